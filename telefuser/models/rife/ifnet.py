"""IFNet of Practical-RIFE 4.25/4.26: the intermediate-flow network that makes the frame between two frames.

Five IFBlocks refine, coarse to fine (image scales 1/16 .. 1/1), a bidirectional flow (4 channels), a blend mask
and 8 feature channels; each block sees both frames and their head features warped by the flow so far. The frame
is the mask-weighted blend of both frames warped by the final flow (the 4.2x "fast mode": no refinement UNet).

Precision: the convolutions run in the parameters' dtype (bf16 or fp16 to go faster), while the flow, the mask,
the resampling (bilinear resizes, the backward warp) and the blend stay in float32. A warp's sampling grid in
bf16 (8 mantissa bits) would be off by up to ~2 px at 832 px wide; in float32 the low precision only enters
through the blocks' residual outputs. With float32 parameters every step is float32, as Practical-RIFE runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .keys import HEAD_WIDTH, SCALES


@dataclass
class IFNetConfig:
    """Arch of one flownet.pkl, every field read off its shapes (keys.describe). Defaults: v4.26 as published."""

    head_channels: int = 4  # 16 in v4.26 "heavy" (ccvfi's RIFE_IFNet_v426_heavy)
    block_channels: list[int] = field(default_factory=lambda: [192, 128, 96, 64, 32])
    num_res_convs: int = 8
    feature_channels: int = 8
    scales: list[int] = field(default_factory=lambda: list(SCALES))  # per block, at Practical-RIFE's --scale 1

    @property
    def min_multiple(self) -> int:
        """H and W must be multiples of this (over --scale): the coarsest block downsamples 4x more."""
        return 4 * max(self.scales)


def _conv_act(cin: int, cout: int) -> nn.Sequential:
    # Practical-RIFE's conv(): Conv2d(k3, s2, p1) + LeakyReLU(0.2); key names `.0.weight`, `.0.bias`.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.LeakyReLU(0.2))


class Head(nn.Module):
    """The per-frame feature head: stride-2 conv, two convs, stride-2 transposed conv back to full size."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.cnn0 = nn.Conv2d(3, HEAD_WIDTH, 3, 2, 1)
        self.cnn1 = nn.Conv2d(HEAD_WIDTH, HEAD_WIDTH, 3, 1, 1)
        self.cnn2 = nn.Conv2d(HEAD_WIDTH, HEAD_WIDTH, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(HEAD_WIDTH, out_channels, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.cnn0(x), 0.2)
        x = F.leaky_relu(self.cnn1(x), 0.2)
        x = F.leaky_relu(self.cnn2(x), 0.2)
        return self.cnn3(x)


class ResConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x) * self.beta + x, 0.2)


class IFBlock(nn.Module):
    def __init__(self, in_channels: int, c: int, num_res_convs: int, feature_channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Sequential(_conv_act(in_channels, c // 2), _conv_act(c // 2, c))
        self.convblock = nn.Sequential(*(ResConv(c) for _ in range(num_res_convs)))
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(c, 4 * (5 + feature_channels), 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor, flow: torch.Tensor | None, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x already resized by 1 / scale (see IFNet.forward), flow float32 at full size -> (flow [B, 4],
        mask [B, 1], features) float32 at full size."""
        if flow is not None:
            x = torch.cat((x, _resize(flow, 1.0 / scale) / scale), 1)
        dtype = self.lastconv[0].weight.dtype
        out = self.lastconv(self.convblock(self.conv0(x.to(dtype)))).float()
        out = _resize(out, scale)
        return out[:, :4] * scale, out[:, 4:5], out[:, 5:]


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: sample `image` at (x + flow_x, y + flow_y), bilinear, border-clamped (float32)."""
    _, _, h, w = flow.shape
    xs = torch.linspace(-1.0, 1.0, w, device=flow.device, dtype=torch.float32).view(1, w).expand(h, w)
    ys = torch.linspace(-1.0, 1.0, h, device=flow.device, dtype=torch.float32).view(h, 1).expand(h, w)
    base = torch.stack((xs, ys), -1).unsqueeze(0)  # [1, H, W, 2] in align_corners=True coordinates
    offset = torch.stack((flow[:, 0] / ((image.shape[3] - 1.0) / 2.0), flow[:, 1] / ((image.shape[2] - 1.0) / 2.0)), -1)
    return F.grid_sample(image, base + offset, mode="bilinear", padding_mode="border", align_corners=True)


class IFNet(nn.Module):
    def __init__(self, config: IFNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or IFNetConfig()
        if len(cfg.block_channels) != len(SCALES) or len(cfg.scales) != len(SCALES):
            raise ValueError(f"IFNet 4.2x has {len(SCALES)} blocks, got block_channels {cfg.block_channels}, "
                             f"scales {cfg.scales}")
        self.config = cfg
        head, feat = cfg.head_channels, cfg.feature_channels
        for n, c in enumerate(cfg.block_channels):
            cin = 7 + 2 * head if n == 0 else 12 + 2 * head + feat
            self.add_module(f"block{n}", IFBlock(cin, c, cfg.num_res_convs, feat))
        self.encode = Head(head)

    @property
    def blocks(self) -> list[IFBlock]:
        return [getattr(self, f"block{n}") for n in range(len(SCALES))]

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, timestep: float = 0.5, scale: float = 1.0
                ) -> torch.Tensor:
        """Frames [B, 3, H, W] in [0, 1] (H, W multiples of config.min_multiple / scale: 64 / scale for v4.26)
        -> the frame at `timestep`, float32.

        `scale` is Practical-RIFE's --scale (0.5 for 4K input: flows estimated at half size)."""
        img0, img1 = img0.float(), img1.float()
        t = img0.new_full((img0.shape[0], 1, img0.shape[2], img0.shape[3]), float(timestep))
        dtype = self.encode.cnn0.weight.dtype
        # Each frame joined with its head features, so one grid_sample warps both ([B, 3 + head, H, W]).
        g0 = torch.cat((img0, self.encode(img0.to(dtype)).float()), 1)
        g1 = torch.cat((img1, self.encode(img1.to(dtype)).float()), 1)
        flow = mask = feat = None
        w0, w1 = g0, g1
        for n, block in enumerate(self.blocks):
            s = self.config.scales[n] / scale
            # A block sees its input resized by 1 / s; bilinear resizing works channel by channel, so resizing
            # the pieces and joining them small equals resizing their full-size concatenation, which is never
            # written (at 720p, batch 16, that concatenation was a quarter of the network's time).
            r0, r1 = _resize(w0, 1.0 / s), _resize(w1, 1.0 / s)
            if flow is None:  # conv0's channels: img0, img1, f0, f1, t
                x = torch.cat((r0[:, :3], r1[:, :3], r0[:, 3:], r1[:, 3:], _resize(t, 1.0 / s)), 1)
                flow, mask, feat = block(x, None, s)
            else:  # warped img0, img1, warped f0, f1, t, mask, features
                x = torch.cat((r0[:, :3], r1[:, :3], r0[:, 3:], r1[:, 3:], _resize(torch.cat((t, mask, feat), 1),
                                                                                   1.0 / s)), 1)
                delta, mask, feat = block(x, flow, s)
                flow = flow + delta
            last = n == len(SCALES) - 1  # the blend needs the frames warped, not their features
            w0 = warp(img0 if last else g0, flow[:, :2])
            w1 = warp(img1 if last else g1, flow[:, 2:4])
        m = torch.sigmoid(mask)
        return w0 * m + w1 * (1 - m)


def load_flownet(path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> IFNet:
    """An IFNet with a `flownet.pkl` as downloaded (torch.load(weights_only=True), `module.` stripped), its
    architecture read off the file; telefuser.errors.WeightsError naming the file when it is not one."""
    from ..single_file import load_described

    return load_described("RIFE", path, device, dtype, redownload="flownet.pkl")  # type: ignore[return-value]
