"""The fxopt program: an FX GraphModule produced by torch.export, plus what is
needed to run, re-export and compare it (its example inputs).

Parameters and buffers live as attributes of the module and are reached by
``get_attr`` nodes; the module is called with the model's own inputs and
returns the model's own output structure (the pytree specs of torch.export).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
from typing import Any, Iterable, Iterator

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim


def _writes(user: fx.Node, node: fx.Node) -> bool:
    """``user`` writes into ``node`` in place (an argument its schema marks mutable)."""
    schema = getattr(user.target, "_schema", None) if user.op == "call_function" else None
    if schema is None:
        return False
    return any(arg.alias_info is not None and arg.alias_info.is_write and value is node
               for arg, value in zip(schema.arguments, user.args))


def _fingerprint(t: torch.Tensor) -> tuple:
    """A cheap digest of a tensor's values: up to 64 evenly spaced elements.
    Equal tensors share it; ``torch.equal`` settles the rest."""
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 64)][:64]
    return tuple(sample.tolist())


aten = torch.ops.aten

# Lookups whose indices must lie in [0, rows): target -> fn(node) giving
# (the indices argument, the rows of the table it indexes). PyTorch raises
# IndexError outside that range; ONNX Gather takes -rows..rows-1 and wraps
# negative ids around, so the backends check these inputs before a call.
LOOKUPS: dict[Any, Any] = {
    aten.embedding.default: lambda n: (n.args[1], static_size(n.args[0], 0)),
    aten.index_select.default: lambda n: (n.args[2], static_size(n.args[0], n.args[1])),
}

# Ops whose output holds some of the integers of their first input (views,
# copies, casts between integer types): ids keep their values through them.
_SAME_VALUES = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints, aten.expand.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten._to_copy.default, aten.to.dtype,
    aten.slice.Tensor, aten.select.int, aten.t.default, aten.transpose.int, aten.permute.default,
}


def register_lookup(target, fn) -> None:
    """Declare that ``target`` (an fxopt op) indexes a table: ``fn(node)``
    returns ``(indices argument, rows)``; see :data:`LOOKUPS`."""
    LOOKUPS[target] = fn


def static_size(node, dim) -> int | None:
    """Dim ``dim`` of the value ``node`` holds when it is a number, else None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor) and isinstance(dim, int) and -val.dim() <= dim < val.dim():
        size = val.shape[dim]
        return size if isinstance(size, int) else None
    return None


# Prefixes torch.export gives the inputs it lifts from parameters, buffers and constants.
_LIFTED_PREFIXES = ("p_", "b_", "c_")


class Graph:
    """A traced model that passes rewrite and backends lower.

    ``graph.module`` is the ``torch.fx.GraphModule``; ``graph.fx`` its
    ``torch.fx.Graph``. Passes edit ``graph.fx`` and add constants with
    :meth:`add_constant`; the pass manager recompiles, refreshes shape metadata
    and verifies after each pass.
    """

    def __init__(self, module: fx.GraphModule, example_args: tuple = (), example_kwargs: dict | None = None, name: str = "model"):
        self.module = module
        self.example_args = tuple(example_args)
        self.example_kwargs = dict(example_kwargs or {})
        self.name = name
        # Facts passes established (``Pass.ensures``) and later passes may require.
        self.properties: set[str] = set()
        # Symbol name ("s43") -> the name of its dimension ("batch"), from the
        # user's named ``Dim``s; ONNX files call dynamic dimensions by it.
        self.dim_names: dict[str, str] = {}
        # Input name -> n: the caller promises values in [0, n) (a decoder's
        # positions stay below its max_position_embeddings). Passes that build
        # a table indexed by the input (the rotary table GroupQueryAttention
        # reads) size it from this.
        self.value_bounds: dict[str, int] = {}

    # -- running -------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def interface(self):
        """How this graph is called and what it returns (:class:`~fxopt.ir.interface.Interface`)."""
        from .interface import Interface

        return Interface.from_graph(self)

    def index_bounds(self) -> dict[int, tuple[str, int]]:
        """Flat input position -> (input name, rows): the integer inputs whose
        values reach the indices of a lookup (:data:`LOOKUPS`, e.g. token ids
        into ``aten.embedding``) through views and copies, with the size of the
        smallest table they index."""
        bounds: dict[int, tuple[str, int]] = {}
        for i, ph in enumerate(self.placeholders()):
            val = ph.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dtype.is_floating_point or val.dtype.is_complex or val.dtype == torch.bool:
                continue
            frontier, seen = [ph], {ph}
            while frontier:
                node = frontier.pop()
                for user in node.users:
                    if user.target in LOOKUPS:
                        indices, rows = LOOKUPS[user.target](user)
                        if indices is node and rows is not None:
                            bounds[i] = (ph.name, min(rows, bounds.get(i, (ph.name, rows))[1]))
                    elif user.target in _SAME_VALUES and user.args and user.args[0] is node and user not in seen:
                        seen.add(user)
                        frontier.append(user)
        return bounds

    def check_inputs(self, leaves: list, index_bounds: dict[int, tuple[str, int]] | None = None) -> None:
        """Each tensor among the flat inputs has the dtype and rank it was
        traced with (a compiled model is specialized to both); raises
        ValueError naming the input otherwise. With ``index_bounds`` (from
        :meth:`index_bounds`), an index input with a value outside ``[0, rows)``
        raises IndexError naming it."""
        self.interface().check_inputs(leaves, index_bounds)

    def flatten_inputs(self, *args, **kwargs) -> list:
        """The model's inputs as the flat list of graph inputs (the order
        torch.export and the ONNX model use); checks the structure matches."""
        return self.interface().flatten_inputs(*args, **kwargs)

    def unflatten_outputs(self, flat: list):
        """Rebuild the model's output structure (tuple, dict, ModelOutput) from flat outputs."""
        return pytree.tree_unflatten(list(flat), self.fx._codegen.pytree_info.out_spec)

    def num_outputs(self) -> int:
        return self.fx._codegen.pytree_info.out_spec.num_leaves

    def run_example(self):
        return self(*self.example_args, **self.example_kwargs)

    # -- structure -----------------------------------------------------------
    @property
    def fx(self) -> fx.Graph:
        return self.module.graph

    @property
    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.module.graph.nodes)

    def num_nodes(self) -> int:
        """Nodes that compute: everything but placeholders, get_attr and output."""
        return sum(1 for n in self.fx.nodes if n.op == "call_function")

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.fx.nodes if n.op == "placeholder"]

    def get_attr(self, target: str) -> Any:
        obj = self.module
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def constant(self, node: fx.Node) -> torch.Tensor | None:
        """The tensor a ``get_attr`` node reads, else None; None too for a
        buffer the graph writes (state such as a counter or a cache: each
        call reads what the last one left, so no pass may take it as fixed)."""
        if isinstance(node, fx.Node) and node.op == "get_attr" and not any(_writes(u, node) for u in node.users):
            value = self.get_attr(node.target)
            if isinstance(value, torch.Tensor):
                return value
        return None

    def written_attributes(self) -> list[str]:
        """Buffers the graph writes in place (``model.count += 1``, a static
        KV cache): torch.export keeps such writes as ``copy_`` into the buffer."""
        return sorted({n.target for n in self.fx.nodes if n.op == "get_attr" and any(_writes(u, n) for u in n.users)})

    @contextlib.contextmanager
    def state_restored(self):
        """Run the graph inside without keeping what it writes to its buffers
        (numerics checks call it more than once on the same state)."""
        saved = {name: self.get_attr(name).clone() for name in self.written_attributes()}
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    self.get_attr(name).copy_(value)

    def add_constant(self, tensor: torch.Tensor, name_hint: str = "const") -> fx.Node:
        """Register ``tensor`` as a buffer under a fresh name and return a
        ``get_attr`` node for it, placed before the first computing node."""
        base = "".join(c if c.isalnum() else "_" for c in name_hint).strip("_") or "const"
        # torch.export names the input of attribute "w" "b_w" (p_ for parameters,
        # c_ for constants), and the ONNX exporter drops one of two tensors when
        # such an input name equals another attribute's name: avoid both ways.
        taken = {n.replace(".", "_") for n in self.tensor_attributes()}
        lifted = {p + n for n in taken for p in _LIFTED_PREFIXES}
        for i in itertools.count():
            name = base if i == 0 else f"{base}_{i}"
            clash = name in lifted or any(p + name in taken for p in _LIFTED_PREFIXES)
            if not hasattr(self.module, name) and not clash:
                break
        self.module.register_buffer(name, tensor.detach(), persistent=True)
        first = next(n for n in self.fx.nodes if n.op != "placeholder")
        with self.fx.inserting_before(first):
            node = self.fx.get_attr(name)
        from .meta import fake_value_of_constant

        node.meta["val"] = fake_value_of_constant(self, tensor)
        return node

    def own_tensors(self, *, share_weights: bool = False) -> None:
        """Give the graph its own storage for the tensors it reads, so that
        running it never writes into the traced model and later edits of the
        model do not reach it. Tensors that shared a storage (tied weights,
        views) still share one. ``share_weights`` keeps reading the model's
        storage for every tensor the graph does not write (saves the copy's
        memory; see docs/loading.md)."""
        written = set(self.written_attributes())
        storages: dict[int, torch.UntypedStorage] = {}
        with torch.no_grad():
            for name, t in self.tensor_attributes().items():
                if share_weights and name not in written:
                    continue
                key = id(t.untyped_storage()) if t.untyped_storage().data_ptr() == 0 else t.untyped_storage().data_ptr()
                if key not in storages:
                    storages[key] = t.untyped_storage().clone()
                view = torch.empty(0, dtype=t.dtype, device=t.device).set_(storages[key], t.storage_offset(), t.size(), t.stride())
                owner_path, _, leaf = name.rpartition(".")
                owner = self.get_attr(owner_path) if owner_path else self.module
                if leaf in owner._parameters:
                    owner._parameters[leaf] = torch.nn.Parameter(view, requires_grad=t.requires_grad)
                elif leaf in owner._buffers:
                    owner._buffers[leaf] = view
                else:
                    setattr(owner, leaf, view)

    def tensor_attributes(self) -> dict[str, torch.Tensor]:
        named = dict(self.module.named_parameters(remove_duplicate=False))
        named.update(self.module.named_buffers(remove_duplicate=False))
        for name, value in vars(self.module).items():
            if isinstance(value, torch.Tensor) and not name.startswith("_"):
                named.setdefault(name, value)
        return named

    def merge_equal_constants(self, nodes: Iterable[fx.Node], firsts: dict | None = None) -> list[fx.Node]:
        """Make the ``get_attr`` nodes among ``nodes`` whose tensors are equal
        (dtype, shape and values) read the first of them; return the nodes
        merged away. ``firsts`` carries the kept nodes from one call to the next.
        Attributes left unread are for the pass manager to prune."""
        firsts = {} if firsts is None else firsts
        removed = []
        for node in nodes:
            t = self.constant(node)
            if t is None:
                continue
            key = (t.dtype, tuple(t.shape), _fingerprint(t))
            kept = firsts.setdefault(key, [])
            same = next((f for f in kept if f is not node and torch.equal(self.constant(f), t)), None)
            if same is None:
                if node not in kept:
                    kept.append(node)
                continue
            # get_attr nodes all sit before the first computing node, so ``same`` dominates every user.
            node.replace_all_uses_with(same)
            self.fx.erase_node(node)
            removed.append(node)
        return removed

    def prune_unreferenced_attributes(self) -> list[str]:
        """Delete tensor attributes no ``get_attr`` node reads; return their names."""
        used = {n.target for n in self.fx.nodes if n.op == "get_attr"}
        removed = []
        for name in list(self.tensor_attributes()):
            if name in used:
                continue
            owner_path, _, leaf = name.rpartition(".")
            owner = self.get_attr(owner_path) if owner_path else self.module
            if hasattr(owner, leaf):
                delattr(owner, leaf)
                removed.append(name)
        return removed

    def dtypes(self) -> set[torch.dtype]:
        """Dtypes of the tensors the graph's nodes produce (from their metadata)."""
        vals = (n.meta.get("val") for n in self.fx.nodes)
        return {v.dtype for val in vals for v in (val if isinstance(val, (tuple, list)) else [val]) if isinstance(v, torch.Tensor)}

    def param_bytes(self) -> int:
        """Bytes of the distinct storages behind the tensors the graph reads
        (tied weights count once)."""
        seen: dict[int, int] = {}
        for n in self.fx.nodes:
            t = self.constant(n)
            if t is not None:
                storage = t.untyped_storage()
                seen[storage.data_ptr() or id(storage)] = storage.nbytes()
        return sum(seen.values())

    def recompile(self) -> None:
        self.module.recompile()

    def copy(self) -> "Graph":
        """A graph with its own node structure whose constants are shared with
        this one. Passes never write into a constant in place, so sharing is safe;
        the buffers the graph itself writes (counters, caches) are cloned, so
        running the copy leaves this graph's state alone."""
        new_fx = copy.deepcopy(self.fx)
        module = fx.GraphModule(self.module, new_fx, class_name=type(self.module).__name__)
        with torch.no_grad():
            for name in self.written_attributes():
                owner, _, leaf = name.rpartition(".")
                target = module.get_submodule(owner) if owner else module
                value = getattr(target, leaf)
                clone = value.detach().clone()
                if isinstance(value, torch.nn.Parameter):
                    clone = torch.nn.Parameter(clone, requires_grad=value.requires_grad)
                if leaf in getattr(target, "_buffers", {}):
                    target._buffers[leaf] = clone
                else:
                    setattr(target, leaf, clone)
        new = Graph(module, self.example_args, self.example_kwargs, self.name)
        new.properties = set(self.properties)
        new.dim_names = dict(self.dim_names)
        new.value_bounds = dict(self.value_bounds)
        return new

    # -- shapes and re-export -----------------------------------------------
    def dynamic_shapes(self, *, named: bool = True) -> dict[str, Any] | None:
        """The torch.export ``dynamic_shapes`` spec read off the placeholders:
        every dimension that is symbolic in the graph stays dynamic. With
        ``named``, one ``Dim`` per symbol, so inputs that share a dimension
        in the graph (the batch of ``input_ids`` and ``attention_mask``)
        share it in the re-exported program and in ONNX files, under the
        user's name for it (``dim_names``) or ``<input>_dim<axis>``."""
        from .meta import fake_mode_of

        leaves, spec = pytree.tree_flatten((self.example_args, self.example_kwargs))
        phs = self.placeholders()
        if len(leaves) != len(phs):
            raise RuntimeError(f"graph has {len(phs)} inputs but the example inputs flatten to {len(leaves)}")
        env = fake_mode_of(self).shape_env if named else None
        dims_of: dict[str, Any] = {}

        def dim(ph, axis, size):
            expr = size.node.expr
            if env is None or not isinstance(expr, sympy.Symbol):
                return Dim.DYNAMIC
            key = str(expr)
            if key not in dims_of:
                vr = env.var_to_range.get(expr)
                lo = int(vr.lower) if vr is not None and isinstance(vr.lower, sympy.Integer) else None
                hi = int(vr.upper) if vr is not None and isinstance(vr.upper, sympy.Integer) else None
                name = self.dim_names.get(key) or f"{ph.name}_dim{axis}"
                dims_of[key] = Dim(name, **({"min": lo} if lo is not None else {}), **({"max": hi} if hi is not None else {}))
            return dims_of[key]

        any_dynamic = False
        dims = []
        for leaf, ph in zip(leaves, phs):
            val = ph.meta.get("val")
            if isinstance(leaf, torch.Tensor) and isinstance(val, torch.Tensor):
                d = {i: dim(ph, i, s) for i, s in enumerate(val.shape) if isinstance(s, torch.SymInt)}
                any_dynamic |= bool(d)
                dims.append(d or None)
            else:
                dims.append(None)
        if not any_dynamic:
            return None
        args_ds, kwargs_ds = pytree.tree_unflatten(dims, spec)
        bound = inspect.signature(self.module.forward).bind(*args_ds, **kwargs_ds)
        return dict(bound.arguments)

    def symbolic_dims(self) -> dict[str, list[int]]:
        """Input name -> the dimensions that are dynamic."""
        return {
            ph.name: [i for i, s in enumerate(ph.meta["val"].shape) if isinstance(s, torch.SymInt)]
            for ph in self.placeholders()
            if isinstance(ph.meta.get("val"), torch.Tensor)
        }

    def to_exported_program(self, dynamic_shapes: Any = "auto") -> torch.export.ExportedProgram:
        """Re-export the optimized module (fxopt ops included) with the same
        dynamic dimensions; used for saving and for ONNX export.
        ``dynamic_shapes`` defaults to :meth:`dynamic_shapes`, falling back
        to one unnamed dimension per axis where torch.export finds relations
        between sizes that named dimensions cannot state."""
        def export(ds):
            return torch.export.export(self.module, self.example_args, self.example_kwargs, dynamic_shapes=ds, strict=False)

        if dynamic_shapes != "auto":
            return export(dynamic_shapes)
        try:
            return export(self.dynamic_shapes())
        except torch._dynamo.exc.UserError:
            return export(self.dynamic_shapes(named=False))

    # -- text, checks, files ---------------------------------------------------
    def __str__(self) -> str:
        from .printer import format_graph

        return format_graph(self)

    def verify(self) -> None:
        from .verify import verify

        verify(self)

    def refresh_meta(self) -> int:
        """Fill in shape metadata that new nodes lack."""
        from .meta import propagate_meta

        return propagate_meta(self)

    def refresh_meta_all(self) -> int:
        """Recompute shape metadata of every node (after a pass changed the graph)."""
        from .meta import propagate_meta

        return propagate_meta(self, recompute=True)

    def save(self, path) -> None:
        from .serialize import save

        save(self, path)

    @staticmethod
    def load(path) -> "Graph":
        from .serialize import load

        return load(path)
