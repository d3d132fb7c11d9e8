"""Attention over the backends the plan may name.

Each backend's requirements are data in `telefuser.schema.backends` (the
compiler checks them against the target); here the backend runs, or fails
with a message naming what is missing. Attention stays out of torch.compile
graphs: the backends are already fused kernels, and several are opaque to
Dynamo.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import dispatch
from .requirements import ATTENTION_BACKENDS

LAYOUTS = ("BSND", "BNSD")


def _to_bnsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "BSND" else t


def _from_bnsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(1, 2) if layout == "BSND" else t


def _sdpa(q, k, v, attn_mask, scale, dropout_p):  # BNSD
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def _cudnn(q, k, v, attn_mask, scale, dropout_p):
    if not q.is_cuda:  # cuDNN is a preference among SDPA's CUDA kernels; on CPU it is plain SDPA
        return _sdpa(q, k, v, attn_mask, scale, dropout_p)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return _sdpa(q, k, v, attn_mask, scale, dropout_p)


def _flash_package(name: str) -> Any:
    spec = ATTENTION_BACKENDS[name]
    try:
        return importlib.import_module(spec.package)  # type: ignore[arg-type]
    except ImportError as exc:
        raise RuntimeError(f"attention backend {name} needs the package {spec.package!r}, which is not installed; "
                           "install it or recompile the recipe with TORCH_SDPA.") from exc


def _flash(name: str):
    def run(q, k, v, attn_mask, scale, dropout_p):
        if attn_mask is not None:
            raise ValueError(f"{name} does not take an attention mask; use TORCH_SDPA for masked attention")
        module = _flash_package(name)
        out = module.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    return run


def _sage(name: str, function: str):
    def run(q, k, v, attn_mask, scale, dropout_p):
        if attn_mask is not None:
            raise ValueError(f"{name} does not take an attention mask; use TORCH_SDPA for masked attention")
        return getattr(_flash_package(name), function)(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)
    return run


_RUNNERS = {
    "TORCH_SDPA": _sdpa,
    "TORCH_CUDNN": _cudnn,
    "FLASH_ATTN_2": _flash("FLASH_ATTN_2"),
    "FLASH_ATTN_3": _flash("FLASH_ATTN_3"),
    "FLASH_ATTN_4": _flash("FLASH_ATTN_4"),
    "SAGE_ATTN_2_8_8": _sage("SAGE_ATTN_2_8_8", "sageattn_qk_int8_pv_fp8_cuda"),
    "SAGE_ATTN_2_8_16": _sage("SAGE_ATTN_2_8_16", "sageattn_qk_int8_pv_fp16_cuda"),
    "SAGE_ATTN_2_8_8_SM90": _sage("SAGE_ATTN_2_8_8_SM90", "sageattn_qk_int8_pv_fp8_cuda_sm90"),
}
SDPA_FAMILY = ("TORCH_SDPA", "TORCH_CUDNN")  # on CPU tensors both are plain SDPA (cuDNN is a CUDA preference)


def requirement_problems(name: str, q: torch.Tensor) -> list[str]:
    """Why backend `name` cannot run on q (device, capability, dtype, head dim), from its declared requirements."""
    spec = ATTENTION_BACKENDS[name]
    if not q.is_cuda:
        return [] if name in SDPA_FAMILY else [f"runs on {'/'.join(spec.devices)}, the tensors are on {q.device.type}"]
    problems = []
    cc = torch.cuda.get_device_capability(q.device)
    if (spec.min_cc and cc < spec.min_cc) or (spec.max_cc and cc > spec.max_cc):
        problems.append(f"needs compute capability {spec.min_cc}..{spec.max_cc or 'any'}, the GPU has {cc}")
    if str(q.dtype).removeprefix("torch.") not in spec.dtypes:
        problems.append(f"supports {', '.join(spec.dtypes)}, not {q.dtype}")
    if spec.head_dims and q.shape[-1] not in spec.head_dims:
        problems.append(f"supports head dims {spec.head_dims}, not {q.shape[-1]}")
    return problems


def backend_name(attention_config: Union[str, Any, None]) -> str:
    if attention_config is None:
        return dispatch.current("attention", "TORCH_SDPA")
    return attention_config if isinstance(attention_config, str) else str(attention_config.attn_impl)


@torch.compiler.disable
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_config: Union[str, Any, None] = None,
              input_layout: str = "BSND", output_layout: Optional[str] = None, attn_mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over [B, S, N, D] ("BSND") or [B, N, S, D] ("BNSD") tensors."""
    if input_layout not in LAYOUTS or (output_layout or input_layout) not in LAYOUTS:
        raise ValueError(f"layouts must be one of {LAYOUTS}, got {input_layout!r} -> {output_layout!r}")
    name = backend_name(attention_config)
    if name not in _RUNNERS:
        known = ", ".join(_RUNNERS)
        raise ValueError(f"attention backend {name!r} has no runner in this build (runnable: {known})")
    if ATTENTION_BACKENDS[name].package:
        _flash_package(name)  # a backend that is not installed is named first: no other fix helps
    problems = requirement_problems(name, q)
    if problems:
        raise ValueError(f"attention backend {name} cannot run here: {'; '.join(problems)}. "
                         "Recompile the recipe with a backend the target supports (TORCH_SDPA runs everywhere).")
    out = _RUNNERS[name](_to_bnsd(q, input_layout), _to_bnsd(k, input_layout), _to_bnsd(v, input_layout),
                         attn_mask, scale, dropout_p)
    return _from_bnsd(out, output_layout or input_layout)



def __getattr__(name: str) -> Any:
    # `telefuser.ops.attention.long_context_attention(q, k, v, device_mesh=mesh)`: sequence-parallel attention
    # beside plain attention in the API; resolved lazily because telefuser.ops.long_context builds on `attention`.
    if name == "long_context_attention":
        from .long_context import long_context_attention

        return long_context_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
