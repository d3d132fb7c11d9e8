"""INT8 linear (torch._int_mm) against float64 references of the same quantised operands and of the float layer."""

from __future__ import annotations

import pytest
import torch

from telefuser.ops.quantized_linear import LinearInt8, _quantise, replace_linear_layers


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("rows", [5, 40])  # 5 rows: padded up to the 17 that torch._int_mm needs on CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_exact_on_its_operands_and_close_to_float(rows, dtype):
    lin = torch.nn.Linear(64, 48).to(dtype)
    x = torch.randn(2, rows, 64).to(dtype)
    q = LinearInt8(lin)
    out = q(x)
    assert out.dtype == dtype and out.shape == (2, rows, 48)
    # Same int8 operands in float64: int32 accumulation is exact, so only the fp32 epilogue
    # (scales, bias) and the output cast round: 2^-24 (fp32) or 2^-8 (bf16) relative per element.
    xq, xs = _quantise(x.reshape(-1, 64), torch.int8, rowwise=True)
    ref = (xq.double() @ q.weight.double().t()) * xs.double() * q.weight_scale.double() + q.bias.double()
    assert rel(out.reshape(-1, 48), ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    # Against the float layer: two int8 roundings (<= 1/254 of each row's amax) give ~1% of the output norm.
    assert rel(out, lin(x).float()) < 0.03 + (1e-2 if dtype == torch.bfloat16 else 0)


def test_int8_replacement_and_shape_rule():
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, 12))
    with pytest.raises(ValueError, match="layer '2': int8 linear needs in and out features divisible by 8"):
        replace_linear_layers(model, "int8")
    assert type(model[0]) is torch.nn.Linear  # the refusal left the model untouched
    assert replace_linear_layers(model, "int8", skip_modules=["2"]) == 1
    assert isinstance(model[0], LinearInt8) and model[0].weight.dtype == torch.int8
    assert model(torch.randn(3, 64)).shape == (3, 12)
    ref = torch.nn.Linear(64, 128)
    assert rel(LinearInt8(ref).dequantised_weight(), ref.weight.detach()) < 0.01  # 127 levels per row


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (7, 5), reason="needs int8 tensor cores")
@pytest.mark.parametrize("rows", [2, 256])  # 2: the padded path (torch._int_mm needs 17 rows on CUDA)
def test_int8_linear_on_gpu(rows):
    lin = torch.nn.Linear(1536, 8960, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, 1536, device="cuda", dtype=torch.bfloat16)
    assert rel(LinearInt8(lin)(x), lin(x)) < 0.04  # two int8 roundings plus the bf16 output: see the CPU test
