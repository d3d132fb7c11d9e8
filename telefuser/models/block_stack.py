"""How a DiT's repeated blocks look from outside: what step caches (runtime/caches) and block compilation need to
wrap them without knowing the family.

A DiT class declares `BLOCK_LISTS` (its block ModuleLists, in run order) and `residual_stack()`, one `StackBlock`
per block in run order. The stack's residual is taken on one stream of hidden states (Wan's tokens; HunyuanVideo-1.5's
video tokens, which its double-stream blocks carry beside the context tokens and its single-stream blocks at the
front of the joined sequence); each entry says where that stream is in the block's positional arguments and output,
and what the block returns when it is skipped."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class StackBlock:
    module: nn.Module
    # the stream in the block's positional arguments
    stream_in: Callable[[tuple[Any, ...]], torch.Tensor]
    # the stream in the block's output (its arguments given too: a joined sequence's video length is one of them)
    stream_out: Callable[[tuple[Any, ...], Any], torch.Tensor]
    # the block's output when skipped with the stream replaced by `stream` (None: the arguments passed through)
    replace: Callable[[tuple[Any, ...], torch.Tensor | None], Any]


def plain_block(module: nn.Module) -> StackBlock:
    """A block called as block(x, ...) -> x (Wan's)."""
    return StackBlock(module, lambda args: args[0], lambda args, out: out,
                      lambda args, stream: args[0] if stream is None else stream)


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks in run order across its class's `BLOCK_LISTS` (empty when it declares none)."""
    return [block for name in getattr(type(model), "BLOCK_LISTS", ()) for block in getattr(model, name)]
