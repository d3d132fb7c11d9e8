"""What the runtime cannot execute, refused at compile time: a plan that compiles is a plan the runtime runs.

Two lists of small checks, each returning the refusal's message or None:

- NOT_EXECUTABLE_YET: recipe keys the schema accepts (they belong to the reference design's vocabulary) but whose
  feature has not landed in the runtime. When a feature lands, delete its check from the list (and the function).
- DO_NOT_COMPOSE: settings that each run alone but not together.

Checks that need the weights' architecture (heads per degree, FP8 with tp) live beside what they read
(compiler/mesh.py, compiler/models.py); block offload's own rules in compiler/block_offload.py.
"""

from __future__ import annotations

from typing import Callable, Optional

from telefuser.errors import RecipeError
from telefuser.schema.enums import ModelClass, QuantType, WeightOffloadType, is_dit
from telefuser.schema.plan import PlannedModel
from telefuser.schema.model_config import ModelRuntimeConfig
from telefuser.schema.recipe import Recipe

from .skip_work import cache_problem, sparse_problem

Check = Callable[[Recipe, list[PlannedModel]], Optional[str]]


def _not_yet(key: str, value: object, remove: str) -> str:
    return (f"layer2.{key} = {value}: not executable yet (this TeleFuser's runtime does not run it, so the plan "
            f"could not load); {remove} and compile again.")


def _hunyuan15(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    """HunyuanVideo-1.5's own rules and what its stages do not run yet (compiler/hunyuan15.py)."""
    from .hunyuan15 import check_recipe

    return check_recipe(recipe, models)


def _super_resolution(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    from .hunyuan15 import is_hy15

    if is_hy15(recipe.layer1.pipeline):  # its SR stage runs (checked by _hunyuan15)
        return None
    if recipe.layer2.enable_sr:
        return _not_yet("enable_sr", "true", "remove layer2.enable_sr (or set it to false)")
    if recipe.layer2.lq_noise_strength:
        return _not_yet("lq_noise_strength", recipe.layer2.lq_noise_strength,
                        "remove layer2.lq_noise_strength (it noises the super-resolution stage's input)")
    return None


def _pipeline_parallel(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    pp = recipe.layer2.parallel_config.pp_degree
    if pp > 1:
        return (f"layer2.parallel_config.pp_degree = {pp}: pipeline parallelism is not built yet (not executable "
                "yet); set pp_degree = 1 and spread the devices over cfg_degree, sp_ulysses_degree, sp_ring_degree "
                "or tp_degree.")
    return None


def _fullgraph_compile(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    """telefuser.ops.attention.attention runs outside the graph (torch.compiler.disable: the backends' kernels are
    not traceable), so every block graph-breaks at attention, which fullgraph forbids."""
    for name, cfg in recipe.layer2.models.items():
        if cfg.compile_config.enabled and cfg.compile_config.fullgraph:
            return _not_yet(f"models.{name}.compile_config.fullgraph", "true",
                            "set fullgraph = false (each block compiles to graphs around its attention call)")
    return None


NOT_EXECUTABLE_YET: tuple[Check, ...] = (
    _hunyuan15, _super_resolution, _pipeline_parallel, _fullgraph_compile)


def _runtime(recipe: Recipe, name: str) -> ModelRuntimeConfig:
    return recipe.layer2.models.get(name, ModelRuntimeConfig())


def _tensor_parallel_dit(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    """tp shards a DiT's linears into DTensors that stay on their device and replace plain nn.Linear layers: they
    cannot be offloaded, quantised or compiled block by block."""
    if recipe.layer2.parallel_config.tp_degree == 1:
        return None
    for m in models:
        cfg = _runtime(recipe, m.name)
        if not is_dit(m.role):
            continue
        where = f"layer2.models.{m.name}"
        if cfg.offload_config.offload_type != WeightOffloadType.NO_CPU_OFFLOAD:
            return (f"{where}.offload_config.offload_type = {cfg.offload_config.offload_type!r} with "
                    "layer2.parallel_config.tp_degree > 1: tensor-parallel weights stay on their device; use "
                    "offload_type = \"NO_CPU_OFFLOAD\", or sp_ulysses_degree / sp_ring_degree / cfg_degree instead of tp.")
        if cfg.quant_config.quant_type != QuantType.NONE:
            return (f"{where}.quant_config.quant_type = {cfg.quant_config.quant_type!r} with "
                    "layer2.parallel_config.tp_degree > 1: tensor parallelism shards plain linears, not quantised "
                    "ones; set quant_type = \"none\", or use sp_ulysses_degree / sp_ring_degree / cfg_degree.")
        if cfg.compile_config.enabled:
            return (f"{where}.compile_config.enabled = true with layer2.parallel_config.tp_degree > 1: the blocks' "
                    "DTensor linears are not compiled here; set compile_config.enabled = false, or use "
                    "sp_ulysses_degree / sp_ring_degree / cfg_degree.")
    return None


def _fsdp(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    """Under FSDP every rank runs every sharded forward in step: no uneven dp batches, no tp, no weight movers."""
    parallel = recipe.layer2.parallel_config
    if not parallel.enable_fsdp:
        return None
    if parallel.dp_degree > 1:
        return ("layer2.parallel_config.enable_fsdp with dp_degree > 1: dp replicas run different prompts, but every "
                "rank must join each sharded forward; set dp_degree = 1 (or enable_fsdp = false).")
    if parallel.tp_degree > 1:
        return ("layer2.parallel_config.enable_fsdp with tp_degree > 1: the two do not compose here; set tp_degree = 1 "
                "(FSDP with cfg_degree / sp_ulysses_degree / sp_ring_degree does), or enable_fsdp = false.")
    for name, cfg in recipe.layer2.models.items():
        if cfg.offload_config.offload_type != WeightOffloadType.NO_CPU_OFFLOAD:
            return (f"layer2.models.{name}.offload_config.offload_type = {cfg.offload_config.offload_type!r} with "
                    "layer2.parallel_config.enable_fsdp: FSDP owns where the shards live; use offload_type = "
                    "\"NO_CPU_OFFLOAD\" (sharding already divides the weights' memory by the ranks).")
    return None


# Classes made of block ModuleLists (their BLOCK_LISTS), which compile_config compiles one block at a time
# (runtime/load/build.py): HunyuanVideo15DiT's double- and single-stream blocks (base and SR DiT) too.
COMPILED_BY_BLOCK = frozenset({ModelClass.WAN_DIT, ModelClass.UMT5_ENCODER, ModelClass.HUNYUAN15_DIT})


def _compile_without_blocks(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    for m in models:
        if _runtime(recipe, m.name).compile_config.enabled and m.class_ not in (*COMPILED_BY_BLOCK, ModelClass.AUTO):
            return (f"layer2.models.{m.name}.compile_config.enabled = true: compilation is per transformer block, and "
                    f"{m.name!r} is a {m.class_}, which has none ({', '.join(sorted(COMPILED_BY_BLOCK))} have); "
                    "remove its compile_config.")
    return None


def _taehv_decoder(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    """TAEHV (a vae of class TAEHV) decodes only, all tiles at once: no encoder, no tiles, no VAE parallel."""
    vae = next((m for m in models if m.role == "vae" and m.class_ == ModelClass.TAEHV), None)
    if vae is None:
        return None
    l2, where = recipe.layer2, f"layer1.models.{vae.name}"
    pipeline = recipe.layer1.pipeline
    if pipeline in ("wan_i2v", "hunyuan_video15_i2v") or (pipeline == "wan_ti2v" and recipe.layer3.image is not None):
        use = ("HunyuanVideo-1.5's VAE (class HunyuanVideo15VAE, vae/)" if pipeline == "hunyuan_video15_i2v" else
               "the Wan VAE (class WanVAE, Wan2.1_VAE.pth; Wan22VAE for TI2V-5B), or drop [layer3.image] from a "
               "wan_ti2v recipe")
        return (f"{where}: class TAEHV with layer1.pipeline = {pipeline!r} and an image: TAEHV is a decoder only, "
                f"and image-to-video encodes the image with the VAE's encoder; use {use}.")
    if l2.tiled:
        return (f"layer2.tiled = true with {where} of class TAEHV: the TAEHV decoder has no tiled decode (it decodes "
                "a few latent frames at a time, which bounds its memory); set tiled = false.")
    if l2.enable_vae_parallel:
        return (f"layer2.enable_vae_parallel = true with {where} of class TAEHV: VAE parallel shares the Wan VAE's "
                "tiles over ranks and TAEHV has none; set enable_vae_parallel = false (the TAEHV decode is ~13x the "
                "Wan VAE's speed on one device).")
    return None


def _no_linears(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    """RIFE and TAEHV are convolutions only: a quantisation setting would change nothing."""
    for m in models:
        quant = _runtime(recipe, m.name).quant_config.quant_type
        if m.class_ in (ModelClass.RIFE, ModelClass.TAEHV) and quant != QuantType.NONE:
            return (f"layer2.models.{m.name}.quant_config.quant_type = {quant!r}: {m.name!r} is a {m.class_}, made of "
                    "convolutions only, which quantisation (of linear layers) would leave unchanged; set quant_type = "
                    "\"none\" (use its torch_dtype = \"bfloat16\" to halve its memory and time).")
    return None


# sparse attention and step caches: their own rules (ring, quantised attention, models, schedules) in skip_work.py
DO_NOT_COMPOSE: tuple[Check, ...] = (_tensor_parallel_dit, _fsdp, _compile_without_blocks, _taehv_decoder, _no_linears,
                                     sparse_problem, cache_problem)


def check_executable(recipe: Recipe, models: list[PlannedModel]) -> None:
    """Refuse (RecipeError, exit 2) the first setting the runtime cannot execute, naming the key and the fix."""
    for check in (*NOT_EXECUTABLE_YET, *DO_NOT_COMPOSE):
        message = check(recipe, models)
        if message:
            raise RecipeError(message)
