"""Closed vocabularies of the recipe and the plan (each becomes a JSON Schema enum)."""

from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    def __str__(self) -> str:
        return self.value


class AttnImplType(StrEnum):
    """Attention implementations (the reference design's AttnImplType)."""

    TORCH_SDPA = "TORCH_SDPA"
    TORCH_CUDNN = "TORCH_CUDNN"
    FLASH_ATTN_2 = "FLASH_ATTN_2"
    FLASH_ATTN_3 = "FLASH_ATTN_3"
    FLASH_ATTN_4 = "FLASH_ATTN_4"
    SAGE_ATTN_2_8_8 = "SAGE_ATTN_2_8_8"
    SAGE_ATTN_2_8_16 = "SAGE_ATTN_2_8_16"
    SAGE_ATTN_2_8_8_SM90 = "SAGE_ATTN_2_8_8_SM90"
    SPARGE_ATTN = "SPARGE_ATTN"
    RADIAL_ATTN = "RADIAL_ATTN"
    LOCAL_SPARSE_ATTN = "LOCAL_SPARSE_ATTN"
    SSTA_ATTN = "SSTA_ATTN"  # HunyuanVideo-1.5's selective and sliding tile attention
    SOL_ATTN = "SOL_ATTN"


class WeightOffloadType(StrEnum):
    """Where a model's weights live between uses (the reference design's WeightOffloadType)."""

    NO_CPU_OFFLOAD = "NO_CPU_OFFLOAD"
    MODEL_CPU_OFFLOAD = "MODEL_CPU_OFFLOAD"
    SEQUENTIAL_CPU_OFFLOAD = "SEQUENTIAL_CPU_OFFLOAD"
    ASYNC_CPU_OFFLOAD = "ASYNC_CPU_OFFLOAD"


# The modes that stream a DiT's or a text encoder's blocks group by group (the rest move the whole model or nothing).
BLOCK_MODES = frozenset({WeightOffloadType.SEQUENTIAL_CPU_OFFLOAD, WeightOffloadType.ASYNC_CPU_OFFLOAD})


class SampleSolver(StrEnum):
    EULER = "euler"
    UNIPC = "unipc"
    DPMPP = "dpm++"
    LCM = "lcm"  # a step-distilled model's list with x0 re-noised between steps (layer2.denoising_step_list)


class TorchDtype(StrEnum):
    """Compute dtypes."""

    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class WeightDtype(StrEnum):
    """Storage dtypes of weights; `auto` means 'whatever the file holds'."""

    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"
    FLOAT8_E4M3FN = "float8_e4m3fn"
    FLOAT8_E5M2 = "float8_e5m2"


class QuantType(StrEnum):
    NONE = "none"
    FP8_E4M3FN = "fp8_e4m3fn"  # per-tensor scales
    FP8_E4M3FN_ROWWISE = "fp8_e4m3fn_rowwise"  # per-row (output channel) scales
    INT8 = "int8"


class ModelRole(StrEnum):
    DIT = "dit"
    DIT_HIGH_NOISE = "dit_high_noise"
    DIT_LOW_NOISE = "dit_low_noise"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"
    TOKENIZER = "tokenizer"
    IMAGE_ENCODER = "image_encoder"
    VFI = "vfi"  # frame interpolation after the decode (RIFE), run when layer2.enable_vfi
    GLYPH_ENCODER = "glyph_encoder"  # HunyuanVideo-1.5: byT5 on the prompt's quoted text
    DIT_SR = "dit_sr"  # HunyuanVideo-1.5: the super-resolution DiT (layer2.enable_sr)
    SR_UPSAMPLER = "sr_upsampler"  # HunyuanVideo-1.5: the SR stage's latent upsampler


DIT_ROLES = frozenset({ModelRole.DIT, ModelRole.DIT_HIGH_NOISE, ModelRole.DIT_LOW_NOISE, ModelRole.DIT_SR})


def is_dit(role: str) -> bool:
    """Whether a model of this role is a diffusion transformer (the single DiT or one of Wan2.2's MoE pair)."""
    return role in DIT_ROLES


class ModelClass(StrEnum):
    """Registry names: a plan names classes from this list, never an import path."""

    AUTO = "auto"
    WAN_DIT = "WanDiT"
    WAN_VAE = "WanVAE"
    WAN22_VAE = "Wan22VAE"
    UMT5_ENCODER = "UMT5Encoder"
    UMT5_TOKENIZER = "UMT5Tokenizer"
    CLIP_VISION = "CLIPVision"
    RIFE = "RIFE"  # Practical-RIFE v4.26's IFNet (flownet.pkl), role vfi
    TAEHV = "TAEHV"  # the tiny TAEHV decoder (taew2_1.pth / taew2_2.pth), role vae: decode only
    HUNYUAN15_DIT = "HunyuanVideo15DiT"
    HUNYUAN15_VAE = "HunyuanVideo15VAE"
    HUNYUAN15_SR_UPSAMPLER_720P = "HunyuanVideo15SRUpsampler720p"
    HUNYUAN15_SR_UPSAMPLER_1080P = "HunyuanVideo15SRUpsampler1080p"
    QWEN25VL_TEXT_ENCODER = "Qwen25VLTextEncoder"
    QWEN25VL_TOKENIZER = "Qwen25VLTokenizer"
    BYT5_ENCODER = "ByT5Encoder"
    SIGLIP_VISION = "SigLIPVision"


class PipelineType(StrEnum):
    WAN_T2V = "wan_t2v"
    WAN_I2V = "wan_i2v"
    WAN_TI2V = "wan_ti2v"  # Wan2.2 TI2V-5B: text-to-video, or image-to-video when given an image, one checkpoint
    HUNYUAN_VIDEO15_T2V = "hunyuan_video15_t2v"  # HunyuanVideo-1.5 text-to-video (+ SR with layer2.enable_sr)
    HUNYUAN_VIDEO15_I2V = "hunyuan_video15_i2v"  # HunyuanVideo-1.5 image-to-video


HUNYUAN15_PIPELINES = frozenset({PipelineType.HUNYUAN_VIDEO15_T2V, PipelineType.HUNYUAN_VIDEO15_I2V})


class TargetDevice(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class CompileBackend(StrEnum):
    INDUCTOR = "inductor"
    AOT_EAGER = "aot_eager"
    EAGER = "eager"
    CUDAGRAPHS = "cudagraphs"


class CompileMode(StrEnum):
    DEFAULT = "default"
    REDUCE_OVERHEAD = "reduce-overhead"
    MAX_AUTOTUNE = "max-autotune"
    MAX_AUTOTUNE_NO_CUDAGRAPHS = "max-autotune-no-cudagraphs"


class FeatureCacheMethod(StrEnum):
    NONE = "none"
    TEACACHE = "teacache"
    FIRST_BLOCK = "first_block"
    STATIC = "static"
    TAYLORSEER = "taylorseer"


class Resolution(StrEnum):
    P144 = "144p"
    P480 = "480p"
    P720 = "720p"
    P704 = "704p"  # Wan2.2 TI2V-5B's 720p: 1280x704 (sides multiples of 32: Wan2.2 VAE 16 x DiT patch 2)
    P1080 = "1080p"  # HunyuanVideo-1.5's 1080p SR target (its published buckets: 16:9 is 1904x1072)


class AspectRatio(StrEnum):
    R16_9 = "16:9"
    R9_16 = "9:16"
    R1_1 = "1:1"
    R4_3 = "4:3"
    R3_4 = "3:4"
    # image-to-video: the frame size whose aspect ratio is closest to the reference image's, among candidates the
    # plan records (HunyuanVideo-1.5: its published buckets, Tencent's I2V rule; schema/resolution.py)
    AUTO = "auto"


FIXED_ASPECT_RATIOS = tuple(a for a in AspectRatio if a != AspectRatio.AUTO)  # the ratios with one size per resolution
