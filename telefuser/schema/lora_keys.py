"""LoRA files by their tensor names: what each tensor updates, and which tensor of a model that is.

Shared by the compiler (which reads a LoRA's header and records the match in the plan) and the runtime (which
applies the tensors), so both see the same match. Published layouts for Wan:

- kohya / ComfyUI, as lightx2v's distill LoRAs (`Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32`) and
  Wan2.2-Lightning's are: `diffusion_model.blocks.0.self_attn.q.lora_down.weight` [rank, in],
  `...lora_up.weight` [out, rank], `...alpha` (scale alpha / rank), and full-tensor differences `<module>.diff`
  (the weight), `.diff_b` (the bias), `.diff_m` (`blocks.N.diff_m`: the block's modulation);
- musubi-tuner / kohya flattened: `lora_unet_blocks_0_self_attn_q.lora_down.weight` (dots as underscores);
- diffusers / PEFT: `transformer.blocks.0.attn1.to_q.lora_A.weight` / `lora_B.weight` (scale 1), and
  `lora_B.bias` (a bias difference, as diffusers converts `diff_b`).

HunyuanVideo-1.5 (module names are Tencent's own, `double_blocks.0.img_attn_q`, which the DiT keeps): Tencent's
`train.py` wraps every nn.Linear of its transformer with PEFT (`LoraConfig(r, lora_alpha, target_modules="all-linear")`)
and saves with its transformer's `save_lora_adapter`: `pytorch_lora_weights.safetensors` holding
`get_peft_model_state_dict` (`double_blocks.0.img_attn_q.lora_A.weight` [r, in], `.lora_B.weight` [out, r], no
prefix) with the LoraConfig as JSON in the safetensors metadata under `lora_adapter_metadata` (diffusers'
LORA_ADAPTER_METADATA_KEY): the scale is `lora_alpha / r` (`peft_config`); ComfyUI-style files name the same
modules `diffusion_model.<module>.lora_down/lora_up/alpha`, as Wan's; diffusers' names are renamed, and the two
modules that are rows of a Tencent tensor are placed there (`match_lora`'s `rows`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from dataclasses import dataclass, field

PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
KOHYA_PREFIX = "lora_unet_"
PAIR_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up"}
# suffix -> the parameter of the module it changes
DIFF_SUFFIXES = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation", "lora_B.bias": "bias"}

Shape = tuple[int, ...]
# rows of an update placed in a larger or reordered target: (source start, source stop, target start) segments
Rows = tuple[tuple[int, int, int], ...]
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: the adapter's LoraConfig, JSON


@dataclass(frozen=True)
class PeftConfig:
    """The scaling part of a PEFT LoraConfig saved beside the tensors (PEFT's LoRA layer: scale = alpha / r, or
    alpha / sqrt(r) with use_rslora; `rank_pattern` / `alpha_pattern` keys are regexes matched against the end of the
    module name, `(.*\\.)?(pattern)$`, the first that matches)."""

    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool

    @staticmethod
    def _pick(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
        for pattern, value in patterns.items():
            try:
                if re.match(rf"(.*\.)?({pattern})$", module):
                    return value
            except re.error as exc:
                raise ValueError(f"its LoraConfig pattern {pattern!r} is no regular expression ({exc})") from exc
        return default

    def scale(self, module: str, rank: int) -> float:
        """alpha / rank of `module`; ValueError when the config's rank for it is not the tensors' rank."""
        want = int(self._pick(self.rank_pattern, module, self.r))
        if want != rank:
            raise ValueError(f"its LoraConfig ({PEFT_METADATA_KEY}) gives {module!r} rank {want}, its lora_A has "
                             f"{rank} rows")
        alpha = float(self._pick(self.alpha_pattern, module, self.lora_alpha))
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def peft_config(metadata: Mapping[str, str] | None) -> PeftConfig | None:
    """The LoraConfig a diffusers / PEFT `save_lora_adapter` file carries in its safetensors metadata, or None (no
    such entry: scale 1, as diffusers loads such files). ValueError when it is unreadable or not a plain LoRA."""
    raw = (metadata or {}).get(PEFT_METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
        if any(k.startswith("transformer.") for k in config):
            # a pipeline's save_lora_weights packs each component's config under its prefix; diffusers' load_lora_adapter
            # keeps the "transformer." entries, without the prefix
            config = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
        if config.get("use_dora"):
            raise ValueError("it is a DoRA (use_dora = true), whose weight is renormalised per column, not "
                             "W + alpha/r B A")
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"its adapter is {config['peft_type']}, not a LoRA")
        # LoraConfig(**metadata), as diffusers builds it: PEFT's defaults r = 8, lora_alpha = 8 for absent fields
        return PeftConfig(int(config.get("r", 8)), float(config.get("lora_alpha", 8)),
                          {str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()},
                          {str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
                          bool(config.get("use_rslora", False)))
    except (AttributeError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"its {PEFT_METADATA_KEY} metadata is no readable PEFT LoraConfig ({exc!r})") from exc


def pair_scale(module: "LoraModule", rank: int, alpha: float | None, peft: PeftConfig | None) -> float:
    """alpha / rank of a low-rank pair: its `.alpha` tensor (kohya / ComfyUI), else the file's PEFT LoraConfig,
    else 1 (a PEFT file without its config: diffusers then takes alpha = r)."""
    if alpha is not None:
        return alpha / rank
    return peft.scale(module.name, rank) if peft is not None else 1.0


@dataclass
class LoraModule:
    """One update a LoRA file holds: a low-rank pair (keys down, up, maybe alpha) or a full difference (key diff)."""

    name: str  # module name in the file, wrapper prefix stripped (kohya: still flattened)
    param: str  # the module's parameter it changes: weight, bias or modulation
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def is_pair(self) -> bool:
        return "diff" not in self.keys


def _strip(name: str) -> str:
    for prefix in (KOHYA_PREFIX, *PREFIXES):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def parse_lora(keys: Iterable[str]) -> tuple[list[LoraModule], list[str]]:
    """(the updates, in file order; tensor names that are no LoRA tensor). ValueError for a down without its up."""
    modules: dict[tuple[str, str], LoraModule] = {}
    unknown = []
    for key in keys:
        for suffix, param in DIFF_SUFFIXES.items():
            if key.endswith("." + suffix):
                name = _strip(key[: -len(suffix) - 1])
                modules.setdefault((name, "diff:" + param), LoraModule(name, param)).keys["diff"] = key
                break
        else:
            for suffix, role in (*PAIR_SUFFIXES.items(), ("alpha", "alpha")):
                if key.endswith("." + suffix):
                    name = _strip(key[: -len(suffix) - 1])
                    modules.setdefault((name, "pair"), LoraModule(name, "weight")).keys[role] = key
                    break
            else:
                unknown.append(key)
    for module in modules.values():
        if module.is_pair and not {"down", "up"} <= module.keys.keys():
            have = ", ".join(sorted(module.keys))
            raise ValueError(f"module {module.name!r} has only {have}: a low-rank update needs both its down (A) "
                             "and up (B) matrices")
    return list(modules.values()), unknown


@dataclass
class LoraMatch:
    """Each update's target tensor in the model's own (Wan) names, or why it has none."""

    targets: list[tuple[LoraModule, str]]  # (update, model tensor name)
    unmatched: list[str]  # "name: reason"
    layout: str  # the model's own names ("wan", or `own`), diffusers or kohya: how most module names were written
    rows: dict[tuple[str, str], Rows] = field(default_factory=dict)  # (module, param) -> its rows in the target

    @property
    def matched(self) -> int:
        return len(self.targets)


def update_shape(module: LoraModule, shapes: Mapping[str, Shape]) -> Shape:
    """The shape the update has: [out, in] of up @ down, or the difference's own."""
    if not module.is_pair:
        return tuple(shapes[module.keys["diff"]])
    down, up = shapes[module.keys["down"]], shapes[module.keys["up"]]
    if len(down) < 2 or len(up) < 2 or up[1] != down[0]:
        return ()
    return (up[0], *down[1:])


def match_lora(modules: list[LoraModule], lora_shapes: Mapping[str, Shape], model_shapes: Mapping[str, Shape],
               from_diffusers: Callable[[str], str], own: str = "wan",
               rows: Callable[[str, int], tuple[str, Rows] | None] | None = None) -> LoraMatch:
    """Match every update to a model tensor (`model_shapes`: the model's tensors in its own names, layout `own`:
    Wan's, or Tencent's for HunyuanVideo-1.5) by name, in those, diffusers' (renamed by `from_diffusers`) or kohya's
    flattened spelling, and by shape. `rows(name, out)` maps a module whose output rows are a slice or a reordering
    of a model tensor's (HunyuanVideo-1.5 in diffusers' names: the refiner's to_q/to_k/to_v, fused in Tencent's
    `self_attn_qkv`; the final `norm_out.linear`, Tencent's with its halves swapped) to (that module, its Rows)."""
    flat = {}
    for key in model_shapes:
        module, _, _ = key.rpartition(".")
        flat[module.replace(".", "_")] = module
    targets, unmatched, layouts, row_maps = [], [], Counter(), {}
    for module in modules:
        wanted = update_shape(module, lora_shapes)
        mapped = rows(module.name, wanted[0]) if rows is not None and wanted else None
        if mapped is not None:
            name, segments = f"{mapped[0]}.{module.param}", mapped[1]
            have = tuple(model_shapes.get(name, ()))
            if not have or have[1:] != wanted[1:] or max(d + b - a for a, b, d in segments) > have[0]:
                unmatched.append(f"{module.name}: LoRA shape {list(wanted)} does not fit {name} {list(have)}")
                continue
            targets.append((module, name))
            row_maps[(module.name, module.param)] = segments
            layouts["diffusers"] += 1
            continue
        found = None
        for layout, name in ((own, f"{module.name}.{module.param}"),
                             ("diffusers", from_diffusers(f"{module.name}.{module.param}")),
                             ("kohya", f"{flat.get(module.name, '')}.{module.param}")):
            if name in model_shapes:
                found = (layout, name)
                break
        if found is None:
            unmatched.append(f"{module.name}: no such {module.param} in the model")
            continue
        layout, name = found
        have = tuple(model_shapes[name])
        # a linear's weight is [out, in]; a conv LoRA's down may carry the kernel's trailing dims of 1
        if wanted != have and not (module.is_pair and wanted[:2] == have[:2] and all(d == 1 for d in wanted[2:])):
            unmatched.append(f"{module.name}: LoRA shape {list(wanted)}, model {list(have)}")
            continue
        targets.append((module, name))
        layouts[layout] += 1
    return LoraMatch(targets, unmatched, layouts.most_common(1)[0][0] if layouts else own, row_maps)
