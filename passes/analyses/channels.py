"""``ChannelDependencies``: which output channels of which linears must be
removed together, found on the graph (never from module names).

A channel of a linear's output (a row of its weight) can be removed when
every value computed from it is either dropped or read only as an input
channel of another linear (a column of its weight). The analysis follows each
linear's output forward, along the last dimension:

* through element-wise ops with one tensor operand (activations, casts,
  scaling by a number or by a constant broadcast along the channels);
* through element-wise ops with two computed operands whose channels are
  tracked (SwiGLU's ``silu(gate(x)) * up(x)``, a GELU written out as
  ``0.5 * x * (1 + tanh(...))``): both sides' channels are tied into one group;
* through ``split`` / ``slice`` of the last dimension (a merged ``gate_up``
  projection): each piece is a range of the producer's rows;
* into linears, whose weight columns are the group's consumers.

Anything else that reads a tracked channel (a view into heads, a norm, a
reduction, an add with an untracked tensor such as the residual stream, a
graph output) stops the walk: the group is refused with the node and the
reason, and no pass may shrink it.

Attention heads are followed by a second walk, anchored on each attention
(``scaled_dot_product_attention``, or the eager ``softmax(q @ k^T) @ v``
chain): backward from q, k and v to the linears that produce them, and
forward from the output to the linear that reads it. A head is removed whole:
query head ``h`` with the key/value head it reads, and under grouped-query
attention a whole key/value group (KV head ``g`` and query heads
``g * group .. (g + 1) * group - 1``). :class:`AttentionHeads` is the result,
one per attention, in :attr:`ChannelDependencies.attentions`:

* ``q``, ``k``, ``v``: :class:`HeadBlock` s of the producers' rows. Head
  ``h`` of q owns rows ``q.offset + h * q.stride .. + q.stride`` and reads
  ``q.channels`` of them; KV head ``g`` of k / v likewise. Usually each block
  is one head's rows, read whole (a merged QKV projection split before the
  view into heads gives three regions of one producer; its ``split``/``slice``
  nodes are in :attr:`ChannelDependencies.pieces`); a projection laid out head
  by head (GPT-NeoX: ``[q | k | v]`` of head 0, then of head 1, ...) gives q,
  k and v one shared block per head, each reading its own channels, and
  removing a head removes its block. :meth:`AttentionHeads.q_rows`,
  :meth:`~AttentionHeads.k_rows`, :meth:`~AttentionHeads.v_rows` and
  :meth:`~AttentionHeads.columns` give the row / column indices a set of KV
  groups reads;
* ``num_heads``, ``num_kv_heads``, ``head_dim``, ``v_head_dim``, ``group``
  (query heads per KV head);
* ``consumers``: the linears reading the merged output; head ``h`` is their
  input columns ``h * v_head_dim .. + v_head_dim``;
* ``shape_edits``: the view / reshape / expand shape entries that count heads
  (:class:`ShapeEdit`: entry ``index`` of ``node.args[1]`` is
  ``count * factor``, ``count`` the query or the KV head count); entries
  written ``-1`` are not listed;
* ``region``: every node between the producers and the consumers. Nothing
  outside it (but ``sym_size`` and the cache outputs below) reads a value in it;
* ``cache_inputs`` / ``cache_outputs`` (:class:`CacheTensor`): a generation
  step's key/value cache. An input is a graph input concatenated with the new
  keys or values along the positions (``cat([past, k], -2)``), read by nothing
  else; an output is keys or values (never queries, and before ``repeat_kv``)
  that the graph returns (the prefill's ``present``, the decode step's
  ``concat(past, new)``). They carry the KV heads as k and v do: a
  tensor-parallel split divides them with the heads
  (:meth:`ChannelDependencies.splittable_attentions`); shrink leaves such an
  attention alone, since removing heads would change the model's inputs and
  outputs.

The walk goes through transposes and permutes, the view into heads
``[B, S, H, D]`` and the merge back, element-wise ops whose other operand is
broadcast along the head axis (rotary embeddings' ``cos`` / ``sin``, scales,
masks; a soft cap's ``tanh`` of the scores), reductions within each head
that keep their dimensions (a norm of each head's channels: Qwen3's
``q_norm``), slices, splits and concatenations of the head dimension
(``rotate_half``, a head's block split into q, k and v: each value's
channels are followed to the block channels they read),
``repeat_kv`` (``unsqueeze``, ``expand``, ``clone``, ``reshape``),
``enable_gqa``, a split of the head axis into query, key and value heads
(Falcon-7B), heads grouped into a block per KV group and picked out of it
(Falcon-40B, InternLM2: ``[B, S, groups, slots, D]``, its query heads sliced
and merged, its key and value heads selected), and a part every head shares: one head expanded to all of them
(DeepSeek's rotary key part), written with the heads' own part into an empty
buffer (``new_empty``, ``slice_scatter``); it reads no head's rows, and its
projection stays whole. An operand no projection computes with its own value per
head (ALiBi's slopes, T5's and MPNet's relative position bias, a mask per
head) is a :class:`HeadOperand` in ``head_operands``: a split or a shrink
selects its heads where it is read. Anything else refuses the attention
(``refused`` names the node): such an operand within ``repeat_kv``, a graph input that
joins the queries or is read other than by its concatenation, a value in the
region read from outside it (a graph output of queries), fxopt's fused
attention ops (shrink and split before ``fuse-attention`` / ``pack-attention``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx

from ...ir.nodes import module_path, size_expr
from ..analysis import Analysis

aten = torch.ops.aten

# Element-wise ops of one tensor operand (other arguments are numbers).
_UNARY = {
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default, aten.erf.default,
    aten.exp.default, aten.neg.default, aten.abs.default, aten.pow.Tensor_Scalar, aten.clone.default, aten._to_copy.default,
    aten.hardtanh.default, aten.leaky_relu.default, aten.elu.default, aten.gelu.default, aten.sqrt.default, aten.rsqrt.default,
}
# Element-wise ops of two operands (tensor or number).
_BINARY = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.add.Scalar,
           aten.sub.Scalar, aten.div.Scalar, aten.maximum.default, aten.minimum.default, aten.max.other,
           aten.min.other}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}
# Reductions ``(x, dims, keepdim)``: within a head when ``dims`` leave its axis out (a norm of
# each head's channels: Qwen3's and Gemma 3's q_norm / k_norm).
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}


@dataclass(frozen=True)
class Span:
    """Rows ``offset .. offset + size`` of ``producer``'s weight (its output channels)."""

    producer: fx.Node
    offset: int
    size: int


@dataclass
class ChannelGroup:
    """Channels removed together: channel ``c`` of the group is row
    ``span.offset + c`` of every span's producer, column ``c`` of every
    consumer linear, and entry ``c`` along the last dimension of every
    constant operand."""

    size: int
    spans: list[Span] = field(default_factory=list)
    consumers: list[fx.Node] = field(default_factory=list)
    constants: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # (element-wise user, constant operand)
    refused: str | None = None  # why the group cannot be shrunk (names the node)

    @property
    def name(self) -> str:
        return "+".join(dict.fromkeys(f"{module_path(s.producer)}[{s.offset}:{s.offset + s.size}]" for s in self.spans))


@dataclass
class ChannelDependencies:
    """The analysis result: every group, and each split/slice of a producer's
    output with the spans of its pieces (a shrink rewrites their sizes)."""

    groups: list[ChannelGroup]
    pieces: dict[fx.Node, list[Span]]
    attentions: list["AttentionHeads"] = field(default_factory=list)

    def shrinkable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.refused is None]

    def shrinkable_attentions(self) -> list["AttentionHeads"]:
        """Attentions whose heads can be removed: followed whole, and not
        reaching a key/value cache (removing heads there would change the
        model's inputs and outputs)."""
        return [a for a in self.attentions if a.refused is None and not a.has_cache]

    def splittable_attentions(self) -> list["AttentionHeads"]:
        """Attentions whose heads can be divided among ranks: followed whole;
        a key/value cache they read or return is divided with them."""
        return [a for a in self.attentions if a.refused is None]

    def refused(self, *, cache: bool = False) -> dict[str, str]:
        """Why each group or attention cannot be shrunk (with ``cache``:
        split by heads), by name. A group of q/k/v channels that an attention
        the walk followed covers (its walk stops at the view into heads) is
        not listed: the attention is, if its heads cannot go."""
        spans = [s for a in self.splittable_attentions() for s in (a.q, a.k, a.v)]

        def covered(g):
            return all(any(s.producer is t.producer and t.offset <= s.offset and s.offset + s.size <= t.offset + t.size
                           for t in spans) for s in g.spans)

        out = {g.name: g.refused for g in self.groups if g.refused is not None and not covered(g)}
        out.update({a.name: a.refused for a in self.attentions if a.refused is not None})
        if not cache:
            out.update({a.name: f"its heads reach the key/value cache {_cache_names(a)}: removing them would change "
                                "the model's inputs and outputs" for a in self.attentions if a.refused is None and a.has_cache})
        return out

    def group_of(self, span: Span) -> ChannelGroup | None:
        return next((g for g in self.groups if span in g.spans), None)


class _Walk:
    """The forward walk from one linear's output."""

    def __init__(self, graph, producer: fx.Node):
        self.graph = graph
        self.producer = producer
        self.leaves: list[Span] = []
        self.children: dict[Span, list[Span]] = {}  # a span split into pieces
        self.pieces: dict[fx.Node, list[Span]] = {}
        self.arrivals: list[tuple[fx.Node, fx.Node, Span]] = []  # (two-operand op, operand, span)
        self.consumers: dict[Span, list[fx.Node]] = {}
        self.constants: dict[Span, list[tuple[fx.Node, fx.Node]]] = {}
        self.refusals: dict[Span, str] = {}

    def run(self) -> None:
        n = self.graph.constant(self.producer.args[1]).shape[0]
        self._follow(self.producer, Span(self.producer, 0, n), set())
        for span in list(self.children):  # read whole and in pieces: refuse the whole
            if span in self.leaves:
                self.leaves.remove(span)

    def refuse(self, span: Span, node: fx.Node, why: str) -> None:
        self.refusals.setdefault(span, f"node {node.name!r} ({node.target}): {why}")

    def _follow(self, node: fx.Node, span: Span, seen: set) -> None:
        if span not in self.leaves:
            self.leaves.append(span)
        for user in node.users:
            if (user, node, span) not in seen:
                seen.add((user, node, span))
                self._step(node, user, span, seen)

    def _step(self, node: fx.Node, user: fx.Node, span: Span, seen: set) -> None:
        t = user.target
        if user.op != "call_function":
            return self.refuse(span, user, "a graph output reads the channels")
        if t == aten.linear.default:
            if user.args[0] is node and all(a is not node for a in user.args[1:]) and self.graph.constant(user.args[1]) is not None:
                self.consumers.setdefault(span, []).append(user)
                return None
            return self.refuse(span, user, "read as a weight or bias, or by a linear whose weight is not a constant")
        if t in _UNARY and user.args[0] is node and not any(isinstance(a, fx.Node) for a in list(user.args[1:]) + list(user.kwargs.values())):
            return self._follow(user, span, seen)
        if t == aten.unsqueeze.default and not _is_last_dim(user, 1, default=0, of_output=True):
            return self._follow(user, span, seen)  # GPT-BigCode's [B, S, C] -> [B, 1, S, C]
        if t in _BINARY and len(user.args) == 2 and not user.kwargs:
            other = user.args[1] if user.args[0] is node else user.args[0]
            const = self.graph.constant(other) if isinstance(other, fx.Node) else None
            if other is node or not isinstance(other, fx.Node) or (const is not None and (const.dim() == 0 or const.shape[-1] == 1)):
                return self._follow(user, span, seen)
            if const is not None:
                if const.shape[-1] == span.size:
                    self.constants.setdefault(span, []).append((user, other))
                    return self._follow(user, span, seen)
                return self.refuse(span, user, f"a constant of shape {tuple(const.shape)} does not broadcast along the channels")
            self.arrivals.append((user, node, span))
            return self._follow(user, span, seen)
        if t in _SPLITS and user.args[0] is node and _is_last_dim(user, 2, default=0):
            sizes = _split_sizes(user, span.size)
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            pieces = [Span(span.producer, span.offset + a, b) for a, b in zip(starts, sizes)]
            self.children[span] = pieces
            self.pieces[user] = pieces
            for item in user.users:
                if item.target is not operator.getitem:
                    return self.refuse(span, user, "a split read other than by indexing")
            for item in user.users:
                self._follow(item, pieces[item.args[1]], seen)
            return None
        if t == aten.slice.Tensor and user.args[0] is node and _is_last_dim(user, 1, default=0):
            start = user.args[2] if len(user.args) > 2 and user.args[2] is not None else 0
            end = user.args[3] if len(user.args) > 3 and user.args[3] is not None else span.size
            step = user.args[4] if len(user.args) > 4 else 1
            if not (isinstance(start, int) and isinstance(end, int) and step == 1 and 0 <= start < min(end, span.size)):
                return self.refuse(span, user, "a slice with symbolic or negative bounds or a step")
            piece = Span(span.producer, span.offset + start, min(end, span.size) - start)
            self.children.setdefault(span, []).append(piece)
            self.pieces[user] = [piece]
            return self._follow(user, piece, seen)
        return self.refuse(span, user, "the analysis cannot follow channels through this op")


def _is_last_dim(user: fx.Node, index: int, default: int, of_output: bool = False) -> bool:
    dim = user.args[index] if len(user.args) > index else user.kwargs.get("dim", default)
    val = (user if of_output else user.args[0]).meta.get("val")
    return isinstance(dim, int) and isinstance(val, torch.Tensor) and dim % val.dim() == val.dim() - 1


def _split_sizes(user: fx.Node, size: int) -> list[int]:
    if user.target == aten.split_with_sizes.default:
        return [int(s) for s in user.args[1]]
    step = int(user.args[1])
    return [min(step, size - s) for s in range(0, size, step)]


class ChannelAnalysis(Analysis):
    """Groups of linear output channels that must be removed together, and
    the heads of every attention (:class:`ChannelDependencies`); a group or
    attention the walk cannot follow carries the node that stopped it."""

    name = "ChannelDependencies"

    def run(self, graph) -> ChannelDependencies:
        walks = []
        for node in graph.fx.nodes:
            if node.op == "call_function" and node.target == aten.linear.default:
                w = graph.constant(node.args[1])
                if w is not None and w.dim() == 2:
                    walk = _Walk(graph, node)
                    walk.run()
                    walks.append(walk)
        parent: dict[Span, Span] = {}

        def find(s: Span) -> Span:
            parent.setdefault(s, s)
            while parent[s] != s:
                parent[s] = parent[parent[s]]
                s = parent[s]
            return s

        refusals: dict[Span, str] = {}
        arrivals: dict[fx.Node, list[tuple[fx.Node, Span]]] = {}
        for walk in walks:
            for user, operand, span in walk.arrivals:
                arrivals.setdefault(user, []).append((operand, span))
            for span, why in walk.refusals.items():
                # a refused span refuses every piece cut from it
                for s in _descendants(walk.children, span):
                    refusals.setdefault(s, why)
        # Two-operand element-wise ops tie the spans arriving on each side, if both sides carry channels.
        for user, arrived in arrivals.items():
            operands = {id(a) for a in user.args if isinstance(a, fx.Node) and graph.constant(a) is None}
            if {id(o) for o, _ in arrived} != operands:
                why = (f"node {user.name!r} ({user.target}): the other operand carries no linear's channels "
                       "(a residual stream, a norm), so they cannot be removed on one side only")
                for _, s in arrived:
                    refusals.setdefault(s, why)
            for _, s in arrived[1:]:
                parent[find(s)] = find(arrived[0][1])
        groups: dict[Span, ChannelGroup] = {}
        pieces: dict[fx.Node, list[Span]] = {}
        for walk in walks:
            pieces.update(walk.pieces)
            for span in walk.leaves:
                group = groups.setdefault(find(span), ChannelGroup(span.size))
                if span not in group.spans:
                    group.spans.append(span)
                if span.size != group.size:
                    group.refused = group.refused or f"ranges of {span.size} and {group.size} channels meet element-wise"
                group.consumers += [c for c in walk.consumers.get(span, []) if c not in group.consumers]
                group.constants += [c for c in walk.constants.get(span, []) if c not in group.constants]
                if span in refusals:
                    group.refused = group.refused or refusals[span]
        return ChannelDependencies(list(groups.values()), pieces, find_attention_heads(graph))


def _cache_names(attn) -> str:
    names = [c.node.name for c in attn.cache_inputs] + [f"output {c.node.name}" for c in attn.cache_outputs]
    return "(" + ", ".join(names) + ")"


def _descendants(children: dict[Span, list[Span]], span: Span) -> list[Span]:
    out, work = [], [span]
    while work:
        s = work.pop()
        out.append(s)
        work.extend(children.get(s, []))
    return out


# -- attention heads ----------------------------------------------------------------------

SDPA = aten.scaled_dot_product_attention.default
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_SAME = {aten.clone.default, aten._to_copy.default, aten.alias.default, aten.neg.default, aten.contiguous.default}


@dataclass(frozen=True)
class ShapeEdit:
    """Entry ``index`` of the shape list ``node.args[1]`` (a view, reshape or
    expand) is ``count * factor``: ``count`` the query heads (``kind='q'``) or
    the key/value heads (``kind='kv'``)."""

    node: fx.Node
    index: int
    kind: str
    factor: int


@dataclass(frozen=True)
class HeadOperand:
    """Operand ``index`` of ``user`` (a position in its args, or the name of a
    keyword) holds one value per head along its axis ``axis``, counting the
    heads of ``kind`` ('q' or 'kv'); no projection computes it. Keeping some
    heads means reading only theirs: ``index_select`` along ``axis``."""

    user: fx.Node
    index: int | str
    axis: int
    kind: str

    @property
    def node(self) -> fx.Node:
        return self.user.args[self.index] if isinstance(self.index, int) else self.user.kwargs[self.index]


@dataclass(frozen=True)
class CacheTensor:
    """A key/value cache tensor of an attention: a graph input concatenated
    with the new keys or values, or a graph output returning them. Its heads
    lie along ``axis``; ``kind`` says what counts them ('kv': the key/value
    heads, 'q': as many as the query heads, without grouped-query attention)."""

    node: fx.Node
    axis: int
    kind: str


@dataclass(frozen=True)
class HeadBlock:
    """Where one of q, k, v finds its heads in a projection's weight. The
    rows come in blocks of ``stride``, block ``b`` from row ``offset + b *
    stride``, each holding ``len(slots)`` heads: head ``h`` lies in block
    ``h // len(slots)`` from its row ``slots[h % len(slots)]`` and reads the
    rows ``channels`` from there. Usually a block is one head's rows, read
    whole; q, k and v may share blocks (GPT-NeoX lays its QKV projection out
    head by head, ``[q | k | v]`` in one block of three head widths per head;
    Falcon-40B's and InternLM2's hold a KV group each, its query heads, its
    key and its value head). Removing a head removes its block, so a block
    with several heads goes whole. ``size``: the rows of every block."""

    producer: fx.Node
    offset: int
    size: int
    stride: int
    channels: tuple[int, ...]
    slots: tuple[int, ...] = (0,)

    def rows(self, heads) -> torch.Tensor:
        """The blocks of ``heads``: what removing them removes."""
        blocks = list(dict.fromkeys(h // len(self.slots) for h in heads))
        return _head_rows(self.offset, blocks, self.stride, range(self.stride))

    def read_rows(self, heads) -> torch.Tensor:
        """The rows ``heads`` read."""
        p = len(self.slots)
        return torch.tensor([self.offset + (h // p) * self.stride + self.slots[h % p] + c
                             for h in heads for c in self.channels], dtype=torch.long)

    def block_reads(self) -> set[int]:
        """The rows of one block its heads read."""
        return {slot + c for slot in self.slots for c in self.channels}

    def shares_block(self, other: "HeadBlock") -> bool:
        return (self.producer, self.offset, self.stride) == (other.producer, other.offset, other.stride)


@dataclass(frozen=True)
class _Source:
    """What the backward walk knows of one value: its heads are the blocks of
    ``stride`` rows of ``span.producer`` from row ``span.offset``, each repeated
    ``rep`` times (``repeat_kv``). Along axis ``caxis`` entry ``i`` reads the
    block's channels ``entries[i]``; where the walk cannot tell entries apart
    (``caxis`` None) every entry may read any of ``reads``. ``span`` None: the
    value reads no head's rows (one value shared by every head, or an empty
    buffer about to be filled). ``slots``: the heads along a second axis
    (``rep_axis``) are distinct heads of the block, not repeats, starting at
    these rows of it (Falcon-40B's query heads of a KV group)."""

    span: Span | None
    stride: int
    rep: int
    reads: frozenset
    caxis: int | None = None
    entries: tuple | None = None
    slots: tuple[int, ...] | None = None

    def blurred(self) -> "_Source":
        return replace(self, caxis=None, entries=None)

    def moved(self, caxis: int | None) -> "_Source":
        return self.blurred() if caxis is None or self.caxis is None else replace(self, caxis=caxis)

    def taken(self, index) -> "_Source":
        """Entries ``index`` along the channel axis (a slice or a split's piece)."""
        entries = tuple(self.entries[i] for i in index)
        return replace(self, entries=entries, reads=frozenset().union(*entries))

    @staticmethod
    def heads_of(span: Span, width: int, nd: int, slots: int | None = None) -> "_Source":
        """Heads made from ``span``'s rows: one per block of ``width`` channels,
        or blocks of ``slots`` heads (along the axis after the head axis); the
        channels along the last of ``nd`` axes, every entry reading its own."""
        return _Source(span, (slots or 1) * width, 1, frozenset(range(width)), nd - 1,
                       tuple(frozenset((c,)) for c in range(width)),
                       None if slots is None else tuple(j * width for j in range(slots)))

    @staticmethod
    def shared(shape: tuple) -> "_Source":
        """A value of ``shape`` that no head's rows make: each entry along the
        last axis reads nothing."""
        width = _static(shape[-1])
        return _Source(None, 0, 1, frozenset(), None if width is None else len(shape) - 1,
                       None if width is None else (frozenset(),) * width)


@dataclass
class AttentionHeads:
    """The heads of one attention and every node that depends on them (see
    the module docstring). ``refused`` names the node that stops the walk;
    the other fields are then incomplete."""

    node: fx.Node
    q: HeadBlock | None = None
    k: HeadBlock | None = None
    v: HeadBlock | None = None
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    v_head_dim: int = 0
    consumers: list[fx.Node] = field(default_factory=list)
    shape_edits: list[ShapeEdit] = field(default_factory=list)
    region: set = field(default_factory=set)
    refused: str | None = None
    # the key/value cache read from graph inputs and returned as graph outputs (generation's decode step)
    cache_inputs: list[CacheTensor] = field(default_factory=list)
    cache_outputs: list[CacheTensor] = field(default_factory=list)
    head_operands: list[HeadOperand] = field(default_factory=list)

    @property
    def has_cache(self) -> bool:
        return bool(self.cache_inputs or self.cache_outputs)

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def name(self) -> str:
        if self.q is None:
            return self.node.name
        return "+".join(dict.fromkeys(f"{module_path(s.producer)}[{s.offset}:{s.offset + s.size}]" for s in (self.q, self.k, self.v)))

    def query_heads(self, kv_groups) -> list[int]:
        """The query heads of KV groups ``kv_groups``."""
        return [g * self.group + j for g in kv_groups for j in range(self.group)]

    def q_rows(self, kv_groups) -> torch.Tensor:
        """The query rows KV groups ``kv_groups`` read (``k_rows``, ``v_rows``: key and value rows)."""
        return self.q.read_rows(self.query_heads(kv_groups))

    def k_rows(self, kv_groups) -> torch.Tensor:
        return self.k.read_rows(kv_groups)

    def v_rows(self, kv_groups) -> torch.Tensor:
        return self.v.read_rows(kv_groups)

    def columns(self, kv_groups) -> torch.Tensor:
        """The consumers' input columns that read KV groups ``kv_groups``."""
        return _head_rows(0, self.query_heads(kv_groups), self.v_head_dim, range(self.v_head_dim))

    def count(self, kind: str, kv_groups: int) -> int:
        """Heads of ``kind`` ('q' or 'kv') left when ``kv_groups`` groups are kept."""
        return kv_groups * (self.group if kind == "q" else 1)


def _head_rows(offset: int, heads: list[int], stride: int, channels) -> torch.Tensor:
    return torch.tensor([offset + h * stride + c for h in heads for c in channels], dtype=torch.long)


class _Refuse(Exception):
    def __init__(self, node: fx.Node, why: str):
        super().__init__(f"node {node.name!r} ({node.target}): {why}")


def _shape(node) -> tuple:
    """The node's sizes, a symbolic one as its expression: comparing or
    converting a ``SymInt`` would add a guard to the graph's shape environment
    (``s53 == 8`` holds for the traced example) and specialize the dimension
    for every later pass and the export."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        raise _Refuse(node, "no shape metadata")
    return tuple(size_expr(d) for d in v.shape)


def _dim(d: int, nd: int) -> int:
    return d % nd


def _static(x) -> int | None:
    """A size from :func:`_shape` as an int, None when it is symbolic."""
    if isinstance(x, int):
        return x
    return int(x) if getattr(x, "is_Integer", False) else None


class _HeadWalk:
    """Backward from one attention's q, k, v, forward from its output."""

    def __init__(self, graph, computed: set):
        self.graph = graph
        self.computed = computed  # nodes that depend on some linear's output
        self.region: set = set()
        self.edits: list[ShapeEdit] = []
        self.memo: dict = {}
        self.role = "q"  # which of q, k, v the backward walk is on
        # node -> {(role, axis, kind, rep_axis)}: how each value on the walk carries heads
        self.carriers: dict[fx.Node, set] = {}
        self.cache_inputs: list[CacheTensor] = []
        self.head_operands: list[HeadOperand] = []

    # -- backward: a value that carries heads along ``axis`` ----------------------------
    def back(self, node: fx.Node, axis: int, kind: str, rep_axis: int | None = None) -> _Source:
        key = (node, axis, kind, rep_axis)
        self.carriers.setdefault(node, set()).add((self.role, axis, kind, rep_axis))
        if key not in self.memo:
            self.memo[key] = self._back(node, axis, kind, rep_axis)
        return self.memo[key]

    def _back(self, node, axis, kind, rep_axis) -> _Source:
        """Where the heads of ``node`` come from, and which channels of each
        head's block its entries read."""
        if node.op != "call_function":
            raise _Refuse(node, "heads read from a graph input (a key/value cache?) cannot be removed")
        self.region.add(node)
        t, shape = node.target, _shape(node)
        nd = len(shape)
        a0 = node.args[0] if node.args else None
        if t == aten.transpose.int:
            d0, d1 = _dim(node.args[1], nd), _dim(node.args[2], nd)
            swap = {d0: d1, d1: d0}
            found = self.back(a0, swap.get(axis, axis), kind, None if rep_axis is None else swap.get(rep_axis, rep_axis))
            return found.moved(None if found.caxis is None else swap.get(found.caxis, found.caxis))
        if t == aten.permute.default:
            perm = [_dim(p, nd) for p in node.args[1]]
            found = self.back(a0, perm[axis], kind, None if rep_axis is None else perm[rep_axis])
            return found.moved(None if found.caxis is None else perm.index(found.caxis))
        if t in _SAME or (t in _UNARY and not any(isinstance(a, fx.Node) for a in node.args[1:])):
            return self.back(a0, axis, kind, rep_axis)
        if t in _BINARY or t == aten.masked_fill.Scalar:
            return self._back_elementwise(node, shape, axis, kind, rep_axis)
        if t == aten.slice.Tensor:
            d = _dim(node.args[1] if len(node.args) > 1 else 0, nd)
            if d == axis:
                raise _Refuse(node, "a slice of the head axis")
            found = self.back(a0, axis, kind, rep_axis)
            if d == rep_axis:  # some of the heads of each block (Falcon-40B's query heads of a KV group)
                bounds = node.args[2:5]
                if found.slots is None or not all(x is None or isinstance(x, int) for x in bounds):
                    raise _Refuse(node, "a slice of repeated key/value heads, or with symbolic bounds")
                return replace(found, slots=found.slots[slice(*bounds)])
            if d != found.caxis:
                return found
            n = len(found.entries)
            start, end, step = (list(node.args[2:5]) + [None] * 3)[:3]
            if not all(x is None or isinstance(x, int) for x in (start, end, step)):
                return found.blurred()
            return found.taken(range(n)[slice(start, end, step)])
        if t is operator.getitem and isinstance(a0, fx.Node) and a0.target in _SPLITS:
            self.region.add(a0)
            d = _dim(a0.args[2] if len(a0.args) > 2 else a0.kwargs.get("dim", 0), nd)
            if d == axis and rep_axis is None:
                return self._back_head_split(node, axis, kind)
            if d in (axis, rep_axis):
                raise _Refuse(a0, "a split of the head axis")
            found = self.back(a0.args[0], axis, kind, rep_axis)
            if d != found.caxis:
                return found
            sizes = _split_sizes(a0, len(found.entries))
            start = sum(sizes[: node.args[1]])
            return found.taken(range(start, start + sizes[node.args[1]]))
        if t == aten.select.int and rep_axis is None and _dim(node.args[1], nd + 1) == axis + 1:
            return self._back_select_slot(node, axis, kind)
        if t == aten.cat.default:
            dim = _dim(node.args[1] if len(node.args) > 1 else 0, nd)
            if dim in (axis, rep_axis):
                raise _Refuse(node, "a concatenation along the head axis")
            computed = [x for x in node.args[0] if x in self.computed]
            cached = [x for x in node.args[0] if x not in self.computed]
            if not computed or any(x.op != "placeholder" for x in cached):
                raise _Refuse(node, "a concatenation with a tensor that no projection computes and no graph input holds")
            for x in cached:
                self._cache_input(x, node, axis, kind, rep_axis)
            return self._merge([self.back(x, axis, kind, rep_axis) for x in computed], node, concat=dim)
        if t == aten.stack.default:  # GPT-J's rotate_every_two: stack((-x[..., 1::2], x[..., ::2]), -1)
            d = _dim(node.args[1] if len(node.args) > 1 else 0, nd)
            if d in (axis, rep_axis) or any(x not in self.computed for x in node.args[0]):
                raise _Refuse(node, "a stack along the head axis, or of a tensor no projection computes")
            inner = (axis - (axis > d), None if rep_axis is None else rep_axis - (rep_axis > d))
            return self._merge([self.back(x, inner[0], kind, inner[1]) for x in node.args[0]], node).blurred()
        if t == aten.unsqueeze.default:
            d = _dim(node.args[1], nd)
            if d == axis and rep_axis is None and d != nd - 1:
                # one head of the whole width (GPT-BigCode's multi-query keys and values: [B, S, C] -> [B, 1, S, C])
                width = _static(shape[-1])
                if width is None:
                    raise _Refuse(node, "a head of symbolic width")
                return _Source.heads_of(self._flat_back(a0, 0), width, nd)
            if d == axis:
                raise _Refuse(node, "an unsqueeze at the head axis")
            if d == rep_axis:  # repeat_kv's new axis: the repeat was counted at its expand
                found = self.back(a0, axis - (axis > d), kind, None)
            else:
                found = self.back(a0, axis - (axis > d), kind, None if rep_axis is None else rep_axis - (rep_axis > d))
            return found.moved(None if found.caxis is None else found.caxis + (found.caxis >= d))
        if t == aten.expand.default:
            return self._back_expand(node, shape, axis, kind, rep_axis)
        if t == aten.new_empty.default and rep_axis is None:  # a buffer the heads are written into
            self._edit(node, axis, kind, 1)
            return _Source.shared(shape)
        if t == aten.copy.default:  # the values of args[1], in the layout of args[0]
            return self._merge([self.back(x, axis, kind, rep_axis) for x in node.args[:2]], node)
        if t == aten.slice_scatter.default:
            return self._back_slice_scatter(node, axis, kind, rep_axis)
        if t in _VIEWS:
            return self._back_view(node, shape, axis, kind, rep_axis)
        if t in _REDUCTIONS:
            return self._back_reduction(node, axis, kind, rep_axis)
        raise _Refuse(node, "the analysis cannot follow attention heads through this op")

    def _back_slice_scatter(self, node, axis, kind, rep_axis) -> _Source:
        """``slice_scatter(base, src, dim, start, end)``: base with entries
        ``start .. end`` along ``dim`` replaced by src (DeepSeek's keys: the
        per-head part and the shared rotary part written into one buffer)."""
        nd = len(_shape(node))
        base, src = node.args[:2]
        dim = _dim(node.args[2] if len(node.args) > 2 else 0, nd)
        start, end, step = (list(node.args[3:6]) + [None] * 3)[:3]
        if dim in (axis, rep_axis):
            raise _Refuse(node, "a scatter into the head axis")
        b, u = self.back(base, axis, kind, rep_axis), self.back(src, axis, kind, rep_axis)
        merged = self._merge([b.blurred(), u.blurred()], node)
        if dim != b.caxis or dim != u.caxis or None in (b.entries, u.entries) or step not in (None, 1) \
                or not all(x is None or isinstance(x, int) for x in (start, end)):
            return merged
        index = range(len(b.entries))[slice(start, end)]
        if len(index) != len(u.entries):
            return merged
        entries = b.entries[:index.start] + u.entries + b.entries[index.stop:]
        return replace(merged, caxis=dim, entries=entries, reads=frozenset().union(*entries))

    def _back_select_slot(self, node, axis, kind) -> _Source:
        """One head of each block, the blocks along ``axis`` and their heads
        along the next axis (Falcon-40B's key head of each KV group:
        ``qkv[:, :, :, -2]`` of ``[B, S, groups, slots, D]``)."""
        found = self.back(node.args[0], axis, kind, axis + 1)
        if found.slots is None or not isinstance(node.args[2], int):
            raise _Refuse(node, "a select of repeated key/value heads, or at a computed index")
        start = found.slots[node.args[2]]
        shift = lambda chans: frozenset(start + c for c in chans)  # noqa: E731
        caxis = None if found.caxis is None else found.caxis - (found.caxis > axis + 1)
        return replace(found, slots=None, reads=shift(found.reads), caxis=caxis,
                       entries=None if found.entries is None else tuple(shift(e) for e in found.entries))

    def _back_head_split(self, piece, axis, kind) -> _Source:
        """A piece of a split of the head axis: Falcon's ``[B, S, H + 2, D]``
        split into ``H`` query heads, one key and one value head. The piece's
        heads are blocks further into the projection; its size counts them."""
        split, index = piece.args[0], piece.args[1]
        head_view = split.args[0]
        while head_view.target in _SAME or head_view.target == aten.transpose.int:
            head_view = head_view.args[0]
        if split.target != aten.split_with_sizes.default or head_view.target not in _VIEWS \
                or _shape(head_view)[-2] != _shape(split.args[0])[axis] or head_view.args[1][-2] != -1:
            raise _Refuse(split, "a split of the head axis other than into pieces of a view into heads whose count "
                                 "is left to the view (-1)")
        found = self.back(split.args[0], axis, kind, None)
        if found.span is None:
            raise _Refuse(split, "a split of heads that no projection's rows make")
        self._edit(split, index, kind, 1)
        start = sum(int(x) for x in split.args[1][:index])
        return replace(found, span=Span(found.span.producer, found.span.offset + start * found.stride, 0))

    def _back_reduction(self, node, axis, kind, rep_axis):
        """A reduction that keeps its dimensions and leaves the head axis
        (and a repeat's axis) out: each head's result reads that head only."""
        src = node.args[0]
        nd = len(_shape(src))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if not keepdim or dims is None or len(_shape(node)) != nd:
            raise _Refuse(node, "a reduction that drops dimensions")
        reduced = {_dim(d, nd) for d in ([dims] if isinstance(dims, int) else dims)}
        if not reduced or reduced & {axis, rep_axis}:
            raise _Refuse(node, "a reduction across the heads")
        found = self.back(src, axis, kind, rep_axis)
        return replace(found, entries=(found.reads,)) if found.caxis in reduced else found

    def _cache_input(self, past: fx.Node, cat: fx.Node, axis: int, kind: str, rep_axis) -> None:
        """``past``, a graph input concatenated with a projection's keys or
        values (along the positions), is a key/value cache: it carries the
        same heads along the same axis, and nothing else reads it."""
        if self.role == "q" or rep_axis is not None:
            raise _Refuse(cat, f"graph input {past.name!r} joins the queries, or keys already repeated for the query heads")
        s, shape = _shape(past), _shape(cat)
        if _dim(cat.args[1] if len(cat.args) > 1 else 0, len(shape)) == len(shape) - 1:
            raise _Refuse(cat, f"graph input {past.name!r} joins along the channels of each head, not the positions")
        if len(s) != len(shape) or s[axis] != shape[axis]:
            raise _Refuse(cat, f"graph input {past.name!r} of shape {s} does not carry the heads along axis {axis}")
        others = [u for u in past.users if u is not cat and u.target != aten.sym_size.int]
        if others:
            raise _Refuse(others[0], f"reads the key/value cache input {past.name!r} besides its concatenation")
        self.cache_inputs.append(CacheTensor(past, axis, kind))

    def cache_output(self, value: fx.Node) -> "CacheTensor | None":
        """``value``, read by the graph output, as a key/value cache: keys or
        values (never queries) not yet repeated for the query heads."""
        ways = self.carriers.get(value, set())
        if len(ways) != 1:
            return None
        ((role, axis, kind, rep_axis),) = ways
        return CacheTensor(value, axis, kind) if role in ("k", "v") and rep_axis is None else None

    def _merge(self, sources: list[_Source], node, concat: int | None = None) -> _Source:
        """One source for the values an op combines: element-wise (each entry
        reads what the operands' entries there read), or concatenated along
        axis ``concat``."""
        first = next((s for s in sources if s.span is not None), sources[0])
        if any((s.span, s.stride, s.rep, s.slots) != (first.span, first.stride, first.rep, first.slots)
               for s in sources if s.span is not None):
            raise _Refuse(node, "operands carry heads of different projections")
        reads = frozenset().union(*(s.reads for s in sources))
        if any(s.caxis != first.caxis or s.entries is None for s in sources):
            return replace(first, reads=reads).blurred()
        if concat == first.caxis:
            return replace(first, reads=reads, entries=sum((s.entries for s in sources), ()))
        n = max(len(s.entries) for s in sources)
        if any(len(s.entries) not in (1, n) for s in sources):
            return replace(first, reads=reads).blurred()
        entries = tuple(frozenset().union(*(s.entries[i % len(s.entries)] for s in sources)) for i in range(n))
        return replace(first, reads=reads, entries=entries)

    def _back_elementwise(self, node, shape, axis, kind, rep_axis):
        nd = len(shape)
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        tracked = [a for a in operands if a in self.computed]
        for a in operands:
            s = _shape(a)
            for ax in (axis, rep_axis):
                if ax is None:
                    continue
                aligned = ax - (nd - len(s))
                if a in tracked and (len(s) != nd or s[ax] != shape[ax]):
                    raise _Refuse(node, f"operand {a.name!r} of shape {s} does not carry the heads along axis {ax}")
                if a not in tracked and aligned >= 0 and s[aligned] != 1:
                    if ax == rep_axis:
                        raise _Refuse(node, f"operand {a.name!r} has its own value per repeated key/value head (shape {s})")
                    self.head_operands.append(HeadOperand(node, node.args.index(a), aligned, kind))
        if node.target == aten.masked_fill.Scalar and node.args[0] not in tracked:
            raise _Refuse(node, "heads used as a mask")
        if not tracked:
            raise _Refuse(node, "no operand carries the heads")
        return self._merge([self.back(a, axis, kind, rep_axis) for a in tracked], node)

    def _back_expand(self, node, shape, axis, kind, rep_axis):
        src = node.args[0]
        s = _shape(src)
        if len(s) == len(shape) and s[axis] == 1 and shape[axis] != 1 and rep_axis is None:
            # one value for every head, from a projection no pair may split (DeepSeek's
            # rotary key part, computed once and read by all heads): each rank keeps it whole
            self._edit(node, axis, kind, 1)
            return _Source.shared(shape)
        if len(s) != len(shape) or s[axis] != shape[axis]:
            raise _Refuse(node, "an expand that broadcasts along the head axis")
        self._edit(node, axis, kind, 1)
        if rep_axis is None:
            found = self.back(src, axis, kind, None)
        else:
            rep = _static(shape[rep_axis])
            if s[rep_axis] != 1 or rep is None:
                raise _Refuse(node, "a repeat of key/value heads by a symbolic count")
            found = self.back(src, axis, kind, rep_axis)
            found = replace(found, rep=found.rep * rep)
        return found if found.caxis is None or s[found.caxis] == shape[found.caxis] else found.blurred()

    def _back_view(self, node, shape, axis, kind, rep_axis):
        src = node.args[0]
        s = _shape(src)
        nd = len(shape)
        if s == shape:  # a view to the same shape may still spell the head count out
            found = self.back(src, axis, kind, rep_axis)
            self._edit(node, axis, kind, found.rep if kind == "kv" else 1)  # KV heads times a partial repeat
            return found
        if rep_axis is None and len(s) == nd + 1 and s[:axis] + s[axis + 2:] == shape[:axis] + shape[axis + 1:]:
            # repeat_kv's merge [B, Hkv, n_rep, S, D] -> [B, Hkv * n_rep, S, D]: the entry
            # counts KV heads times the repeat (not the query heads: SDPA's enable_gqa may
            # take a partly repeated key/value)
            found = self.back(src, axis, "kv", axis + 1)
            caxis = None if found.caxis is None else found.caxis - (found.caxis > axis)
            if found.slots is not None:  # not repeats: each block's own heads, merged into the query heads
                self._edit(node, axis, "q", 1)
            else:
                self._edit(node, axis, "kv", found.rep)
            return found.moved(caxis)
        if rep_axis == axis + 1 and len(s) == nd - 1 and s[:axis] == shape[:axis] and s[axis + 1:] == shape[axis + 2:]:
            # heads grouped into blocks: [.., groups * slots, D] -> [.., groups, slots, D] (Falcon-40B's KV groups)
            slots = _static(shape[axis + 1])
            if slots is None:
                raise _Refuse(node, "a group of a symbolic number of heads")
            found = self.back(src, axis, kind, None)
            if found.slots is not None or found.rep != 1:
                raise _Refuse(node, "a grouping of heads already grouped or repeated")
            self._edit(node, axis, kind, 1)
            return replace(found, stride=found.stride * slots, slots=tuple(j * found.stride for j in range(slots)))
        if rep_axis == axis + 1 and axis == nd - 3 and [d for d in s[:-1] if d != 1] == [d for d in shape[:-3] if d != 1]:
            # straight into grouped heads: [.., C] -> [.., groups, slots, D] (InternLM2's wqkv)
            slots, width = _static(shape[-2]), _static(shape[-1])
            if slots is None or width is None:
                raise _Refuse(node, "a view into heads of symbolic size")
            self._edit(node, axis, kind, 1)
            return _Source.heads_of(self._flat_back(src, 0), width, nd, slots)
        if rep_axis is None and axis == nd - 2 and [d for d in s[:-1] if d != 1] == [d for d in shape[:-2] if d != 1]:
            width, heads = _static(shape[-1]), _static(shape[-2])
            if width is None or heads is None or _static(s[-1]) != width * heads:
                raise _Refuse(node, "a view into heads of symbolic size")
            self._edit(node, nd - 2, kind, 1)
            return _Source.heads_of(self._flat_back(src, 0), width, nd)
        if rep_axis is None and axis + 1 < nd and len(s) > axis + 1 and s[:axis + 1] == shape[:axis + 1]:
            # a view within each head, the dimensions up to the head axis as they were
            # (GPT-J's interleaved rotary: [.., H, D / 2, 2] -> [.., H, D])
            found = self.back(src, axis, kind, None)
            self._edit(node, axis, kind, found.rep if kind == "kv" else 1)
            return found.blurred()
        raise _Refuse(node, f"a view {s} -> {shape} that does not split the last dimension into heads")

    def _edit(self, node, index, kind, factor):
        entry = node.args[1][index]
        if isinstance(entry, int) and entry != -1:
            self.edits.append(ShapeEdit(node, index, kind, factor))
        elif isinstance(entry, fx.Node):
            raise _Refuse(node, f"the head count (shape entry {index}) is computed")

    def _flat_back(self, node, offset: int) -> Span:
        """The producer rows behind channel ``offset`` of ``node``'s last dimension."""
        t = node.target
        if t == aten.linear.default:
            w = self.graph.constant(node.args[1])
            if w is None or w.dim() != 2:
                raise _Refuse(node, "a linear whose weight is not a constant matrix")
            return Span(node, offset, int(w.shape[0]) - offset)  # the size is fixed by the caller
        self.region.add(node)
        nd = len(_shape(node))
        if t is operator.getitem and node.args[0].target in _SPLITS:
            split = node.args[0]
            self.region.add(split)
            if not _is_last_dim(split, 2, default=0):
                raise _Refuse(split, "a split that is not along the channels")
            size = _static(_shape(split.args[0])[-1])
            sizes = _split_sizes(split, size)
            return self._flat_back(split.args[0], offset + sum(sizes[: node.args[1]]))
        if t == aten.slice.Tensor and _is_last_dim(node, 1, default=0):
            start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
            step = node.args[4] if len(node.args) > 4 else 1
            if not isinstance(start, int) or start < 0 or step != 1:
                raise _Refuse(node, "a slice with a symbolic or negative start or a step")
            return self._flat_back(node.args[0], offset + start)
        if t in _SAME or (t in _UNARY | _BINARY and not any(isinstance(a, fx.Node) for a in node.args[1:])) or (
                t == aten.unsqueeze.default and _dim(node.args[1], nd) != nd - 1):
            return self._flat_back(node.args[0], offset)
        raise _Refuse(node, "the analysis cannot follow a projection's channels into heads through this op")

    # -- forward: from the attention's output ``[B, H, S, D]`` to the consumers -----------
    def forward(self, node: fx.Node, axis: int, consumers: list) -> None:
        for user in node.users:
            t = user.target
            if user.op != "call_function":
                raise _Refuse(user, "a graph output reads the attention's heads")
            if t == aten.sym_size.int:
                continue
            self.region.add(user)
            shape = _shape(user)
            nd = len(shape)
            if t == aten.transpose.int:
                d0, d1 = _dim(user.args[1], nd), _dim(user.args[2], nd)
                self.forward(user, {d0: d1, d1: d0}.get(axis, axis), consumers)
            elif t == aten.permute.default:
                self.forward(user, [_dim(p, nd) for p in user.args[1]].index(axis), consumers)
            elif t in _SAME and user.args[0] is node:
                self.forward(user, axis, consumers)
            elif t in _VIEWS and _shape(node) == shape:  # Cohere's view of the attention's output to its own shape
                self._edit(user, axis, "q", 1)
                self.forward(user, axis, consumers)
            elif t in _VIEWS and axis == nd - 1 and len(_shape(node)) == nd + 1 and _shape(node)[:-2] == shape[:-1]:
                head = _static(_shape(node)[-1])
                if head is None:
                    raise _Refuse(user, "a merge of heads of symbolic size")
                self._edit(user, nd - 1, "q", head)
                self._flat_forward(user, consumers)
            else:
                raise _Refuse(user, "the analysis cannot follow the attention's heads through this op")

    def _flat_forward(self, node, consumers: list) -> None:
        for user in node.users:
            t = user.target
            if user.op == "call_function" and t == aten.linear.default and user.args[0] is node \
                    and all(a is not node for a in user.args[1:]) and self.graph.constant(user.args[1]) is not None:
                consumers.append(user)
            elif user.op == "call_function" and t in _SAME and user.args[0] is node:
                self.region.add(user)
                self._flat_forward(user, consumers)
            else:
                raise _Refuse(user, "the attention's merged heads are read other than by a linear")


def _computed(graph) -> set:
    """Nodes whose value depends on a linear's output (a size read off one,
    ``sym_size``, does not carry its values)."""
    out: set = set()
    for n in graph.fx.nodes:
        if n.op == "call_function" and n.target != aten.sym_size.int and (
                n.target == aten.linear.default or any(a in out for a in n.all_input_nodes)):
            out.add(n)
    return out


def _attention_inputs(node: fx.Node, walk: _HeadWalk):
    """(q, k, v, q's head axis kind for k/v) of an attention anchor, and the
    nodes between the scores and the probabilities for the eager form."""
    if node.target == SDPA:
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            ms = _shape(mask)
            if mask in walk.computed:
                raise _Refuse(node, "a mask computed from projections")
            if len(ms) >= 3 and ms[-3] != 1:
                walk.head_operands.append(HeadOperand(node, 3 if len(node.args) > 3 else "attn_mask", len(ms) - 3, "q"))
        gqa = bool(node.kwargs.get("enable_gqa", False))
        return (q, 1, 3), (k, 1, 3), (v, 1, 3), "kv" if gqa else "q"
    # eager: matmul(probs, v), probs = softmax(scores) (through casts, masks and scales), scores = q @ kt
    probs, v = node.args
    s = probs
    while s.target not in _SOFTMAX:
        if s.target not in _SAME:
            return None
        walk.region.add(s)
        s = s.args[0]
    if _dim(s.args[1], len(_shape(s))) != len(_shape(s)) - 1:
        raise _Refuse(s, "a softmax that is not over the keys")
    walk.region.add(s)
    s = s.args[0]
    while s.target != aten.matmul.default:
        head_wise = s.target in _BINARY | _SAME or s.target == aten.masked_fill.Scalar or (
            s.target in _UNARY and not any(isinstance(a, fx.Node) for a in s.args[1:]))  # Gemma 2's tanh soft cap
        if s.op != "call_function" or not head_wise:
            raise _Refuse(s, "scores computed by an op the analysis cannot follow")
        walk.region.add(s)
        shape = _shape(s)
        for a in s.args:
            if isinstance(a, fx.Node) and a not in walk.computed:
                ms = _shape(a)
                aligned = 1 - (len(shape) - len(ms))  # the head axis of [B, H, S, T] scores
                if aligned >= 0 and ms[aligned] != 1:
                    walk.head_operands.append(HeadOperand(s, s.args.index(a), aligned, "q"))
        tracked = [a for a in s.args if isinstance(a, fx.Node) and a in walk.computed]
        if len(tracked) != 1:
            raise _Refuse(s, "scores combined with another computed tensor")
        s = tracked[0]
    walk.region.add(s)
    q, kt = s.args
    return (q, 1, 3), (kt, 1, 2), (v, 1, 3), "q"


def _is_eager_attention(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target != aten.matmul.default or len(node.args) != 2:
        return False
    s = node.args[0]
    while isinstance(s, fx.Node) and s.target in _SAME and len(s.users) == 1:
        s = s.args[0]
    return isinstance(s, fx.Node) and s.target in _SOFTMAX and len(_shape(node)) == 4


def _fused_attention_ops() -> set:
    ops = set()
    for name in ("packed_attention", "packed_attention_dynamic_int8", "group_query_attention"):
        op = getattr(torch.ops.fxopt, name, None)
        if op is not None:
            ops.add(op.default)
    return ops


def find_attention_heads(graph) -> list[AttentionHeads]:
    """Every attention of ``graph`` with its heads (see the module docstring)."""
    computed = _computed(graph)
    fused = _fused_attention_ops()
    order = {n: i for i, n in enumerate(graph.fx.nodes)}
    out = []
    for node in graph.fx.nodes:
        if node.op != "call_function":
            continue
        if node.target in fused:
            out.append(AttentionHeads(node, refused=f"node {node.name!r} ({node.target}): a fused attention op; "
                                                    "remove heads before fuse-attention / pack-attention"))
            continue
        if node.target != SDPA and not _is_eager_attention(node):
            continue
        walk = _HeadWalk(graph, computed)
        heads = AttentionHeads(node)
        try:
            found = _attention_inputs(node, walk)
            if found is None:
                continue
            (q, qa, qd), (k, ka, kd), (v, va, vd), kv_kind = found
            walk.role = "q"
            q_src = walk.back(q, qa, "q")
            walk.role = "k"
            k_src = walk.back(k, ka, kv_kind)
            walk.role = "v"
            v_src = walk.back(v, va, kv_kind)
            nq, nk = _static(_shape(q)[qa]), _static(_shape(k)[ka])
            q_dim, k_dim, v_dim = _static(_shape(q)[qd]), _static(_shape(k)[kd]), _static(_shape(v)[vd])
            if None in (nq, nk, q_dim, v_dim):
                raise _Refuse(node, "a symbolic number or width of heads")
            if None in (q_src.span, k_src.span, v_src.span):
                raise _Refuse(node, "queries, keys or values that no projection's heads make")
            if q_src.rep != 1 or k_src.rep != v_src.rep or k_dim != q_dim:
                raise _Refuse(node, "query heads repeated, or keys and values repeated differently")
            n_kv = nk // k_src.rep
            if nq % n_kv or (kv_kind == "q" and k_src.rep * n_kv != nq):
                raise _Refuse(node, f"{nq} query heads do not divide into {n_kv} key/value heads")
            heads.q, heads.k, heads.v = (_block(src, n) for src, n in ((q_src, nq), (k_src, n_kv), (v_src, n_kv)))
            heads.num_heads, heads.num_kv_heads, heads.head_dim, heads.v_head_dim = nq, n_kv, q_dim, v_dim
            _check_blocks([heads.q, heads.k, heads.v], node)
            walk.region.add(node)
            walk.forward(node, 1, heads.consumers)
            if not heads.consumers:
                raise _Refuse(node, "no linear reads the attention's output")
            for n in walk.region | {s.producer for s in (heads.q, heads.k, heads.v)}:
                for user in n.users:
                    cache = walk.cache_output(n) if user.op == "output" else None
                    if cache is not None:
                        heads.cache_outputs.append(cache)
                    elif user not in walk.region and user not in heads.consumers and user.target != aten.sym_size.int:
                        raise _Refuse(user, f"reads {n.name!r}, a value that carries the attention's heads, from outside the attention")
            heads.cache_outputs.sort(key=lambda c: order[c.node])  # the region is a set: graph order, every run
            heads.cache_inputs = walk.cache_inputs
            heads.head_operands = list(dict.fromkeys(walk.head_operands))
            for op in heads.head_operands:
                size, want = _shape(op.node)[op.axis], heads.count(op.kind, n_kv)
                if _static(size) != want:
                    raise _Refuse(op.user, f"operand {op.node.name!r} has {size} values along its axis {op.axis}, "
                                           f"not one per head ({want})")
        except _Refuse as e:
            heads.refused = str(e)
        heads.shape_edits, heads.region = list(dict.fromkeys(walk.edits)), walk.region
        out.append(heads)
    return out


def _block(src: _Source, heads: int) -> HeadBlock:
    """The rows of ``heads`` heads of ``src``: a lone head's block is the rows it reads
    (GPT-BigCode's one key head is a piece of the projection's channels, after the queries)."""
    channels = sorted(src.reads)
    if heads == 1 and channels and src.slots is None:
        lo, hi = channels[0], channels[-1] + 1
        return HeadBlock(src.span.producer, src.span.offset + lo, hi - lo, hi - lo, tuple(c - lo for c in channels))
    slots = src.slots or (0,)
    if heads % len(slots):
        raise _Refuse(src.span.producer, f"{heads} heads do not fill blocks of {len(slots)}")
    return HeadBlock(src.span.producer, src.span.offset, heads // len(slots) * src.stride, src.stride, tuple(channels),
                     slots)


def _check_blocks(blocks: list[HeadBlock], node) -> None:
    """q, k and v read rows of their own, or share blocks (one per head, the
    same heads) reading different channels of each."""
    for i, a in enumerate(blocks):
        for b in blocks[i + 1:]:
            if a.shares_block(b):
                if a.size != b.size:
                    raise _Refuse(node, "query and key/value heads share blocks of a projection's rows but differ in number")
                if a.block_reads() & b.block_reads():
                    raise _Refuse(node, "query, key and value read the same rows of one projection")
            elif a.producer is b.producer and a.offset < b.offset + b.size and b.offset < a.offset + a.size:
                raise _Refuse(node, "query, key and value read overlapping rows of one projection")
