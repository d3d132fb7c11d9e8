"""HunyuanVideo-1.5 DiT architecture numbers (the plan's `arch` keys) and the published presets."""

from __future__ import annotations

from dataclasses import dataclass, field

COND_TYPE_TEXT, COND_TYPE_GLYPH, COND_TYPE_IMAGE = 0, 1, 2
LATENT_CHANNELS = 32  # the VAE's latent (AutoencoderKLConv3D latent_channels)


@dataclass(frozen=True)
class HunyuanVideo15DiTConfig:
    """Architecture numbers; defaults are the published 480p/720p T2V/I2V transformer (8.3B parameters).
    The SR transformers (720p_sr_distilled, 1080p_sr_distilled) differ in `in_channels` (98) and `use_meanflow`."""

    in_channels: int = 65  # img_in's input channels: latent + condition latent + mask (SR: + lq latent + lq mask)
    out_channels: int = LATENT_CHANNELS
    hidden_size: int = 2048
    heads_num: int = 16
    mlp_hidden_dim: int = 8192  # hidden_size * mlp_width_ratio (4)
    double_blocks: int = 54  # mm_double_blocks_depth
    single_blocks: int = 0  # mm_single_blocks_depth
    patch_size: list[int] = field(default_factory=lambda: [1, 1, 1])
    rope_dim_list: list[int] = field(default_factory=lambda: [16, 56, 56])
    rope_theta: float = 256.0
    text_states_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    refiner_blocks: int = 2  # txt_in.individual_token_refiner depth
    byt5_dim: int = 1472  # byT5-small (Glyph-SDXL-v2) d_model
    byt5_hidden: int = 2048  # byt5_in fc1/fc2 width
    vision_states_dim: int = 1152  # SigLIP so400m hidden size
    use_meanflow: bool = False  # time_r_in: SR distilled models
    guidance_embed: bool = False  # guidance_in: guidance-distilled models (none published for 1.5)
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads_num:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads_num {self.heads_num}")
        if sum(self.rope_dim_list) != self.head_dim or any(d % 2 for d in self.rope_dim_list):
            raise ValueError(f"rope_dim_list {self.rope_dim_list} must be even and sum to the head dim {self.head_dim}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be [t, h, w], got {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads_num


HUNYUAN15_8B = HunyuanVideo15DiTConfig()
HUNYUAN15_SR_8B = HunyuanVideo15DiTConfig(in_channels=98, use_meanflow=True)
