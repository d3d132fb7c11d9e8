"""LoRAs of layer2.models.<name>.lora_configs, matched against the model's weights from the LoRA file's header.

The plan records each LoRA's fingerprint and match counts; the runtime applies exactly that match and refuses a
LoRA file that changed since compiling.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from telefuser.errors import RecipeError, WeightsError
from telefuser.schema.fingerprint import fingerprint, safetensors_header_bytes, sha256_requested
from telefuser.schema.lora_keys import LoraMatch, Shape, match_lora, pair_scale, parse_lora, peft_config
from telefuser.schema.plan import PlannedLora
from telefuser.schema.model_config import ModelRuntimeConfig

from .weights import TensorInfo

# class -> the layout its own tensor names are in (HunyuanVideo-1.5's DiT keeps Tencent's module names)
LORA_CLASSES = {"WanDiT": "wan", "HunyuanVideo15DiT": "tencent"}
EXAMPLES = 5


def _header_shapes(path: Path, where: str) -> tuple[dict[str, Shape], dict[str, str]]:
    """(tensor name -> shape, the header's metadata) after checking that every tensor's bytes lie inside the file."""
    try:
        raw = safetensors_header_bytes(path)
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
        shapes = {name: tuple(int(d) for d in t["shape"]) for name, t in header.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise WeightsError(f"{where}: {path} is not a readable safetensors file ({exc}); re-download the LoRA.") from exc
    if 8 + len(raw) + end > path.stat().st_size:
        raise WeightsError(f"{where}: {path} is truncated (its header describes {8 + len(raw) + end} bytes, the file "
                           f"has {path.stat().st_size}); re-download the LoRA.")
    return shapes, metadata


def _mismatch(path: Path, model: str, match: LoraMatch, total: int) -> str:
    examples = "; ".join(match.unmatched[:3])
    return (f"LoRA {str(path)!r} of model {model!r}: matched {match.matched} of {total} LoRA modules "
            f"({len(match.unmatched)} match no tensor of this model, e.g. {examples}). Is the LoRA made for another "
            "model (Wan2.1 vs Wan2.2, 1.3B vs 14B, T2V vs I2V, Wan vs HunyuanVideo-1.5)?")


def plan_loras(name: str, class_name: str, layout: str, tensors: dict[str, TensorInfo], runtime: ModelRuntimeConfig,
               recipe_dir: Path, tp_degree: int) -> list[PlannedLora]:
    """Each LoRA of the model matched by name and shape; refusals (or warnings, on_mismatch = "warn") with counts."""
    if not runtime.lora_configs:
        return []
    if class_name not in LORA_CLASSES:
        raise RecipeError(f"layer2.models.{name}.lora_configs: LoRA is supported on the Wan and HunyuanVideo-1.5 "
                          f"DiTs, and {name!r} is a {class_name}; remove its lora_configs.")
    from telefuser.models.registry import get

    entry = get(class_name)
    own = {entry.own_name(k, layout): t for k, t in tensors.items()}
    model_shapes = {k: t.shape for k, t in own.items()}
    if class_name == "HunyuanVideo15DiT" and layout != "tencent":
        # diffusers' refiner to_q/to_k/to_v are one self_attn_qkv in the model: its shapes as the runtime builds it
        import torch

        meta = {k: torch.empty(t.shape, device="meta") for k, t in tensors.items()}
        model_shapes = {k: tuple(v.shape) for k, v in entry.convert(meta, layout).items()}
    fp8_weights = {k for k, t in own.items() if t.dtype.startswith("float8")}
    linears = {k for k, s in model_shapes.items() if k.endswith(".weight") and len(s) == 2}
    planned = []
    for i, lora in enumerate(runtime.lora_configs):
        where = f"layer2.models.{name}.lora_configs[{i}]"
        path = Path(lora.path).expanduser()
        path = path if path.is_absolute() else recipe_dir / path
        if not path.is_file():
            raise WeightsError(f"{where}: the LoRA file {path} does not exist; fix its path (relative paths are "
                               "relative to the recipe).")
        if path.suffix != ".safetensors":
            raise WeightsError(f"{where}: {path} is not a .safetensors file; LoRAs load from safetensors only.")
        shapes, metadata = _header_shapes(path, where)
        try:
            modules, unknown = parse_lora(shapes)
        except ValueError as exc:
            raise WeightsError(f"{where}: {path}: {exc}; the file is incomplete or not a LoRA.") from exc
        try:  # the alpha a PEFT file keeps in its metadata: read (and its ranks checked) as the runtime will
            peft = peft_config(metadata)
            for module in modules:
                if module.is_pair and "alpha" not in module.keys:
                    pair_scale(module, shapes[module.keys["down"]][0], None, peft)
        except (ValueError, IndexError) as exc:
            raise WeightsError(f"{where}: LoRA {str(path)!r}: {exc}; only plain LoRAs (W + alpha/r B A) load.") from exc
        if unknown:
            raise WeightsError(f"{where}: {path} holds {unknown[0]!r}, which is no LoRA tensor name (lora_down/"
                               "lora_up/alpha, lora_A/lora_B, .diff/.diff_b/.diff_m): not a LoRA file.")
        if not modules:
            raise WeightsError(f"{where}: {path} holds no LoRA tensors.")
        match = match_lora(modules, shapes, model_shapes, lambda key: entry.own_name(key, "diffusers"),
                           LORA_CLASSES[class_name], entry.lora_rows)
        if match.unmatched:
            message = _mismatch(path, name, match, len(modules))
            if lora.on_mismatch == "error":
                raise WeightsError(f"{where}: {message} To apply the {match.matched} that match and go on, set "
                                   f"{where}.on_mismatch = \"warn\".")
            warnings.warn(f"{where}: {message} Only the {match.matched} that match are applied "
                          "(on_mismatch = \"warn\").", stacklevel=2)
        for module, target in match.targets:
            if target not in fp8_weights:
                continue
            if lora.merge:
                raise WeightsError(
                    f"{where}: {target} of model {name!r} is stored in float8, so merging LoRA {str(path)!r} into it "
                    f"would dequantise and requantise it; set {where}.merge = false: the LoRA then runs beside the "
                    "FP8 linear (y = W8 x + strength * alpha/rank * up(down x)) and the weights stay FP8.")
            if not module.is_pair:
                raise WeightsError(f"{where}: LoRA {str(path)!r} holds a full difference ({module.keys['diff']}) "
                                   f"for {target}, which is stored in float8: it cannot be added without "
                                   "requantising; use the model's bf16 checkpoint with this LoRA.")
        if not lora.merge and tp_degree > 1:
            raise RecipeError(f"{where}.merge = false with parallel_config.tp_degree > 1: tensor parallelism shards "
                              "the plain linears and cannot shard a LoRA beside them; merge it, or set tp_degree = 1.")
        planned.append(PlannedLora(
            path=str(path), strength=lora.strength, merge=lora.merge, on_mismatch=lora.on_mismatch,
            file=fingerprint(path, full_hash=sha256_requested()), key_layout=match.layout, modules=len(modules),
            matched=match.matched, unmatched_examples=match.unmatched[:EXAMPLES],
            linears_covered=len({t for m, t in match.targets if m.is_pair and t in linears}),
            linears_total=len(linears)))
    return planned
