"""LoRA merged into the weights at load: W += strength * scale * up @ down.

Two key conventions are read: kohya/Wan style (`<module>.lora_down.weight`,
`<module>.lora_up.weight`, optional `<module>.alpha`, scale = alpha / rank) and
PEFT/diffusers style (`<module>.lora_A.weight`, `<module>.lora_B.weight`,
scale 1). Module names may carry a wrapper prefix, which is stripped.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from telefuser.errors import WeightsError

_PAIRS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up"}
_PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.")


def _module_name(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def lora_deltas(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`<module>.weight` -> the fp32 update `scale * up @ down` for every LoRA pair in `state`."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for suffix, role in _PAIRS.items():
            if key.endswith("." + suffix):
                parts.setdefault(_module_name(key[: -len(suffix) - 1]), {})[role] = tensor
                break
        else:
            if key.endswith(".alpha"):
                parts.setdefault(_module_name(key[: -len(".alpha")]), {})["alpha"] = tensor
            else:
                raise WeightsError(f"LoRA file {source!r} holds {key!r}, which is not a LoRA tensor name I know.")
    deltas = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            raise WeightsError(f"LoRA file {source!r} has an unpaired down/up (A/B) matrix for {module!r}.")
        down, up = p["down"].float().flatten(1), p["up"].float().flatten(1)
        rank = down.shape[0]
        scale = float(p["alpha"]) / rank if "alpha" in p else 1.0
        deltas[module + ".weight"] = scale * (up @ down)
    if not deltas:
        raise WeightsError(f"LoRA file {source!r} holds no lora_down/lora_up or lora_A/lora_B pairs.")
    return deltas


@torch.no_grad()
def merge_lora(
    model: torch.nn.Module,
    deltas: Mapping[str, torch.Tensor],
    strength: float,
    source: str,
    to_canonical: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> int:
    """Add the deltas into the model's weights (renamed to the model's own layout first); returns count."""
    renamed = to_canonical(dict(deltas)) if to_canonical is not None else dict(deltas)
    params = dict(model.named_parameters())
    for name, delta in renamed.items():
        param = params.get(name)
        if param is None:
            raise WeightsError(
                f"LoRA {source!r} updates {name!r}, which this model does not have; "
                "is the LoRA made for another model?"
            )
        if param.shape != delta.shape:
            raise WeightsError(
                f"LoRA {source!r} updates {name!r} with shape {tuple(delta.shape)}, "
                f"but the weight is {tuple(param.shape)}; is the LoRA made for another model size?"
            )
        param.add_((strength * delta).to(device=param.device, dtype=param.dtype))
    return len(renamed)
