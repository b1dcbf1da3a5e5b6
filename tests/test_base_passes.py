"""canonicalize, dce, constant-fold and cse: each before/after, a case where it
must not fire, and parity with the original."""

import torch
from torch.export import Dim

import fxopt
from conftest import model_spec, reference, run, trace_once

aten = torch.ops.aten


def targets(graph):
    return [n.target for n in graph.fx.nodes if n.op == "call_function"]


def optimize(graph, pipeline):
    result = fxopt.PassManager(pipeline).run(graph)
    return result.graph, result.records[-1]


class Matmuls(torch.nn.Module):
    """The linear forms a traced model shows: addmm, mm, matmul, and a transposed weight."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(8, 16))  # [K, N], used as x @ W (Conv1D style)
        self.b1 = torch.nn.Parameter(torch.randn(16))
        self.w2 = torch.nn.Parameter(torch.randn(16, 16))
        self.w3 = torch.nn.Parameter(torch.randn(4, 16))  # [N, K], used through .t()

    def forward(self, x, w_in):
        h = torch.addmm(self.b1, x.view(-1, 8), self.w1).view(x.shape[0], x.shape[1], 16)
        h = torch.matmul(h, self.w2)
        h = torch.mm(h.view(-1, 16), self.w3.t())
        return h + torch.matmul(h, w_in).sum()  # w_in is a graph input: must stay a matmul


def test_canonicalize_turns_constant_matmuls_into_linear():
    x, w_in = torch.randn(2, 3, 8), torch.randn(4, 4)
    model = Matmuls()
    graph = fxopt.trace(model, (x, w_in), dynamic_shapes=({0: Dim.DYNAMIC, 1: Dim.DYNAMIC}, None))
    assert aten.addmm.default in targets(graph)
    out, record = optimize(graph, "canonicalize")
    t = targets(out)
    assert t.count(aten.linear.default) == 3
    assert aten.addmm.default not in t and aten.mm.default not in t
    assert t.count(aten.matmul.default) == 1  # the graph-input weight is left alone
    assert record.stats["rewritten"]["linear"] == 3 and record.stats["rewritten"]["flatten-absorbed"] == 1
    # the transposed parameter is used as is, w1 is stored transposed once
    linears = [n for n in out.fx.nodes if n.target == aten.linear.default]
    assert out.constant(linears[-1].args[1]) is graph.get_attr("w3")
    x2, w2 = torch.randn(5, 2, 8), torch.randn(4, 4)
    with torch.no_grad():
        torch.testing.assert_close(out(x2, w2), model(x2, w2))


def test_canonicalize_drops_dropout_asserts_and_identity_views():
    spec = model_spec("gpt2-tiny")
    graph = trace_once(spec)
    before = targets(graph)
    # eval-mode dropout is a clone once the traced graph is functionalized
    assert aten.clone.default in before and aten._assert_tensor_metadata.default in before
    out, record = optimize(graph, "canonicalize")
    after = targets(out)
    assert aten.clone.default not in after and aten._assert_tensor_metadata.default not in after
    assert aten.addmm.default not in after and after.count(aten.linear.default) == 9
    for inputs in [spec.example_inputs, *spec.other_inputs]:
        assert fxopt.compare(reference(spec, inputs), run(out, inputs)).within(1e-5)


def test_canonicalize_without_linear_leaves_flattened_linears_alone():
    class Flattened(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.proj(x.view(-1, 8)).view(x.shape[0], x.shape[1], 4)

    graph = fxopt.trace(Flattened().eval(), (torch.randn(2, 3, 8),))
    assert "flatten-absorbed" not in optimize(graph, "canonicalize(linear=false)")[1].stats["rewritten"]
    assert optimize(graph, "canonicalize")[1].stats["rewritten"]["flatten-absorbed"] == 1


def test_canonicalize_keeps_training_dropout():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.aten.dropout(x, 0.5, True)

    graph = fxopt.trace(M(), (torch.randn(4),))
    out, record = optimize(graph, "canonicalize,cse,constant-fold")
    assert aten.native_dropout.default in targets(out) and not any(r.changed for r in fxopt.PassManager("canonicalize").run(graph).records)


class ScaledProjections(torch.nn.Module):
    """OPT's query: a linear's output times a constant; and two that must stay."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))
        self.tied = torch.nn.Linear(8, 8)
        self.tied_user = torch.nn.Linear(8, 8, bias=False)
        self.tied_user.weight = self.tied.weight  # tied: folding would copy the weight

    def forward(self, x):
        q = self.q(x) * 0.125
        k = self.k(x) / 4.0
        tied = self.tied(x) * 0.5 + self.tied_user(x)
        per_feature = self.v(x) * torch.arange(8.0)  # not a scalar
        return q, k, tied, per_feature


def test_canonicalize_folds_a_constant_scale_into_the_linear():
    x = torch.randn(2, 5, 8)
    model = ScaledProjections().eval()
    graph = fxopt.trace(model, (x,), dynamic_shapes=({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},))
    out, record = optimize(graph, "canonicalize,dce")
    assert fxopt.PassManager("canonicalize").run(graph).records[0].stats["rewritten"]["scale-folded"] == 2
    t = targets(out)
    assert t.count(aten.mul.Tensor) == 2 and aten.div.Tensor not in t  # the tied and the per-feature ones stay
    q_linear = next(n for n in out.fx.nodes if n.target == aten.linear.default and n.users and
                    next(iter(n.users)).op == "output")
    torch.testing.assert_close(out.constant(q_linear.args[1]), model.q.weight * 0.125)
    with torch.no_grad():
        for inputs in (x, torch.randn(3, 7, 8)):
            torch.testing.assert_close(out(inputs), model(inputs))
    assert not any(r.stats["rewritten"].get("scale-folded") for r in
                   fxopt.PassManager("canonicalize(fold_scale=false)").run(graph).records)


class FoldedHeads(torch.nn.Module):
    """Attention over heads folded into the batch, as BLOOM writes it: [B, H, S, D]
    viewed as [B * H, S, D], ``baddbmm`` with a [B * H, 1, S] bias, ``bmm``, each
    result viewed back; and a ``bmm`` whose 3-D result is returned as it is."""

    def forward(self, q, k, v, bias):
        b, h, s, d = q.shape
        bias = bias.reshape(b * h, 1, s)
        scores = torch.baddbmm(bias, q.reshape(b * h, s, d), k.reshape(b * h, s, d).transpose(1, 2), beta=0.5,
                               alpha=0.25).view(b, h, s, s)
        out = torch.bmm(scores.softmax(-1).view(b * h, s, s), v.reshape(b * h, s, d)).view(b, h, s, d)
        return out, torch.bmm(q.reshape(b * h, s, d), v.reshape(b * h, s, d).transpose(1, 2))


def test_canonicalize_unfolds_attention_over_folded_heads():
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    bias = torch.randn(2, 4, 5)
    model = FoldedHeads()
    dim = {0: Dim("b", max=64), 2: Dim("s", max=64)}
    graph = fxopt.trace(model, (q, k, v, bias), dynamic_shapes=(dim, dim, dim, {0: Dim("b", max=64), 2: Dim("s", max=64)}))
    out, record = optimize(graph, "canonicalize,dce")
    assert record.stats["removed"] > 0
    computed = [t for t in targets(out) if isinstance(t, torch._ops.OpOverload)
                and t not in (aten.sym_size.int, aten.view.default, aten.reshape.default)]
    # scores = 0.25 * (q @ k^T) + 0.5 * bias viewed as [B, H, 1, S]; the returned 3-D bmm stays
    assert computed == [aten.transpose.int, aten.matmul.default, aten.mul.Tensor, aten.mul.Tensor, aten.add.Tensor,
                        aten.softmax.int, aten.matmul.default, aten.transpose.int, aten.bmm.default], computed
    assert [n.meta["val"].dim() for n in out.fx.nodes if n.target == aten.matmul.default] == [4, 4]
    assert fxopt.PassManager("canonicalize").run(graph).records[0].stats["rewritten"]["heads-unfolded"] == 2
    for inputs in ((q, k, v, bias), (*(torch.randn(3, 4, 7, 8) for _ in range(3)), torch.randn(3, 4, 7))):
        with torch.no_grad():
            want = model(*inputs)
        for backend in ("eager", "onnxruntime"):
            assert fxopt.compare(want, fxopt.compile(out, backend)(*inputs)).within(1e-5), backend
    off = fxopt.PassManager("canonicalize(unfold_heads=false)").run(graph).records[0].stats["rewritten"]
    assert "heads-unfolded" not in off
    # a pass may have put the sizes the view back reads after the baddbmm: the bias's unfolded
    # view reads sizes of its own, and the graph stays in order
    moved = graph.copy()
    baddbmm = next(n for n in moved.fx.nodes if n.target == aten.baddbmm.default)
    (back,) = baddbmm.users
    sizes = [a for a in back.args[1] if isinstance(a, torch.fx.Node)]
    for size in sizes:
        size.replace_all_uses_with(moved.fx.call_function(aten.sym_size.int, size.args), lambda u: u is back)
    for size in [a for a in back.args[1] if isinstance(a, torch.fx.Node)]:
        baddbmm.append(size)
    moved.fx.lint()
    optimize(moved, "canonicalize")[0].fx.lint()


def test_dce_removes_dead_pure_nodes_but_keeps_effects():
    class M(torch.nn.Module):
        def forward(self, x):
            torch._assert_async((x.abs() >= 0).all(), "kept: an assert has an effect")
            return x.cos()

    graph = fxopt.trace(M(), (torch.randn(3),))
    # tracing already drops dead code, so add some: a dead chain and a dead constant read
    x = graph.placeholders()[0]
    with graph.fx.inserting_after(x):
        sin = graph.fx.call_function(aten.sin.default, (x,))
    with graph.fx.inserting_after(sin):
        graph.fx.call_function(aten.add.Tensor, (sin, graph.add_constant(torch.randn(100, 3), "unused")))
    graph.refresh_meta()
    bytes_before = graph.param_bytes()
    out, record = optimize(graph, "dce")
    assert aten.sin.default not in targets(out) and aten.cos.default in targets(out)
    assert aten._assert_async.msg in targets(out)
    assert record.stats["removed"] == 3 and out.param_bytes() < bytes_before
    out, _ = optimize(graph, "canonicalize,dce")  # canonicalize drops runtime asserts on purpose
    assert targets(out) == [aten.cos.default]


def test_constant_fold_precomputes_constant_subgraphs_and_keeps_dynamic_ones():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 4))
            self.s = torch.nn.Parameter(torch.randn(6))

        def forward(self, x):
            w = self.w * self.s[:, None].exp()  # constant: folds into one weight
            pos = torch.arange(x.shape[1])  # depends on a dynamic size: stays
            return torch.nn.functional.linear(x, w) + pos[:, None]

    x = torch.randn(2, 5, 4)
    model = M()
    graph = fxopt.trace(model, (x,), dynamic_shapes=({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},))
    out, record = optimize(graph, "constant-fold")
    assert record.stats["folded"] == 1
    t = targets(out)
    assert aten.exp.default not in t and aten.mul.Tensor not in t
    assert aten.arange.default in t or aten.arange.start in t
    x2 = torch.randn(3, 7, 4)
    with torch.no_grad():
        torch.testing.assert_close(out(x2), model(x2))


def test_constant_fold_refuses_to_materialize_large_expands():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = torch.nn.Parameter(torch.randn(1, 256))

        def forward(self, x):
            return x + self.b.expand(1024, 256)

    graph = fxopt.trace(M(), (torch.randn(1024, 256),))
    out, record = optimize(graph, "constant-fold(max_bytes=4096)")
    assert not record.changed and record.stats["skipped"] == 1
    out, record = optimize(graph, "constant-fold(max_bytes=10000000)")
    assert not record.changed  # growing past the constant it reads is never worth it


def test_constant_fold_does_not_undo_compression():
    class Dequant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("q", torch.randint(-8, 8, (16, 16), dtype=torch.int8))
            self.register_buffer("scale", torch.rand(16, 1))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.q.float() * self.scale)

    graph = fxopt.trace(Dequant(), (torch.randn(2, 16),))
    out, record = optimize(graph, "constant-fold")
    assert not record.changed and out.param_bytes() == graph.param_bytes()


def test_constant_fold_builds_small_tensors_from_literals():
    class Mask(torch.nn.Module):
        def forward(self, x):
            return x + torch.ones(8, 8).tril()

    graph = fxopt.trace(Mask(), (torch.randn(8, 8),))
    out, record = optimize(graph, "constant-fold")
    assert record.stats["folded"] == 1 and targets(out) == [aten.add.Tensor]


def test_cse_merges_duplicates_but_not_random_ops():
    class M(torch.nn.Module):
        def forward(self, x):
            a = x.exp() + x.exp()
            r = torch.rand_like(x) + torch.rand_like(x)
            return a, (r * 0) + x.exp() * 2

    x = torch.randn(4)
    graph = fxopt.trace(M(), (x,))
    out, record = optimize(graph, "cse")
    t = targets(out)
    assert t.count(aten.exp.default) == 1
    assert t.count(aten.rand_like.default) == 2
    assert record.stats["merged"] == 2
    a, b = out(x)
    torch.testing.assert_close(a, 2 * x.exp())
    torch.testing.assert_close(b, 2 * x.exp())


def test_cse_merges_tied_weights():
    spec = model_spec("tiny-gpt")  # the LM head is tied to the token embedding
    graph = fxopt.trace(spec.model, spec.example_inputs)
    reads = [n for n in graph.fx.nodes if n.op == "get_attr"]
    # the graph owns a copy of the weights; tied ones still share one storage
    tensors = {(t.untyped_storage().data_ptr(), t.shape, t.stride()) for t in map(graph.constant, reads)}
    out, record = optimize(graph, "cse")
    assert len([n for n in out.fx.nodes if n.op == "get_attr"]) == len(tensors)
    assert out.param_bytes() == graph.param_bytes()
    assert fxopt.compare(reference(spec), run(out, spec.example_inputs)).max_abs_err == 0
