"""LoRAs applied as the plan recorded them: merged into the weights at load (W += strength * alpha/rank * up @ down),
or (merge = false) beside each targeted linear as a LoraLinear, so that FP8 weights stay FP8.

The file is checked against the plan's fingerprint first, and matched with the same rules the compiler used
(telefuser.schema.lora_keys): a match that differs from the plan's counts is refused. Full-tensor differences
(`.diff`, `.diff_b`, `.diff_m`) are added to their tensor in either mode (strength times the difference); the
compiler refuses them on float8 weights. Linears the model reads as float itself (FLOAT32_LINEARS) or keeps in its
dtype under quantisation (KEEP_PRECISION_LINEARS: HunyuanVideo-1.5's embedders and output layer) are merged: they are
never quantised, so merging them is exact and costs nothing per step. The scale of a pair is its `.alpha` / rank, or
the PEFT LoraConfig in the file's metadata (`lora_adapter_metadata`), or 1 (schema.lora_keys.pair_scale). An update
whose rows are a slice or reordering of its target's (the match's `rows`: HunyuanVideo-1.5's refiner q/k/v in
diffusers' names, fused here) is placed in those rows, zeros elsewhere: each slice keeps its own low-rank pair.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from telefuser.errors import PlanError, WeightsError
from telefuser.ops.lora_linear import LoraLinear
from telefuser.schema.fingerprint import file_sha256, fingerprint
from telefuser.schema.lora_keys import Rows, match_lora, pair_scale, parse_lora, peft_config
from telefuser.schema.plan import PlannedLora, PlannedModel

from .fp8_checkpoint import float32_linears
from .weights import read_state_dict

RECOMPILE = "recompile the recipe (telefuser-compile)"
# target module -> [(down [r, in], up [out, r] scaled by strength * alpha / rank)]
Pending = dict[str, list[tuple[torch.Tensor, torch.Tensor]]]


def _check_file(lora: PlannedLora, model: str) -> None:
    path = Path(lora.path)
    if not path.is_file():
        raise WeightsError(f"LoRA file {lora.path!r} of model {model!r} is missing; restore it, or fix its path in "
                           f"the recipe and {RECOMPILE}.")
    try:
        now = fingerprint(path, full_hash=False)
        changed = (now.size, now.header_sha256) != (lora.file.size, lora.file.header_sha256) or (
            lora.file.sha256 is not None and file_sha256(path, what="checking") != lora.file.sha256)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"LoRA file {lora.path!r} of model {model!r} cannot be read ({exc}): it is truncated or "
                           f"damaged; restore the original file, or {RECOMPILE}.") from exc
    if changed:
        raise WeightsError(f"LoRA file {lora.path!r} of model {model!r} changed since the plan was compiled (its "
                           f"size, header or contents differ); the plan's match may no longer hold, so {RECOMPILE}.")


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name) if module_name else model, attr)


@torch.no_grad()
def _place(update: torch.Tensor, segments: Rows | None, rows: int) -> torch.Tensor:
    """An update's rows placed in its target's (a slice of a fused tensor, or reordered): zeros elsewhere."""
    if segments is None:
        return update
    out = update.new_zeros((rows, *update.shape[1:]))
    for start, stop, at in segments:
        out[at:at + stop - start] = update[start:stop]
    return out


def apply_loras(model: nn.Module, planned: PlannedModel, from_diffusers, dtype: torch.dtype,
                rows=None) -> Pending:
    """Merge every merged LoRA and every full difference into `model`; return the unmerged low-rank updates by
    target module, for `wrap_unmerged` once the base layers are final (after any on-the-fly quantisation)."""
    own_shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    keep_float = (*float32_linears(model), *getattr(model, "KEEP_PRECISION_LINEARS", ()))
    pending: Pending = {}
    for lora in planned.loras:
        _check_file(lora, planned.name)
        tensors = read_state_dict([Path(lora.path)], "cpu")
        try:
            with safe_open(lora.path, "pt") as f:
                peft = peft_config(f.metadata())
        except ValueError as exc:  # the compiler read the same metadata; a plan whose file changed is caught above
            raise PlanError(f"LoRA {lora.path!r}: {exc}; {RECOMPILE}.") from exc
        modules, _ = parse_lora(tensors)
        match = match_lora(modules, {k: tuple(t.shape) for k, t in tensors.items()}, own_shapes, from_diffusers,
                           rows=rows)
        if match.matched != lora.matched:
            raise PlanError(f"LoRA {lora.path!r} now matches {match.matched} tensors of model {planned.name!r}, the "
                            f"plan recorded {lora.matched}; {RECOMPILE}.")
        for module, target in match.targets:
            param = _tensor(model, target)
            segments = match.rows.get((module.name, module.param))
            if not module.is_pair:
                update = _place(lora.strength * tensors[module.keys["diff"]].float(), segments, param.shape[0])
            else:
                down = tensors[module.keys["down"]].float().flatten(1)
                up = tensors[module.keys["up"]].float().flatten(1)
                alpha = module.keys.get("alpha")
                try:
                    scale = pair_scale(module, down.shape[0], float(tensors[alpha]) if alpha else None, peft)
                except ValueError as exc:
                    raise PlanError(f"LoRA {lora.path!r}: {exc}; {RECOMPILE}.") from exc
                up = _place(lora.strength * scale * up, segments, param.shape[0])
                module_name = target.removesuffix(".weight")
                if not lora.merge and not any(fnmatch.fnmatch(module_name, p) for p in keep_float):
                    pending.setdefault(module_name, []).append((down, up))
                    continue
                update = (up @ down).reshape(param.shape)
            if param.element_size() == 1:  # float8: the compiler refuses this; a changed plan could ask for it
                raise PlanError(f"LoRA {lora.path!r} would be merged into {target} of model {planned.name!r}, which "
                                f"is stored in float8; set its merge = false and {RECOMPILE}.")
            param.add_(update.to(device=param.device, dtype=param.dtype))
    return pending


def wrap_unmerged(model: nn.Module, pending: Pending, dtype: torch.dtype) -> int:
    """Replace each targeted layer by a LoraLinear around it (several LoRAs stacked along the rank)."""
    for name, updates in pending.items():
        base = model.get_submodule(name)
        device = next(iter(base.state_dict().values())).device
        down = torch.cat([d for d, _ in updates]).to(device=device, dtype=dtype)
        up = torch.cat([u for _, u in updates], dim=1).to(device=device, dtype=dtype)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, LoraLinear(base, down, up))
    return len(pending)
