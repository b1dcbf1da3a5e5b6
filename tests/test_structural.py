"""Each built-in pass family at work, written as a graph before and the graph
expected after (tests/structural.py), with a case where it must not fire.
The parity and model-level tests of each pass live beside its family's tests;
here the point is the exact graph a pass leaves."""

import torch
import torch.nn.functional as F

import fxopt
from fxopt.ir.quant import QuantConfig, quantize, to_nbits
from fxopt.passes.quantize import SmoothQuant
from structural import assert_rewrites_to, assert_structurally_equal, assert_unchanged, graph_of, structure

aten = torch.ops.aten
fxops = torch.ops.fxopt

torch.manual_seed(0)
X = torch.randn(2, 5, 16)
W = torch.randn(24, 16)
B = torch.randn(24)


# -- canonicalize ------------------------------------------------------------------------

W_KN = torch.randn(16, 24)  # stored [K, N], used as x @ W (GPT-2's Conv1D)
W_KN_T = W_KN.t().contiguous()


def test_canonicalize_turns_addmm_into_linear_with_the_weight_transposed_once():
    def before(x):
        return torch.addmm(B, x, W_KN)

    def expected(x):
        return F.linear(x, W_KN_T, B)

    assert_rewrites_to("canonicalize", before, (torch.randn(4, 16),), expected, constant_values=True)


W_8, B_8 = W * 0.125, B * 0.125


def test_canonicalize_folds_a_constant_scale_into_the_linear():
    def before(x):
        return F.linear(x, W, B) * 0.125

    def expected(x):
        return F.linear(x, W_8, B_8)

    assert_rewrites_to("canonicalize", before, (X,), expected, constant_values=True)


def test_canonicalize_keeps_a_matmul_whose_weight_is_an_input():
    assert_unchanged("canonicalize", lambda x, w: x @ w, (X, torch.randn(16, 8)))


# -- dce -----------------------------------------------------------------------------------

def test_dce_removes_a_dead_computation():
    before = graph_of(lambda x: x.sin(), (X,), name="dead_cos")
    x = next(n for n in before.fx.nodes if n.op == "placeholder")
    with before.fx.inserting_after(x):
        before.fx.call_function(aten.cos.default, (x,))
    before.recompile()
    assert "dead %" in "\n".join(structure(before)[0])
    assert_rewrites_to("dce", before, (X,), lambda x: x.sin())


def test_dce_keeps_live_and_effectful_nodes():
    assert_unchanged("dce", lambda x: x.sin() + torch.rand_like(x), (X,))


# -- constant-fold ---------------------------------------------------------------------------

FOLDED = (W[:, :16] * 2).sum(0)


def test_constant_fold_precomputes_a_subgraph_of_constants():
    def before(x):
        return x + (W[:, :16] * 2).sum(0)

    assert_rewrites_to("constant-fold", before, (X,), lambda x: x + FOLDED, constant_values=True)


def test_constant_fold_leaves_what_reads_an_input():
    assert_unchanged("constant-fold", lambda x: (x * 2).sum(0), (X,))


# -- cse ---------------------------------------------------------------------------------------

def test_cse_merges_two_equal_computations():
    def before(x):
        return torch.sin(x) * 3 + torch.sin(x) * 3

    def expected(x):
        s = torch.sin(x) * 3
        return s + s

    assert_rewrites_to("cse", before, (X,), expected)


def test_cse_does_not_merge_random_ops():
    assert_unchanged("cse", lambda x: torch.rand_like(x) + torch.rand_like(x), (X,))


# -- fusions ---------------------------------------------------------------------------------

def test_fuse_linear_act_makes_one_op_of_a_linear_and_its_gelu():
    assert_rewrites_to("canonicalize,fuse-linear-act", lambda x: F.gelu(F.linear(x, W, B)), (X,),
                       lambda x: fxops.linear_act(x, W, B, "gelu"))


def test_fuse_linear_act_leaves_a_linear_whose_output_is_read_twice():
    assert_unchanged("fuse-linear-act", lambda x: F.gelu(F.linear(x, W, B)) + F.linear(x, W, B).sum(),
                     (X,), prepare="canonicalize,cse")


NORM_W = torch.rand(16) + 0.5
LN_B = torch.randn(16)


def test_fuse_norm_makes_one_op_of_a_written_out_rms_norm():
    def before(x):
        return NORM_W * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    assert_rewrites_to("fuse-norm", before, (X,), lambda x: fxops.rms_norm(x, NORM_W, 1e-6))


def test_fuse_norm_leaves_a_norm_over_another_dim():
    assert_unchanged("fuse-norm", lambda x: x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6), (X,))


WS = [torch.randn(16, 16) for _ in range(3)]
BS = [torch.randn(16) for _ in range(3)]
W_QKV, B_QKV = torch.cat(WS), torch.cat(BS)


def test_merge_linears_reads_the_shared_input_once():
    def before(x):
        return tuple(F.linear(x, w, b) for w, b in zip(WS, BS))

    def expected(x):
        return tuple(torch.split(F.linear(x, W_QKV, B_QKV), [16, 16, 16], -1))

    # merge-linears leaves the old weights' reads for dce
    assert_rewrites_to("canonicalize,merge-linears,dce", before, (X,), expected, constant_values=True)


def test_merge_linears_leaves_linears_on_different_inputs():
    assert_unchanged("merge-linears", lambda x, y: (F.linear(x, WS[0]), F.linear(y, WS[1])), (X, X + 1),
                     prepare="canonicalize")


def test_fuse_attention_makes_sdpa_of_written_out_attention():
    q = torch.randn(1, 2, 5, 16)

    def before(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v

    def expected(q, k, v):
        return aten.scaled_dot_product_attention.default(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=0.25)

    assert_rewrites_to("fuse-attention", before, (q, q + 1, q - 1), expected)


def test_fuse_attention_leaves_a_softmax_over_another_dim():
    q = torch.randn(1, 2, 5, 5)
    assert_unchanged("fuse-attention", lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v, (q, q, q))


# -- quantization ------------------------------------------------------------------------------

def test_quantize_int4_groups_become_matmul_nbits_with_the_reference_codes():
    nb = to_nbits(quantize(W, QuantConfig(4, "asym", "group", 16)))

    def expected(x):
        return fxops.linear_nbits(x, nb.B, nb.scales, nb.zero_points, B, 16, 24, 4, 16, 4)

    result = assert_rewrites_to("canonicalize,quantize(bits=4,group_size=16)", lambda x: F.linear(x, W, B), (X,), expected,
                                constant_values=True, tolerance=0.1)
    assert result.records[-1].stats["quantized"] == 1


def test_quantize_dynamic_w8a8_becomes_the_per_token_int8_op():
    qt = quantize(W, QuantConfig(8, "sym", "channel"))
    scale = qt.scale.reshape(24)
    w_u8 = (qt.q.to(torch.int16) + 128).to(torch.uint8)
    rowsum = (qt.q.double().sum(1) * scale.double()).float()

    def expected(x):
        return fxops.linear_dynamic_int8_per_token(x, w_u8, scale, rowsum, B)

    assert_rewrites_to("canonicalize,quantize(mode=dynamic)", lambda x: F.linear(x, W, B), (X,), expected,
                       constant_values=True, tolerance=0.05)


def test_quantize_leaves_layers_its_filters_exclude():
    assert_unchanged("quantize(bits=8,min_size=10000)", lambda x: F.linear(x, W, B), (X,), prepare="canonicalize")


GAMMA, BETA = torch.rand(16) + 0.5, torch.randn(16)
W_Q, W_K = torch.randn(16, 16), torch.randn(16, 16)


def test_smooth_quant_moves_the_activation_range_into_the_weights():
    calibration = [X, X * 2]

    def before(x):
        h = F.layer_norm(x, [16], GAMMA, BETA, 1e-5)
        return F.linear(h, W_Q), F.linear(h, W_K)

    act = torch.stack([F.layer_norm(c, [16], GAMMA, BETA, 1e-5).abs().amax(dim=(0, 1)) for c in calibration]).amax(0)
    s = SmoothQuant.factors(act, torch.maximum(W_Q.abs().amax(0), W_K.abs().amax(0)), 0.5)

    gamma, beta, w_q, w_k = GAMMA / s, BETA / s, W_Q * s, W_K * s

    def expected(x):
        h = F.layer_norm(x, [16], gamma, beta, 1e-5)
        return F.linear(h, w_q), F.linear(h, w_k)

    result = assert_rewrites_to("canonicalize,smooth-quant,dce", before, (X,), expected, constant_values=True, atol=1e-5,
                                calibration_data=calibration)
    assert result.records[1].stats["smoothed"] == 2


def test_smooth_quant_refuses_a_linear_whose_input_is_not_a_norm():
    assert_unchanged("smooth-quant", lambda x: F.linear(torch.relu(x), W_Q), (X,), prepare="canonicalize",
                     calibration_data=[X])


# -- the helper itself ------------------------------------------------------------------------

def test_structure_ignores_names_and_order_but_not_ops():
    def a(x):
        u, v = x.sin(), x.cos()
        return u + v

    def b(x):
        v, u = x.cos(), x.sin()
        return u + v

    assert_structurally_equal(graph_of(a, (X,)), graph_of(b, (X,)))
    try:
        assert_structurally_equal(graph_of(a, (X,)), graph_of(lambda x: x.cos() + x.sin(), (X,)))
    except AssertionError as e:
        assert "graphs differ" in str(e) and "aten.sin.default" in str(e)
    else:
        raise AssertionError("swapped operands compared equal")


# -- attention packing and padding removal ------------------------------------------------------

D_MODEL, HEADS = 16, 2
W_PACKED, B_PACKED = torch.randn(3 * D_MODEL, D_MODEL), torch.randn(3 * D_MODEL)


def self_attention(x, mask=None, causal=True):
    b, s, _ = x.shape
    q, k, v = F.linear(x, W_PACKED, B_PACKED).split(D_MODEL, -1)
    q, k, v = (t.view(b, s, HEADS, D_MODEL // HEADS).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return o.transpose(1, 2).reshape(b, s, D_MODEL)


def test_pack_attention_makes_one_op_of_a_causal_block():
    def expected(x):
        return fxops.packed_attention(x, W_PACKED, B_PACKED, None, HEADS, True, (D_MODEL // HEADS) ** -0.5, -10000.0)

    assert_rewrites_to("canonicalize,pack-attention,dce", self_attention, (X,), expected, constant_values=True)


def test_pack_attention_refuses_an_arbitrary_float_mask():
    bias = torch.randn(1, 1, 5, 5)
    assert_unchanged("pack-attention", lambda x: self_attention(x, bias, causal=False), (X,), prepare="canonicalize")


W_ROWS = torch.randn(D_MODEL, D_MODEL)
MIN = torch.finfo(torch.float32).min


def padded_block(x, mask):
    b, s, _ = x.shape
    q = F.linear(x, W_ROWS).view(b, s, HEADS, D_MODEL // HEADS).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, q, q, attn_mask=torch.where(mask[:, None, None, :].bool(), 0.0, MIN))
    return F.gelu(o.transpose(1, 2).reshape(b, s, D_MODEL))


def test_remove_padding_runs_row_wise_ops_on_the_real_tokens_only():
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0

    def expected(x, mask):
        index = fxops.padding_index(mask)
        q = F.linear(fxops.unpad(x, index), W_ROWS).view(-1, HEADS, D_MODEL // HEADS)
        q = fxops.pad(q, index, 2, 5).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, q, q, attn_mask=torch.where(mask[:, None, None, :].bool(), 0.0, MIN))
        rows = F.gelu(fxops.unpad(o.transpose(1, 2), index).view(-1, D_MODEL))
        return fxops.pad(rows, index, 2, 5)

    result = assert_rewrites_to("canonicalize,remove-padding(padded_outputs=zero),dce", padded_block, (X, mask), expected,
                                tolerance=None)
    # padded_outputs=zero: the real tokens' rows are exact, the padded ones 0
    out, ref = result.graph(X, mask), padded_block(X, mask)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()])
    assert not out[~mask.bool()].any()


def test_remove_padding_refuses_to_change_padded_outputs_unless_asked():
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0
    assert_unchanged("remove-padding", padded_block, (X, mask), prepare="canonicalize")
