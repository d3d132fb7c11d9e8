"""HunyuanVideo-1.5's super-resolution stage in the compiler: its recipe rules, its stages and their activations
(compiler/hunyuan15.py calls these; the family's other rules live there).

Stages after the base denoise (runtime/stages/hy15_sr.py, image_load.py, hy15_image_encode.py run them):

  T2V:  upsample_latent (hy15_sr_upsample) -> super_resolve (hy15_sr) -> decode_vae at the SR frame
  I2V:  load_image_sr (image_load: --image fitted to the SR frame) -> encode_image_sr (hy15_image_encode: SigLIP's
        tokens and the VAE latent of that image) -> upsample_latent -> super_resolve (condition "i2v") -> decode_vae

Each of load_image_sr, encode_image_sr and upsample_latent records `frame_sizes`: the SR frame of every base frame a
run may generate (each resolution at each fixed aspect ratio and each of "auto"'s candidates), keyed by the base frame
"WxH" (`sr_sizes`); the runtime looks its run's base frame up there, and the memory estimate takes the largest.

The I2V part follows Tencent's SR pipeline (tencent/HunyuanVideo-1.5 hyvideo/pipelines/hunyuan_video_sr_pipeline.py,
commit 60783e7 of the GitHub mirror), which the base pipeline calls with the user's reference image, not the base
stage's fitted frame: the SR DiT's condition latent is the reference image resized to cover the SR frame (Lanczos),
centre-cropped and VAE-encoded (`get_image_condition_latents(task, image, sr_height, sr_width)`) at latent frame 0
with the task mask 1 there (`_prepare_cond_latents`), and it gets SigLIP's tokens of the image cropped to the SR
resolution's bucket (`_prepare_vision_states(image, "720p")`, `mask_type="i2v"`). LightX2V's HunyuanVideo-1.5 runner
(ModelTC/LightX2V lightx2v/models/runners/hunyuan_video/hunyuan_video_15_runner.py) re-encodes both at the SR frame
too. Tencent maps every 480p base transformer, I2V included, to the same `720p_sr_distilled` SR DiT and upsampler
(`TRANSFORMER_VERSION_TO_SR_VERSION`), with the same lq noise (0.7) and schedule as for T2V.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from telefuser.schema.buckets import BUCKET_BASE_SIZE, closest_frame_size, sr_bucket_size
from telefuser.schema.enums import FIXED_ASPECT_RATIOS, Resolution
from telefuser.schema.plan import PlannedModel, Stage
from telefuser.schema.recipe import Recipe, SRConfig
from telefuser.schema.resolution import RESOLUTION_TABLE, frame_candidates, frame_key
from telefuser.schema.step_list import grid_params

from .skip_work import cache_residual_bytes, default_frame_size, denoise_params, token_grid

UPSAMPLER_VERSION = {"HunyuanVideo15SRUpsampler720p": "720p_sr_distilled",
                     "HunyuanVideo15SRUpsampler1080p": "1080p_sr_distilled"}
# The VAE encoding one image at the SR frame: this many feature maps of the encoder's first level (its widest at
# full resolution: block_out_channels[0], 128 published) for the one frame, as compiler/memory.py's VAE_LIVE_MAPS
# counts the decoder's. Arithmetic, not measured on a GPU.
ENCODE_LIVE_MAPS = 10


def check_sr(recipe: Recipe, roles: set[str]) -> Optional[str]:
    """The refusal for the SR keys of a HunyuanVideo-1.5 recipe (T2V and I2V alike), or None."""
    l2 = recipe.layer2
    sr_roles = sorted(r for r in ("dit_sr", "sr_upsampler") if r in roles)
    if not l2.enable_sr:
        if sr_roles:
            return (f"layer1.models has the SR stage's {', '.join(sr_roles)}, but layer2.enable_sr is false: set "
                    "layer2.enable_sr = true (and lq_noise_strength, published 0.7), or remove them.")
        if l2.lq_noise_strength:
            return ("layer2.lq_noise_strength noises the SR stage's low-resolution latent; it needs layer2.enable_sr "
                    "= true (remove it, or enable the SR stage).")
        if l2.sr_config is not None:
            return "layer2.sr_config sets the SR stage's sampling; it needs layer2.enable_sr = true (or remove it)."
        return None
    missing = [r for r in ("dit_sr", "sr_upsampler") if r not in roles]
    if missing:
        return (f"layer2.enable_sr = true needs the SR stage's models: role 'dit_sr' (the SR DiT, transformer/"
                f"720p_sr_distilled) and role 'sr_upsampler' (upsampler/720p_sr_distilled); missing: {', '.join(missing)}.")
    sr = l2.sr_config or SRConfig()
    if sr.sample_solver != "euler":
        return f"layer2.sr_config.sample_solver = {str(sr.sample_solver)!r}: the SR stage samples with \"euler\" (published)."
    if sr.cfg_scale != 1.0:
        return (f"layer2.sr_config.cfg_scale = {sr.cfg_scale}: the SR DiTs are guidance-distilled (published guidance "
                "1.0, one DiT call per step); CFG in the SR stage is not built: set cfg_scale = 1.0.")
    target = str(sr.target_resolution)
    for res in recipe.layer3.resolution.choices:
        for ar in recipe.layer3.aspect_ratio.choices:
            for w, h in frame_candidates(recipe.layer1.pipeline, res, ar):
                tw, th = sr_frame_size(w, h, target)
                if tw * th <= w * h:
                    return (f"layer2.sr_config.target_resolution = {target!r} is not larger than layer3 resolution "
                            f"{res} at {ar} ({w}x{h}); pick a larger SR row or restrict layer3.resolution.choices.")
    return None


def sr_frame_size(width: int, height: int, target: str) -> tuple[int, int]:
    """(width, height) of the SR video for a base frame of width x height: the target resolution's bucket of the
    closest aspect ratio (the published BucketMap, `schema.buckets.sr_bucket_size`: 480p 848x480 -> 720p 1280x720),
    or where the target has no published bucket the table row's size of the closest aspect ratio (for a fixed
    ratio's base frame: that ratio's row entry)."""
    if target in BUCKET_BASE_SIZE:
        return sr_bucket_size(width, height, target)
    return closest_frame_size([RESOLUTION_TABLE[Resolution(target)][a] for a in FIXED_ASPECT_RATIOS], width, height)


def sr_sizes(recipe: Recipe) -> dict[str, list[int]]:
    """base frame "WxH" -> [width, height] of the SR video, for every base frame a run may generate: each allowed
    resolution at each fixed aspect ratio and each of "auto"'s candidates (`frame_candidates`, the sizes layer 3's
    frame_sizes / image_frame_sizes record). The runtime's SR stages read the SR frame of the run's base frame here."""
    target = str((recipe.layer2.sr_config or SRConfig()).target_resolution)
    return {frame_key(w, h): list(sr_frame_size(w, h, target))
            for res in recipe.layer3.resolution.choices for ar in recipe.layer3.aspect_ratio.choices
            for w, h in frame_candidates(recipe.layer1.pipeline, res, ar)}


def sr_grid(recipe: Recipe, temporal: int, spatial: int, patch: list[int]) -> tuple[int, int, int]:
    """The SR DiT's token grid at the SR frame of the default base frame (where the plan records its sparse
    attention's density)."""
    target = str((recipe.layer2.sr_config or SRConfig()).target_resolution)
    return token_grid(recipe, temporal, spatial, patch, sr_frame_size(*default_frame_size(recipe), target))


def sr_stages(recipe: Recipe, models: list[PlannedModel], spatial: int, image_fit: dict[str, Any], i2v: bool,
              num_train_timesteps: int, temporal: int) -> list[Stage]:
    """The SR stages after the base denoise (I2V: the reference image at the SR frame first); the SR DiT's step
    cache, if any, recorded as the base DiT's is (compiler/skip_work.py)."""
    l2 = recipe.layer2
    sr = l2.sr_config or SRConfig()
    by_role = {m.role: m.name for m in models}
    patch = list(next(m for m in models if m.role == "dit_sr").arch.get("patch_size", [1, 1, 1]))
    up = next(m for m in models if m.role == "sr_upsampler")
    sizes = sr_sizes(recipe)
    stages = []
    if i2v:  # the user's image again, fitted to the SR frame (not the base frame upscaled), SigLIP's tokens and latent
        stages.append(Stage(name="load_image_sr", kind="image_load",
                            params={**image_fit, "frame_sizes": sizes, "output": "sr_image"}))
        stages.append(Stage(name="encode_image_sr", kind="hy15_image_encode",
                            models=[by_role["image_encoder"], by_role["vae"]],
                            params={"input": "sr_image", "frame_sizes": sizes, "spatial_ratio": spatial,
                                    "outputs": ["sr_vision_states", "sr_image_latent"],
                                    "siglip_resize": "bicubic_antialias"}))
    # two stages, so that the memory plan sees the upsampler and the SR DiT one after the other (the SR DiT can be
    # copied in while the upsampler runs)
    stages.append(Stage(name="upsample_latent", kind="hy15_sr_upsample", models=[by_role["sr_upsampler"]],
                        params={"version": UPSAMPLER_VERSION.get(up.class_, "720p_sr_distilled"),
                                "target_resolution": str(sr.target_resolution), "frame_sizes": sizes,
                                "spatial_ratio": spatial, "resize": "bilinear",
                                "lq_noise_strength": l2.lq_noise_strength, "generator": "cpu"}))
    stages.append(Stage(name="super_resolve", kind="hy15_sr", models=[by_role["dit_sr"]],
                        params={"lq_noise_strength": l2.lq_noise_strength, "solver": "euler",
                                **grid_params(None), "num_inference_steps": sr.num_inference_steps,
                                "sigma_shift": sr.sigma_shift, "num_train_timesteps": num_train_timesteps,
                                "cfg_scale": sr.cfg_scale, "meanflow": True, "condition": "i2v" if i2v else "t2v",
                                **denoise_params(recipe, models, [by_role["dit_sr"]], temporal, spatial, patch,
                                                 steps=sr.num_inference_steps, grid=sr_grid(recipe, temporal,
                                                                                             spatial, patch))}))
    return stages


def largest_sr_frame(stages: list[Stage]) -> Optional[tuple[int, int]]:
    """The largest frame the SR stage makes (width, height), or None without one: the decode's and later stages'."""
    sr = next((s for s in stages if s.kind == "hy15_sr_upsample"), None)
    if sr is None:
        return None
    w, h = max((tuple(v) for v in sr.params["frame_sizes"].values()), key=lambda s: s[0] * s[1])
    return int(w), int(h)


def sr_activations(recipe: Recipe, models: list[PlannedModel], stages: list[Stage], frame: tuple[int, int],
                   dtype_bytes: dict[str, int], latent_channels: int, temporal: int,
                   vae_workspace: Callable[..., int]) -> dict[str, int]:
    """The SR DiT's activations at the SR frame, the upsampler's and, for I2V, the VAE encode of the image at the SR
    frame (one frame, untiled: `activations.vae_encode_sr`) and the base frame's encode (`activations.vae_encode`, as
    compiler/memory.py counts it: the untiled decode's workspace at the base `frame`; memory.py counts the decode
    itself at the SR frame, `largest_sr_frame`)."""
    l2 = recipe.layer2
    out: dict[str, int] = {}
    sr = next((s for s in stages if s.kind == "hy15_sr_upsample"), None)
    by_role = {m.role: m for m in models}
    if sr is None or "dit_sr" not in by_role:
        return out
    dit = by_role["dit_sr"]
    space = int(sr.params["spatial_ratio"])
    w, h = largest_sr_frame(stages)  # type: ignore[misc]  (the SR stage is there)
    tokens = ((l2.num_frames - 1) // temporal + 1) * (h // space) * (w // space)
    sp = l2.parallel_config.sp_ulysses_degree * l2.parallel_config.sp_ring_degree
    hidden, mlp = int(dit.arch.get("hidden_size", 0)), int(dit.arch.get("mlp_hidden_dim", 0))
    act = dtype_bytes.get(dit.compute_dtype, 2)
    latent = tokens * int(dit.arch.get("in_channels", 98)) * 4 * 3  # x, condition, zero condition (float32)
    out["activations.dit_sr"] = -(-tokens // sp) * (2 * hidden + 2 * mlp) * act + latent  # a shard per sp rank
    # its step cache keeps the block stack's residual between steps (one branch: the SR DiT runs without CFG)
    out["activations.dit_sr"] += cache_residual_bytes(recipe, -(-tokens // sp), hidden, act, {dit.name}, branches=1)
    up = by_role.get("sr_upsampler")
    if up is not None:  # the resized latent, two feature maps of the upsampler's width and its output (float32)
        width = int(up.arch.get("hidden_channels", (up.arch.get("block_out_channels") or [64])[0]))
        out["activations.sr_upsample"] = tokens * (2 * width + 4 * latent_channels) * 4
    vae = by_role.get("vae")
    if vae is not None:
        if any(s.params.get("input", "image") == "image" for s in stages if s.kind == "hy15_image_encode"):
            out["activations.vae_encode"] = vae_workspace(recipe, vae, frame[0], frame[1], space, False)
        if any(s.params.get("input") == "sr_image" for s in stages if s.kind == "hy15_image_encode"):
            first = int((vae.arch.get("block_out_channels") or [128])[0])
            out["activations.vae_encode_sr"] = ENCODE_LIVE_MAPS * first * w * h * dtype_bytes.get(vae.compute_dtype, 2) \
                + 3 * w * h * 4  # the fitted image in float32
    return out
