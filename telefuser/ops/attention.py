"""Attention over the backends the plan may name.

Each backend's requirements are data in `telefuser.schema.backends`, checked by
one rule (`attention_problems`): by the compiler against the described target,
and here once per (backend, device, dtype, head dim) against the real tensors,
failing with a message naming what is missing. Attention stays out of torch.compile
graphs: the backends are already fused kernels, and several are opaque to
Dynamo.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from telefuser.schema.backends import ATTENTION_BACKENDS, attention_problems

from . import dispatch
from .quantized_attention import VARIANTS, quantized_attention

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


def _backend_package(name: str) -> Any:
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
        module = _backend_package(name)
        out = module.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    return run


def _quantized(name: str):
    """SAGE_ATTN_*: inside the runtime's planned sparse self-attention (a sparse_config beside a quantised
    attn_impl) the quantised kernel's block-sparse mode on the sparse steps and layers; dense quantised attention
    elsewhere (dense steps and layers, as Radial Attention's use_sage_attention runs them; short cross-attention
    stays exact, `quantized_attention`)."""
    def run(q, k, v, attn_mask, scale, dropout_p):
        from .planned_sparse import planned_self_attention
        from .ssta import planned_ssta

        out = planned_ssta(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, scale, quantized=name)
        if out is not None:
            return out.transpose(1, 2)
        if attn_mask is not None:
            raise ValueError(f"{name} does not take an attention mask; use TORCH_SDPA for masked attention")
        out = planned_self_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, quantized=name)
        if out is not None:
            return out.transpose(1, 2)
        return quantized_attention(q, k, v, name, scale)
    return run


def _block_sparse(q, k, v, attn_mask, scale, dropout_p):  # BNSD
    """RADIAL_ATTN / LOCAL_SPARSE_ATTN: block-sparse inside the runtime's planned self-attention (the plan's
    pattern, `planned_sparse.planned_sparse`), dense SDPA everywhere else (cross-attention, dense steps/layers)."""
    from .planned_sparse import planned_self_attention

    if attn_mask is None and dropout_p == 0.0:
        out = planned_self_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
        if out is not None:
            return out.transpose(1, 2)
    return _sdpa(q, k, v, attn_mask, scale, dropout_p)


def _ssta(q, k, v, attn_mask, scale, dropout_p):  # BNSD
    """SSTA_ATTN: HunyuanVideo-1.5's SSTA inside the runtime's planned joint attention (`ssta.planned_ssta`), dense
    SDPA elsewhere (the dense steps and blocks, the token refiner)."""
    from .ssta import planned_ssta

    if dropout_p == 0.0:
        out = planned_ssta(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, scale)
        if out is not None:
            return out.transpose(1, 2)
    return _sdpa(q, k, v, attn_mask, scale, dropout_p)


_RUNNERS = {
    "TORCH_SDPA": _sdpa,
    "TORCH_CUDNN": _cudnn,
    "FLASH_ATTN_2": _flash("FLASH_ATTN_2"),
    "FLASH_ATTN_3": _flash("FLASH_ATTN_3"),
    "FLASH_ATTN_4": _flash("FLASH_ATTN_4"),
    **{name: _quantized(name) for name in VARIANTS},
    "RADIAL_ATTN": _block_sparse,  # our block-sparse kernel (schema/backends.py)
    "LOCAL_SPARSE_ATTN": _block_sparse,
    "SSTA_ATTN": _ssta,
}
SDPA_FAMILY = ("TORCH_SDPA", "TORCH_CUDNN")  # on CPU tensors both are plain SDPA (cuDNN is a CUDA preference)


@functools.lru_cache(maxsize=None)
def backend_problems(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, ...]:
    """Why backend `name` cannot run on tensors of this device, dtype and head dim (the compiler's rule,
    `telefuser.schema.backends.attention_problems`, on the real device); checked once per combination."""
    spec = ATTENTION_BACKENDS[name]
    kind = "cuda" if device.type == "cuda" else "cpu"  # meta tensors (shape checks) count as host tensors
    if kind == "cpu" and name in SDPA_FAMILY:
        return ()
    if spec.package and (kind == "cuda" or "cpu" not in spec.devices):
        _backend_package(name)  # a backend that is not installed is named first: no other fix helps
    cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return tuple(attention_problems(spec, kind, cc, str(dtype).removeprefix("torch."), head_dim))


def check_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """Raise a ValueError naming what is missing when backend `name` cannot run here."""
    if name not in _RUNNERS:
        raise ValueError(f"attention backend {name!r} has no runner in this build (runnable: {', '.join(_RUNNERS)})")
    problems = backend_problems(name, device, dtype, head_dim)
    if problems:
        raise ValueError(f"attention backend {name} cannot run here: {'; '.join(problems)}. "
                         "Recompile the recipe with a backend the target supports (TORCH_SDPA runs everywhere).")


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
    check_backend(name, q.device, q.dtype, q.shape[-1])
    out = _RUNNERS[name](_to_bnsd(q, input_layout), _to_bnsd(k, input_layout), _to_bnsd(v, input_layout),
                         attn_mask, scale, dropout_p)
    return _from_bnsd(out, output_layout or input_layout)
