"""Peak memory per device, estimated before anything is loaded, per stage.

weights: parameters x bytes of the compute dtype (fp8-quantised linears 1
byte), divided by tp (and by the mesh size under FSDP). Where they are:
NO_CPU_OFFLOAD resident for the whole run; MODEL_CPU_OFFLOAD on the device only
during a stage that uses the model; SEQUENTIAL/ASYNC_CPU_OFFLOAD (a DiT, a text
encoder) the non-block weights and kept blocks resident (per use for several DiTs
taking turns and for text encoders) plus, while it runs, the ring of `groups_resident` group buffers
(compiler/block_offload.py); `run_on_cpu` models none (their bytes are
reported as host_weights). activations: the DiT at the largest allowed frame
size and num_frames, with tokens split by sequence parallelism: per token, the
residual stream, the normalised FFN input and the FFN's hidden layer before and after its
activation, in the compute dtype (FP8 linears add FP8_FFN_EXTRA bytes per hidden value), for one CFG branch
(they run one after the other); attention is flash-style (no S x S matrix). The VAE decode workspace is
VAE_LIVE_MAPS full-resolution feature maps of one latent frame's 4 output frames at base_dim channels (a
tile's instead when the plan tiles the decode), plus the decoded video in float32. Both calibrated on an H100
(bench/memory.py, docs/benchmarks.md "Memory modes": the Wan2.1-14B DiT at 480p x 81 frames held 2.31-2.38 GiB of
activations in bf16, 3.17-3.52 GiB with FP8 linears; the Wan2.1 VAE's decode 3.1 GiB).
A stage's peak (`stage_peaks`) is the sum of its components, each kept in
the plan (memory.stages) so measured peaks can be set beside them; the plan's
peak is the largest stage's (or a planned prefetch's, when larger).
These are estimates for refusing the clearly impossible, not promises.

Prefetch: for every use of a MODEL_CPU_OFFLOAD model (a stage naming it, in run order)
the previous model use is where it could be copied in ahead of time, on a side
stream. That is recorded as a prefetch when the estimated peak of that previous
use with both models on the device (resident weights, the running model if it is
offloaded too, the prefetched one, that stage's activations, the workspace) stays
within PREFETCH_HEADROOM of the capacity; otherwise the plan records "no prefetch" and why.
The first model use of a video has no use before it: that model is recorded as read
straight to the device at load (during_stage = the load stage, no during_model) when it
fits beside everything the first video holds, since its host copy is then pinned in the
background while the first video runs (`_at_load`).
"""

from __future__ import annotations

from telefuser.schema.enums import ModelClass, ModelRole, WeightOffloadType, is_dit
from telefuser.schema.plan import BlockOffload, MemoryEstimate, PlannedModel, PrefetchDecision, Stage, StageMemory
from telefuser.schema.model_config import ModelRuntimeConfig
from telefuser.schema.recipe import Recipe
from telefuser.schema.resolution import frame_candidates
from telefuser.schema.vae_tiles import hy15_frames_per_tile_call

from .block_offload import plan_block_offload
from .hunyuan15_sr import largest_sr_frame
from .skip_work import cache_residual_bytes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
FP8_QUANT = ("fp8_e4m3fn", "fp8_e4m3fn_rowwise", "int8")
WORKSPACE_BYTES = 1 * 2**30  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
VAE_LIVE_MAPS = 10  # concatenated caches, padding copies, residual inputs and outputs at full resolution
# FP8 linears quantise their input: the FFN's second linear holds an FP8 copy of the hidden layer and _scaled_mm's
# output beside the bf16 hidden layer; measured on an H100 as about 2 more bytes per hidden value (bench/memory.py)
FP8_FFN_EXTRA = 2
# A prefetch holds two models on the device at once; it is planned only with this share of the capacity to spare,
# since a wrong estimate would turn a run that fits into one that does not.
PREFETCH_HEADROOM = 0.9
# RIFE (the vfi stage): device bytes per frame pair per padded pixel, all levels of the IFNet's pyramid, flows and
# warps in float32 (bf16 convolutions alike); bench/vfi.py on an H200 (docs/benchmarks.md): v4.26 batch 8 held
# 2.50 GiB at 480p (896x512 padded), 5.72 GiB at 720p (1280x768): about 730 and 780 bytes. Beside the batch, the
# uint8 frames on the device: the output (the originals copied into it) and, on several ranks, the broadcast input.
RIFE_BYTES_PER_PAIR_PIXEL = 800
# TAEHV's decode: full-resolution feature maps of its last stage's width for one chunk's output frames; bench/vfi.py
# (H200, bf16, 480p x 81 frames): chunks of 4 latent frames held 4.17 GiB, about 5 such maps of the 16 frames.
TAEHV_LIVE_MAPS = 5


def _largest_frame(recipe: Recipe) -> tuple[int, int, str, str]:
    best = (0, 0, "", "")
    for res in recipe.layer3.resolution.choices:
        for ar in recipe.layer3.aspect_ratio.choices:  # "auto": its largest candidate
            for w, h in frame_candidates(recipe.layer1.pipeline, res, ar):
                if w * h > best[0] * best[1]:
                    best = (w, h, str(res), str(ar))
    return best


def _weight_bytes(model: PlannedModel, runtime: ModelRuntimeConfig, recipe: Recipe) -> int:
    bytes_per = DTYPE_BYTES[model.compute_dtype]
    if runtime.quant_config.quant_type in FP8_QUANT:
        bytes_per = 1
    stored = model.attributes.fp8_layout  # an FP8 checkpoint's linears stay 1 byte; the rest takes the compute dtype
    fp8 = stored.linear_parameters if stored is not None else 0
    total = (model.parameter_count - fp8) * bytes_per + fp8
    # unmerged LoRAs stay resident beside the weights: about their file's size (bf16 LoRAs, bf16 compute)
    total += sum(lora.file.size for lora in model.loras if not lora.merge)
    p = recipe.layer2.parallel_config
    if is_dit(model.role):
        total //= p.tp_degree
    if p.enable_fsdp and (is_dit(model.role) or model.role == ModelRole.TEXT_ENCODER.value):
        total //= p.world_size  # each rank keeps its share (plus one whole block while it runs)
    return total


def _device_weights(recipe: Recipe, models: list[PlannedModel]) -> tuple[dict[str, int], int, dict[str, int],
                                                                        list[BlockOffload]]:
    """(breakdown of weights, bytes resident for the whole run, bytes each model adds while in use, block plans)."""
    l2 = recipe.layer2
    breakdown: dict[str, int] = {}
    resident, in_use, blocks = 0, {}, []
    several_dits = sum(is_dit(m.role) for m in models) > 1
    for m in models:
        runtime = l2.models.get(m.name, ModelRuntimeConfig())
        size = _weight_bytes(m, runtime, recipe)
        mode = runtime.offload_config.offload_type
        if runtime.run_on_cpu:  # host memory only; its stage's work runs on the CPU too
            breakdown[f"host_weights.{m.name}"] = size
            in_use[m.name] = 0
            continue
        breakdown[f"weights.{m.name}"] = size
        if mode == WeightOffloadType.NO_CPU_OFFLOAD:
            resident += size
        elif mode == WeightOffloadType.MODEL_CPU_OFFLOAD:
            in_use[m.name] = size  # on the device only during its own stage
        else:  # sequential / async (a DiT, a text encoder): kept part resident or in use, a ring of group buffers
            plan = plan_block_offload(m, runtime, size, several_dits)
            blocks.append(plan)
            ring = plan.groups_resident * plan.group_bytes
            breakdown[f"blocks.{m.name}.resident"] = plan.resident_bytes
            breakdown[f"blocks.{m.name}.ring"] = ring
            if plan.resident_between_uses:
                resident += plan.resident_bytes
                in_use[m.name] = ring
            else:
                in_use[m.name] = ring + plan.resident_bytes
    return breakdown, resident, in_use, blocks


def _vae_workspace(recipe: Recipe, vae: PlannedModel, width: int, height: int, space: int, tiled: bool) -> int:
    """VAE_LIVE_MAPS feature maps of one latent frame's 4 output frames at full resolution (at one tile's when
    tiled: `tile_size` latent pixels x the spatial ratio, and that tile's decoded frames), plus the video in float32."""
    l2 = recipe.layer2
    # Wan2.2's decoder works at half resolution in patch space (2x2 pixels as channels): per output pixel
    # it holds decoder_base_dim / 4 channels
    base = int(vae.arch.get("base_dim", (vae.arch.get("block_out_channels") or [96])[0])) if vae.class_ != "Wan22VAE" else \
        int(vae.arch.get("decoder_base_dim", 256)) // int(vae.arch.get("patch_size", 2)) ** 2
    width_bytes = DTYPE_BYTES[vae.compute_dtype]
    area = width * height
    tile = 0
    frames_per_call = 1
    if tiled:
        area = min(area, l2.tile_size[0] * space * l2.tile_size[1] * space)
        tile = l2.num_frames * 3 * area * width_bytes
        if vae.class_ == ModelClass.HUNYUAN15_VAE:  # several latent frames per call of a tile (its decode_tile)
            frames_per_call = hy15_frames_per_tile_call(*l2.tile_size)
    return VAE_LIVE_MAPS * 4 * frames_per_call * base * area * width_bytes + tile + l2.num_frames * 3 * width * height * 4


def _taehv_workspace(recipe: Recipe, vae: PlannedModel, width: int, height: int, chunk: int) -> int:
    """TAEHV_LIVE_MAPS maps of one chunk's frames (t_upscale 4 per latent frame) at the last stage's resolution
    and width, plus the video in float32 (as the Wan VAE's). With a 2x2 patch (taew2_2, taehv1_5) the last stage
    runs at half the frame's width and height, and the pixel shuffle makes the frame."""
    channels = vae.arch.get("channels") or [256, 128, 64, 64]
    frames = 4 * chunk
    area = width * height
    maps = area // int(vae.arch.get("patch_size", 1)) ** 2
    return TAEHV_LIVE_MAPS * frames * int(channels[-1]) * maps * DTYPE_BYTES[vae.compute_dtype] + \
        recipe.layer2.num_frames * 3 * area * 4


def _vfi_workspace(stage: Stage, width: int, height: int) -> int:
    """One batch of frame pairs through RIFE at the padded frame size, and the uint8 frames on the device."""
    p = stage.params
    pad = int(p.get("pad_to", 128))
    padded = -(-width // pad) * pad * (-(-height // pad) * pad)
    frames = int(p["output_frames"]) + (int(p["input_frames"]) if p.get("parallel_ranks", 1) > 1 else 0)
    return int(p["batch_size"]) * padded * RIFE_BYTES_PER_PAIR_PIXEL + frames * width * height * 3


def estimate_memory(recipe: Recipe, models: list[PlannedModel], capacity: int,
                    stages: list[Stage] | None = None) -> MemoryEstimate:
    """The peak estimate; with the plan's `stages`, also the peak per stage and the prefetch decision for every
    offloaded model use."""
    l2 = recipe.layer2
    width, height, res, ar = _largest_frame(recipe)
    breakdown, resident, in_use, blocks = _device_weights(recipe, models)
    dit = next((m for m in models if m.role == ModelRole.DIT.value), None) or next(m for m in models if is_dit(m.role))
    # Wan's arch names, else HunyuanVideo-1.5's
    dim, ffn = int(dit.arch.get("dim", dit.arch.get("hidden_size", 0))), int(dit.arch.get("ffn_dim", dit.arch.get("mlp_hidden_dim", 0)))
    act_bytes = DTYPE_BYTES[dit.compute_dtype]
    noise = next((s for s in stages or [] if s.kind == "noise"), None)  # the VAE's compression (Wan2.2's: 4 x 16 x 16)
    time_ratio, space = (noise.params["temporal_ratio"], noise.params["spatial_ratio"]) if noise else (4, 8)
    patch = list(dit.arch.get("patch_size", [1, 2, 2]))
    latent_frames = (l2.num_frames - 1) // time_ratio + 1
    tokens = latent_frames * (height // (space * patch[1])) * (width // (space * patch[2]))
    sp = l2.parallel_config.sp_ulysses_degree * l2.parallel_config.sp_ring_degree
    # one CFG branch at a time: the runtime runs the conditional and the unconditional forward one after the other
    # (stages/denoise.guided), so only one branch's activations are live (plus a float32 prediction, negligible).
    # Per token: the residual stream, the normalised FFN input, the hidden layer before and after the GELU.
    dit_runtime = l2.models.get(dit.name, ModelRuntimeConfig())
    fp8 = dit_runtime.quant_config.quant_type in FP8_QUANT or dit.attributes.fp8_layout is not None
    per_token = (2 * dim + 2 * ffn) * act_bytes + (FP8_FFN_EXTRA * ffn if fp8 else 0)
    breakdown["activations.dit"] = -(-tokens // sp) * per_token
    if any(s.params.get("first_frame") for s in stages or [] if s.kind == "denoise"):
        # TI2V per-token timesteps: float32 modulation e [S, 6, dim] and time embedding [S, dim] of the whole
        # sequence, and each block's modulation + e of its tokens
        breakdown["activations.dit"] += tokens * 7 * dim * 4 + -(-tokens // sp) * 6 * dim * 4
    # step caches keep the block stack's residual per CFG branch between steps (compiler/skip_work.py)
    base = {m.name for m in models if m.role != ModelRole.DIT_SR.value}  # the SR DiT's: compiler/hunyuan15_sr.py
    breakdown["activations.dit"] += cache_residual_bytes(recipe, -(-tokens // sp), dim, act_bytes, base)
    decoded = largest_sr_frame(stages or []) or (width, height)  # HunyuanVideo-1.5's SR frame where it has SR
    vae = next((m for m in models if m.role == ModelRole.VAE.value), None)
    if vae is not None:
        decode = next((s for s in stages or [] if s.kind == "vae_decode"), None)
        tiled = bool(decode.params.get("tiled")) if decode is not None else l2.tiled
        if decode is not None and decode.params.get("decoder") == "taehv":
            breakdown["activations.vae_decode"] = _taehv_workspace(recipe, vae, *decoded,
                                                                   int(decode.params["chunk_frames"]))
        else:
            breakdown["activations.vae_decode"] = _vae_workspace(recipe, vae, *decoded, space, tiled)
        if tiled:  # the encoder (image-to-video's condition) still sees whole frames
            breakdown["activations.vae_encode"] = _vae_workspace(recipe, vae, width, height, space, False)
    vfi = next((s for s in stages or [] if s.kind == "vfi"), None)
    if vfi is not None:
        breakdown["activations.vfi"] = _vfi_workspace(vfi, *decoded)
    from .hunyuan15 import activations as hy15_activations, is_hy15

    if is_hy15(recipe.layer1.pipeline):  # the SR DiT's and upsampler's, the Qwen2.5-VL / SigLIP stages'
        breakdown.update(hy15_activations(recipe, models, stages or [], (width, height), _vae_workspace))
    breakdown["workspace"] = WORKSPACE_BYTES
    prefetch = plan_prefetch(recipe, models, stages or [], capacity, resident, breakdown, (width, height), in_use)
    per_stage = stage_peaks(stages or [], models, breakdown, (width, height), l2.text_len, resident, in_use, prefetch)
    if per_stage:
        peak = max(s.peak_bytes for s in per_stage)
    else:  # no stages (a bare estimate): the largest model in use beside the largest activations
        peak_activation = max(breakdown["activations.dit"], breakdown.get("activations.vae_decode", 0),
                              breakdown.get("activations.vae_encode", 0))
        peak = int(resident + max(in_use.values(), default=0) + peak_activation + WORKSPACE_BYTES)
    # A planned prefetch holds two models at once: its peak counts (it was planned only where it fits).
    peak = max([peak, *(d.peak_bytes for d in prefetch if d.prefetch)])
    return MemoryEstimate(peak_bytes=peak, capacity_bytes=capacity, breakdown=breakdown,
                          at={"width": width, "height": height, "resolution": res, "aspect_ratio": ar,
                              "num_frames": l2.num_frames, "tokens": tokens},
                          prefetch=prefetch, block_offload=blocks, stages=per_stage)


def stage_peaks(stages: list[Stage], models: list[PlannedModel], breakdown: dict[str, int], frame: tuple[int, int],
                text_len: int, resident: int, in_use: dict[str, int],
                prefetch: list[PrefetchDecision]) -> list[StageMemory]:
    """The peak of every stage that uses the device: resident weights, the largest model it activates (its models
    run one after another), prefetches made during it, a model read to the device at load whose first use has not
    come yet, its activations and the workspace."""
    on_cpu = {name for name, size in in_use.items() if size == 0 and f"host_weights.{name}" in breakdown}
    at_load = [d.model for d in prefetch if d.prefetch and d.during_model is None]
    seen: set[str] = set()  # models used by an earlier stage
    out = []
    for stage in stages:
        if stage.kind in ("load", "write_video", "noise", "image_load"):
            continue
        used = [n for n in stage.models if n in in_use]
        components = {"resident": resident}
        if used:
            largest = max(used, key=lambda n: in_use[n])
            if in_use[largest]:
                components[f"in_use.{largest}"] = in_use[largest]
        for d in prefetch:
            if d.prefetch and d.during_stage == stage.name and d.during_model is not None:
                components[f"prefetch.{d.model}"] = breakdown.get(f"weights.{d.model}", 0)
        for name in at_load:  # on the device from loading until its first use ends (runtime/offload.py)
            if name not in used and name not in seen:
                components[f"loaded_at_start.{name}"] = breakdown.get(f"weights.{name}", 0)
        seen.update(used)
        device_models = [n for n in stage.models if n not in on_cpu and n in {m.name for m in models}
                         and next(m for m in models if m.name == n).role != ModelRole.TOKENIZER.value]
        activation = _stage_activation(stage, models, breakdown, frame, text_len) if device_models else 0
        components["activations"] = activation
        components["workspace"] = WORKSPACE_BYTES
        out.append(StageMemory(stage=stage.name, peak_bytes=sum(components.values()), components=components))
    return out


def model_uses(stages: list[Stage], models: list[PlannedModel]) -> list[tuple[Stage, str]]:
    """(stage, model) for every model a stage activates, in run order (the tokenizer is no device model; a
    denoise stage's models in phase order)."""
    device_models = {m.name for m in models if m.role != ModelRole.TOKENIZER.value}
    return [(s, name) for s in stages if s.kind != "load" for name in s.models if name in device_models]


def _stage_activation(stage: Stage, models: list[PlannedModel], breakdown: dict[str, int], frame: tuple[int, int],
                      text_len: int) -> int:
    """Activation bytes while `stage` runs, at the estimate's largest frame."""
    kind = stage.kind
    from .hunyuan15 import stage_activation as hy15_stage_activation

    family = hy15_stage_activation(stage, breakdown)
    if family is not None:
        return family
    if kind == "denoise":
        return breakdown.get("activations.dit", 0)
    if kind == "vae_encode":  # the encoder's feature maps are those of the untiled decoder, mirrored
        return breakdown.get("activations.vae_encode", breakdown.get("activations.vae_decode", 0))
    if kind == "vae_decode":
        return breakdown.get("activations.vae_decode", 0)
    if kind == "vfi":
        return breakdown.get("activations.vfi", 0)
    by_name = {m.name: m for m in models}
    if kind == "text_encode":
        encoder = by_name.get(stage.models[-1]) if stage.models else None
        if encoder is None:
            return 0
        arch, width = encoder.arch, DTYPE_BYTES[encoder.compute_dtype]
        batch = 2 if stage.params.get("negative") else 1
        dim, ffn, heads = int(arch.get("dim", 0)), int(arch.get("dim_ffn", 0)), int(arch.get("num_heads", 1))
        # the residual stream and the FFN's hidden layer, plus the float32 attention scores (position bias)
        return batch * text_len * (2 * dim + ffn) * width + batch * heads * text_len * text_len * 4
    if kind == "image_encode":
        encoder = by_name.get(stage.models[0]) if stage.models else None
        if encoder is None:
            return 0
        arch, width = encoder.arch, DTYPE_BYTES[encoder.compute_dtype]
        tokens = (int(arch.get("image_size", 224)) // int(arch.get("patch_size", 14))) ** 2 + 1
        dim, mlp, heads = int(arch.get("dim", 0)), int(arch.get("mlp_dim", 0)), int(arch.get("num_heads", 1))
        return tokens * (2 * dim + mlp) * width + heads * tokens * tokens * 4 + 3 * frame[0] * frame[1] * 4
    return 0


def _at_load(name: str, stage: Stage, stages: list[Stage], models: list[PlannedModel], breakdown: dict[str, int],
             frame: tuple[int, int], text_len: int, resident: int, limit: int, capacity: int,
             prefetch_size: int) -> PrefetchDecision:
    """The first model use of a video: the model can be read straight to the device at load (the first video then
    copies nothing in) while its pinned host copy is made in the background, since pinning is the slow part of
    loading. The device copy is dropped when that first use ends (the runtime waits for the host copy there if it
    is not complete), so the peak to fit is that stage's: the model beside everything resident and its activations."""
    load = next((s for s in stages if s.kind == "load"), None)
    first_use = "its first use in a video: copied in when its stage starts"
    if load is None:
        return PrefetchDecision(model=name, stage=stage.name, prefetch=False, peak_bytes=0, reason=first_use)
    activation = _stage_activation(stage, models, breakdown, frame, text_len)
    peak = resident + breakdown.get(f"weights.{name}", 0) + activation + WORKSPACE_BYTES
    if prefetch_size == 0:
        return PrefetchDecision(model=name, stage=stage.name, prefetch=False, peak_bytes=0,
                                reason=f"{first_use} (layer2.models.{name}.offload_config.prefetch_size = 0)")
    if peak > limit:
        return PrefetchDecision(model=name, stage=stage.name, during_stage=load.name, prefetch=False, peak_bytes=peak,
                                reason=f"{first_use}; loading it on the device would need est. {peak / 2**30:.2f} GiB "
                                       f"in stage {stage.name}, over the limit of {limit / 2**30:.2f} GiB")
    warm_up = stage.kind == "text_encode"  # an empty prompt is a valid input to run it on at load (the runtime does)
    return PrefetchDecision(
        model=name, stage=stage.name, during_stage=load.name, prefetch=True, peak_bytes=peak,
        reason=f"read straight to the device at load for the first video{', run once there on an empty prompt' if warm_up else ''}"
               f", its pinned host copy made in the background and the device copy dropped when that use ends: est. "
               f"peak {peak / 2**30:.2f} GiB, limit {limit / 2**30:.2f} GiB ({PREFETCH_HEADROOM:.0%} of "
               f"{capacity / 2**30:.2f} GiB)")


def plan_prefetch(recipe: Recipe, models: list[PlannedModel], stages: list[Stage], capacity: int, resident: int,
                  breakdown: dict[str, int], frame: tuple[int, int], in_use: dict[str, int]) -> list[PrefetchDecision]:
    """For each use of a MODEL_CPU_OFFLOAD model: prefetch it during the previous model use, or not, and why.
    `in_use`: bytes each model adds on the device while it runs (an offloaded model's weights, a block-offloaded
    DiT's ring of group buffers)."""
    l2 = recipe.layer2

    def offload(name: str):
        return l2.models.get(name, ModelRuntimeConfig()).offload_config

    def offloaded(name: str) -> bool:
        return offload(name).offload_type == WeightOffloadType.MODEL_CPU_OFFLOAD

    limit = int(capacity * PREFETCH_HEADROOM)
    uses = model_uses(stages, models)
    decisions = []
    for index, (stage, name) in enumerate(uses):
        if not offloaded(name):
            continue
        if index == 0:
            decisions.append(_at_load(name, stage, stages, models, breakdown, frame, l2.text_len, resident, limit,
                                      capacity, offload(name).prefetch_size))
            continue
        before, running = uses[index - 1]
        if running == name:
            decisions.append(PrefetchDecision(
                model=name, stage=stage.name, during_stage=before.name, during_model=running, prefetch=False,
                peak_bytes=0, reason=f"the use before is its own (stage {before.name}): copied in again at its stage"))
            continue
        size = breakdown.get(f"weights.{name}", 0)
        peak = resident + size + _stage_activation(before, models, breakdown, frame, l2.text_len) + WORKSPACE_BYTES
        peak += in_use.get(running, 0)
        if offload(name).prefetch_size == 0:
            fits, reason = False, f"layer2.models.{name}.offload_config.prefetch_size = 0"
        elif peak <= limit:
            fits, reason = True, (f"both fit: est. peak {peak / 2**30:.2f} GiB, limit {limit / 2**30:.2f} GiB "
                                  f"({PREFETCH_HEADROOM:.0%} of {capacity / 2**30:.2f} GiB)")
        else:
            fits, reason = False, (f"both would need est. {peak / 2**30:.2f} GiB, over the limit of "
                                   f"{limit / 2**30:.2f} GiB ({PREFETCH_HEADROOM:.0%} of {capacity / 2**30:.2f} GiB): "
                                   "copied in when its stage starts")
        decisions.append(PrefetchDecision(model=name, stage=stage.name, during_stage=before.name,
                                          during_model=running, prefetch=fits, peak_bytes=peak, reason=reason))
    return decisions
