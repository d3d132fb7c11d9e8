"""The HunyuanVideo-1.5 super-resolution stage's model pieces (tencent/HunyuanVideo-1.5 `hunyuan_video_sr_pipeline.py`,
`modules/upsample.py`; diffusers has no SR pipeline).

The SR DiT (`transformer/720p_sr_distilled`: 480p -> 720p, `transformer/1080p_sr_distilled`: 720p -> 1080p) is the
base DiT architecture (`dit.HunyuanVideo15DiT`) with two differences read from the published code and weights:
- 98 input channels: the noisy latent (32), the base model's conditioning (32 condition latent + 1 task mask: the
  first frame's latent and mask 1 at frame 0 for I2V, zeros for T2V) and the low-resolution conditioning: the
  upsampled, noised low-resolution latent (32) and a mask of ones (1);
- MeanFlow: `time_r_in` embeds the next step's timestep (0 at the last step), added to the time vector.
Its schedule is its own (published: flow_shift 2.0, guidance 1.0; 6 steps for 720p, 8 for 1080p).

The published recipe for the low-resolution conditioning, given the base stage's final latent `lq` [B, 32, T, h, w]:
1. the SR latent size is the high-resolution bucket whose aspect ratio is closest to the low-resolution video's
   (`sr_target_size`); the frame count is unchanged;
2. every latent frame is resized bilinearly (align_corners False) to that size, then refined by the learned latent
   upsampler of the SR version (`upsampler/<version>`, in float32): `SRUpsampler720p` or `SRUpsampler1080p`;
3. it is noised with `lq_noise_strength` s (published 0.7): (1 - s) * lq + s * noise, noise ~ N(0, 1);
4. while the SR timestep t >= 1000 * s the DiT sees [cond, mask, lq, ones]; once t < 1000 * s the low-resolution
   channels and their mask are zeros (`sr_condition` returns both, `sr_condition_for` picks one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .buckets import BUCKET_BASE_SIZE, crop_size_buckets
from .dit import condition_latents
from .vae import CausalConv3d, ResnetBlock, RMSNorm3d

# Published SR stage settings (hyvideo/commons SR_PIPELINE_CONFIGS) and the base -> SR version map.
SR_VERSIONS = {
    "720p_sr_distilled": {"base_resolution": "480p", "target_resolution": "720p", "flow_shift": 2.0,
                          "guidance_scale": 1.0, "num_inference_steps": 6, "upsampler": "SRUpsampler720p"},
    "1080p_sr_distilled": {"base_resolution": "720p", "target_resolution": "1080p", "flow_shift": 2.0,
                           "guidance_scale": 1.0, "num_inference_steps": 8, "upsampler": "SRUpsampler1080p"},
}
LQ_NOISE_STRENGTH = 0.7  # the published SR pipeline's noise_scale


@dataclass(frozen=True)
class SRUpsampler720pConfig:
    """Tencent's SRTo720pUpsampler: causal convolutions with residual blocks, latent -> latent at the same size."""

    in_channels: int = 32
    out_channels: int = 32
    hidden_channels: int = 64
    num_blocks: int = 6
    global_residual: bool = False


class _ResidualBlock(nn.Module):
    """x + conv(SiLU(conv(SiLU(conv(x))))) (keys block.0 / block.2 / block.4)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(CausalConv3d(channels, channels), nn.SiLU(), CausalConv3d(channels, channels),
                                   nn.SiLU(), CausalConv3d(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class SRUpsampler720p(nn.Module):
    def __init__(self, config: SRUpsampler720pConfig) -> None:
        super().__init__()
        self.config = c = config
        self.in_conv = CausalConv3d(c.in_channels, c.hidden_channels)
        self.blocks = nn.ModuleList(_ResidualBlock(c.hidden_channels) for _ in range(c.num_blocks))
        self.out_conv = CausalConv3d(c.hidden_channels, c.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.in_conv(x)
        for block in self.blocks:
            y = block(y)
        y = self.out_conv(y)
        return y + x if self.config.global_residual and y.shape == x.shape else y


@dataclass(frozen=True)
class SRUpsampler1080pConfig:
    """Tencent's SRTo1080pUpsampler: a VAE-decoder-like stack of residual blocks without resampling."""

    z_channels: int = 32
    out_channels: int = 32
    block_out_channels: list[int] = field(default_factory=lambda: [64, 64])
    num_res_blocks: int = 2


class _UpLevel(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)


class SRUpsampler1080p(nn.Module):
    def __init__(self, config: SRUpsampler1080pConfig) -> None:
        super().__init__()
        self.config = c = config
        if c.block_out_channels[0] % c.z_channels:
            raise ValueError(f"block_out_channels[0] {c.block_out_channels[0]} must be a multiple of z_channels {c.z_channels}")
        self.conv_in = CausalConv3d(c.z_channels, c.block_out_channels[0])
        self.up = nn.ModuleList()
        cin = c.block_out_channels[0]
        for cout in c.block_out_channels:
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, cout))
                cin = cout
            self.up.append(_UpLevel(blocks))
        self.norm_out = RMSNorm3d(cin)
        self.conv_out = CausalConv3d(cin, c.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z) + z.repeat_interleave(self.config.block_out_channels[0] // self.config.z_channels, dim=1)
        for level in self.up:
            for block in level.block:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def sr_target_size(lr_height: int, lr_width: int, base_resolution: str = "480p",
                   target_resolution: str = "720p") -> tuple[int, int]:
    """(height, width) in pixels of the SR video for a low-resolution video of lr_height x lr_width (a bucket of
    `base_resolution`): the `target_resolution` bucket of the closest aspect ratio, the first one on a tie (the
    published BucketMap)."""
    lr = crop_size_buckets(BUCKET_BASE_SIZE[base_resolution])
    if (lr_width, lr_height) not in lr:
        raise ValueError(f"{lr_width}x{lr_height} is not a {base_resolution} bucket; the base stage generates one of "
                         f"{len(lr)} sizes (e.g. {lr[len(lr) // 2]})")
    ratio = float(lr_width) / float(lr_height)
    hr = crop_size_buckets(BUCKET_BASE_SIZE[target_resolution])
    diffs = [abs(float(w) / float(h) - ratio) for w, h in hr]
    w, h = hr[diffs.index(min(diffs))]
    return h, w


@torch.no_grad()
def upsample_lq_latent(lq: torch.Tensor, size: tuple[int, int], upsampler: nn.Module) -> torch.Tensor:
    """The base stage's latent [B, C, T, h, w] -> [B, C, T, *size]: bilinear per frame, then the learned upsampler
    in float32 (as published); returned in lq's dtype."""
    b, c, t, h, w = lq.shape
    frames = lq.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    frames = F.interpolate(frames, size=tuple(size), mode="bilinear", align_corners=False)
    up = frames.reshape(b, t, c, *size).permute(0, 2, 1, 3, 4)
    out = upsampler(up.to(next(upsampler.parameters()).dtype))  # published: float32 weights and input
    return out.to(lq.dtype)


def noise_lq_latent(lq: torch.Tensor, strength: float = LQ_NOISE_STRENGTH,
                    generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - s) * lq + s * noise: the upsampled low-resolution latent moved to flow time t = 1000 s."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"lq_noise_strength must be in [0, 1], got {strength}")
    if noise is None:
        noise = torch.randn(lq.shape, generator=generator, device=lq.device, dtype=torch.float32).to(lq.dtype)
    return (1.0 - strength) * lq + strength * noise


def sr_condition(latents: torch.Tensor, lq: torch.Tensor,
                 image_latent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SR DiT's conditioning channels for `latents` [B, C, T, H, W] and the noised, upsampled low-resolution
    latent `lq` of the same shape: (condition, zero_condition), each [B, 2C + 2, T, H, W] = [condition latent (C),
    task mask (1), lq (C), lq mask (1)]; zero_condition has the last C + 1 channels zero."""
    if lq.shape != latents.shape:
        raise ValueError(f"the low-resolution latent must be upsampled to the SR latent's shape {list(latents.shape)}, "
                         f"got {list(lq.shape)}")
    base = condition_latents(latents, image_latent)
    ones = torch.ones_like(lq[:, :1])
    condition = torch.cat([base, lq.to(base.dtype), ones], dim=1)
    zero = torch.cat([base, torch.zeros_like(condition[:, base.shape[1]:])], dim=1)
    return condition, zero


def sr_condition_for(t: float | torch.Tensor, condition: torch.Tensor, zero_condition: torch.Tensor,
                     strength: float = LQ_NOISE_STRENGTH) -> torch.Tensor:
    """The conditioning of the SR step at timestep t (0..1000): the low-resolution channels until t < 1000 s."""
    return zero_condition if float(t) < 1000.0 * strength else condition


def meanflow_t_r(timesteps: list[float] | torch.Tensor, index: int) -> float:
    """The MeanFlow SR DiT's second timestep at step `index`: the next step's timestep, 0 at the last step."""
    return 0.0 if index == len(timesteps) - 1 else float(timesteps[index + 1])
