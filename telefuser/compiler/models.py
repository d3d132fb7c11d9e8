"""Layer 1 resolved: each recipe model bound to its weight files, class, layout, dtype and architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from telefuser.errors import RecipeError, WeightsError
from telefuser.schema.fingerprint import fingerprint, sha256_requested
from telefuser.schema.enums import is_dit
from telefuser.schema.fp8_keys import scan_fp8
from telefuser.schema.plan import DetectedAttributes, Fp8Layout, PlannedModel
from telefuser.schema.model_config import ModelRuntimeConfig
from telefuser.schema.recipe import ModelSpec, Recipe

from .detect import Detection, detect, parameter_count, storage_dtype, used_tensors
from .hunyuan15_fp8 import fp8_refusal as hy15_fp8_refusal
from .hunyuan15 import CLASS_BY_ROLE as HY15_CLASS_BY_ROLE, HY15_ONLY_ROLES, check_compatible as hy15_check_compatible, check_family as hy15_check_family, is_hy15
from .lora import plan_loras
from .weights import WeightIndex, read_index

CLASS_BY_ROLE = {"dit": ("WanDiT", "HunyuanVideo15DiT"), "dit_high_noise": ("WanDiT",), "dit_low_noise": ("WanDiT",),
                 "vae": ("WanVAE", "Wan22VAE", "TAEHV", "HunyuanVideo15VAE"),
                 "text_encoder": ("UMT5Encoder", "Qwen25VLTextEncoder"), "tokenizer": ("UMT5Tokenizer", "Qwen25VLTokenizer"),
                 "image_encoder": ("CLIPVision", "SigLIPVision"), "vfi": ("RIFE",),
                 **{r: c for r, c in HY15_CLASS_BY_ROLE.items() if r in HY15_ONLY_ROLES}}
# Architecture numbers the weights do not store; the recipe's value is taken when it gives one.
NOT_IN_WEIGHTS = {"WanDiT": {"num_heads", "eps"}, "CLIPVision": {"num_heads", "eps", "activation"}}


def resolve_path(raw: str, recipe_dir: Path) -> Path:
    path = Path(raw).expanduser()
    return path if path.is_absolute() else (recipe_dir / path)


def _flag(metadata: dict[str, str], key: str) -> bool | None:
    value = metadata.get(key)
    return None if value is None else value.lower() in ("1", "true", "yes")


def _check_declared(spec: ModelSpec, det: Detection, dtype: str) -> dict[str, Any]:
    where = f"layer1.models.{spec.name}"
    if spec.class_ != "auto" and spec.class_ != det.class_name:
        raise WeightsError(f"{where}: class = {spec.class_!r}, but {spec.path} holds a {det.class_name} "
                           f"({det.layout} layout); fix the class or the path.")
    expected_class = CLASS_BY_ROLE[spec.role]
    if det.class_name not in expected_class:
        raise WeightsError(f"{where}: role {spec.role!r} needs a {' or a '.join(expected_class)}, but {spec.path} "
                           f"holds a {det.class_name}: weights of another model; fix the path.")
    if spec.dtype != "auto" and not det.class_name.endswith("Tokenizer") and spec.dtype != dtype:
        raise WeightsError(f"{where}: dtype = {spec.dtype!r}, but the weights are stored as {dtype}; "
                           "fix the recipe (or use dtype = \"auto\").")
    arch = dict(det.arch)
    free = NOT_IN_WEIGHTS.get(det.class_name, set())
    for key, value in spec.arch.items():
        if key in free:
            arch[key] = value
        elif key not in arch:
            raise RecipeError(f"{where}.arch.{key}: {det.class_name} has no such architecture number; "
                              f"known: {', '.join(sorted(arch))}.")
        elif arch[key] != value:
            raise WeightsError(f"{where}.arch.{key} = {value!r} contradicts the weights, which have {arch[key]!r} "
                               f"({spec.path}); the weights decide: fix or drop the recipe's value.")
    return arch


def _fp8_layout(spec: ModelSpec, index: WeightIndex, det: Detection, runtime: ModelRuntimeConfig,
                tp_degree: int) -> Fp8Layout | None:
    """The checkpoint's FP8 layout (None: no float8 tensors), and the layer-2 settings it rules out."""
    try:
        layout = scan_fp8({k: (t.dtype, t.shape) for k, t in index.tensors.items()})
    except ValueError as exc:
        raise WeightsError(f"layer1.models.{spec.name}: {spec.path}: {exc}.") from exc
    if layout is None:
        return None
    if det.class_name not in ("WanDiT", "HunyuanVideo15DiT"):
        raise WeightsError(f"layer1.models.{spec.name}: {spec.path} stores {det.class_name} weights in float8; FP8 "
                           "checkpoints are supported for the Wan and HunyuanVideo-1.5 DiTs only: use the model's "
                           "bf16/fp32 file.")
    refusal = hy15_fp8_refusal(layout, det.layout, index.tensors) if det.class_name == "HunyuanVideo15DiT" else None
    if refusal:
        raise WeightsError(f"layer1.models.{spec.name}: {spec.path} is an FP8 HunyuanVideo-1.5 DiT, but {refusal}; "
                           "use LightX2V's *_scaled_fp8_e4m3_lightx2v* file or the bf16 one.")
    quant = runtime.quant_config.quant_type
    fits = {"per_tensor": "fp8_e4m3fn", "unscaled": "fp8_e4m3fn", "per_channel": "fp8_e4m3fn_rowwise"}.get(
        layout.granularity)
    if quant not in ("none", fits):
        raise RecipeError(
            f"layer2.models.{spec.name}.quant_config.quant_type = {quant!r}, but {spec.path} already stores its "
            f"linears in float8 ({layout.granularity.replace('_', ' ')} scales): re-quantising them would lose "
            f"precision for nothing. Set quant_type = \"none\" (the stored FP8 linears run as stored)"
            + (f" or \"{fits}\" (also quantises the linears the file keeps in bf16)." if fits else "."))
    if tp_degree > 1:
        raise RecipeError(f"layer1.models.{spec.name}: an FP8 checkpoint with parallel_config.tp_degree > 1: tensor "
                          "parallelism shards plain linears, not FP8 ones; set tp_degree = 1 (use Ulysses/ring/cfg "
                          "parallelism) or the bf16 checkpoint.")
    return layout


def _attributes(spec: ModelSpec, dtype: str, metadata: dict[str, str], moe: bool,
                fp8_layout: Fp8Layout | None) -> DetectedAttributes:
    where = f"layer1.models.{spec.name}.attributes"
    fp8 = fp8_layout is not None
    declared = spec.attributes
    if declared.fp8 is not None and declared.fp8 != fp8:
        stored = (f"stored as {dtype}" if not fp8 else f"stored as float8_e4m3fn ({fp8_layout.fp8_tensors} float8 "
                  f"tensors, {fp8_layout.granularity.replace('_', ' ')} scales)")  # type: ignore[union-attr]
        raise WeightsError(f"{where}.fp8 = {str(declared.fp8).lower()}, but the weights are {stored}: the "
                           "weights decide; fix or drop the recipe's value.")
    found = {}
    for name in ("distill", "meanflow"):
        in_file, said = _flag(metadata, name), getattr(declared, name)
        if in_file is not None and said is not None and in_file != said:
            raise WeightsError(f"{where}.{name} = {str(said).lower()}, but the weights' metadata says {name} = {str(in_file).lower()}.")
        found[name] = bool(in_file if in_file is not None else said)
    return DetectedAttributes(fp8=fp8, moe=moe, fp8_layout=fp8_layout, **found)


def plan_model(spec: ModelSpec, recipe: Recipe, recipe_dir: Path, inspect: bool) -> PlannedModel:
    runtime = recipe.layer2.models.get(spec.name, ModelRuntimeConfig())
    compute = runtime.torch_dtype or recipe.layer1.torch_dtype
    moe = recipe.layer1.is_moe and is_dit(spec.role)
    path = resolve_path(spec.path, recipe_dir)
    if not inspect:  # --check --no-weights: the recipe's declarations stand in for the weights
        return PlannedModel(name=spec.name, role=spec.role, path=str(path), class_=spec.class_,
                            dtype=spec.dtype, compute_dtype=compute, key_layout="tokenizers" if spec.role == "tokenizer" else "wan",
                            attributes=DetectedAttributes(moe=moe, fp8=bool(spec.attributes.fp8),
                                                          distill=bool(spec.attributes.distill), meanflow=bool(spec.attributes.meanflow)),
                            arch=dict(spec.arch), parameter_count=0, files=[])
    index = read_index(path)
    det = detect(index)
    dtype = storage_dtype(index.tensors) if index.tensors else "auto"
    arch = _check_declared(spec, det, dtype)
    tp = recipe.layer2.parallel_config.tp_degree
    fp8_layout = _fp8_layout(spec, index, det, runtime, tp)
    return PlannedModel(
        name=spec.name, role=spec.role, path=str(path), class_=det.class_name, dtype=dtype, compute_dtype=compute,
        key_layout=det.layout, attributes=_attributes(spec, dtype, index.metadata, moe, fp8_layout), arch=arch,
        parameter_count=parameter_count(used_tensors(det, index.tensors)),  # a CLIP file's text tower is dropped
        files=[fingerprint(f, full_hash=sha256_requested()) for f in index.files],  # --hash-weights: full SHA-256 too
        loras=plan_loras(spec.name, det.class_name, det.layout, index.tensors, runtime, recipe_dir, tp),
    )


def _latent_input_channels(pipeline: str, z_dim: int) -> int:
    """Channels a Wan DiT takes: the noisy latent, plus for I2V the first frame's latent and a 4-channel mask.
    TI2V (Wan2.2 5B) takes the latent alone: the image's latent replaces its first frame."""
    return 2 * z_dim + 4 if pipeline == "wan_i2v" else z_dim


def check_compatible(models: list[PlannedModel], pipeline: str) -> None:
    """The DiTs, VAE and text encoder must fit together and the pipeline (channels, text width, MoE pair)."""
    hy15_check_family(models, pipeline)
    if is_hy15(pipeline):
        return hy15_check_compatible(models, pipeline)
    by_role = {m.role: m for m in models}
    vae, text = by_role.get("vae"), by_role.get("text_encoder")
    dits = [m for m in models if is_dit(m.role)]
    for dit in dits:
        a = dit.arch
        if text and a.get("text_dim") != text.arch.get("dim"):
            raise WeightsError(f"DiT {dit.name!r} takes text features of width {a.get('text_dim')}, but text encoder "
                               f"{text.name!r} produces {text.arch.get('dim')}: these weights belong to different models.")
        if vae and a.get("out_dim") != vae.arch.get("z_dim"):
            hint = {("WanVAE", 48): " (a 48-channel DiT is Wan2.2 TI2V-5B's: it takes the Wan2.2 VAE, Wan2.2_VAE.pth)",
                    ("Wan22VAE", 16): " (a 16-channel DiT takes the Wan2.1 VAE, Wan2.1_VAE.pth; the Wan2.2 VAE's "
                                      "48 channels are TI2V-5B's)",
                    ("TAEHV", 16): " (a 16-channel TAEHV is taew2_1.pth: a 48-channel DiT takes taew2_2.pth)",
                    ("TAEHV", 48): " (a 48-channel TAEHV is taew2_2.pth: a 16-channel DiT takes taew2_1.pth)"}.get(
                        (vae.class_, vae.arch.get("z_dim") if vae.class_ == "TAEHV" else a.get("out_dim")), "")
            raise WeightsError(f"DiT {dit.name!r} outputs {a.get('out_dim')} latent channels, but VAE {vae.name!r} "
                               f"({vae.class_}) decodes {vae.arch.get('z_dim')}: these weights belong to different "
                               f"models{hint}.")
        expected = _latent_input_channels(pipeline, int(a.get("out_dim", 0)))
        if a.get("in_dim") != expected:
            kind = "an image-to-video" if a.get("in_dim", 0) > a.get("out_dim", 0) else "a text-to-video"
            raise WeightsError(f"layer1.pipeline = {pipeline!r} feeds DiT {dit.name!r} {expected} input channels, but its "
                               f"weights take {a.get('in_dim')} ({kind} model): set the pipeline that matches the "
                               "weights, or point the path at the right DiT.")
    clip = by_role.get("image_encoder")
    for dit in dits:
        takes_image = dit.arch.get("model_type") == "i2v"  # img_emb + k_img/v_img: Wan2.1 I2V attends to CLIP tokens
        if takes_image and clip is None:
            raise WeightsError(f"DiT {dit.name!r} attends to CLIP image features (its weights have img_emb: Wan2.1 "
                               "image-to-video), but layer1.models has no image_encoder; add the CLIP model (role = "
                               "\"image_encoder\", class = \"CLIPVision\", e.g. models_clip_open-clip-xlm-roberta-large-"
                               "vit-huge-14.pth of the same release) and set layer2.enable_clip_stage = true.")
        if clip is not None and not takes_image:
            raise WeightsError(f"image encoder {clip.name!r} would be unused: DiT {dit.name!r} has no image cross-attention "
                               "(no img_emb in its weights); drop the image_encoder model and layer2.enable_clip_stage, "
                               "or point the DiT at image-to-video weights.")
        if clip is not None and dit.arch.get("image_dim") != clip.arch.get("dim"):
            raise WeightsError(f"DiT {dit.name!r} takes CLIP features of width {dit.arch.get('image_dim')}, but image "
                               f"encoder {clip.name!r} produces {clip.arch.get('dim')}: these weights belong to different models.")
    if len(dits) == 2:
        differing = sorted(k for k in dits[0].arch if dits[0].arch[k] != dits[1].arch.get(k))
        if differing:
            raise WeightsError(f"the MoE DiTs {dits[0].name!r} and {dits[1].name!r} must share one architecture, but differ "
                               f"in {', '.join(differing)}: the two experts come from one checkpoint "
                               "(high_noise_model/ and low_noise_model/ of the same release).")
