"""The ordered stages the runtime executes, with every parameter it needs spelled out."""

from __future__ import annotations

import itertools

from telefuser.errors import RecipeError
from telefuser.schema.enums import ModelRole, PipelineType, is_dit
from telefuser.schema.plan import PlannedModel, Stage
from telefuser.schema.recipe import Recipe
from telefuser.schema.resolution import RESOLUTION_TABLE, frame_candidates

from .skip_work import denoise_params

NUM_TRAIN_TIMESTEPS = 1000
TEMPORAL_RATIO, SPATIAL_RATIO = 4, 8  # the Wan2.1 VAE: 4x in time (after the first frame), 8x8 in space
LATENT_CHANNELS = {"WanVAE": 16, "Wan22VAE": 48, "TAEHV": 16}  # z_dim, where a --no-weights plan has no arch to read it from
IMAGE_FIT = {"fit": "cover_center_crop", "resample": "lanczos", "value_range": [-1, 1]}
TAEHV_CHUNK_FRAMES = 4  # latent frames per TAEHV decode step: 4.2 GiB at 480p x 81 frames, all at once 17.7 (bench)
VFI_PAD_TO = 128  # RIFE's frames padded to multiples of this (Practical-RIFE's inference_video, LightX2V)


def output_frames(num_frames: int, multiplier: int) -> int:
    """Frames after interpolation: the originals and multiplier - 1 new ones between each pair (81 -> 161 at 2x)."""
    return (num_frames - 1) * multiplier + 1


def vfi_stage(recipe: Recipe, models: list[PlannedModel], replica_ranks: int) -> Stage:
    """RIFE after the decode: the plan's multiplier, pairs per batch, the model's dtype; the pairs shared out over
    the ranks of a dp replica (each rank's contiguous run of pairs, gathered on its lead)."""
    l2 = recipe.layer2
    rife = next(m for m in models if m.role == ModelRole.VFI.value)
    return Stage(name="interpolate_frames", kind="vfi", models=[rife.name],
                 params={"multiplier": l2.vfi_multiplier, "batch_size": l2.vfi_batch_size, "dtype": rife.compute_dtype,
                         "scale": 1.0, "pad_to": VFI_PAD_TO, "input_frames": l2.num_frames,
                         "output_frames": output_frames(l2.num_frames, l2.vfi_multiplier),
                         "fps": l2.fps * l2.vfi_multiplier, "parallel_ranks": replica_ranks})


def vae_ratios(vae: PlannedModel | None) -> tuple[int, int]:
    """(temporal, spatial) compression of the plan's VAE, from its architecture (read from the weights): 2 per
    down-sampling stage, times the Wan2.2 VAE's patchify (2x2 pixels folded into channels first: 16x in all).
    A --no-weights plan has only the recipe's class: Wan2.1's 4 x 8 x 8, Wan2.2's 4 x 16 x 16."""
    arch = vae.arch if vae is not None else {}
    class_ = vae.class_ if vae is not None else "WanVAE"
    if class_ == "TAEHV":  # 4 frames per latent, 8x space (taew2_2: its 2x2 patch on top, 16x)
        return TEMPORAL_RATIO, SPATIAL_RATIO * int(arch.get("patch_size", 1))
    temporal = 2 ** sum(bool(d) for d in arch["temporal_downsample"]) if "temporal_downsample" in arch else TEMPORAL_RATIO
    spatial = 2 ** (len(arch["dim_mult"]) - 1) if "dim_mult" in arch else SPATIAL_RATIO
    if class_ == "Wan22VAE":
        spatial *= int(arch.get("patch_size", 2))
    return temporal, spatial


def check_frame_sizes(recipe: Recipe, spatial: int, patch: list[int]) -> None:
    """Every allowed resolution x aspect ratio (each of "auto"'s candidates) must split into whole latent pixels and
    whole DiT patches."""
    step_h, step_w = spatial * int(patch[1]), spatial * int(patch[2])
    l3 = recipe.layer3
    for res, ar in itertools.product(l3.resolution.choices, l3.aspect_ratio.choices):
        for width, height in frame_candidates(recipe.layer1.pipeline, res, ar):
            if width % step_w or height % step_h:
                fits = sorted({str(r) for r, table in RESOLUTION_TABLE.items() for w, h in table.values()
                               if w % step_w == 0 and h % step_h == 0})
                raise RecipeError(
                    f"layer3: resolution {res} at aspect ratio {ar} is {width}x{height}, but this plan's frames must "
                    f"have sides in multiples of {step_w} x {step_h} (the VAE's {spatial}x spatial compression x the "
                    f"DiT's {patch[1]}x{patch[2]} patch), or the latent would not split into whole patches. Restrict "
                    f"layer3.resolution.choices / layer3.aspect_ratio.choices to sizes that fit (resolutions with "
                    f"some that do: {', '.join(fits) or 'none'}; 704p is Wan2.2 TI2V-5B's 720p, 1280x704).")


def image_stages(recipe: Recipe, by_role: dict[str, str], stages: list[Stage], temporal: int, spatial: int) -> list[str]:
    """Wan2.1 image-to-video: the image fitted to the frame, its CLIP tokens, and the VAE latents of [image, zero
    frames] behind a first-frame mask. Appends the stages; returns the DiT inputs they make."""
    stages.append(Stage(name="load_image", kind="image_load", params=dict(IMAGE_FIT)))
    conditioning = []
    if ModelRole.IMAGE_ENCODER.value in by_role:
        stages.append(Stage(name="encode_image", kind="image_encode", models=[by_role[ModelRole.IMAGE_ENCODER.value]],
                            params={"features": "penultimate_block", "output": "clip_fea"}))
        conditioning.append("clip_fea")
    stages.append(Stage(name="encode_condition", kind="vae_encode", models=[by_role[ModelRole.VAE.value]],
                        params={"condition": "first_frame", "num_frames": recipe.layer2.num_frames,
                                "temporal_ratio": temporal, "spatial_ratio": spatial,
                                "mask_channels": temporal, "output": "y"}))
    return ["y", *conditioning]


def first_frame_stages(recipe: Recipe, by_role: dict[str, str], stages: list[Stage], temporal: int,
                       spatial: int) -> None:
    """Wan2.2 TI2V: the image fitted to the frame and its VAE latent (one latent frame), which the denoise stage
    puts in place of the first latent frame. With an optional image, both stages do nothing on a run without one."""
    optional = {"optional": True} if not recipe.layer3.image.required else {}  # type: ignore[union-attr]
    stages.append(Stage(name="load_image", kind="image_load", params={**IMAGE_FIT, **optional}))
    stages.append(Stage(name="encode_condition", kind="vae_encode", models=[by_role[ModelRole.VAE.value]],
                        params={"condition": "image_latent", "num_frames": 1, "temporal_ratio": temporal,
                                "spatial_ratio": spatial, "output": "image_latent", **optional}))


def build_stages(recipe: Recipe, models: list[PlannedModel]) -> list[Stage]:
    from . import hunyuan15

    if hunyuan15.is_hy15(recipe.layer1.pipeline):  # its own pipeline kind and stages (compiler/hunyuan15.py)
        stages = hunyuan15.build_stages(recipe, models, check_frame_sizes, IMAGE_FIT)
    else:
        stages = wan_stages(recipe, models)
    return stages + output_stages(recipe, models)


def wan_stages(recipe: Recipe, models: list[PlannedModel]) -> list[Stage]:
    """Wan's stages up to the denoised latent."""
    l2 = recipe.layer2
    by_role = {m.role: m.name for m in models}
    use_cfg = recipe.layer1.is_moe and ((l2.cfg_scale_high or l2.cfg_scale) != 1.0 or (l2.cfg_scale_low or l2.cfg_scale) != 1.0) \
        or (not recipe.layer1.is_moe and l2.cfg_scale != 1.0)
    stages = [Stage(name="load_models", kind="load", models=[m.name for m in models])]
    stages.append(Stage(name="encode_text", kind="text_encode",
                        models=[by_role[ModelRole.TOKENIZER.value], by_role[ModelRole.TEXT_ENCODER.value]],
                        params={"text_len": l2.text_len, "negative": use_cfg}))
    vae = next((m for m in models if m.role == ModelRole.VAE.value), None)
    latent_channels = int(vae.arch.get("z_dim", 16)) if vae is not None and vae.arch else \
        LATENT_CHANNELS.get(vae.class_ if vae is not None else "", 16)
    temporal, spatial = vae_ratios(vae)
    dit = next(m for m in models if is_dit(m.role))
    check_frame_sizes(recipe, spatial, list(dit.arch.get("patch_size", [1, 2, 2])))
    conditioning: list[str] = []
    first_frame = False
    if recipe.layer1.pipeline == PipelineType.WAN_I2V.value:
        conditioning = image_stages(recipe, by_role, stages, temporal, spatial)
    elif recipe.layer1.pipeline == PipelineType.WAN_TI2V.value and recipe.layer3.image is not None:
        first_frame_stages(recipe, by_role, stages, temporal, spatial)
        first_frame = True
    stages.append(Stage(name="prepare_latents", kind="noise",
                        params={"num_frames": l2.num_frames, "latent_channels": latent_channels,
                                "temporal_ratio": temporal, "spatial_ratio": spatial, "generator": "cpu"}))
    denoise: dict = {"solver": l2.sample_solver, "num_inference_steps": l2.num_inference_steps,
                     "sigma_shift": l2.sigma_shift, "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "cfg": use_cfg}
    if l2.denoising_step_list is not None:  # a step-distilled model's own timesteps (schema/step_list.py)
        denoise["denoising_step_list"] = list(l2.denoising_step_list)
    if conditioning:  # the DiT's extra inputs, the same for the conditional and the unconditional branch
        denoise["conditioning"] = conditioning
    if first_frame:  # TI2V: the image's latent is the first latent frame, at timestep 0 for its tokens
        denoise["first_frame"] = "image_latent"
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
    # sparse attention and step caches of the DiT(s), resolved (compiler/skip_work.py)
    denoise.update(denoise_params(recipe, models, dits, temporal, spatial, list(dit.arch.get("patch_size", [1, 2, 2]))))
    stages.append(Stage(name="denoise", kind="denoise", models=dits, params=denoise))
    return stages


def output_stages(recipe: Recipe, models: list[PlannedModel]) -> list[Stage]:
    """Every family's last stages: the VAE decode, frame interpolation with enable_vfi, the video file."""
    l2 = recipe.layer2
    vae = next(m for m in models if m.role == ModelRole.VAE.value)
    # VAE parallel: the tiled decode's tiles shared out over the ranks of a dp replica (same frames as the
    # one-rank tiled decode with this tile size), so it implies tiling.
    replica_ranks = l2.parallel_config.world_size // l2.parallel_config.dp_degree
    parallel_vae = l2.enable_vae_parallel and replica_ranks > 1
    decode = {"tiled": l2.tiled or parallel_vae, "tile_size": list(l2.tile_size),
              "parallel_ranks": replica_ranks if parallel_vae else 1}
    if vae.class_ == "TAEHV":  # the tiny decoder: a few latent frames at a time, untiled
        decode.update(decoder="taehv", chunk_frames=TAEHV_CHUNK_FRAMES)
    if l2.enable_vfi:  # the decoded frames stay on the device for the vfi stage (no host round trip)
        decode["output"] = "device_frames"
    stages = [Stage(name="decode_vae", kind="vae_decode", models=[vae.name], params=decode)]
    fps = l2.fps
    if l2.enable_vfi:
        stages.append(vfi_stage(recipe, models, replica_ranks))
        fps = l2.fps * l2.vfi_multiplier
    stages.append(Stage(name="write_video", kind="write_video",
                        params={"fps": fps, "container": "mp4", "codec": "libx264", "pixel_format": "yuv420p"}))
    return stages
