"""Building each planned model: registry class, plan's arch, weights in the model's own key layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from telefuser.errors import PlanError, WeightsError
from telefuser.models.block_stack import model_blocks
from telefuser.schema.enums import CompileMode, QuantType
from telefuser.schema.plan import PlannedModel
from telefuser.schema.model_config import ModelRuntimeConfig

from .fp8_checkpoint import float32_linears, place_fp8_linears
from .lora import apply_loras, wrap_unmerged
from .phases import LoadPhases
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


def _instantiate(entry: Any, planned: PlannedModel) -> torch.nn.Module:
    model_class = entry.model_class  # imported here, not under the device context (which slows imports)
    try:
        config = entry.config_class(**planned.arch)
    except (TypeError, ValueError) as exc:
        raise PlanError(
            f"the plan's arch for model {planned.name!r} does not fit {planned.class_} ({exc}); "
            "recompile the recipe with this TeleFuser version."
        ) from exc
    # On the meta device no memory or time is spent on weights the checkpoint replaces, and nothing is
    # initialised at random. Buffers a model derives in __init__ and no checkpoint holds (the VAEs' latent
    # statistics) it computes for real even there (on the CPU; moved with the model): one left on meta is a bug of
    # the model class, not something to hide by building the whole model for real.
    with torch.device("meta"):
        model = model_class(config)
    persistent = model.state_dict().keys()
    left = [name for name, b in model.named_buffers() if b.is_meta and name not in persistent]
    if left:
        raise RuntimeError(f"{planned.class_} built on the meta device leaves its derived buffer(s) {left} there; "
                           "the model class must compute them for real under meta (see models/wan/causal_vae.py, "
                           "latent_stats)")
    return model


def build_model(
    planned: PlannedModel, runtime: ModelRuntimeConfig, device: torch.device, base_dir: Path | None = None,
    phases: LoadPhases | None = None,
) -> torch.nn.Module:
    """The model of the plan with its weights, LoRA and quantisation applied, on `device`.

    An FP8 checkpoint's float8 linears become LinearFP8 layers straight from the stored weights and scales.
    LoRAs come from the plan (`planned.loras`: paths resolved against the recipe's folder and fingerprinted at
    compile time), so `base_dir` (the recipe's folder, which callers pass) is not needed for them.
    `phases` records "<name>: read" (the files' tensors on `device`) and "<name>: build" (the rest).
    """
    phases = phases or LoadPhases()
    entry = _registry_entry(planned)
    dtype = DTYPES[planned.compute_dtype]
    fp8 = planned.attributes.fp8_layout is not None
    with phases.phase(f"{planned.name}: read"):
        # An FP8 checkpoint is read as stored (scales stay float32); place_fp8_linears casts the rest.
        state = read_state_dict([Path(f.path) for f in planned.files], device, None if fp8 else dtype)
    with phases.phase(f"{planned.name}: build"):
        return _build(entry, planned, runtime, device, state, dtype, fp8)


def _build(entry: Any, planned: PlannedModel, runtime: ModelRuntimeConfig, device: torch.device,
           state: dict[str, torch.Tensor], dtype: torch.dtype, fp8: bool) -> torch.nn.Module:
    layout = _layout(entry, state.keys(), f"the weights of model {planned.name!r}")
    if layout != planned.key_layout:
        raise WeightsError(
            f"the weights of model {planned.name!r} are now in the {layout!r} key layout but the plan "
            f"recorded {planned.key_layout!r}; recompile the recipe."
        )
    state = entry.convert(state, layout)  # scale tensors are renamed with their weights (same module prefix)
    model = _instantiate(entry, planned)
    if fp8:
        place_fp8_linears(model, state, planned, dtype)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"the weights of model {planned.name!r} do not match {planned.class_} built from the plan's arch: "
            f"{str(exc).splitlines()[0]} ...; the files changed or the arch is wrong: recompile the recipe."
        ) from exc
    # .to(dtype) would cast float8 buffers too (float8 counts as floating point): an FP8 model is cast already
    model.to(device=device, dtype=None if fp8 else dtype).eval().requires_grad_(False)
    pending = apply_loras(model, planned, lambda key: entry.own_name(key, "diffusers"), dtype, entry.lora_rows)
    if runtime.quant_config.quant_type != QuantType.NONE:
        try:
            from telefuser.ops.quantized_linear import replace_linear_layers
        except ImportError as exc:
            raise PlanError(
                f"model {planned.name!r} is planned with {runtime.quant_config.quant_type} quantisation, but this build "
                "has no telefuser.ops.quantized_linear; set quant_config.quant_type = \"none\" and recompile."
            ) from exc
        try:
            # an FP8 checkpoint's linears are LinearFP8 already: only its remaining nn.Linear layers are quantised
            # and never the linears the model class keeps in its dtype (KEEP_PRECISION_LINEARS: HunyuanVideo-1.5's
            # embedders and output layer)
            keep = getattr(model, "KEEP_PRECISION_LINEARS", ())
            replace_linear_layers(model, runtime.quant_config.quant_type,
                                  skip_modules=[*runtime.quant_config.skip_modules, *float32_linears(model), *keep])
        except ValueError as exc:
            raise PlanError(f"model {planned.name!r}: {exc}; change layer2.models.{planned.name}.quant_config "
                            "and recompile.") from exc
    wrap_unmerged(model, pending, dtype)
    if runtime.compile_config.enabled:
        _compile_blocks(model, runtime)
    return model


def _compile_blocks(model: torch.nn.Module, runtime: ModelRuntimeConfig) -> None:
    """torch.compile each transformer block (one graph per block keeps compile time low): the blocks of the model
    class's BLOCK_LISTS (WanDiT's `blocks`, HunyuanVideo15DiT's double- then single-stream blocks)."""
    blocks = model_blocks(model)
    if not blocks:
        raise PlanError(f"compile is enabled for a {type(model).__name__}, which has no transformer blocks to compile.")
    cfg = runtime.compile_config
    for block in blocks:
        block.compile(backend=cfg.backend, mode=None if cfg.mode == CompileMode.DEFAULT else cfg.mode,
                      fullgraph=cfg.fullgraph, dynamic=cfg.dynamic)
