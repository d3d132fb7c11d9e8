"""Compile-aware dispatch for every op with a kernel: the kernel in eager mode where it can run, the
native path under torch.compile (Inductor sees plain aten ops) and on CPU tensors without the interpreter."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

from telefuser.ops import dispatch, normalization, residual, rotary

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("the kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, S, D = 2, 6, 48
cos, sin = rotary.wan_rope_cos_sin((1, 2, 3), 16, device=DEVICE)


def _inputs():
    x, y = torch.randn(B, S, D, device=DEVICE), torch.randn(B, S, D, device=DEVICE)
    w, mod = torch.randn(D, device=DEVICE), torch.randn(B, 1, D, device=DEVICE)
    return x, y, w, mod


# op name -> (kernel module, kernel function, how the op is called)
CASES = {
    "rms_norm": ("norms", "rms_norm", lambda x, y, w, m: normalization.rms_norm(x, w, 1e-6)),
    "layer_norm": ("norms", "layer_norm", lambda x, y, w, m: normalization.layer_norm(x, w, None, 1e-6)),
    "modulate": ("modulate", "modulate", lambda x, y, w, m: normalization.modulate(x, m, m)),
    "norm_modulate": ("modulate", "norm_modulate", lambda x, y, w, m: normalization.norm_modulate(x, m, m)),
    "gated_add": ("residual", "gated_add", lambda x, y, w, m: residual.gated_add(x, y, m)),
    "rotary": ("rotary", "apply_rotary_emb", lambda x, y, w, m: rotary.apply_rotary_emb(x.view(B, S, 3, 16), cos, sin)),
}


@pytest.fixture
def spy(monkeypatch):
    def install(op: str) -> list[int]:
        module_name, function, _ = CASES[op]
        module = importlib.import_module(f"telefuser.kernels.triton.{module_name}")
        real, calls = getattr(module, function), []
        monkeypatch.setattr(module, function, lambda *a: calls.append(1) or real(*a))
        return calls
    return install


@pytest.mark.parametrize("op", list(CASES))
def test_eager_runs_kernel_compile_traces_native(op, spy):
    calls, call = spy(op), CASES[op][2]
    args = _inputs()
    with dispatch.use_dispatch({op: "torch"}):
        native = call(*args)
    with dispatch.use_dispatch({op: "triton"}):
        kernel = call(*args)
        assert calls == [1]
        # fp32 in and out, fp32 arithmetic on both paths: only summation order differs.
        torch.testing.assert_close(kernel, native, rtol=1e-5, atol=1e-5)
        graphs = []

        def capture(gm, example_inputs):
            graphs.append(str(gm.graph))
            return gm.forward

        compiled = torch.compile(call, backend=capture, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(*args), native, rtol=1e-5, atol=1e-5)
    assert calls == [1]  # the compiled call did not run the kernel...
    assert graphs and "telefuser" not in graphs[0]  # ...nor put the custom op in the graph: native aten ops only
    assert dispatch.current(op) == "torch"  # each context restored the table around it


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rule")
def test_cpu_tensors_take_native_path_without_interpreter(monkeypatch, spy):
    calls = spy("rms_norm")
    monkeypatch.delenv("TRITON_INTERPRET")
    with dispatch.use_dispatch({"rms_norm": "triton"}):
        CASES["rms_norm"][2](*_inputs())
    assert calls == []


def test_attention_stays_out_of_compiled_graphs():
    from telefuser.ops.attention import attention

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    q = torch.randn(1, 8, 2, 16, device=DEVICE)
    compiled = torch.compile(lambda t: attention(t * 2, t, t) + 1, backend=capture)
    torch.testing.assert_close(compiled(q), attention(q * 2, q, q) + 1)
    assert len(graphs) == 2 and not any("attention" in g for g in graphs)  # a graph break around it


def test_outside_a_plan_cpu_tensors_take_the_native_path(spy):
    calls = spy("rms_norm")
    with dispatch.use_dispatch({}):  # plain eager code: no plan recorded anything
        out = CASES["rms_norm"][2](*_inputs())
    assert out.shape == (B, S, D)
    assert calls == ([1] if torch.cuda.is_available() else [])  # even under Triton's interpreter


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", list(CASES))
def test_outside_a_plan_cuda_tensors_use_the_kernel(op, spy):
    calls, call = spy(op), CASES[op][2]
    with dispatch.use_dispatch({}):
        call(*_inputs())
    assert calls == [1]


def test_attention_takes_the_reference_designs_config_and_names_a_missing_package():
    from telefuser.ops.attention import attention
    from telefuser.schema.recipe import AttentionConfig

    q, k, v = (torch.randn(1, 8, 2, 16, device=DEVICE) for _ in range(3))
    out = attention(q, k, v, attention_config=AttentionConfig(attn_impl="TORCH_SDPA"))
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    if importlib.util.find_spec("flash_attn_interface") is None:
        with pytest.raises(RuntimeError, match="needs the package 'flash_attn_interface', which is not installed"):
            attention(q, k, v, attention_config=AttentionConfig(attn_impl="FLASH_ATTN_3"))
