"""The dispatch table: for each model and op, the implementation the runtime will call, and why."""

from __future__ import annotations

from telefuser.errors import RecipeError
from telefuser.schema.backends import ATTENTION_BACKENDS, KERNEL_PACKAGE, AttentionBackend, attention_problems
from telefuser.schema.plan import DispatchEntry, PlannedModel, ResolvedTarget
from telefuser.schema.recipe import ModelRuntimeConfig

from .skip_work import pattern_wired

KERNEL_OPS = ("rms_norm", "layer_norm", "norm_modulate", "modulate", "rotary", "gated_add")
OPS_BY_CLASS: dict[str, tuple[str, ...]] = {
    "WanDiT": ("attention", *KERNEL_OPS, "linear"),
    "WanVAE": ("attention",),
    "UMT5Encoder": ("attention", "rms_norm", "linear"),
    "CLIPVision": ("attention", "layer_norm", "linear"),
    "HunyuanVideo15DiT": ("attention", *KERNEL_OPS, "linear"),
    "HunyuanVideo15VAE": ("attention",),
    "Qwen25VLTextEncoder": ("attention", "rms_norm", "linear"),
    "ByT5Encoder": ("attention", "rms_norm", "linear"),
    "SigLIPVision": ("attention", "layer_norm", "linear"),
}
FP8_MIN_CC = (8, 9)  # float8 tensor cores (torch._scaled_mm): Ada and Hopper onwards


def _cc(target: ResolvedTarget) -> tuple[int, int] | None:
    return tuple(int(x) for x in target.compute_capability.split(".")) if target.compute_capability else None  # type: ignore[return-value]


def target_attention_problems(spec: AttentionBackend, target: ResolvedTarget, dtype: str,
                              head_dim: int | None) -> list[str]:
    """Why `spec` cannot run on `target` (empty when it can)."""
    return attention_problems(spec, target.device, _cc(target), dtype, head_dim, target.packages)


def _head_dim(model: PlannedModel) -> int | None:
    """Attention head width, or None where the arch is not known (--no-weights without the numbers)."""
    width_key, heads_key = {"WanDiT": ("dim", "num_heads"), "UMT5Encoder": ("dim_attn", "num_heads"),
                            "ByT5Encoder": ("dim_attn", "num_heads"), "HunyuanVideo15DiT": ("hidden_size", "heads_num"),
                            "Qwen25VLTextEncoder": ("hidden_size", "num_heads"),
                            "SigLIPVision": ("dim", "num_heads")}.get(model.class_, (None, None))
    arch = model.arch
    if width_key in arch and heads_key in arch:
        return int(arch[width_key]) // int(arch[heads_key])
    return None


QUANTISED = ("SAGE_ATTN_2_8_8", "SAGE_ATTN_2_8_16", "SAGE_ATTN_2_8_8_SM90")  # telefuser/kernels/triton/sage_attention.py


def _attention(model: PlannedModel, runtime: ModelRuntimeConfig, target: ResolvedTarget) -> DispatchEntry:
    impl = runtime.attention_config.attn_impl
    head_dim = _head_dim(model)
    spec = ATTENTION_BACKENDS[impl]
    problems = target_attention_problems(spec, target, model.compute_dtype, head_dim)
    if problems:
        workable = [name for name, s in ATTENTION_BACKENDS.items()
                    if not target_attention_problems(s, target, model.compute_dtype, head_dim)
                    and pattern_wired(name, model.class_)]
        raise RecipeError(
            f"layer2.models.{model.name}.attention_config.attn_impl = {impl!r} cannot run on this target "
            f"({target.device}{' cc ' + target.compute_capability if target.compute_capability else ''}): "
            f"{'; '.join(problems)}. Backends that would work: {', '.join(workable) or 'none'}."
        )
    reason = f"requested; {spec.description}; requirements met on the target"
    if impl in QUANTISED:
        if target.device != "cuda":
            reason += "; on the CPU the PyTorch reference of the kernel's arithmetic (the kernel under TRITON_INTERPRET=1)"
        reason += ("; cross-attention over <= 2048 keys (text, image tokens) stays exact SDPA; under sp_ring "
                   "the kernel's log-sum-exp merges the blocks")
        if runtime.attention_config.sparse_config is not None:  # compiler/skip_work.py
            reason += ("; with the sparse_config: self-attention through the kernel's block-sparse mode over the mask "
                       "the denoise stage records (sparse_attention), dense quantised on the dense steps and layers")
    elif impl == "SSTA_ATTN":  # compiler/skip_work.py
        reason += ("; the joint attention through SSTA (the denoise stage's sparse_attention: the window and the top-k "
                   "tiles chosen per call, context tokens dense), the kernel on CUDA, its PyTorch reference on the CPU; "
                   "the dense steps and layers and the token refiner run TORCH_SDPA")
    elif impl in ("RADIAL_ATTN", "LOCAL_SPARSE_ATTN"):  # compiler/skip_work.py
        reason += ("; self-attention block-sparse over the mask the denoise stage records (sparse_attention: pattern, "
                   "density at the default resolution), the kernel on CUDA, its PyTorch reference on the CPU; "
                   "cross-attention and the dense steps and layers run TORCH_SDPA")
    elif impl in ("FLASH_ATTN_2", "FLASH_ATTN_3", "FLASH_ATTN_4"):
        reason += "; under sp_ring the blocks run SDPA's kernels, which return the log-sum-exp the merge needs"
    return DispatchEntry(model=model.name, op="attention", impl=impl, reason=reason)


def _kernel_op(model: PlannedModel, op: str, runtime: ModelRuntimeConfig, target: ResolvedTarget) -> DispatchEntry:
    if target.device != "cuda":
        impl, reason = "torch", "CPU target: native PyTorch"
    elif runtime.compile_config.enabled:
        impl, reason = "torch", "torch.compile is enabled: Inductor traces the native op and fuses it with its neighbours"
    elif KERNEL_PACKAGE in target.packages:
        impl, reason = "triton", "eager mode on CUDA: TeleFuser's fused Triton kernel (one pass over memory)"
    else:
        impl, reason = "torch", f"{KERNEL_PACKAGE} is not installed on the target: native PyTorch"
    return DispatchEntry(model=model.name, op=op, impl=impl, reason=reason)


def _linear(model: PlannedModel, runtime: ModelRuntimeConfig, target: ResolvedTarget) -> DispatchEntry:
    quant = runtime.quant_config.quant_type
    stored = model.attributes.fp8_layout
    cc = _cc(target)
    if stored is not None and quant == "none":
        if target.device == "cuda" and (cc is None or cc < FP8_MIN_CC):
            raise RecipeError(
                f"model {model.name!r} is an FP8 checkpoint, whose linears run on float8 tensor cores (compute "
                f"capability >= 8.9); the target is cuda{' cc ' + target.compute_capability if target.compute_capability else ''}."
                " Use the model's bf16 checkpoint on this GPU.")
        where = "PyTorch's CPU implementation" if target.device == "cpu" else "float8 tensor cores"
        return DispatchEntry(model=model.name, op="linear", impl="fp8_scaled_mm",
                             reason=f"FP8 checkpoint run as stored ({stored.granularity.replace('_', ' ')} weight "
                                    f"scales, per-{'row' if stored.granularity == 'per_channel' else 'tensor'} "
                                    f"activation scales): torch._scaled_mm, {where}; other linears torch")
    if quant == "none":
        return DispatchEntry(model=model.name, op="linear", impl="torch", reason="no quantisation: torch.nn.Linear (cuBLAS)")
    if target.device != "cuda" or cc is None or (quant.startswith("fp8") and cc < FP8_MIN_CC):
        raise RecipeError(
            f"layer2.models.{model.name}.quant_config.quant_type = {quant!r} needs a CUDA GPU with compute capability "
            f">= 8.9 (float8 tensor cores); the target is {target.device}"
            f"{' cc ' + target.compute_capability if target.compute_capability else ''}. Use type = \"none\"."
        )
    if quant == "int8":
        return DispatchEntry(model=model.name, op="linear", impl="int8_mm", reason="int8 weights and activations (torch._int_mm)")
    scales = "per-row" if quant.endswith("rowwise") else "per-tensor"
    return DispatchEntry(model=model.name, op="linear", impl="fp8_scaled_mm",
                         reason=f"fp8 e4m3 weights and activations, {scales} scales (torch._scaled_mm)")


def build_dispatch(models: list[PlannedModel], runtimes: dict[str, ModelRuntimeConfig], target: ResolvedTarget) -> list[DispatchEntry]:
    entries = []
    host = target.model_copy(update={"device": "cpu", "gpu": None, "compute_capability": None})
    for model in models:
        runtime = runtimes.get(model.name, ModelRuntimeConfig())
        where = host if runtime.run_on_cpu else target  # run_on_cpu: chosen as for a CPU target
        for op in OPS_BY_CLASS.get(model.class_, ()):
            if op == "attention":
                entries.append(_attention(model, runtime, where))
            elif op == "linear":
                entries.append(_linear(model, runtime, where))
            else:
                entries.append(_kernel_op(model, op, runtime, where))
    return entries
