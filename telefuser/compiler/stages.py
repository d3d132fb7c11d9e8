"""The ordered stages the runtime executes, with every parameter it needs spelled out."""

from __future__ import annotations

from telefuser.schema.enums import ModelRole, PipelineType
from telefuser.schema.plan import PlannedModel, Stage
from telefuser.schema.recipe import Recipe

NUM_TRAIN_TIMESTEPS = 1000
TEMPORAL_RATIO, SPATIAL_RATIO = 4, 8  # the Wan2.1 VAE: 4x in time (after the first frame), 8x8 in space


def image_stages(recipe: Recipe, by_role: dict[str, str], stages: list[Stage]) -> list[str]:
    """Wan2.1 image-to-video: the image fitted to the frame, its CLIP tokens, and the VAE latents of [image, zero
    frames] behind a first-frame mask. Appends the stages; returns the DiT inputs they make."""
    stages.append(Stage(name="load_image", kind="image_load",
                        params={"fit": "cover_center_crop", "resample": "lanczos", "value_range": [-1, 1]}))
    conditioning = []
    if ModelRole.IMAGE_ENCODER.value in by_role:
        stages.append(Stage(name="encode_image", kind="image_encode", models=[by_role[ModelRole.IMAGE_ENCODER.value]],
                            params={"features": "penultimate_block", "output": "clip_fea"}))
        conditioning.append("clip_fea")
    stages.append(Stage(name="encode_condition", kind="vae_encode", models=[by_role[ModelRole.VAE.value]],
                        params={"condition": "first_frame", "num_frames": recipe.layer2.num_frames,
                                "temporal_ratio": TEMPORAL_RATIO, "spatial_ratio": SPATIAL_RATIO,
                                "mask_channels": TEMPORAL_RATIO, "output": "y"}))
    return ["y", *conditioning]


def build_stages(recipe: Recipe, models: list[PlannedModel]) -> list[Stage]:
    l2 = recipe.layer2
    by_role = {m.role: m.name for m in models}
    use_cfg = recipe.layer1.is_moe and ((l2.cfg_scale_high or l2.cfg_scale) != 1.0 or (l2.cfg_scale_low or l2.cfg_scale) != 1.0) \
        or (not recipe.layer1.is_moe and l2.cfg_scale != 1.0)
    stages = [Stage(name="load_models", kind="load", models=[m.name for m in models])]
    stages.append(Stage(name="encode_text", kind="text_encode",
                        models=[by_role[ModelRole.TOKENIZER.value], by_role[ModelRole.TEXT_ENCODER.value]],
                        params={"text_len": l2.text_len, "negative": use_cfg}))
    vae = next((m for m in models if m.role == ModelRole.VAE.value), None)
    latent_channels = int(vae.arch.get("z_dim", 16)) if vae is not None and vae.arch else 16
    conditioning: list[str] = []
    if recipe.layer1.pipeline == PipelineType.WAN_I2V.value:
        conditioning = image_stages(recipe, by_role, stages)
    stages.append(Stage(name="prepare_latents", kind="noise",
                        params={"num_frames": l2.num_frames, "latent_channels": latent_channels,
                                "temporal_ratio": TEMPORAL_RATIO, "spatial_ratio": SPATIAL_RATIO, "generator": "cpu"}))
    denoise: dict = {"solver": l2.sample_solver, "num_inference_steps": l2.num_inference_steps,
                     "sigma_shift": l2.sigma_shift, "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "cfg": use_cfg}
    if conditioning:  # the DiT's extra inputs, the same for the conditional and the unconditional branch
        denoise["conditioning"] = conditioning
    if recipe.layer1.is_moe:
        high, low = by_role[ModelRole.DIT_HIGH_NOISE.value], by_role[ModelRole.DIT_LOW_NOISE.value]
        denoise.update({
            "boundary": l2.boundary, "boundary_timestep": l2.boundary * NUM_TRAIN_TIMESTEPS,
            "phases": [
                {"model": high, "while": "t >= boundary_timestep", "cfg_scale": l2.cfg_scale_high if l2.cfg_scale_high is not None else l2.cfg_scale},
                {"model": low, "while": "t < boundary_timestep", "cfg_scale": l2.cfg_scale_low if l2.cfg_scale_low is not None else l2.cfg_scale},
            ],
        })
        dits = [high, low]
    else:
        denoise["cfg_scale"] = l2.cfg_scale
        dits = [by_role[ModelRole.DIT.value]]
    stages.append(Stage(name="denoise", kind="denoise", models=dits, params=denoise))
    # VAE parallel: the tiled decode's tiles shared out over the ranks of a dp replica (same frames as the
    # one-rank tiled decode with this tile size), so it implies tiling.
    replica_ranks = l2.parallel_config.world_size // l2.parallel_config.dp_degree
    parallel_vae = l2.enable_vae_parallel and replica_ranks > 1
    stages.append(Stage(name="decode_vae", kind="vae_decode", models=[by_role[ModelRole.VAE.value]],
                        params={"tiled": l2.tiled or parallel_vae, "tile_size": list(l2.tile_size),
                                "parallel_ranks": replica_ranks if parallel_vae else 1}))
    stages.append(Stage(name="write_video", kind="write_video",
                        params={"fps": l2.fps, "container": "mp4", "codec": "libx264", "pixel_format": "yuv420p"}))
    return stages
