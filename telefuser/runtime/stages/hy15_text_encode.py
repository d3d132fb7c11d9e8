"""hy15_glyph_encode + hy15_text_encode: HunyuanVideo-1.5's two text inputs per CFG branch, on the replica's lead (one rank: the plan
runs HunyuanVideo-1.5 on one device).

- Qwen2.5-VL: the prompt rendered through the published chat template ([system: the video system prompt, user:
  prompt] + the generation prompt; `models.hunyuan15.text.render_prompt`), tokenized with the plan's
  `tokenizer.json` (a plain `tokenizers` encode), right-padded with <|endoftext|> to text_len + crop tokens; the
  encoder returns hidden_states[-3]; the first `crop` tokens (the system turn, through "<|im_start|>user\\n") are
  dropped from the states and the mask.
- byT5: the prompt's quoted texts as 'Text "a". ' (`glyph_text`), byte ids (`byt5_ids`) of glyph_len tokens; no
  quoted text: no glyph tokens (None). The negative prompt's glyphs are none (`negative_glyphs` false: Tencent's
  pipeline; diffusers extracts them from the negative prompt).
"""

from __future__ import annotations

import torch

from telefuser.errors import PlanError
from telefuser.schema.plan import Stage

from .base import RunState, StageContext, register, timed


def _qwen_inputs(tokenizer, prompts: list[str], text_len: int):
    from telefuser.models.hunyuan15.text import tokenize_rendered

    pad = tokenizer.token_to_id("<|endoftext|>")
    if pad is None:
        raise PlanError("the plan's Qwen2.5-VL tokenizer has no <|endoftext|> token; is it Qwen2.5-VL's tokenizer.json? "
                        "Fix the tokenizer path and recompile.")
    return tokenize_rendered(lambda s: tokenizer.encode(s, add_special_tokens=False).ids, prompts, pad,
                             max_length=text_len)


@torch.no_grad()
def encode_text_states(qwen: torch.nn.Module, tokenizer, prompt: str, text_len: int, device: torch.device):
    """(text_states [1, text_len, D] float32, text_mask [1, text_len]) of one prompt, after the template's crop."""
    ids, mask, crop = _qwen_inputs(tokenizer, [prompt], text_len)
    qdev = next(qwen.parameters()).device
    states = qwen(ids.to(qdev), mask.to(qdev))[:, crop:].float().to(device)
    return states, mask[:, crop:].to(device)


@torch.no_grad()
def encode_glyphs(byt5: torch.nn.Module, prompt: str, glyph_len: int, device: torch.device):
    """(byt5_states [1, glyph_len, D2] float32, byt5_mask) of the prompt's quoted text, or (None, None) without any."""
    from telefuser.models.hunyuan15.text import byt5_ids, glyph_text

    glyph = glyph_text(prompt)
    if glyph is None:
        return None, None
    ids, mask = byt5_ids(glyph, glyph_len)
    bdev = next(byt5.parameters()).device
    return byt5(ids.to(bdev), mask.to(bdev)).float().to(device), mask.to(device)


def _branches(state: RunState, stage: Stage) -> list[tuple[str, bool]]:
    """(prompt, whether its glyphs are encoded) per CFG branch: the prompt, and the negative prompt under CFG."""
    branches = [(state.params.prompt, True)]
    if stage.params["negative"]:
        branches.append((state.params.negative_prompt, bool(stage.params.get("negative_glyphs"))))
    return branches


@register("hy15_glyph_encode")
def hy15_glyph_encode(ctx: StageContext, state: RunState, stage: Stage) -> None:
    """byT5 on each branch's quoted text (its own stage: the memory plan sees byT5 and Qwen2.5-VL one at a time).
    Activated on every run, quoted text or not: the plan's model uses (and prefetches) are in stage order."""
    (byt5_name,) = stage.models
    glyphs = []
    with timed(state.timings, "encode", ctx):
        with ctx.placements[byt5_name].active() as byt5, ctx.dispatch(byt5_name):
            for prompt, encode in _branches(state, stage):
                glyphs.append(encode_glyphs(byt5, prompt, stage.params["glyph_len"], ctx.device) if encode
                              else (None, None))
    state.family["glyphs"] = glyphs


@register("hy15_text_encode")
def hy15_text_encode(ctx: StageContext, state: RunState, stage: Stage) -> None:
    tokenizer_name, qwen_name = stage.models
    p = stage.params
    if p.get("template") != "hunyuan_video15":
        raise PlanError(f"the plan's stage {stage.name!r} renders prompts with template {p.get('template')!r}, which "
                        "this runtime does not know; recompile the recipe with this version.")
    branches = _branches(state, stage)
    glyphs = state.family.get("glyphs") or [(None, None)] * len(branches)
    if len(glyphs) != len(branches):
        raise PlanError(f"the plan's stage {stage.name!r} encodes {len(branches)} prompts but the glyph stage "
                        f"{len(glyphs)}; recompile.")
    out = []
    # Qwen2.5-VL lives on each dp replica's lead (several ranks: cfg parallel), which broadcasts its outputs; byT5
    # runs on every rank (hy15_glyph_encode)
    shared = ctx.plan.placement_of(qwen_name).ranks == "all"
    with timed(state.timings, "encode", ctx):
        texts = []
        if shared or ctx.rank.is_writer:
            tokenizer = ctx.tokenizers[tokenizer_name]
            with ctx.placements[qwen_name].active() as qwen, ctx.dispatch(qwen_name):
                texts = [encode_text_states(qwen, tokenizer, prompt, p["text_len"], ctx.device) for prompt, _ in branches]
        else:
            planned = next(m for m in ctx.plan.layer1_model_definition.models if m.name == qwen_name)
            texts = [(torch.empty(1, p["text_len"], planned.arch["hidden_size"], device=ctx.device),
                      torch.empty(1, p["text_len"], dtype=torch.int64, device=ctx.device)) for _ in branches]
        if not shared:
            texts = [(ctx.rank.broadcast(states.contiguous()), ctx.rank.broadcast(mask.contiguous()))
                     for states, mask in texts]
        for (states, mask), (byt5_states, byt5_mask) in zip(texts, glyphs):
            out.append({"text_states": states, "text_mask": mask, "byt5_states": byt5_states, "byt5_mask": byt5_mask})
    state.family["text"] = out
