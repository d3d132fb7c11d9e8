"""The reference design's configuration classes, as the recipe schema's own pydantic models.

Every name here *is* a class of `telefuser.schema` (re-exported, never copied), so code written
against the reference design builds the very objects a TOML recipe becomes, validated by the same
rules, and compiles them with `telefuser.compile`:

    from telefuser.core.config import AttentionConfig, AttnImplType, ModelRuntimeConfig, ParallelConfig

    attn = AttentionConfig.dense_attention(AttnImplType.FLASH_ATTN_3)
    ParallelConfig(device_ids=[0, 1, 2, 3], sp_ulysses_degree=4).validate()

Mapping onto the three layers
-----------------------------
* Per-model runtime settings (`ModelRuntimeConfig`, `AttentionConfig` + `SparseAttentionConfig`,
  `OffloadConfig` / `WeightOffloadType`, `CompileConfig`, `QuantConfig`, `LoraConfig`,
  `FeatureCacheConfig`) and `ParallelConfig` are layer-2 models unchanged. The reference's
  `AttentionConfig.dense_attention(attn_impl=FLASH_ATTN_2)`, `.radial_attention(...)` and
  `.local_sparse_attention(...)` and `ParallelConfig(...).validate()` are methods of those models.
  Keys the reference has and the recipe does not (e.g. `device_id`, `ray_config`, attention `scale`)
  are refused like any unknown key: pydantic raises ValidationError naming the field.
* `Wan21VideoPipelineConfig`, `Wan22VideoPipelineConfig` and `HunyuanVideo15PipelineConfig` are all
  `Layer2`, the inference config (HunyuanVideo-1.5's SR stage: `enable_sr`, `lq_noise_strength`, `sr_config`):
  one model holds the single-DiT and the MoE settings (`boundary`, `cfg_scale_high`, `cfg_scale_low`
  apply when layer 1 has the two DiTs), and `sample_solver`, `enable_clip_stage`,
  `enable_denoising_parallel`, `enable_vae_parallel`, `enable_vfi` are its fields under the same
  names. The reference's per-model keywords are accepted by the constructor and filed under
  `Layer2.models`, which is keyed by layer-1 model name, using each role's conventional name
  (`MODEL_CONFIG_KEYWORDS`):

      dit_config -> models["dit"]                  dit_high_config -> models["dit_high_noise"]
      vae_config -> models["vae"]                  dit_low_config  -> models["dit_low_noise"]
      text_encoding_config -> models["text_encoder"]
      clip_config -> models["image_encoder"]       vfi_config -> models["vfi"]

  So name the layer-1 models by role (as recipes/tiny.toml does), or set `models={name: ...}`
  directly when they are named otherwise (wan22_t2v_a14b.toml's "dit_high" / "dit_low"). The
  keywords are construction conveniences: never stored or dumped, not recipe keys. `vfi_config`
  configures the layer-1 model named "vfi" (role `vfi`, class `RIFE`; with `enable_vfi = True`).
* What the reference passes to a pipeline's constructor beyond that (model paths, torch dtype,
  the user's prompt and seed) is layer 1 (`Layer1`, `ModelSpec`) and layer 3 (`Layer3`), and
  `Recipe` ties the three layers and the `Target` together; `recipe.to_toml()` writes it as a file.
"""

from __future__ import annotations

from telefuser.schema.enums import (
    AspectRatio,
    AttnImplType,
    CompileBackend,
    CompileMode,
    FeatureCacheMethod,
    ModelClass,
    ModelRole,
    PipelineType,
    QuantType,
    Resolution,
    SampleSolver,
    TargetDevice,
    TorchDtype,
    WeightDtype,
    WeightOffloadType,
)
from telefuser.schema.model_config import (
    AttentionConfig,
    CompileConfig,
    FeatureCacheConfig,
    LoraConfig,
    ModelRuntimeConfig,
    OffloadConfig,
    QuantConfig,
    SparseAttentionConfig,
)
from telefuser.schema.parallel import ParallelConfig
from telefuser.schema.recipe import (
    MODEL_CONFIG_KEYWORDS,
    AspectRatioParam,
    DeclaredAttributes,
    ImageParam,
    IntParam,
    Layer1,
    Layer2,
    Layer3,
    ModelSpec,
    Recipe,
    ResolutionParam,
    SRConfig,
    StringParam,
    Target,
)

# The reference design's pipeline configs: the inference config itself (see the module docstring).
Wan21VideoPipelineConfig = Layer2
Wan22VideoPipelineConfig = Layer2
# HunyuanVideo-1.5 (layer1.pipeline "hunyuan_video15_t2v" / "hunyuan_video15_i2v"): the same inference config, whose
# `enable_sr`, `lq_noise_strength` and `sr_config` (SRConfig: the SR stage's solver settings) run its SR stage.
HunyuanVideo15PipelineConfig = Layer2

__all__ = [
    # the reference design's names
    "AttentionConfig", "AttnImplType", "CompileConfig", "FeatureCacheConfig", "LoraConfig", "ModelRuntimeConfig",
    "OffloadConfig", "ParallelConfig", "QuantConfig", "QuantType", "SparseAttentionConfig", "WeightOffloadType",
    "Wan21VideoPipelineConfig", "Wan22VideoPipelineConfig", "HunyuanVideo15PipelineConfig", "SRConfig",
    "MODEL_CONFIG_KEYWORDS",
    # the rest of a recipe, to build one in Python
    "Recipe", "Target", "Layer1", "ModelSpec", "DeclaredAttributes", "Layer2", "Layer3", "StringParam", "IntParam",
    "ResolutionParam", "AspectRatioParam", "ImageParam",
    "AspectRatio", "CompileBackend", "CompileMode", "FeatureCacheMethod", "ModelClass", "ModelRole", "PipelineType",
    "Resolution", "SampleSolver", "TargetDevice", "TorchDtype", "WeightDtype",
]
