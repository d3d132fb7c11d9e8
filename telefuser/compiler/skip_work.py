"""Skipping work in the DiT, decided here and recorded in the denoise stage's params (docs/sparse_and_caches.md):

- `sparse_attention` {model: {...}}: a DiT with `attn_impl = RADIAL_ATTN | LOCAL_SPARSE_ATTN` (16-bit kernel), or
  `SAGE_ATTN_*` with a `sparse_config` naming the pattern (the quantised kernel's block-sparse mode): the resolved
  pattern (`sparse_impl`, `block_size`, `decay_factor`, `local_window_size`, `dense_timesteps`, `dense_layers`),
  the block mask's density at the default resolution (`density`, `density_grid`) and the `attn_impl` running it;
- `step_cache` {model: {...}}: a DiT with a `feature_cache_config`: every argument of
  `telefuser.runtime.caches.apply_step_cache` resolved (TeaCache's polynomial included).

The refusals (`sparse_problem`, `cache_problem`) are the compiler's, registered in compiler/executable.py."""

from __future__ import annotations

import math
from typing import Any, Optional

from telefuser.schema import block_masks, ssta
from telefuser.schema.enums import AttnImplType, FeatureCacheMethod, ModelClass, is_dit
from telefuser.schema.model_config import SPARSE_IMPL_OF, ModelRuntimeConfig, SparseAttentionConfig
from telefuser.schema.plan import PlannedModel
from telefuser.schema.recipe import Recipe
from telefuser.schema.resolution import typical_frame_size
from telefuser.schema.teacache_fits import HY15_COEFFICIENTS, WAN21_COEFFICIENTS

BUILT_SPARSE = (AttnImplType.RADIAL_ATTN.value, AttnImplType.LOCAL_SPARSE_ATTN.value,  # our block-sparse kernel
                AttnImplType.SSTA_ATTN.value)
PATTERN_CLASSES = {"radial": (ModelClass.WAN_DIT, ModelClass.AUTO), "local": (ModelClass.WAN_DIT, ModelClass.AUTO),
                   "ssta": (ModelClass.HUNYUAN15_DIT, ModelClass.AUTO)}  # where each pattern is wired
NOT_BUILT_SPARSE = (AttnImplType.SOL_ATTN.value, AttnImplType.SPARGE_ATTN.value)  # declared, no runner in ops
QUANTISED = ("SAGE_ATTN_2_8_8", "SAGE_ATTN_2_8_16", "SAGE_ATTN_2_8_8_SM90")
QUANTISED_MIN_BLOCK = 32  # kernels/triton/sage_sparse_attention.py: MIN_BLOCK (the compiler imports no kernels)
CACHED_DITS = (ModelClass.WAN_DIT, ModelClass.HUNYUAN15_DIT, ModelClass.AUTO)  # classes with residual_stack()


def _runtime(recipe: Recipe, name: str) -> ModelRuntimeConfig:
    return recipe.layer2.models.get(name, ModelRuntimeConfig())


def _where(name: str) -> str:
    return f"layer2.models.{name}"


def _models_by_name(recipe: Recipe, models: list[PlannedModel]) -> dict[str, PlannedModel]:
    return {m.name: m for m in models}


def _impl_name(runtime: ModelRuntimeConfig) -> str:
    impl = runtime.attention_config.attn_impl
    return str(getattr(impl, "value", impl))


def pattern_wired(attn_impl: str, class_: str) -> bool:
    """Whether a sparse attn_impl's pattern is wired into this model class (dense ones: always)."""
    pattern = SPARSE_IMPL_OF.get(attn_impl)
    return pattern is None or class_ in PATTERN_CLASSES.get(pattern, ())


def runs_sparse(runtime: ModelRuntimeConfig) -> bool:
    """Whether this model's self-attention runs a block-sparse pattern: a sparse attn_impl built here (16-bit
    kernel), or a quantised attn_impl with a sparse_config (the quantised kernel's block-sparse mode)."""
    attn = runtime.attention_config
    return attn.attn_impl in BUILT_SPARSE or (attn.attn_impl in QUANTISED and attn.sparse_config is not None)


def sparse_config_of(runtime: ModelRuntimeConfig) -> SparseAttentionConfig:
    """The sparse pattern the model runs: its sparse_config with `sparse_impl` filled in from a sparse attn_impl
    (beside a quantised attn_impl the sparse_config names it)."""
    given = runtime.attention_config.sparse_config or SparseAttentionConfig()
    impl = SPARSE_IMPL_OF.get(runtime.attention_config.attn_impl, given.sparse_impl)
    return given.model_copy(update={"sparse_impl": impl})


def sparse_problem(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    by_name = _models_by_name(recipe, models)
    for name, cfg in recipe.layer2.models.items():
        attn = cfg.attention_config
        where = f"{_where(name)}.attention_config"
        if attn.attn_impl in QUANTISED and attn.sparse_config is not None \
                and attn.sparse_config.sparse_impl not in ("radial", "local", "ssta"):
            return (f"{where}.sparse_config beside attn_impl = {attn.attn_impl!r} (the quantised kernel's "
                    "block-sparse mode, as Radial Attention's use_sage_attention): sparse_config.sparse_impl = "
                    f"{attn.sparse_config.sparse_impl!r}, but the pattern must be named here, \"radial\", \"local\" or "
                    "\"ssta\" (with a quantised attn_impl nothing else says which); or remove the sparse_config for "
                    "dense quantised attention.")
        if attn.sparse_config is not None and attn.attn_impl not in SPARSE_IMPL_OF and attn.attn_impl not in QUANTISED:
            return (f"{where}.sparse_config is set but attn_impl = {attn.attn_impl!r} is dense, so the pattern would be "
                    "ignored; set attn_impl = \"RADIAL_ATTN\" (sparse_impl \"radial\"), \"LOCAL_SPARSE_ATTN\" "
                    "(\"local\") or \"SSTA_ATTN\" (\"ssta\", HunyuanVideo-1.5), or remove the sparse_config.")
        if attn.attn_impl in NOT_BUILT_SPARSE:
            return (f"{where}.attn_impl = {attn.attn_impl!r}: this TeleFuser has no runner for it (its package's "
                    "kernel is not wired); use \"RADIAL_ATTN\" or \"LOCAL_SPARSE_ATTN\" (TeleFuser's block-sparse "
                    "kernel) or a dense attn_impl.")
        if not runs_sparse(cfg):
            continue
        model = by_name.get(name)
        sparse = sparse_config_of(cfg)
        refusal = _pattern_problem(where, attn.attn_impl, name, model, sparse, recipe)
        if refusal:
            return refusal
        if sparse.sparse_impl == "ssta":
            frames = (recipe.layer2.num_frames - 1) // 4 + 1
            found = ssta.problems(tuple(sparse.tile_size), tuple(sparse.win_size), sparse.ssta_topk, frames,
                                  QUANTISED_MIN_BLOCK if attn.attn_impl in QUANTISED else 0)
            if found:
                return f"{where}.sparse_config (SSTA): {'; '.join(found)}."
        elif sparse.block_size & (sparse.block_size - 1):
            return (f"{where}.sparse_config.block_size = {sparse.block_size}: the block-sparse kernel needs a power of "
                    "two of at least 16 (128 is the default and Radial Attention's).")
        elif attn.attn_impl in QUANTISED and sparse.block_size < QUANTISED_MIN_BLOCK:
            return (f"{where}.sparse_config.block_size = {sparse.block_size} with attn_impl = {attn.attn_impl!r}: the "
                    f"quantised kernel's block-sparse mode needs blocks of at least {QUANTISED_MIN_BLOCK} tokens (each "
                    "key tile is the K dim of its FP8 P·V product); use 128 (the default and Radial Attention's).")
        if sparse.sparse_impl == "local" and sparse.local_window_size < 1:
            return (f"{where}: LOCAL_SPARSE_ATTN needs sparse_config.local_window_size >= 1 (tokens per side of the "
                    "window along frame, height and width; 0 means off); set it (AttentionConfig.local_sparse_attention "
                    "uses 6).")
        ring = recipe.layer2.parallel_config.sp_ring_degree
        if ring > 1:
            return (f"{where}.attn_impl = {attn.attn_impl!r} with layer2.parallel_config.sp_ring_degree = {ring}: the "
                    "block mask is global over the whole token sequence, and ring attention gives each rank a shard "
                    "of the keys (the sparse ring is not built); use sp_ulysses_degree instead (each rank holds whole "
                    "sequences for its heads, so the mask applies unchanged), or a dense attn_impl.")
    return None


def _pattern_problem(where: str, impl: str, name: str, model: Optional[PlannedModel], sparse: SparseAttentionConfig,
                     recipe: Recipe) -> Optional[str]:
    """Whether this model can run the pattern: radial and local are wired into Wan's self-attention, SSTA into
    HunyuanVideo-1.5's joint attention (the base DiT's, and the SR DiT's at the SR frame)."""
    classes = PATTERN_CLASSES.get(str(sparse.sparse_impl), ())
    if model is not None and is_dit(model.role) and model.class_ in classes:
        if model.class_ != ModelClass.AUTO or (sparse.sparse_impl == "ssta") == recipe.layer1.pipeline.startswith(
                "hunyuan_video15"):
            return None
    what = f"a {model.role} ({model.class_})" if model is not None else "no model"
    if sparse.sparse_impl == "ssta":
        return (f"{where}.attn_impl = {impl!r} (SSTA) on {name!r}, {what}: SSTA is wired into HunyuanVideo-1.5's "
                "DiTs' joint attention; on Wan use RADIAL_ATTN or LOCAL_SPARSE_ATTN, "
                "elsewhere a dense attn_impl.")
    if model is not None and model.class_ == ModelClass.HUNYUAN15_DIT:
        return (f"{where}: sparse_impl {sparse.sparse_impl!r} on {name!r}, a HunyuanVideo-1.5 DiT: its joint attention "
                "runs SSTA (attn_impl = \"SSTA_ATTN\", the pattern its 720p sparse transformers were trained with), "
                "not Wan's radial or local masks; use SSTA_ATTN or a dense attn_impl.")
    return (f"{where}.attn_impl = {impl!r} on {name!r}, {what}: {sparse.sparse_impl} sparse attention is wired into "
            "the Wan DiT's self-attention only; use a dense attn_impl for this model.")


def _teacache_key(model: PlannedModel, recipe: Recipe) -> Optional[str]:
    arch = model.arch
    if model.class_ == ModelClass.HUNYUAN15_DIT:  # the 8.3B's fits, by task and the default frame's resolution
        if int(arch.get("hidden_size", 0)) != 2048 or int(arch.get("double_blocks", 0)) != 54:
            return None
        task = "i2v" if recipe.layer1.pipeline == "hunyuan_video15_i2v" else "t2v"
        return f"hunyuan_video15_{task}_{'720p' if default_frame_size(recipe)[1] >= 720 else '480p'}"
    if recipe.layer1.is_moe or "dim" not in arch:
        return None
    dim, kind = int(arch["dim"]), arch.get("model_type", "t2v")
    if kind == "t2v" and dim in (1536, 5120):
        return "wan2.1_t2v_1.3b" if dim == 1536 else "wan2.1_t2v_14b"
    if kind == "i2v" and dim == 5120:
        height = default_frame_size(recipe)[1]
        return "wan2.1_i2v_14b_720p" if height >= 720 else "wan2.1_i2v_14b_480p"
    return None


def _arch_identifies(model: PlannedModel, recipe: Recipe) -> bool:
    """Whether the arch holds the numbers the published fits are keyed by: a --check --no-weights plan may hold only
    the recipe's declarations, and the compile with the weights decides then (a Wan2.2 expert never has a fit)."""
    keys = ("hidden_size", "double_blocks") if model.class_ == ModelClass.HUNYUAN15_DIT else ("dim",)
    return recipe.layer1.is_moe or all(k in (model.arch or {}) for k in keys)


def sr_steps(recipe: Recipe) -> int:
    """The SR stage's steps (HunyuanVideo-1.5: layer2.sr_config, or its published default)."""
    from telefuser.schema.recipe import SRConfig

    return (recipe.layer2.sr_config or SRConfig()).num_inference_steps


def cache_problem(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    by_name = _models_by_name(recipe, models)
    for name, cfg in recipe.layer2.models.items():
        cache = cfg.feature_cache_config
        if cache.method == FeatureCacheMethod.NONE:
            continue
        where = f"{_where(name)}.feature_cache_config"
        model = by_name.get(name)
        if model is None or not is_dit(model.role) or model.class_ not in CACHED_DITS:
            what = f"a {model.role} ({model.class_})" if model is not None else "no model"
            return (f"{where}.method = {cache.method!r} on {name!r}, {what}: step caches wrap the block stack of "
                    "a sampling stage's DiT (Wan's, HunyuanVideo-1.5's base and SR DiTs) only; remove this "
                    "feature_cache_config.")
        steps, steps_key = (sr_steps(recipe), "layer2.sr_config.num_inference_steps") if model.role == "dit_sr" \
            else (recipe.layer2.num_inference_steps, "layer2.num_inference_steps")
        if cache.compute_steps is not None and any(s >= steps for s in cache.compute_steps):
            return (f"{where}.compute_steps = {cache.compute_steps}: steps are 0-based and the plan has "
                    f"{steps_key} = {steps}; list steps below {steps}.")
        if model.role == "dit_sr" and cache.method == FeatureCacheMethod.TEACACHE and cache.coefficients is None:
            return (f"{where}.method = \"teacache\" on {name!r}, HunyuanVideo-1.5's SR DiT: no rescaling polynomial is "
                    "published for it; give its fit as feature_cache_config.coefficients (highest power first), or use "
                    "method = \"first_block\", \"static\" or \"taylorseer\".")
        arch = model.arch or {}
        layers = int(arch.get("num_layers", 0)) or int(arch.get("double_blocks", 0)) + int(arch.get("single_blocks", 0))
        if cache.method == FeatureCacheMethod.FIRST_BLOCK and layers and cache.first_blocks >= layers:
            return (f"{where}.first_blocks = {cache.first_blocks}: the DiT has {layers} blocks, and at least one must be "
                    "left to reuse; set first_blocks below it.")
        if cache.method == FeatureCacheMethod.TEACACHE and cache.coefficients is None \
                and _arch_identifies(model, recipe) and _teacache_key(model, recipe) is None:
            known = model.arch or {}
            what = (f"hidden {known.get('hidden_size')}, {known.get('double_blocks')} double-stream blocks"
                    if model.class_ == ModelClass.HUNYUAN15_DIT else
                    f"{'dim ' + str(known['dim']) + ', ' if 'dim' in known else ''}{known.get('model_type', 't2v')}"
                    f"{', a Wan2.2 expert' if recipe.layer1.is_moe else ''}")
            return (f"{where}.method = \"teacache\" on {name!r}: rescaling polynomials are published for Wan2.1 "
                    "T2V 1.3B/14B and I2V 14B 480p/720p (TeaCache) and the HunyuanVideo-1.5 8.3B DiT's T2V/I2V "
                    f"480p/720p (LightX2V) only, and this DiT ({what}) is none of them; give its fit as "
                    "feature_cache_config.coefficients (highest power first), or use method = \"first_block\", "
                    "\"static\" or \"taylorseer\".")
    return None


def default_frame_size(recipe: Recipe) -> tuple[int, int]:
    l3 = recipe.layer3
    return typical_frame_size(recipe.layer1.pipeline, l3.resolution.default, l3.aspect_ratio.default)


def token_grid(recipe: Recipe, temporal: int, spatial: int, patch: list[int],
               frame: Optional[tuple[int, int]] = None) -> tuple[int, int, int]:
    """The DiT's (frames, height, width) token grid at `frame` (width, height; default: the default resolution's)
    and the plan's frame count."""
    width, height = frame or default_frame_size(recipe)
    frames = (recipe.layer2.num_frames - 1) // temporal + 1
    return (frames // int(patch[0]), height // spatial // int(patch[1]), width // spatial // int(patch[2]))


def denoise_params(recipe: Recipe, models: list[PlannedModel], dits: list[str], temporal: int, spatial: int,
                   patch: list[int], steps: Optional[int] = None,
                   grid: Optional[tuple[int, int, int]] = None) -> dict[str, Any]:
    """A sampling stage's `sparse_attention` and `step_cache` records (absent when unused); `steps`: the stage's step
    count (default layer2.num_inference_steps; HunyuanVideo-1.5's SR stage passes its own), `grid`: the token grid
    the density is recorded at (default: the default frame's; the SR stage: its SR frame's)."""
    by_name = _models_by_name(recipe, models)
    sparse: dict[str, Any] = {}
    caches: dict[str, Any] = {}
    for name in dits:
        runtime = _runtime(recipe, name)
        if runs_sparse(runtime):
            cfg = sparse_config_of(runtime)
            grid = grid or token_grid(recipe, temporal, spatial, patch)
            entry = {**cfg.model_dump(mode="json"), "density_grid": list(grid), "attn_impl": _impl_name(runtime)}
            if cfg.sparse_impl == "ssta":  # chosen per call: the window's share and a bound with the top-k
                tile, window, topk = ssta.effective(grid, tuple(cfg.tile_size), tuple(cfg.win_size), cfg.ssta_topk)
                low, high = ssta.density_bounds(grid, tuple(cfg.tile_size), tuple(cfg.win_size), cfg.ssta_topk)
                entry.update(block_size=math.prod(tile), density=round(high, 6), density_window=round(low, 6),
                             effective={"tile_size": list(tile), "win_size": list(window), "ssta_topk": topk})
            else:
                mask = block_masks.block_mask(cfg.sparse_impl, grid, cfg.block_size, cfg.decay_factor,
                                              cfg.local_window_size)
                entry["density"] = round(block_masks.density(mask), 6)
            sparse[name] = entry
        cache = runtime.feature_cache_config
        if cache.method != FeatureCacheMethod.NONE:
            record: dict[str, Any] = {"method": cache.method, "warmup_steps": cache.warmup_steps,
                                      "max_consecutive_skips": cache.max_consecutive_skips,
                                      "num_inference_steps": steps or recipe.layer2.num_inference_steps}
            if cache.method == FeatureCacheMethod.TEACACHE:
                key = _teacache_key(by_name[name], recipe) if cache.coefficients is None else None
                hy15 = by_name[name].class_ == ModelClass.HUNYUAN15_DIT
                fits = HY15_COEFFICIENTS if hy15 else WAN21_COEFFICIENTS
                record.update(threshold=cache.threshold, teacache_input="modulated" if hy15 else "t_emb", final_steps=1,
                              coefficients=list(cache.coefficients or fits.get(key or "", ())),
                              coefficients_source=key or "feature_cache_config.coefficients")
            elif cache.method == FeatureCacheMethod.FIRST_BLOCK:
                record.update(threshold=cache.threshold, first_blocks=cache.first_blocks, final_steps=0)
            elif cache.method == FeatureCacheMethod.STATIC:
                record.update(compute_steps=sorted(set(cache.compute_steps or [])), final_steps=0)
            else:
                record.update(interval=cache.interval, order=cache.order, final_steps=0)
            caches[name] = record
    out: dict[str, Any] = {}
    if sparse:
        out["sparse_attention"] = sparse
    if caches:
        out["step_cache"] = caches
    return out


def explain_lines(stages: list) -> list[str]:
    """--explain's block for the denoise stage's sparse attention and step caches (none: no lines)."""
    sampling = [s for s in stages if s.kind in ("denoise", "hy15_denoise", "hy15_sr")]  # the SR DiT's cache too
    sparse = {k: v for s in sampling for k, v in s.params.get("sparse_attention", {}).items()}
    caches = {k: v for s in sampling for k, v in s.params.get("step_cache", {}).items()}
    lines = []
    if sparse:
        lines += ["", "sparse attention (the DiT's self-attention, or HunyuanVideo-1.5's joint attention; "
                      "block-sparse):"]
        for model, r in sparse.items():
            kernel = r.get("attn_impl", "")
            how = f" through {kernel} (quantised, dense steps too)" if kernel in QUANTISED else ""
            if r["sparse_impl"] == "ssta":
                e = r["effective"]
                pattern = (f"tiles {tuple(e['tile_size'])}, window {tuple(e['win_size'])} tiles + top {e['ssta_topk']} "
                           f"tiles per head by importance (lambda {r['ssta_lambda']}), context tokens dense")
                density = (f"density {r['density_window']:.3f} (window) to at most {r['density']:.3f} (with the "
                           "top-k) of the video tiles")
            else:
                pattern = (f"decay_factor {r['decay_factor']}" if r["sparse_impl"] == "radial"
                           else f"window {r['local_window_size']} tokens per side")
                density = f"density {r['density']:.3f}"
            lines.append(f"  {model:<14} {r['sparse_impl']}{how}, blocks of {r['block_size']} tokens, {pattern}; dense: first "
                         f"{r['dense_timesteps']} step(s), first {r['dense_layers']} block(s); {density} at the default "
                         f"resolution (token grid {tuple(r['density_grid'])})")
    if caches:
        lines += ["", "step cache (reused steps add the block stack's cached residual):"]
        for model, r in caches.items():
            method = r["method"]
            if method == "static":
                rule = f"computes steps {r['compute_steps']} of {r['num_inference_steps']}"
            elif method == "taylorseer":
                rule = f"computes every {r['interval']} steps, order-{r['order']} Taylor forecast between"
            elif method == "teacache":
                signal = "block 0's modulated input" if r["teacache_input"] == "modulated" else "time-embedding"
                rule = (f"threshold {r['threshold']} on the rescaled {signal} change ({r['coefficients_source']}), "
                        f"last {r['final_steps']} step(s) computed")
            else:
                rule = f"threshold {r['threshold']} on the first {r['first_blocks']} block(s)' residual change"
            skips = r["max_consecutive_skips"]
            lines.append(f"  {model:<14} {method}: {rule}; warm-up {r['warmup_steps']} step(s), "
                         f"{'no limit on' if skips is None else f'at most {skips}'} consecutive reuses; per CFG branch")
    return lines


def cache_residual_bytes(recipe: Recipe, tokens_per_rank: int, dim: int, act_bytes: int,
                         names: Optional[set[str]] = None, branches: Optional[int] = None) -> int:
    """Device bytes a step cache keeps between steps, for the largest of the plan's caches among `names` (None:
    every model; MoE: one expert's cache lives at a time, dropped at the switch): per CFG branch this rank runs
    (`branches`, default: 1 under cfg parallel, else 2), the block stack's residual [S, dim] in the model dtype,
    twice for first_block (its reference residual), order + 1 for TaylorSeer."""
    l2 = recipe.layer2
    if branches is None:
        branches = 1 if l2.parallel_config.cfg_degree == 2 else 2  # cfg off: one branch, over-counted here
    largest = 0
    for name, cfg in l2.models.items():
        if names is not None and name not in names:
            continue
        cache = cfg.feature_cache_config
        if cache.method == FeatureCacheMethod.NONE:
            continue
        tensors = {FeatureCacheMethod.FIRST_BLOCK: 2, FeatureCacheMethod.TAYLORSEER: cache.order + 1}.get(cache.method, 1)
        largest = max(largest, tensors)
    return branches * largest * tokens_per_rank * dim * act_bytes
