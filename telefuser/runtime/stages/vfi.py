"""vfi: the decoded frames through RIFE, `multiplier` x the frames (F -> (F - 1) x multiplier + 1, the originals at
indices multiple of it), in batches of `batch_size` pairs on the plan's device, written into one preallocated
output (the frames are never all held twice). On a dp replica of several ranks (`parallel_ranks` > 1) the lead
broadcasts the frames, each rank interpolates its contiguous run of pairs (`rife.interpolate.split_pairs`) and the
lead receives every other rank's share straight into its place in the output; the video equals the one-rank one."""

from __future__ import annotations

import numpy as np
import torch

from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register, timed


@register("vfi")
def vfi(ctx: StageContext, state: RunState, stage: Stage) -> None:
    from telefuser.models.rife.interpolate import interpolate, output_frame_count, split_pairs

    p = stage.params
    multiplier, batch, pad_to, scale = int(p["multiplier"]), int(p["batch_size"]), int(p["pad_to"]), float(p["scale"])
    ranks = _replica_ranks(ctx) if p.get("parallel_ranks", 1) > 1 else [ctx.rank.rank]
    if ctx.rank.rank not in ranks or (len(ranks) == 1 and not ctx.rank.is_writer):
        return
    (name,) = stage.models
    with timed(state.timings, "vfi", ctx):
        with ctx.placements[name].active() as model, ctx.dispatch(name):
            if len(ranks) == 1:
                state.frames = interpolate(state.frames, model, multiplier, batch, scale, channels_last=True,
                                           pad_to=pad_to)
                return
            frames = _broadcast_frames(ctx, state, int(p["input_frames"]))
            shares = split_pairs(frames.shape[0], len(ranks), multiplier)
            mine = shares[ranks.index(ctx.rank.rank)]
            part = frames[mine.frame_start:mine.frame_stop]
            if ctx.rank.is_writer:
                out = np.empty((output_frame_count(frames.shape[0], multiplier), *frames.shape[1:]), np.uint8)
                # the lead's share in place (its last frame is the next share's first original: the same pixels)
                interpolate(part, model, multiplier, batch, scale, channels_last=True, pad_to=pad_to,
                            out=out[mine.out_start:mine.out_start + output_frame_count(part.shape[0], multiplier)])
                del frames, part
                received = torch.from_numpy(out)
                for rank, share in zip(ranks, shares):
                    if rank != ctx.rank.rank and share.num_out:
                        torch.distributed.recv(received[share.out_start:share.out_stop], src=rank)
                state.frames = out
            else:
                made = interpolate(part, model, multiplier, batch, scale, channels_last=True, pad_to=pad_to)
                if mine.num_out:
                    torch.distributed.send(torch.from_numpy(np.ascontiguousarray(made[:mine.num_out])),
                                           dst=ctx.rank.replica_lead)


def _replica_ranks(ctx: StageContext) -> list[int]:
    """The ranks of this rank's dp replica, in rank order (its lead first)."""
    dp = ctx.rank.dp_index
    return sorted(r.rank for r in ctx.plan.mesh.ranks if r.coords.get("dp", 0) == dp)


def _broadcast_frames(ctx: StageContext, state: RunState, num_frames: int) -> np.ndarray:
    """The lead's decoded uint8 frames [F, H, W, 3] on every rank of the replica (others learn the shape from the
    run's parameters and the plan)."""
    shape = (num_frames, state.params.height, state.params.width, 3)
    if ctx.rank.is_writer:
        if state.frames is None or tuple(state.frames.shape) != shape:
            got = None if state.frames is None else tuple(state.frames.shape)
            raise PlanError(f"the vfi stage expected decoded frames {shape}, got {got}; recompile the recipe.")
        buffer = torch.from_numpy(np.ascontiguousarray(state.frames))
    else:
        buffer = torch.empty(shape, dtype=torch.uint8)
    return ctx.rank.broadcast(buffer).numpy()
