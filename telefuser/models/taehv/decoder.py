"""TAEHV's decoder (madebyollin/taehv, base variant): Wan or HunyuanVideo-1.5 latents -> video, a fraction of the
full VAE's cost.

Three stages, each three MemBlocks (a residual conv block that also sees its own input one latent step earlier,
zeros before the first), a nearest x2 upsample and a TGrow (a 1x1 conv making `stride` frames of each frame), then
a conv to RGB (pixel-shuffled when patch_size > 1). TAEHV decodes the latents the DiT makes, without Wan's
latent mean/std (its README: "TAEHV encodes / decodes exactly what diffusion models use"), into [0, 1]; the first
t_upscale - 1 frames are warm-up and trimmed, so 21 latent frames make 21 * 4 - 3 = 81.

`decode` runs the time axis in chunks of latent frames, carrying each MemBlock's last input across chunks: the
result equals the all-frames-at-once evaluation (taehv's `parallel=True`) and the frame-by-frame one, with
memory bounded by the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TAEHVConfig:
    """Arch of one TAEHV checkpoint, read off its shapes (keys.describe). Defaults: taew2_1.pth."""

    z_dim: int = 16  # taehv's latent_channels: Wan2.1 / Wan2.2-A14B VAE; 48 for taew2_2 (Wan2.2-TI2V-5B), 32 taehv1_5
    patch_size: int = 1  # 2 for taew2_2 and taehv1_5
    channels: list[int] = field(default_factory=lambda: [256, 128, 64, 64])
    decoder_time_upscale: list[bool] = field(default_factory=lambda: [False, True, True])
    decoder_space_upscale: list[bool] = field(default_factory=lambda: [True, True, True])  # not in the weights


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat((x, past), 1)) + x)


class TGrow(nn.Module):
    def __init__(self, c: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c, c * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N*T, C*s, H, W] -> [N*T*s, C, H, W]: frame t makes frames t*s .. t*s + s - 1, channel group g -> frame g
        return self.conv(x).reshape(-1, x.shape[1], x.shape[2], x.shape[3])


class TAEHV(nn.Module):
    """The decoder of a TAEHV checkpoint; parameters under `decoder.N`, as published."""

    def __init__(self, config: TAEHVConfig | None = None) -> None:
        super().__init__()
        cfg = config or TAEHVConfig()
        self.config = cfg
        n = cfg.channels
        layers: list[nn.Module] = [Clamp(), nn.Conv2d(cfg.z_dim, n[0], 3, padding=1), nn.ReLU()]
        for stage in range(3):
            c = n[stage]
            layers += [MemBlock(c), MemBlock(c), MemBlock(c),
                       nn.Upsample(scale_factor=2 if cfg.decoder_space_upscale[stage] else 1),
                       TGrow(c, 2 if cfg.decoder_time_upscale[stage] else 1),
                       nn.Conv2d(c, n[stage + 1], 3, padding=1, bias=False)]
        layers += [nn.ReLU(), nn.Conv2d(n[3], 3 * cfg.patch_size ** 2, 3, padding=1)]
        self.decoder = nn.Sequential(*layers)

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def t_upscale(self) -> int:
        return 2 ** sum(bool(t) for t in self.config.decoder_time_upscale)

    @property
    def space_upscale(self) -> int:
        return 2 ** sum(bool(s) for s in self.config.decoder_space_upscale) * self.config.patch_size

    def num_frames(self, latent_frames: int) -> int:
        """Output frames of `latent_frames` latents: t_upscale per latent, the first t_upscale - 1 trimmed."""
        return latent_frames * self.t_upscale - (self.t_upscale - 1)

    def _run(self, x: torch.Tensor, batch: int, memory: dict[int, torch.Tensor]) -> torch.Tensor:
        """One time chunk [B*t, C, H, W] (batch-major) through the decoder; `memory` carries each MemBlock's
        last input frame [B, C, H, W] to the next chunk."""
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                seq = x.reshape(batch, -1, *x.shape[1:])
                prev = memory.get(i)
                prev = torch.zeros_like(seq[:, :1]) if prev is None else prev.unsqueeze(1)
                past = torch.cat((prev, seq[:, :-1]), 1).reshape(x.shape)
                memory[i] = seq[:, -1].clone()  # a copy: a view would keep the whole chunk alive
                x = layer(x, past)
            else:
                x = layer(x)
        return x

    @torch.no_grad()
    def decode(self, z: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """z [B, z_dim, T, h, w] (the DiT's latents) -> video [B, 3, T * 4 - 3, h * 8, w * 8] in [-1, 1]
        (patch 2, Wan2.2's 5B and HunyuanVideo-1.5: h * 16, w * 16), in the parameters' dtype. `chunk_frames`
        latent frames at a time (None: all at once)."""
        if z.ndim != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"TAEHV decodes [B, {self.z_dim}, T, h, w] latents, got {tuple(z.shape)}")
        dtype = self.decoder[1].weight.dtype
        b, _, t, h, w = z.shape
        up, p, s = self.t_upscale, self.config.patch_size, self.space_upscale
        trim = up - 1
        out = torch.empty(b, 3, self.num_frames(t), h * s, w * s, dtype=dtype, device=z.device)
        chunk = t if chunk_frames is None else max(1, chunk_frames)
        memory: dict[int, torch.Tensor] = {}
        for t0 in range(0, t, chunk):
            x = z[:, :, t0:t0 + chunk].to(dtype).permute(0, 2, 1, 3, 4)  # [B, t, C, h, w]
            n = x.shape[1]
            y = self._run(x.reshape(b * n, *x.shape[2:]), b, memory)
            if p > 1:
                y = F.pixel_shuffle(y, p)
            y = y.reshape(b, n * up, 3, *y.shape[2:]).clamp(0, 1).mul(2).sub(1)
            first = t0 * up  # index of this chunk's first frame before the trim
            skip = max(0, trim - first)
            if skip < y.shape[1]:
                out[:, :, first + skip - trim:first + y.shape[1] - trim] = y[:, skip:].transpose(1, 2)
        return out


def load_taehv(path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TAEHV:
    """The decoder of a TAEHV checkpoint (`.pth` through torch.load(weights_only=True), or `.safetensors`), its
    architecture read off the file; telefuser.errors.WeightsError naming the file when it is not one."""
    from ..single_file import load_described

    return load_described("TAEHV", path, device, dtype)  # type: ignore[return-value]
