"""Building each planned model: registry class, plan's arch, weights in the model's own key layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from telefuser.errors import PlanError, WeightsError
from telefuser.schema.plan import PlannedModel
from telefuser.schema.recipe import ModelRuntimeConfig

from .lora import lora_deltas, merge_lora
from .weights import read_state_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _registry_entry(planned: PlannedModel) -> Any:
    from telefuser.models import registry

    try:
        return registry.get(planned.class_)
    except KeyError as exc:
        raise PlanError(
            f"model {planned.name!r} names class {planned.class_!r}, which this TeleFuser's model registry "
            f"does not have; recompile the recipe with this version."
        ) from exc


def _layout(entry: Any, keys, what: str) -> str:
    try:
        return entry.detect_layout(keys)
    except ValueError as exc:
        raise WeightsError(f"{what}: {exc}; is it made for {entry.name}?") from exc


def _instantiate(entry: Any, planned: PlannedModel, device: torch.device) -> torch.nn.Module:
    model_class = entry.model_class  # imported here, not under the device context (which slows imports)
    try:
        config = entry.config_class(**planned.arch)
    except (TypeError, ValueError) as exc:
        raise PlanError(
            f"the plan's arch for model {planned.name!r} does not fit {planned.class_} ({exc}); "
            "recompile the recipe with this TeleFuser version."
        ) from exc
    # On the meta device no memory or time is spent on weights the checkpoint replaces, and nothing is
    # initialised at random. Buffers a model derives in __init__ and no checkpoint holds (the VAE's latent
    # statistics) it computes for real even there (on the CPU; moved with the model).
    with torch.device("meta"):
        model = model_class(config)
    persistent = model.state_dict().keys()
    if any(b.is_meta and name not in persistent for name, b in model.named_buffers()):
        # A model that cannot derive such a buffer under meta is built for real (only small models carry them).
        with torch.device(device):
            model = model_class(config)
    return model


def build_model(
    planned: PlannedModel, runtime: ModelRuntimeConfig, device: torch.device, base_dir: Path | None = None
) -> torch.nn.Module:
    """The model of the plan with its weights, LoRA and quantisation applied, on `device`.

    `base_dir` resolves relative LoRA paths: the recipe's folder, like every path in a recipe.
    """
    entry = _registry_entry(planned)
    dtype = DTYPES[planned.compute_dtype]
    state = read_state_dict([Path(f.path) for f in planned.files], device, dtype)
    layout = _layout(entry, state.keys(), f"the weights of model {planned.name!r}")
    if layout != planned.key_layout:
        raise WeightsError(
            f"the weights of model {planned.name!r} are now in the {layout!r} key layout but the plan "
            f"recorded {planned.key_layout!r}; recompile the recipe."
        )
    state = entry.convert(state, layout)
    model = _instantiate(entry, planned, device)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"the weights of model {planned.name!r} do not match {planned.class_} built from the plan's arch: "
            f"{str(exc).splitlines()[0]} ...; the files changed or the arch is wrong: recompile the recipe."
        ) from exc
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    for lora in runtime.lora_configs:
        path = str(Path(base_dir or ".", lora.path))  # an absolute lora.path stays as it is
        deltas = lora_deltas(read_state_dict([Path(path)], "cpu"), path)
        lora_layout = _layout(entry, deltas.keys(), f"LoRA {path!r}")
        merge_lora(model, deltas, lora.strength, path, lambda d: entry.convert(d, lora_layout))
    if runtime.quant_config.quant_type != "none":
        try:
            from telefuser.ops.quantized_linear import replace_linear_layers
        except ImportError as exc:
            raise PlanError(
                f"model {planned.name!r} is planned with {runtime.quant_config.quant_type} quantisation, but this build "
                "has no telefuser.ops.quantized_linear; set quant_config.quant_type = \"none\" and recompile."
            ) from exc
        try:
            replace_linear_layers(model, runtime.quant_config.quant_type, skip_modules=runtime.quant_config.skip_modules)
        except ValueError as exc:
            raise PlanError(f"model {planned.name!r}: {exc}; change layer2.models.{planned.name}.quant_config "
                            "and recompile.") from exc
    if runtime.compile_config.enabled:
        _compile_blocks(model, runtime)
    return model


def _compile_blocks(model: torch.nn.Module, runtime: ModelRuntimeConfig) -> None:
    """torch.compile each transformer block (one graph per block keeps compile time low)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise PlanError(f"compile is enabled for a {type(model).__name__}, which has no transformer blocks to compile.")
    cfg = runtime.compile_config
    for block in blocks:
        block.compile(backend=cfg.backend, mode=None if cfg.mode == "default" else cfg.mode,
                      fullgraph=cfg.fullgraph, dynamic=cfg.dynamic)
