"""vfi: the decoded frames through RIFE, `multiplier` x the frames (F -> (F - 1) x multiplier + 1, the originals at
indices multiple of it), in batches of `batch_size` pairs on the plan's device.

The decode leaves its uint8 frames on the device for this stage (`state.device_frames`; the plan's decode
params say `output = "device_frames"`). One rank: the output is allocated once on the device, the decoded frames
are copied into its slots 0, m, 2m, ... and dropped, and the new frames are made in place there
(`interpolate(out[::m], out=out)`), so the frames are never held twice; the result comes back to the host in one
copy. A dp replica of several ranks (`parallel_ranks` > 1): the lead broadcasts the
frames (device tensors, so NCCL can carry them), each rank interpolates its contiguous run of pairs
(`rife.interpolate.split_pairs`) and the lead receives every other rank's share straight into its place in the
preallocated output; the video equals the one-rank one (each new frame depends on its pair alone)."""

from __future__ import annotations

import numpy as np
import torch

from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register, timed


@register("vfi")
def vfi(ctx: StageContext, state: RunState, stage: Stage) -> None:
    p = stage.params
    ranks = _replica_ranks(ctx) if p.get("parallel_ranks", 1) > 1 else [ctx.rank.rank]
    if ctx.rank.rank not in ranks or (len(ranks) == 1 and not ctx.rank.is_writer):
        return
    (name,) = stage.models
    with timed(state.timings, "vfi", ctx):
        with ctx.placements[name].active() as model, ctx.dispatch(name):
            device = next(model.parameters()).device
            if len(ranks) == 1:
                state.frames = _one_rank(state, model, p, device)
            else:
                _shared(ctx, state, model, p, ranks, device)


def _args(p: dict) -> dict:
    return {"batch_size": int(p["batch_size"]), "scale": float(p["scale"]), "channels_last": True,
            "pad_to": int(p["pad_to"])}


def _one_rank(state: RunState, model: torch.nn.Module, p: dict, device: torch.device) -> np.ndarray:
    from telefuser.models.rife.interpolate import interpolate, output_frame_count

    m = int(p["multiplier"])
    frames = _take_frames(state)
    out = torch.empty((output_frame_count(frames.shape[0], m), *frames.shape[1:]), dtype=torch.uint8, device=device)
    out[::m].copy_(frames)
    del frames
    interpolate(out[::m], model, m, out=out, **_args(p))
    return out.cpu().numpy()


def _shared(ctx: StageContext, state: RunState, model: torch.nn.Module, p: dict, ranks: list[int],
            device: torch.device) -> None:
    from telefuser.models.rife.interpolate import interpolate, output_frame_count, split_pairs

    m = int(p["multiplier"])
    frames = _broadcast_frames(ctx, state, int(p["input_frames"]), device)
    shares = split_pairs(frames.shape[0], len(ranks), m)
    mine = shares[ranks.index(ctx.rank.rank)]
    part = frames[mine.frame_start:mine.frame_stop]
    if not ctx.rank.is_writer:
        made = interpolate(part, model, m, **_args(p))
        if mine.num_out:
            torch.distributed.send(made[:mine.num_out].contiguous(), dst=ctx.rank.replica_lead)
        return
    out = torch.empty((output_frame_count(frames.shape[0], m), *frames.shape[1:]), dtype=torch.uint8, device=device)
    # the lead's own share in place (its last frame is the next share's first original: the same pixels)
    interpolate(part, model, m, out=out[mine.out_start:mine.out_start + output_frame_count(part.shape[0], m)],
                **_args(p))
    del frames, part
    for rank, share in zip(ranks, shares):
        if rank != ctx.rank.rank and share.num_out:
            torch.distributed.recv(out[share.out_start:share.out_stop], src=rank)
    state.frames = out.cpu().numpy()


def _take_frames(state: RunState) -> torch.Tensor:
    """The decoded frames, where the decode left them (on the device, or the host's numpy frames), taken out of the
    run state so that only the output holds them afterwards."""
    if state.device_frames is not None:
        frames, state.device_frames = state.device_frames, None
        return frames
    if state.frames is None:
        raise PlanError("the vfi stage found no decoded frames: the plan has no vae_decode before it; recompile it.")
    frames, state.frames = torch.from_numpy(state.frames), None
    return frames


def _replica_ranks(ctx: StageContext) -> list[int]:
    """The ranks of this rank's dp replica, in rank order (its lead first)."""
    dp = ctx.rank.dp_index
    return sorted(r.rank for r in ctx.plan.mesh.ranks if r.coords.get("dp", 0) == dp)


def _broadcast_frames(ctx: StageContext, state: RunState, num_frames: int, device: torch.device) -> torch.Tensor:
    """The lead's decoded uint8 frames [F, H, W, 3] on every rank of the replica, on the device (the other ranks
    know the shape from the run's parameters and the plan)."""
    shape = (num_frames, state.params.height, state.params.width, 3)
    if ctx.rank.is_writer:
        buffer = _take_frames(state)
        if tuple(buffer.shape) != shape:
            raise PlanError(f"the vfi stage expected decoded frames {shape}, got {tuple(buffer.shape)}; recompile "
                            "the recipe.")
        buffer = buffer.to(device).contiguous()
    else:
        buffer = torch.empty(shape, dtype=torch.uint8, device=device)
    return ctx.rank.broadcast(buffer)
