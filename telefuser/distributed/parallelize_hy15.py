"""`parallelize_hy15_dit(model, mesh)`: sequence parallelism (Ulysses, ring, both) applied to an unchanged
HunyuanVideo-1.5 DiT (`models.hunyuan15.dit.HunyuanVideo15DiT`: the base DiT and the SR DiT alike).

HunyuanVideo-1.5's blocks are MMDiT-style: video and context tokens attend jointly (double-stream blocks keep two
streams, single-stream blocks one joined sequence). Under sequence parallelism the video tokens are split across the
sp ranks and the context tokens (text, glyph, image: at most a few thousand) stay whole on every rank, as Tencent's
own code and xDiT's "joint" strategy do:

- before the first block, the video tokens and their RoPE table are cut into this rank's shard (padded at the end,
  `telefuser.distributed.sequence`); later blocks get the same RoPE shard. The context stream, the modulation
  vector and the key mask are left whole: every rank runs the context stream's projections and MLPs on the whole
  context (identical on every rank, because its attention output is);
- each block's joint attention (its `attend` seam: [video shard, context] queries, keys and values) runs
  `telefuser.ops.joint_attention.joint_long_context_attention`, which attends every video query and every context
  query to every valid video and context key and returns the context's output whole on every rank;
- single-stream blocks get this rank's video token count (the model passes the count it sees);
- after the final layer (per token, out_channels values instead of hidden: the smallest thing to gather), the
  shards are gathered and the padding dropped, so `forward` returns what one rank returns.

Needs at least one double-stream block (every published 1.5 transformer has 54): the model joins its single-stream
sequence from the double blocks' (then sharded) video stream.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from telefuser.ops.joint_attention import joint_long_context_attention

from .sequence import degree, gather_sequence, shard_length, shard_sequence, sp_size


class _SequenceState:
    """The forward in flight: its full video token count, the RoPE shard made for it, the context lengths."""

    def __init__(self) -> None:
        self.full_len = 0
        self.rope_full: Optional[tuple[torch.Tensor, ...]] = None
        self.rope_shard: Optional[tuple[torch.Tensor, ...]] = None
        self.mask: Optional[torch.Tensor] = None
        self.lengths: Optional[list[int]] = None

    def rope(self, rope: tuple[torch.Tensor, ...], mesh: DeviceMesh) -> tuple[torch.Tensor, ...]:
        if self.rope_full is None or any(a is not b for a, b in zip(rope, self.rope_full)):
            self.rope_full = rope
            self.rope_shard = tuple(shard_sequence(t, 0, mesh) for t in rope)
        assert self.rope_shard is not None
        return self.rope_shard

    def context_lengths(self, mask: Optional[torch.Tensor]) -> Optional[list[int]]:
        """Valid context tokens per video from the model's key mask [B, 1, 1, video + context] (None: all valid);
        read once per forward (one host sync), as every block gets the same mask."""
        if mask is None:
            return None
        if mask is not self.mask:
            self.mask = mask
            self.lengths = [int(n) for n in mask[:, 0, 0, self.full_len:].sum(-1).tolist()]
        return self.lengths


def parallelize_hy15_dit(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Make `model` (a HunyuanVideo15DiT) run sequence-parallel over the mesh's sp_ring x sp_ulysses ranks, in
    place. A mesh without sequence-parallel ranks leaves it unchanged."""
    if sp_size(mesh) == 1:
        return model
    if not len(model.double_blocks):
        raise ValueError("sequence parallelism of a HunyuanVideo-1.5 DiT needs a double-stream block (the model "
                         "joins its single-stream sequence from their video stream); this one has none")
    heads, ulysses = model.double_blocks[0].heads, degree(mesh, "sp_ulysses")  # this rank's: fewer under tp
    if heads % ulysses:
        raise ValueError(f"Ulysses degree {ulysses} does not divide the HunyuanVideo-1.5 DiT's {heads} attention heads"
                         f"{' held by this rank' if heads != model.config.heads_num else ''}")
    state = _SequenceState()

    def first_double(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        img, txt, vec, rope, mask = args
        state.full_len = img.shape[1]
        return (shard_sequence(img, 1, mesh), txt, vec, state.rope(rope, mesh), mask)

    def later_double(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        img, txt, vec, rope, mask = args
        return (img, txt, vec, state.rope(rope, mesh), mask)

    def single(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x, vec, _video_tokens, rope, mask = args
        return (x, vec, shard_length(state.full_len, mesh), state.rope(rope, mesh), mask)

    def gather_final(_module: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return gather_sequence(out, 1, mesh, state.full_len)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               video_tokens: int) -> torch.Tensor:
        n = video_tokens
        out, joint = joint_long_context_attention(q[:, :n], k[:, :n], v[:, :n], q[:, n:], k[:, n:], v[:, n:], mesh,
                                                  seq_len=state.full_len, joint_lengths=state.context_lengths(mask))
        return torch.cat([out, joint], 1)

    for index, block in enumerate(model.double_blocks):
        block.register_forward_pre_hook(first_double if index == 0 else later_double)
        block.attend = attend
    for block in model.single_blocks:
        block.register_forward_pre_hook(single)
        block.attend = attend
    model.final_layer.register_forward_hook(gather_final)
    return model
