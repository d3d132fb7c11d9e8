"""Per-model runtime settings of layer 2 (`layer2.models.<name>`): attention, offload, compile, quantisation,
LoRA, feature cache, dtype, CPU execution. The reference design's names (telefuser.core.config re-exports them)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, PositiveInt, model_validator

from .base import StrictModel
from .enums import (
    AttnImplType,
    CompileBackend,
    CompileMode,
    FeatureCacheMethod,
    QuantType,
    TorchDtype,
    WeightOffloadType,
)


class SparseAttentionConfig(StrictModel):
    sparse_impl: Optional[Literal["radial", "local", "ssta", "sol"]] = Field(
        None, description="Sparse pattern: radial, local, ssta (HunyuanVideo-1.5's selective and sliding tile "
        "attention) or sol; must agree with a sparse attn_impl. Beside a quantised attn_impl (SAGE_ATTN_*) it names the "
        "pattern (radial, local or ssta) that attn_impl's kernel runs block-sparse (Radial Attention's "
        "use_sage_attention)."
    )
    dense_timesteps: int = Field(0, ge=0, description="First N denoising steps run dense attention.")
    dense_layers: int = Field(0, ge=0, description="First N transformer blocks run dense attention.")
    decay_factor: float = Field(1.0, gt=0, le=1.0, description="radial: scales the band of frames at distance >= 2 "
                                "(1.0: Radial Attention's).")
    local_window_size: int = Field(0, ge=0, description="Tokens per side of the local window (0 = off).")
    block_size: int = Field(128, ge=16, description="radial, local: tokens per mask block, a power of two (128: Radial "
                            "Attention's). ssta: its tile is the block.")
    tile_size: tuple[PositiveInt, PositiveInt, PositiveInt] = Field(
        (6, 8, 8), description="ssta: the (t, h, w) tile of video tokens that forms one block (the released (6, 8, 8)).")
    win_size: tuple[PositiveInt, PositiveInt, PositiveInt] = Field(
        (3, 3, 3), description="ssta: the sliding window in tiles around a query's tile, odd sizes (released (3, 3, 3)).")
    ssta_topk: PositiveInt = Field(64, description="ssta: tiles each query tile adds by importance, per head (released "
                                   "64; halved for videos of at most 31 latent frames, as published).")
    ssta_lambda: float = Field(0.7, ge=0, le=1, description="ssta: importance = lambda * similarity - (1 - lambda) * "
                               "redundancy of the tiles' mean queries and keys (released 0.7).")


# The sparse attention implementations and the `sparse_impl` each one runs.
SPARSE_IMPL_OF = {
    AttnImplType.RADIAL_ATTN.value: "radial",
    AttnImplType.LOCAL_SPARSE_ATTN.value: "local",
    AttnImplType.SSTA_ATTN.value: "ssta",
    AttnImplType.SOL_ATTN.value: "sol",
}


QUANTISED_ATTN = (AttnImplType.SAGE_ATTN_2_8_8, AttnImplType.SAGE_ATTN_2_8_16, AttnImplType.SAGE_ATTN_2_8_8_SM90)


def _sparse_kernel(attn_impl: AttnImplType, sparse: AttnImplType) -> AttnImplType:
    """The attn_impl a sparse constructor takes: its own sparse one, or a quantised one (block-sparse mode)."""
    impl = AttnImplType(attn_impl)
    if impl != sparse and impl not in QUANTISED_ATTN:
        raise ValueError(f"attn_impl {impl.value} cannot run the pattern: use {sparse.value} or one of "
                         f"{', '.join(q.value for q in QUANTISED_ATTN)}")
    return impl


class AttentionConfig(StrictModel):
    attn_impl: AttnImplType = AttnImplType.TORCH_SDPA
    sparse_config: Optional[SparseAttentionConfig] = None

    @classmethod
    def dense_attention(cls, attn_impl: AttnImplType = AttnImplType.FLASH_ATTN_2, **kwargs: Any) -> "AttentionConfig":
        """Dense attention with `attn_impl` (the reference design's default: FLASH_ATTN_2)."""
        return cls(attn_impl=attn_impl, sparse_config=None, **kwargs)

    @classmethod
    def radial_attention(cls, dense_timesteps: int = 40, dense_layers: int = 0, decay_factor: float = 1.0,
                         attn_impl: AttnImplType = AttnImplType.RADIAL_ATTN, **kwargs: Any) -> "AttentionConfig":
        """Radial sparse attention; the first `dense_timesteps` steps and `dense_layers` blocks stay dense.
        `attn_impl`: RADIAL_ATTN (16-bit kernel, dense steps exact) or a SAGE_ATTN_* variant (its block-sparse mode,
        dense steps quantised: Radial Attention's use_sage_attention)."""
        sparse = SparseAttentionConfig(sparse_impl="radial", dense_timesteps=dense_timesteps,
                                       dense_layers=dense_layers, decay_factor=decay_factor)
        return cls(attn_impl=_sparse_kernel(attn_impl, AttnImplType.RADIAL_ATTN), sparse_config=sparse, **kwargs)

    @classmethod
    def local_sparse_attention(cls, dense_timesteps: int = 40, dense_layers: int = 0, local_window_size: int = 6,
                               attn_impl: AttnImplType = AttnImplType.LOCAL_SPARSE_ATTN,
                               **kwargs: Any) -> "AttentionConfig":
        """Local-window sparse attention of `local_window_size` tokens per side; `attn_impl` as in
        `radial_attention` (LOCAL_SPARSE_ATTN or a SAGE_ATTN_* variant)."""
        sparse = SparseAttentionConfig(sparse_impl="local", dense_timesteps=dense_timesteps,
                                       dense_layers=dense_layers, local_window_size=local_window_size)
        return cls(attn_impl=_sparse_kernel(attn_impl, AttnImplType.LOCAL_SPARSE_ATTN), sparse_config=sparse,
                   **kwargs)

    @classmethod
    def ssta_attention(cls, dense_timesteps: int = 0, dense_layers: int = 0, ssta_topk: int = 64,
                       ssta_lambda: float = 0.7, tile_size: tuple[int, int, int] = (6, 8, 8),
                       win_size: tuple[int, int, int] = (3, 3, 3), attn_impl: AttnImplType = AttnImplType.SSTA_ATTN,
                       **kwargs: Any) -> "AttentionConfig":
        """HunyuanVideo-1.5's SSTA (its released settings by default: every step and block sparse); `attn_impl`:
        SSTA_ATTN (16-bit kernel) or a SAGE_ATTN_* variant (its block-sparse mode)."""
        sparse = SparseAttentionConfig(sparse_impl="ssta", dense_timesteps=dense_timesteps, dense_layers=dense_layers,
                                       ssta_topk=ssta_topk, ssta_lambda=ssta_lambda, tile_size=tile_size,
                                       win_size=win_size)
        return cls(attn_impl=_sparse_kernel(attn_impl, AttnImplType.SSTA_ATTN), sparse_config=sparse, **kwargs)

    def is_sparse(self) -> bool:
        return self.attn_impl in SPARSE_IMPL_OF

    @model_validator(mode="after")
    def _sparse_impl_matches(self) -> "AttentionConfig":
        wanted = SPARSE_IMPL_OF.get(self.attn_impl)
        found = self.sparse_config.sparse_impl if self.sparse_config is not None else None
        if wanted is not None and found is not None and found != wanted:
            raise ValueError(f"attn_impl {self.attn_impl} runs sparse_impl {wanted!r}, but sparse_config.sparse_impl "
                             f"is {found!r}; make them agree (or leave sparse_impl out)")
        return self


class OffloadConfig(StrictModel):
    offload_type: WeightOffloadType = WeightOffloadType.NO_CPU_OFFLOAD
    pin_cpu_memory: bool = True
    offload_ratio: float = Field(1.0, gt=0, le=1.0, description="SEQUENTIAL/ASYNC_CPU_OFFLOAD: fraction of the "
                                 "blocks of a DiT or text encoder kept on the CPU and streamed in (spread evenly); the rest "
                                 "stay resident.")
    prefetch_size: int = Field(1, ge=0, description="ASYNC_CPU_OFFLOAD: block groups copied ahead of the one "
                               "computing (at least 1); MODEL_CPU_OFFLOAD: 0 turns the planned prefetch off.")
    blocks_per_group: Optional[PositiveInt] = Field(
        None, description="SEQUENTIAL/ASYNC_CPU_OFFLOAD: blocks streamed in together (one copy, one device buffer); "
        "unset: the compiler takes the fewest blocks whose weights reach 64 MiB. The plan records the choice.")


class CompileConfig(StrictModel):
    enabled: bool = False
    backend: CompileBackend = CompileBackend.INDUCTOR
    mode: CompileMode = CompileMode.DEFAULT
    fullgraph: bool = False
    dynamic: bool = False


class QuantConfig(StrictModel):
    quant_type: QuantType = QuantType.NONE
    skip_modules: list[str] = Field(default_factory=list, description="Module name patterns left unquantised.")


class LoraConfig(StrictModel):
    """One LoRA file for this model: kohya/ComfyUI (`lora_down`/`lora_up`/`alpha`, `diffusion_model.` or
    `lora_unet_` prefixes, `.diff`/`.diff_b`/`.diff_m` full differences) or diffusers/PEFT (`lora_A`/`lora_B`)."""

    path: str = Field(min_length=1, description="The LoRA .safetensors file; relative to the recipe.")
    strength: float = Field(1.0, description="Multiplier of the LoRA's update (times alpha / rank).")
    merge: bool = Field(True, description="true: added into the weights at load; false: applied beside each "
                        "targeted linear (y = W x + strength * alpha/rank * up(down x)), which leaves FP8 "
                        "weights FP8 (required for a LoRA on an FP8 checkpoint's linears).")
    on_mismatch: Literal["error", "warn"] = Field(
        "error", description="A LoRA module that names no layer of the model (or one of another shape): error "
        "refuses the recipe with the counts; warn applies the modules that match and warns.")


class FeatureCacheConfig(StrictModel):
    """Step cache around the DiT (runtime/caches): reused steps add the cached residual of the block stack."""

    method: FeatureCacheMethod = Field(FeatureCacheMethod.NONE, description="teacache, first_block (cache-dit's "
                                       "DBCache, Bn 0), static (compute_steps), taylorseer; none: no cache.")
    threshold: float = Field(0.0, ge=0, description="teacache / first_block: reuse while the (rescaled, accumulated) "
                             "relative L1 change stays under it; 0 never reuses (bit-identical to no cache).")
    compute_steps: Optional[list[int]] = Field(
        None, description="static: the 0-based denoising steps that compute (the others reuse); static only.")
    warmup_steps: int = Field(0, ge=0, description="The first N steps always compute.")
    max_consecutive_skips: Optional[int] = Field(
        None, ge=0, description="At most this many reused steps in a row (unset: no limit).")
    first_blocks: PositiveInt = Field(1, description="first_block: blocks that run every step (cache-dit's Fn).")
    interval: PositiveInt = Field(2, description="taylorseer: a step computes every `interval` steps.")
    order: int = Field(1, ge=0, le=2, description="taylorseer: order of the Taylor forecast of reused steps.")
    coefficients: Optional[list[float]] = Field(
        None, description="teacache: the rescaling polynomial (highest power first); unset: the published fit for "
        "the DiT (TeaCache's Wan2.1 T2V 1.3B/14B, I2V 14B 480p/720p; LightX2V's HunyuanVideo-1.5 8.3B T2V/I2V "
        "480p/720p).")

    @model_validator(mode="after")
    def _method_fields(self) -> "FeatureCacheConfig":
        if (self.method == FeatureCacheMethod.STATIC) != (self.compute_steps is not None):
            raise ValueError("compute_steps is the static method's schedule: give it exactly when method = \"static\"")
        if self.compute_steps is not None and any(s < 0 for s in self.compute_steps):
            raise ValueError(f"compute_steps are 0-based step indices, got {self.compute_steps}")
        if self.coefficients is not None and self.method != FeatureCacheMethod.TEACACHE:
            raise ValueError("coefficients are TeaCache's polynomial: only with method = \"teacache\"")
        return self


class ModelRuntimeConfig(StrictModel):
    """Per-model execution settings (keyed by the model's name in layer 1)."""

    attention_config: AttentionConfig = Field(default_factory=AttentionConfig)
    offload_config: OffloadConfig = Field(default_factory=OffloadConfig)
    compile_config: CompileConfig = Field(default_factory=CompileConfig)
    quant_config: QuantConfig = Field(default_factory=QuantConfig)
    lora_configs: list[LoraConfig] = Field(default_factory=list)
    feature_cache_config: FeatureCacheConfig = Field(default_factory=FeatureCacheConfig)
    torch_dtype: Optional[TorchDtype] = Field(None, description="Override of layer1.torch_dtype for this model.")
    run_on_cpu: bool = Field(False, description="Keep this model in host memory and run it on the CPU (its outputs "
                             "are copied to the device): the text encoder or the CLIP image encoder only.")
