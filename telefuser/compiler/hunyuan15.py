"""HunyuanVideo-1.5 (`layer1.pipeline = "hunyuan_video15_t2v"` / `"hunyuan_video15_i2v"`): the family's part of the
compiler, kept in one module: which classes each role takes, what the weights must agree on, what is not built yet
(refused here, so that a plan that compiles is a plan the runtime runs), the stages and their activations.

The stages (runtime/stages/hy15_*.py run them; they compute what tests/test_hy15_pipeline_parity.py composes):

  load_models -> encode_text (hy15_text_encode: Qwen2.5-VL hidden_states[-3] of the templated prompt, cropped;
  byT5 of its quoted text) -> [I2V: load_image (image_load) -> encode_image (hy15_image_encode: SigLIP tokens and
  the VAE latent of the first frame)] -> prepare_latents (noise) -> denoise (hy15_denoise: CFG flow-matching Euler
  over HunyuanVideo-1.5's shifted grid) -> [enable_sr, compiler/hunyuan15_sr.py: (I2V: load_image_sr ->
  encode_image_sr: the image again at the SR frame) -> upsample_latent -> super_resolve (hy15_sr: the base latent
  upsampled, noised by lq_noise_strength, the SR DiT's own few-step schedule)] -> decode_vae (vae_decode) ->
  [enable_vfi: interpolate_frames (vfi)] -> write_video; the last three are every family's (stages.output_stages).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from telefuser.errors import RecipeError, WeightsError
from telefuser.schema.enums import HUNYUAN15_PIPELINES, PipelineType
from telefuser.schema.plan import PlannedModel, Stage
from telefuser.schema.model_config import ModelRuntimeConfig
from telefuser.schema.recipe import Recipe
from telefuser.schema.step_list import grid_params

from .hunyuan15_sr import check_sr, sr_activations, sr_stages
from .skip_work import denoise_params

NUM_TRAIN_TIMESTEPS = 1000
LATENT_CHANNELS, TEMPORAL_RATIO, SPATIAL_RATIO = 32, 4, 16  # the published VAE (a --no-weights plan has no arch)
GLYPH_LEN = 256  # byT5 tokens (published BYT5_MAX_LENGTH)
HY15_CLASSES = frozenset({"HunyuanVideo15DiT", "HunyuanVideo15VAE", "HunyuanVideo15SRUpsampler720p",
                          "HunyuanVideo15SRUpsampler1080p", "Qwen25VLTextEncoder", "Qwen25VLTokenizer", "ByT5Encoder",
                          "SigLIPVision"})
# role -> the classes it takes in a HunyuanVideo-1.5 recipe
CLASS_BY_ROLE = {"dit": ("HunyuanVideo15DiT",), "dit_sr": ("HunyuanVideo15DiT",), "vae": ("HunyuanVideo15VAE", "TAEHV"),
                 "text_encoder": ("Qwen25VLTextEncoder",), "tokenizer": ("Qwen25VLTokenizer",),
                 "glyph_encoder": ("ByT5Encoder",), "image_encoder": ("SigLIPVision",),
                 "sr_upsampler": ("HunyuanVideo15SRUpsampler720p", "HunyuanVideo15SRUpsampler1080p")}
HY15_ONLY_ROLES = ("glyph_encoder", "dit_sr", "sr_upsampler")
# classes either family's pipeline takes: RIFE works on decoded frames; TAEHV decodes the latents of the file's
# channels (taew2_1 / taew2_2 Wan's, taehv1_5 HunyuanVideo-1.5's), which check_compatible compares with the DiT's
ANY_FAMILY_CLASSES = frozenset({"RIFE", "TAEHV"})


def is_hy15(pipeline: str) -> bool:
    return pipeline in HUNYUAN15_PIPELINES


# ------------------------------------------------------------------ what the weights must agree on


def check_family(models: list[PlannedModel], pipeline: str) -> None:
    """HunyuanVideo-1.5 classes only in its pipelines, and only its classes there (before any channel check)."""
    hy = sorted({m.class_ for m in models if m.class_ in HY15_CLASSES})
    other = sorted({m.class_ for m in models
                    if m.class_ not in HY15_CLASSES | ANY_FAMILY_CLASSES and m.class_ != "auto"})
    if not is_hy15(pipeline) and hy:
        raise RecipeError(f"layer1.pipeline = {pipeline!r} (Wan), but layer1.models holds HunyuanVideo-1.5 models "
                          f"({', '.join(hy)}); set layer1.pipeline = \"hunyuan_video15_t2v\" or "
                          "\"hunyuan_video15_i2v\", or point the paths at Wan weights.")
    if is_hy15(pipeline) and other:
        raise RecipeError(f"layer1.pipeline = {pipeline!r}, but layer1.models holds models of another family "
                          f"({', '.join(other)}); a HunyuanVideo-1.5 pipeline takes "
                          f"{', '.join(sorted(HY15_CLASSES | ANY_FAMILY_CLASSES))}.")


def latent_geometry(vae: Optional[PlannedModel]) -> tuple[int, int, int]:
    """(latent channels, temporal ratio, spatial ratio) of the plan's VAE: HunyuanVideo-1.5's from its arch, a TAEHV
    decoder's from its file (4 frames per latent frame, 8x space times its patch), the published VAE's without
    weights."""
    arch = dict(vae.arch) if vae is not None else {}
    if vae is not None and vae.class_ == "TAEHV" and arch:
        return int(arch["z_dim"]), 2 ** sum(bool(t) for t in arch["decoder_time_upscale"]), 8 * int(arch["patch_size"])
    return (int(arch.get("latent_channels", LATENT_CHANNELS)), int(arch.get("temporal_ratio", TEMPORAL_RATIO)),
            int(arch.get("spatial_ratio", SPATIAL_RATIO)))


def check_compatible(models: list[PlannedModel], pipeline: str) -> None:
    """Channels, text / glyph / image widths, the base and SR DiT's input channels, the upsampler's channels."""
    by_role = {m.role: m for m in models}
    vae, qwen, byt5 = by_role.get("vae"), by_role.get("text_encoder"), by_role.get("glyph_encoder")
    siglip, up = by_role.get("image_encoder"), by_role.get("sr_upsampler")
    geometry = latent_geometry(vae) if vae is not None and vae.arch else None  # (channels, temporal, spatial)
    c = geometry[0] if geometry else None
    for role, expected_in, what in (("dit", lambda c: 2 * c + 1, "the base DiT (latent + condition latent + mask)"),
                                    ("dit_sr", lambda c: 3 * c + 2, "the SR DiT (+ low-resolution latent + mask)")):
        dit = by_role.get(role)
        if dit is None:
            continue
        a = dit.arch
        if c is not None and a["out_channels"] != c:
            raise WeightsError(f"DiT {dit.name!r} outputs {a['out_channels']} latent channels, but VAE {vae.name!r} "
                               f"decodes {c}: these weights belong to different models.")
        if c is not None and a["in_channels"] != expected_in(c):
            other = "an SR DiT (transformer/720p_sr_distilled or 1080p_sr_distilled)" if a["in_channels"] == 3 * c + 2 \
                else "a base DiT (transformer/480p_t2v, 720p_i2v, ...)"
            raise WeightsError(f"role {role!r} is {what}, which takes {expected_in(c)} input channels, but DiT "
                               f"{dit.name!r} takes {a['in_channels']}: it is {other}; fix its path or role.")
        if qwen is not None and a["text_states_dim"] != qwen.arch["hidden_size"]:
            raise WeightsError(f"DiT {dit.name!r} takes text states of width {a['text_states_dim']}, but text encoder "
                               f"{qwen.name!r} produces {qwen.arch['hidden_size']}: these weights belong to different "
                               "models.")
        if byt5 is not None and a["byt5_dim"] != byt5.arch["dim"]:
            raise WeightsError(f"DiT {dit.name!r} takes glyph states of width {a['byt5_dim']}, but glyph encoder "
                               f"{byt5.name!r} produces {byt5.arch['dim']}: these weights belong to different models.")
        if siglip is not None and a["vision_states_dim"] != siglip.arch["dim"]:
            raise WeightsError(f"DiT {dit.name!r} takes image states of width {a['vision_states_dim']}, but image "
                               f"encoder {siglip.name!r} produces {siglip.arch['dim']}: these weights belong to "
                               "different models.")
        if a.get("guidance_embed"):
            raise WeightsError(f"DiT {dit.name!r} embeds the guidance scale (guidance_in), which no published "
                               "HunyuanVideo-1.5 pipeline feeds; not executable yet.")
    if vae is not None and geometry and vae.class_ == "TAEHV" and geometry[2] != SPATIAL_RATIO:
        raise WeightsError(f"TAEHV decoder {vae.name!r} upsamples {geometry[2]}x, but HunyuanVideo-1.5's "
                           f"latents are {SPATIAL_RATIO}x its frames: use taehv1_5.pth (patch 2).")
    sr_dit = by_role.get("dit_sr")
    if sr_dit is not None and not sr_dit.arch.get("use_meanflow"):
        raise WeightsError(f"SR DiT {sr_dit.name!r} has no MeanFlow time_r_in; the published SR DiTs "
                           "(720p_sr_distilled, 1080p_sr_distilled) do: fix its path.")
    if up is not None and c is not None:
        channels = (up.arch.get("in_channels", up.arch.get("z_channels")), up.arch["out_channels"])
        if channels != (c, c):
            raise WeightsError(f"SR upsampler {up.name!r} maps {channels[0]} -> {channels[1]} latent channels, but "
                               f"VAE {vae.name!r} has {c}: these weights belong to different models.")


# ------------------------------------------------------------------ recipe rules and what is not built yet


def _runtime(recipe: Recipe, name: str) -> ModelRuntimeConfig:
    return recipe.layer2.models.get(name, ModelRuntimeConfig())


def check_recipe(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    """The refusal for a HunyuanVideo-1.5 recipe (or for a HunyuanVideo-1.5 role / class / SR key in another
    pipeline), or None."""
    l1, l2 = recipe.layer1, recipe.layer2
    pipeline = str(l1.pipeline)
    roles = {m.role for m in l1.models}
    if not is_hy15(pipeline):
        foreign = sorted(r for r in roles if r in HY15_ONLY_ROLES)
        classes = sorted({m.class_ for m in models if m.class_ in HY15_CLASSES})
        if foreign or classes:
            return (f"layer1.pipeline = {pipeline!r} (Wan), but layer1.models has HunyuanVideo-1.5 "
                    f"{'roles ' + ', '.join(foreign) if foreign else 'classes ' + ', '.join(classes)}; set "
                    "layer1.pipeline = \"hunyuan_video15_t2v\" or \"hunyuan_video15_i2v\", or remove them.")
        if l2.sr_config is not None:
            return "layer2.sr_config is the HunyuanVideo-1.5 SR stage's; remove it (Wan has no SR stage)."
        return None
    where = f"layer1.pipeline = {pipeline!r}"
    for m in models:
        expected = CLASS_BY_ROLE.get(m.role)
        if m.class_ != "auto" and expected is not None and m.class_ not in expected:
            return (f"layer1.models.{m.name}: role {m.role!r} of a HunyuanVideo-1.5 pipeline takes "
                    f"{' or '.join(expected)}, not {m.class_}; fix its class or path.")
    for role in ("text_encoder", "glyph_encoder"):
        if role not in roles:
            return (f"{where} needs a model with role {role!r} ("
                    f"{'Qwen2.5-VL-7B-Instruct, class Qwen25VLTextEncoder' if role == 'text_encoder' else 'byT5 (Glyph-SDXL-v2), class ByT5Encoder'}).")
    i2v = pipeline == PipelineType.HUNYUAN_VIDEO15_I2V.value
    if i2v and "image_encoder" not in roles:
        return (f"{where} needs a model with role 'image_encoder' (SigLIP so400m-patch14-384, class SigLIPVision: "
                "the published I2V pipeline's vision_states) and layer2.enable_clip_stage = true.")
    refusal = _check_parallel(recipe, models)
    if refusal:
        return refusal
    for m in l1.models:  # FP8 DiT files: compiler/hunyuan15_fp8.py decides from the header
        if m.attributes.fp8 and m.role not in ("dit", "dit_sr"):
            return (f"layer1.models.{m.name}.attributes.fp8 = true: only HunyuanVideo-1.5's DiT is read from an FP8 "
                    "file; use the model's bf16/fp32 file.")
    return check_sr(recipe, roles)


def _check_parallel(recipe: Recipe, models: list[PlannedModel]) -> Optional[str]:
    """Several ranks: cfg, Ulysses, ring, dp, tp (double-stream blocks), FSDP (the base DiT by double_blocks,
    Qwen2.5-VL by layers) and VAE parallel run (T2V, I2V, SR). Heads per Ulysses / tp degree are compiler/mesh.py's
    check (it reads `heads_num` too); the rules of tp and FSDP with other settings are compiler/executable.py's."""
    parallel = recipe.layer2.parallel_config
    if parallel.tp_degree > 1:
        for m in models:
            if m.role not in ("dit", "dit_sr") or not m.arch:
                continue
            if m.arch.get("single_blocks", 0):
                return (f"layer1.models.{m.name}: tp_degree = {parallel.tp_degree} with a HunyuanVideo-1.5 DiT of "
                        f"{m.arch['single_blocks']} single-stream blocks: their tensor-parallel split is not built "
                        "(not executable yet; no published 1.5 transformer has any); use sp_ulysses_degree / "
                        "sp_ring_degree / cfg_degree instead of tp.")
            if int(m.arch.get("mlp_hidden_dim", 0)) % parallel.tp_degree:
                return (f"layer2.parallel_config.tp_degree = {parallel.tp_degree} does not divide the MLP width "
                        f"{m.arch['mlp_hidden_dim']} of model {m.name!r}, which tp splits across ranks; lower it.")
    if parallel.sp_ulysses_degree * parallel.sp_ring_degree > 1:
        for m in models:
            if m.role in ("dit", "dit_sr") and m.arch.get("double_blocks", 1) == 0:
                return (f"layer1.models.{m.name}: a HunyuanVideo-1.5 DiT without double-stream blocks under sequence "
                        "parallelism: the video tokens are sharded at the first double-stream block (every "
                        "published transformer has 54); set sp_ulysses_degree = sp_ring_degree = 1.")
    return None


# ------------------------------------------------------------------ stages


def _arch(models: list[PlannedModel], role: str) -> dict[str, Any]:
    m = next((m for m in models if m.role == role), None)
    return dict(m.arch) if m is not None else {}


def build_stages(recipe: Recipe, models: list[PlannedModel], check_frame_sizes: Callable[[Recipe, int, list[int]], None],
                 image_fit: dict[str, Any]) -> list[Stage]:
    """The stages up to the denoised (and super-resolved) latent; `check_frame_sizes` and `image_fit` are
    compiler/stages.py's (shared with Wan's image stages)."""
    l2 = recipe.layer2
    by_role = {m.role: m.name for m in models}
    use_cfg = l2.cfg_scale != 1.0
    latent_channels, temporal, spatial = latent_geometry(next((m for m in models if m.role == "vae"), None))
    patch = list(_arch(models, "dit").get("patch_size", [1, 1, 1]))
    check_frame_sizes(recipe, spatial, patch)
    if patch != [1, 1, 1]:
        raise RecipeError(f"DiT patch {patch}: the HunyuanVideo-1.5 stages run patch [1, 1, 1] (every published "
                          "transformer's); not executable yet.")
    stages = [Stage(name="load_models", kind="load", models=[m.name for m in models])]
    # byT5, then Qwen2.5-VL, each its own stage: the memory plan sees one encoder on the device at a time, and the
    # base DiT copied in while Qwen2.5-VL runs only when it finds room for both
    stages.append(Stage(name="encode_glyphs", kind="hy15_glyph_encode", models=[by_role["glyph_encoder"]],
                        params={"glyph_len": GLYPH_LEN, "negative": use_cfg, "negative_glyphs": False,
                                "glyphs": "quoted_text"}))
    stages.append(Stage(name="encode_text", kind="hy15_text_encode",
                        models=[by_role["tokenizer"], by_role["text_encoder"]],
                        params={"text_len": l2.text_len, "negative": use_cfg, "template": "hunyuan_video15"}))
    conditioning = "t2v"
    if recipe.layer1.pipeline == PipelineType.HUNYUAN_VIDEO15_I2V.value:
        stages.append(Stage(name="load_image", kind="image_load", params=dict(image_fit)))
        stages.append(Stage(name="encode_image", kind="hy15_image_encode",
                            models=[by_role["image_encoder"], by_role["vae"]],
                            params={"outputs": ["vision_states", "image_latent"], "siglip_resize": "bicubic_antialias"}))
        conditioning = "i2v"
    stages.append(Stage(name="prepare_latents", kind="noise",
                        params={"num_frames": l2.num_frames, "latent_channels": latent_channels,
                                "temporal_ratio": temporal, "spatial_ratio": spatial, "generator": "cpu"}))
    stages.append(Stage(name="denoise", kind="hy15_denoise", models=[by_role["dit"]],
                        params={"solver": str(l2.sample_solver),
                                **grid_params(l2.denoising_step_list, str(l2.sample_solver)),
                                "num_inference_steps": l2.num_inference_steps, "sigma_shift": l2.sigma_shift,
                                "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "cfg": use_cfg, "cfg_scale": l2.cfg_scale,
                                "condition": conditioning,  # + the base DiT's step cache (compiler/skip_work.py)
                                "meanflow": bool(next(m for m in models if m.role == "dit").arch.get("use_meanflow")),
                                **denoise_params(recipe, models, [by_role["dit"]], temporal, spatial, patch)}))
    if l2.enable_sr:  # compiler/hunyuan15_sr.py (I2V: the reference image at the SR frame first)
        stages += sr_stages(recipe, models, spatial, image_fit, conditioning == "i2v", NUM_TRAIN_TIMESTEPS, temporal)
    return stages  # + the decode, frame interpolation and the video file: compiler/stages.output_stages, as Wan's


# ------------------------------------------------------------------ activations (compiler/memory.py)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def activations(recipe: Recipe, models: list[PlannedModel], stages: list[Stage], frame: tuple[int, int],
                vae_workspace: Callable[..., int]) -> dict[str, int]:
    """Breakdown entries that differ from Wan's: the SR DiT's activations at the SR frame (and the decode there), the
    text stage's (Qwen2.5-VL's residual stream, MLP and attention scores over text_len + the template, and byT5's)
    and the image stage's (SigLIP's and the VAE encode of one frame)."""
    l2 = recipe.layer2
    out: dict[str, int] = {}
    by_role = {m.role: m for m in models}
    out.update(sr_activations(recipe, models, stages, frame, DTYPE_BYTES, LATENT_CHANNELS, TEMPORAL_RATIO,
                               vae_workspace))
    qwen = by_role.get("text_encoder")
    if qwen is not None:
        a, width = qwen.arch, DTYPE_BYTES.get(qwen.compute_dtype, 2)
        length = l2.text_len + 128  # the template's system turn, cropped after the encoder (108 tokens published)
        hidden, mlp, heads = int(a.get("hidden_size", 0)), int(a.get("intermediate_size", 0)), int(a.get("num_heads", 1))
        out["activations.text_encode"] = length * (2 * hidden + 2 * mlp) * width + heads * length * length * 4
    byt5 = by_role.get("glyph_encoder")
    if byt5 is not None:
        a, width = byt5.arch, DTYPE_BYTES.get(byt5.compute_dtype, 2)
        dim, ffn, heads = int(a.get("dim", 0)), int(a.get("dim_ffn", 0)), int(a.get("num_heads", 1))
        out["activations.glyph_encode"] = GLYPH_LEN * (2 * dim + 2 * ffn) * width + heads * GLYPH_LEN ** 2 * 4
    siglip = by_role.get("image_encoder")
    if siglip is not None:
        a, width = siglip.arch, DTYPE_BYTES.get(siglip.compute_dtype, 2)
        tokens = (int(a.get("image_size", 384)) // int(a.get("patch_size", 14))) ** 2
        dim, mlp, heads = int(a.get("dim", 0)), int(a.get("mlp_dim", 0)), int(a.get("num_heads", 1))
        out["activations.image_encode"] = tokens * (2 * dim + mlp) * width + heads * tokens * tokens * 4
    return out


def stage_activation(stage: Stage, breakdown: dict[str, int]) -> Optional[int]:
    """Activation bytes of a HunyuanVideo-1.5 stage kind, or None (not one of them)."""
    return {"hy15_text_encode": breakdown.get("activations.text_encode", 0),
            "hy15_glyph_encode": breakdown.get("activations.glyph_encode", 0),
            "hy15_image_encode": breakdown.get("activations.image_encode", 0)
            + (breakdown.get("activations.vae_encode_sr", 0) if stage.params.get("input") == "sr_image" else
               breakdown.get("activations.vae_encode", breakdown.get("activations.vae_decode", 0))),
            "hy15_denoise": breakdown.get("activations.dit", 0),
            "hy15_sr_upsample": breakdown.get("activations.sr_upsample", 0),
            "hy15_sr": breakdown.get("activations.dit_sr", 0)}.get(stage.kind)
