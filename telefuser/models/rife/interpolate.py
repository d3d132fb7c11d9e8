"""A video's frames through RIFE: 2x (one new frame between each pair) or 4x, 8x by repeated halving.

Layout of the output at multiplier m: the originals at indices 0, m, 2m, ... (so at even indices), the frame at
k/m of the way from original i to i + 1 at index i * m + k; F frames -> (F - 1) * m + 1 (81 -> 161 at 2x, 321
at 4x). Every level of the halving works in place in the one preallocated output: level step s (m, m/2, .., 2)
makes out[i + s/2] from out[i] and out[i + s], so the frames are never held twice, only `batch_size` pairs at a
time on the model's device. The padding (zeros at the right and bottom, to a multiple of max(128, 128 / scale),
as Practical-RIFE's inference_video pads; `pad_to`) is cropped off again.

Several ranks: `split_pairs` gives each rank a contiguous share of the pairs (i, i + 1); the rank interpolates
only its frames (`interpolate_share`), and the shares' outputs concatenated in rank order are the whole video,
equal to the one-rank result (each pair's frames depend on that pair alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from .ifnet import IFNet

Frames = Union[torch.Tensor, np.ndarray]
MULTIPLIERS = (2, 4, 8)


def output_frame_count(num_frames: int, multiplier: int) -> int:
    return (num_frames - 1) * multiplier + 1 if num_frames > 0 else 0


def pad_multiple(scale: float = 1.0, pad_to: int = 128) -> int:
    """What H and W are padded to: max(pad_to, pad_to / scale), with Practical-RIFE's (and LightX2V's) 128 by
    default; 64 (vs-rife's for 4.26) is the least a v4.26 IFNet takes, and pads 832 px to 832 instead of 896."""
    return max(pad_to, int(pad_to / scale))


@dataclass(frozen=True)
class RankShare:
    """One rank's part of an interpolation: pairs [pair_start, pair_stop) (pair i joins frames i and i + 1).

    The rank reads input frames [frame_start, frame_stop) and contributes output frames [out_start, out_stop):
    its originals and the frames made between them, the next share's first original excluded (the last rank
    keeps the final frame). Concatenating every rank's contribution in rank order gives the whole output."""

    rank: int
    pair_start: int
    pair_stop: int
    frame_start: int
    frame_stop: int
    out_start: int
    out_stop: int

    @property
    def num_out(self) -> int:
        return self.out_stop - self.out_start


def split_pairs(num_frames: int, world_size: int, multiplier: int = 2) -> list[RankShare]:
    """Every rank's share: the F - 1 pairs in contiguous runs, the first (F - 1) % world ranks one pair more."""
    if num_frames < 1 or world_size < 1:
        raise ValueError(f"need frames and ranks, got {num_frames} frames on {world_size} ranks")
    _check_multiplier(multiplier)
    pairs = num_frames - 1
    base, extra = divmod(pairs, world_size)
    shares, start = [], 0
    for r in range(world_size):
        stop = start + base + (1 if r < extra else 0)
        last = r == world_size - 1
        shares.append(RankShare(r, start, stop, start, stop + 1, start * multiplier,
                                stop * multiplier + (1 if last else 0)))
        start = stop
    return shares


def rank_share(num_frames: int, rank: int, world_size: int, multiplier: int = 2) -> RankShare:
    return split_pairs(num_frames, world_size, multiplier)[rank]


def _check_multiplier(multiplier: int) -> None:
    if multiplier not in MULTIPLIERS:
        raise ValueError(f"multiplier {multiplier}: RIFE interpolation here halves repeatedly, so 2, 4 or 8")


def _as_torch(frames: Frames) -> torch.Tensor:
    return torch.from_numpy(frames) if isinstance(frames, np.ndarray) else frames


def _channels_last(frames: torch.Tensor, channels_last: bool | None) -> bool:
    if frames.ndim != 4:
        raise ValueError(f"frames must be [F, H, W, 3] or [F, 3, H, W], got shape {tuple(frames.shape)}")
    if channels_last is None:
        channels_last = frames.shape[-1] == 3
    if (frames.shape[-1] if channels_last else frames.shape[1]) != 3:
        raise ValueError(f"frames must be RGB: [F, H, W, 3] or [F, 3, H, W], got shape {tuple(frames.shape)}")
    return channels_last


@torch.no_grad()
def interpolate(frames: Frames, model: IFNet, multiplier: int = 2, batch_size: int = 8, scale: float = 1.0,
                channels_last: bool | None = None, out: Frames | None = None, pad_to: int = 128) -> Frames:
    """F frames -> (F - 1) * multiplier + 1, originals at indices multiple of `multiplier`.

    frames: [F, H, W, 3] (channels_last, the runtime's uint8 frames) or [F, 3, H, W], uint8 (0..255) or float in
    [0, 1], a torch tensor or a numpy array on the CPU (or already on the model's device); the output has the
    same type, layout, dtype and device (uint8: rounded). `channels_last` None: [F, H, W, 3] when the last dim
    is 3. The model computes in its own dtype (see ifnet: bf16 convolutions, float32 flow and warps) on its own
    device, `batch_size` pairs at a time. `out`: a preallocated output to write into (its shape is checked).
    `pad_to`: see pad_multiple.
    """
    _check_multiplier(multiplier)
    src = _as_torch(frames)
    last = _channels_last(src, channels_last)
    n = src.shape[0]
    if n == 0:
        raise ValueError("no frames to interpolate")
    shape = (output_frame_count(n, multiplier), *src.shape[1:])
    if out is None:
        result = torch.empty(shape, dtype=src.dtype, device=src.device)
        if isinstance(frames, np.ndarray):
            result = result.numpy()
    else:
        result = out
    dst = _as_torch(result)
    if tuple(dst.shape) != shape or dst.dtype != src.dtype:
        raise ValueError(f"out must be {shape} {src.dtype}, got {tuple(dst.shape)} {dst.dtype}")
    dst[::multiplier] = src
    device = next(model.parameters()).device
    h, w = (src.shape[1], src.shape[2]) if last else (src.shape[2], src.shape[3])
    m = pad_multiple(scale, pad_to)
    config = getattr(model, "config", None)
    if config is not None and (m * scale) % config.min_multiple:
        raise ValueError(f"pad_to {pad_to} at scale {scale}: this IFNet needs sizes a multiple of "
                         f"{config.min_multiple} / scale")
    pad = (0, (-w) % m, 0, (-h) % m)

    def load(idx: list[int]) -> torch.Tensor:  # [B, 3, H', W'] float32 in [0, 1] on the model's device
        x = dst[idx].to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2) if last else x
        x = x.float() / 255.0 if dst.dtype == torch.uint8 else x.float()
        return F.pad(x, pad)

    def store(idx: list[int], y: torch.Tensor) -> None:
        y = y[:, :, :h, :w]
        if dst.dtype == torch.uint8:
            y = (y.clamp(0, 1) * 255.0).round().to(torch.uint8)
        else:
            y = y.to(dst.dtype)
        dst[idx] = (y.permute(0, 2, 3, 1) if last else y).to(dst.device)

    step = multiplier
    while step >= 2:
        starts = list(range(0, dst.shape[0] - 1, step))
        for b in range(0, len(starts), batch_size):
            i0 = starts[b:b + batch_size]
            y = model(load(i0), load([i + step for i in i0]), 0.5, scale)
            store([i + step // 2 for i in i0], y)
        step //= 2
    return result


def interpolate_share(frames: Frames, model: IFNet, share: RankShare, multiplier: int = 2, batch_size: int = 8,
                      scale: float = 1.0, channels_last: bool | None = None, pad_to: int = 128) -> Frames:
    """This rank's contribution (share.num_out frames) from the whole input video's frames."""
    part = interpolate(frames[share.frame_start:share.frame_stop], model, multiplier, batch_size, scale,
                       channels_last, pad_to=pad_to)
    return part[:share.num_out]
