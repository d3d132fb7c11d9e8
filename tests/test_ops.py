"""Ops: native paths against float64 references, attention layouts, diffusers-compatible modules, FP8 linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from telefuser.ops.activations import ApproximateGELU, get_activation
from telefuser.ops.attention import attention
from telefuser.ops.ffn import FeedForward
from telefuser.ops.normalization import AdaLayerNormContinuous, norm_modulate
from telefuser.ops.quantized_linear import LinearFP8, convert_params_to_buffers, replace_linear_layers
from telefuser.ops.residual import gated_add
from telefuser.ops.rotary import apply_rotary_emb, wan_rope_cos_sin


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_rope_matches_wan_complex_formula():
    # Wan: per axis, freqs = 1 / 10000^(arange(0, d, 2) / d) with d = 2 * pairs; x as complex pairs times e^{i pos freq}.
    head_dim, grid = 128, (3, 4, 5)
    cos, sin = wan_rope_cos_sin(grid, head_dim)
    x = torch.randn(1, 60, 2, head_dim, dtype=torch.float64)
    xc = torch.view_as_complex(x.reshape(1, 60, 2, head_dim // 2, 2))
    c = head_dim // 2
    parts = (c - 2 * (c // 3), c // 3, c // 3)
    tables = [torch.polar(torch.ones(n, p, dtype=torch.float64),
                          torch.outer(torch.arange(n, dtype=torch.float64),
                                      1.0 / 10000 ** (torch.arange(0, 2 * p, 2, dtype=torch.float64) / (2 * p))))
              for n, p in zip(grid, parts)]
    f, h, w = grid
    freqs = torch.cat([tables[0][:, None, None].expand(f, h, w, -1), tables[1][None, :, None].expand(f, h, w, -1),
                       tables[2][None, None].expand(f, h, w, -1)], dim=-1).reshape(60, 1, -1)
    ref = torch.view_as_real(xc * freqs).flatten(3)
    assert rel(apply_rotary_emb(x.float(), cos, sin), ref) < 1e-6  # float32 rotation of float64 angles


@pytest.mark.parametrize("layout", ["BSND", "BNSD"])
def test_attention_layouts_mask_and_scale(layout):
    q, k, v = (torch.randn(2, 3, 7, 16, dtype=torch.float64) for _ in range(3))  # BNSD
    bias = torch.randn(2, 1, 7, 7, dtype=torch.float64)
    ref = torch.softmax(q @ k.transpose(-1, -2) * 0.5 + bias, dim=-1) @ v
    args = (q, k, v) if layout == "BNSD" else tuple(t.transpose(1, 2) for t in (q, k, v))
    out = attention(*args, input_layout=layout, output_layout="BNSD", attn_mask=bias, scale=0.5)
    assert rel(out, ref) < 1e-10
    with pytest.raises(ValueError, match="layouts"):
        attention(q, k, v, input_layout="SBND")


def test_norm_modulate_and_gated_add_native():
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    shift, scale, gate = (torch.randn(2, 1, 64) for _ in range(3))
    ref = F.layer_norm(x.double(), (64,), eps=1e-6) * (1 + scale.double()) + shift.double()
    assert rel(norm_modulate(x, shift, scale), ref) < 1e-2  # bf16 output rounding (2^-8)
    assert rel(gated_add(x, x, gate), x.double() * (1 + gate.double())) < 1e-2


def test_feedforward_loads_diffusers_weights():
    Reference = pytest.importorskip("diffusers.models.attention").FeedForward

    for act in ("gelu", "gelu-approximate", "geglu", "swiglu", "linear-silu", "geglu-approximate"):
        ref = Reference(32, mult=2, activation_fn=act).eval()
        ours = FeedForward(32, mult=2, activation_fn=act).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(3, 5, 32)
        assert rel(ours(x), ref(x).detach()) < 1e-6, act


def test_activations():
    x = torch.randn(100, dtype=torch.float64)
    assert torch.allclose(get_activation("silu")(x), x * torch.sigmoid(x))
    with pytest.raises(ValueError, match="unknown activation"):
        get_activation("nope")
    approx = ApproximateGELU(4, 4)
    h = approx.proj(torch.ones(1, 4))
    assert torch.allclose(approx(torch.ones(1, 4)), h * torch.sigmoid(1.702 * h))


def test_ada_layer_norm_continuous():
    norm = AdaLayerNormContinuous(16, 8, elementwise_affine=False)
    x, cond = torch.randn(2, 5, 16), torch.randn(2, 8)
    scale, shift = norm.linear(F.silu(cond)).chunk(2, dim=1)
    ref = F.layer_norm(x, (16,), eps=1e-5) * (1 + scale[:, None]) + shift[:, None]
    assert rel(norm(x, cond), ref) < 1e-5


def test_fp8_replacement_and_quantisation_error():
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    assert replace_linear_layers(model, "fp8_e4m3fn_rowwise", skip_modules=["2"]) == 1
    assert isinstance(model[0], LinearFP8) and isinstance(model[2], torch.nn.Linear)
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 per element, ~3% in norm for Gaussian weights.
    ref = torch.nn.Linear(64, 128)
    assert rel(LinearFP8(ref, rowwise=True).dequantised_weight(), ref.weight.detach()) < 0.04
    with pytest.raises(ValueError, match="unsupported quantisation"):
        replace_linear_layers(model, "int4")
    convert_params_to_buffers(model)
    assert list(model.parameters()) == [] and "2.weight" in dict(model.named_buffers())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs fp8 tensor cores")
def test_fp8_linear_matches_bf16_on_gpu():
    lin = torch.nn.Linear(1536, 8960, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(256, 1536, device="cuda", dtype=torch.bfloat16)
    for rowwise in (False, True):
        # Two e4m3 roundings (weights, activations) of ~2^-4 each: a few percent of the output norm.
        assert rel(LinearFP8(lin, rowwise=rowwise)(x), lin(x)) < 0.08


def test_linear_gelu_tanh_matches_unfused():
    from telefuser.ops.activations import linear_gelu_tanh

    lin = torch.nn.Linear(16, 24)
    x = torch.randn(2, 5, 16)
    ref = F.gelu(lin(x), approximate="tanh")
    assert rel(linear_gelu_tanh(lin, x), ref) < 1e-6
    if torch.cuda.is_available():  # the fused cuBLASLt epilogue: tanh GELU, fp32 within rounding
        lin_c, x_c = lin.cuda(), x.cuda()
        assert rel(linear_gelu_tanh(lin_c, x_c).cpu(), ref) < 1e-4


@pytest.mark.parametrize("norm_type", ["layer_norm", "rms_norm"])
def test_ada_layer_norm_continuous_loads_diffusers_weights(norm_type):
    Reference = pytest.importorskip("diffusers.models.normalization").AdaLayerNormContinuous

    ref = Reference(16, 8, elementwise_affine=True, eps=1e-5, norm_type=norm_type).eval()
    torch.nn.init.normal_(ref.norm.weight)  # non-trivial affine weights, so loading them is checked
    ours = AdaLayerNormContinuous(16, 8, elementwise_affine=True, eps=1e-5, norm_type=norm_type).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, cond = torch.randn(2, 5, 16), torch.randn(2, 8)
    assert rel(ours(x, cond), ref(x, cond).detach()) < 1e-6  # fp32 both sides; only operation order differs
