"""text_encode: positive (and negative) prompt -> umT5 context, on each dp replica's lead and broadcast to the
other ranks; under FSDP every rank runs the sharded encoder on the same prompts."""

from __future__ import annotations

from typing import Callable

import torch

from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register, timed

Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def encode_prompts(encoder: torch.nn.Module, tokenizer: Tokenize, prompts: list[str], device: torch.device):
    """`[B, text_len, dim]` float32: each prompt's embedding up to its real length, zeros after.

    `tokenizer` (telefuser.models.t5.tokenizer.UMT5Tokenizer) cleans the text, appends </s>
    and pads/truncates to text_len. Wan cuts every embedding to its prompt's token count
    and zero-pads it back to text_len before the DiT's text projection; zeroing the
    padded rows is the same thing without the ragged list.
    """
    ids, mask = tokenizer(prompts)
    ids, mask = ids.to(device), mask.to(device)
    context = encoder(ids, mask).float()
    return context * mask.unsqueeze(-1).to(context.dtype)



@register("text_encode")
def text_encode(ctx: StageContext, state: RunState, stage: Stage) -> None:
    tokenizer_name, encoder_name = stage.models
    prompts = [state.params.prompt]
    if stage.params["negative"]:
        prompts.append(state.params.negative_prompt)
    shared = ctx.plan.placement_of(encoder_name).ranks == "all"  # FSDP's sharded encoder: every rank runs it
    placement = ctx.placements.get(encoder_name)
    with timed(state.timings, "encode", ctx):
        if shared or ctx.rank.is_writer:
            with placement.active() as encoder, ctx.dispatch(encoder_name):
                # on the model's device (the CPU under run_on_cpu), then to the compute device
                context = encode_prompts(encoder, ctx.tokenizers[tokenizer_name], prompts, placement.device)
                context = context.to(ctx.device)
        else:  # the encoder lives on rank 0 only; its output arrives here
            planned = next(m for m in ctx.plan.layer1_model_definition.models if m.name == encoder_name)
            shape = (len(prompts), stage.params["text_len"], planned.arch["dim"])
            context = torch.empty(shape, dtype=torch.float32, device=ctx.device)
        if not shared:
            context = ctx.rank.broadcast(context)
    state.context = context[:1]
    state.context_null = context[1:] if len(prompts) > 1 else None
