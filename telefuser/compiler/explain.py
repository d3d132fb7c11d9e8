"""Readable views of plans: a summary (--explain) and a semantic difference (--diff)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic

from telefuser.errors import PlanError
from telefuser.schema.enums import WeightOffloadType
from telefuser.schema.plan import Plan
from telefuser.schema.step_list import step_list_timesteps

from .skip_work import explain_lines

GIB = 2**30


def read_plan_file(path: str | Path) -> tuple[Plan, dict[str, Any]]:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Plan.model_validate(raw), raw
    except FileNotFoundError as exc:
        raise PlanError(f"{path}: no such plan file.") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, pydantic.ValidationError):
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise PlanError(f"{path} is not a TeleFuser plan: at {where}: {first['msg']}; compile it with telefuser-compile.") from exc
        raise PlanError(f"{path} is not readable JSON ({exc}).") from exc


def explain(plan: Plan) -> str:
    l2 = plan.layer2_inference_config
    lines = [
        f"plan {plan.plan_hash[:16]}  recipe {plan.recipe.name!r}  compiled {plan.timestamp}",
        f"pipeline {plan.pipeline_type} on {plan.device}"
        + (f" ({plan.target.gpu or 'GPU'}, cc {plan.target.compute_capability})" if plan.device == "cuda" else "")
        + f", compute dtype {plan.torch_dtype}",
        "",
        "models:",
    ]
    for m in plan.layer1_model_definition.models:
        arch = ", ".join(f"{k}={v}" for k, v in m.arch.items() if k in ("dim", "num_layers", "num_heads", "ffn_dim", "z_dim", "base_dim", "vocab_size"))
        flags = [k for k, v in m.attributes.model_dump().items() if v]
        lines.append(f"  {m.name:<14} {m.role:<14} {m.class_:<13} {m.key_layout:<10} {m.dtype:<9} "
                     f"{m.parameter_count / 1e6:9.1f}M  {arch}{'  [' + ', '.join(flags) + ']' if flags else ''}")
    moe = f", boundary {l2.boundary} (cfg high {l2.cfg_scale_high}, low {l2.cfg_scale_low})" if l2.boundary else ""
    lines += ["", f"sampling: {l2.sample_solver}, {l2.num_inference_steps} steps, shift {l2.sigma_shift}, "
                  f"cfg {l2.cfg_scale}{moe}, {l2.num_frames} frames at {l2.fps} fps"
                  + (f" (interpolated {l2.vfi_multiplier}x: {(l2.num_frames - 1) * l2.vfi_multiplier + 1} frames at "
                     f"{l2.fps * l2.vfi_multiplier} fps)" if l2.enable_vfi else "")]
    sizes = "; ".join(f"{res} " + ", ".join(f"{ar} {w}x{h}" for ar, (w, h) in ratios.items())
                      for res, ratios in plan.layer3_user_interface.frame_sizes.items())
    lines += [f"frames: {sizes}"]
    for res, cands in plan.layer3_user_interface.image_frame_sizes.items():  # aspect ratio "auto"
        shown = [f"{w}x{h}" for w, h in cands]
        lines.append(f"  {res} auto: the size of the aspect ratio closest to the image's, of {len(cands)}: "
                     + ", ".join(shown if len(shown) <= 8 else [*shown[:3], "...", *shown[-3:]]))
    lines += _step_list(plan)
    lines += _super_resolution(plan)
    lines += ["", "dispatch:"]
    for d in plan.dispatch:
        lines.append(f"  {d.model:<14} {d.op:<14} {d.impl:<14} {d.reason}")
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.degrees.items() if v > 1) or "single device"
    mem = plan.memory
    lines += ["", f"mesh: {plan.mesh.world_size} rank(s), {mesh}",
              f"memory: peak {mem.peak_bytes / GIB:.2f} GiB of {mem.capacity_bytes / GIB:.1f} GiB per device at {mem.at}"]
    lines += _stage_memory(plan)
    lines += _placement(plan)
    lines += _offload(plan)
    lines += _block_offload(plan)
    lines += explain_lines(plan.stages)  # sparse attention, step caches (compiler/skip_work.py)
    lines += ["", "stages: " + " -> ".join(s.name for s in plan.stages)]
    lines += _image_path(plan)
    lines += _frames_out(plan)
    params = plan.layer3_user_interface.parameters
    lines += ["", "parameters (telefuser-run):"]
    for name, p in params.items():
        extra = f" choices {p.choices}" if p.choices else ""
        given = "required" if p.required else "optional" if p.type == "path" else f"default {p.default!r}"
        lines.append(f"  --{name.replace('_', '-'):<16} {p.type:<8} {given}{extra}")
    return "\n".join(lines)


def _frames_out(plan: Plan) -> list[str]:
    """The decode (TAEHV's chunks) and frame interpolation (RIFE's multiplier, batch, dtype, ranks, fps)."""
    lines = []
    for s in plan.stages:
        p = s.params
        if s.kind == "vae_decode" and p.get("decoder") == "taehv":
            lines.append(f"  {s.name:<18} {s.kind:<12} {', '.join(s.models)}: TAEHV preview decoder, "
                         f"{p['chunk_frames']} latent frames at a time, untiled")
        if s.kind == "vfi":
            ranks = f", pairs split over {p['parallel_ranks']} ranks" if p.get("parallel_ranks", 1) > 1 else ""
            lines.append(f"  {s.name:<18} {s.kind:<12} {', '.join(s.models)}: RIFE {p['multiplier']}x, "
                         f"{p['input_frames']} -> {p['output_frames']} frames, {p['fps']} fps, {p['batch_size']} "
                         f"pairs per batch in {p['dtype']}, padded to {p['pad_to']}{ranks}")
    return ["", "frames out:", *lines] if lines else []


def _step_list(plan: Plan) -> list[str]:
    """A step-distilled schedule: the listed timesteps, what the DiT is fed, and (MoE) which expert runs each."""
    denoise = next((s for s in plan.stages if s.kind in ("denoise", "hy15_denoise")), None)
    steps = denoise.params.get("denoising_step_list") if denoise is not None else None
    if not steps:
        return []
    fed = step_list_timesteps(steps, denoise.params["sigma_shift"], denoise.params["num_train_timesteps"])
    line = (f"  timesteps {steps}, shift {denoise.params['sigma_shift']} (the distilled model's list) -> DiT "
            f"timesteps {[round(t, 1) for t in fed]}")
    boundary = denoise.params.get("boundary_timestep")
    if boundary is None:
        return [line]
    high, low = (phase["model"] for phase in denoise.params["phases"])
    experts = [high if t >= boundary else low for t in fed]
    return [line, f"  experts per step (t >= {boundary:g}: {high}): {experts}"]


def sr_frame_list(sizes: dict[str, list[int]], shown: int = 6) -> str:
    """The SR stages' `frame_sizes` (base frame "WxH" -> SR frame) as "848x480 -> 1280x720, ..."; past `shown` base
    frames (aspect ratio "auto": every bucket) their count and the largest SR frame."""
    pairs = [f"{base} -> {w}x{h}" for base, (w, h) in sizes.items()]
    if len(pairs) <= shown:
        return ", ".join(pairs)
    w, h = max((tuple(v) for v in sizes.values()), key=lambda s: s[0] * s[1])
    return f"{', '.join(pairs[:shown])}, ... ({len(pairs)} base frames; the largest SR frame {w}x{h})"


def _super_resolution(plan: Plan) -> list[str]:
    """HunyuanVideo-1.5's SR stage: sizes, the low-resolution latent's noise, the SR DiT's own schedule."""
    up = next((s for s in plan.stages if s.kind == "hy15_sr_upsample"), None)
    sr = next((s for s in plan.stages if s.kind == "hy15_sr"), None)
    if up is None or sr is None:
        return []
    p, q = up.params, sr.params
    sizes = sr_frame_list(p["frame_sizes"])
    return [f"super-resolution ({p['version']}): {', '.join(up.models)} upsamples the base latent to the "
            f"{p['target_resolution']} frame ({sizes}), noised by lq_noise_strength {p['lq_noise_strength']}; "
            f"{', '.join(sr.models)}: {q['solver']}, {q['num_inference_steps']} steps, shift {q['sigma_shift']}, cfg "
            f"{q['cfg_scale']}{', MeanFlow' if q.get('meanflow') else ''}"
            f"{'; I2V: the image latent at that size at latent frame 0 + its SigLIP tokens' if q.get('condition') == 'i2v' else ''}"
            "; then decode_vae at that size"]


def _stage_memory(plan: Plan) -> list[str]:
    """The estimated peak of every stage, with its components (largest first)."""
    lines = []
    for s in plan.memory.stages:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(s.components.items(), key=lambda kv: -kv[1]) if v)
        lines.append(f"  {s.stage:<17} peak {s.peak_bytes / GIB:6.2f} GiB  ({parts})")
    return ["memory per stage (estimated peak per device, GiB):", *lines] if lines else []


def _block_offload(plan: Plan) -> list[str]:
    """SEQUENTIAL / ASYNC_CPU_OFFLOAD models (DiTs, text encoders): groups, ring and what stays on the device."""
    if not plan.memory.block_offload:
        return []
    lines = ["block offload (blocks in host memory, streamed into a ring of device buffers group by group):"]
    for b in plan.memory.block_offload:
        streamed = sum(len(g) for g in b.groups)
        copy = (f"{b.prefetch_groups} group(s) copied ahead on a side stream" if b.prefetch_groups
                else "each group copied in before it runs")
        where = "resident for the run" if b.resident_between_uses else \
            "copied in per use (between uses the model is all in host memory)"
        lines.append(f"  {b.model:<14} {b.mode}: {streamed} of {b.num_blocks} blocks streamed in {len(b.groups)} "
                     f"group(s) of {b.blocks_per_group}, ring of {b.groups_resident} x {b.group_bytes / 2**20:.1f} MiB, "
                     f"{copy}; non-block weights and kept blocks {b.resident_bytes / 2**20:.1f} MiB {where}")
    return lines


def _placement(plan: Plan) -> list[str]:
    """Where each model lives (plan.placement), in one line per model."""
    lines = ["", "placement:"]
    for p in plan.placement:
        facts = [p.offload_type, "every rank" if p.ranks == "all" else "each replica's lead",
                 f"runs on the {'CPU' if p.compute_device == 'cpu' else 'device'}",
                 f"read to the {'CPU' if p.load_device == 'cpu' else 'device'}"]
        facts += [name for name, on in (("read to the device for its first use", p.loaded_on_device),
                                        ("pinned", p.pinned), ("FSDP-sharded", p.sharded),
                                        ("tp/sequence parallel", p.parallelized)) if on]
        if p.streamed_blocks:
            facts.append(f"{p.streamed_blocks} blocks streamed")
        if p.prefetched_uses:
            facts.append(f"{p.prefetched_uses} use(s) prefetched")
        lines.append(f"  {p.model:<14} {', '.join(facts)}")
    return lines


def _offload(plan: Plan) -> list[str]:
    """MODEL_CPU_OFFLOAD models: where their host copy lives, and per use whether it is prefetched and why."""
    offloaded = [p.model for p in plan.placement if p.offload_type == WeightOffloadType.MODEL_CPU_OFFLOAD]
    if not offloaded:
        return []

    def host(name: str) -> str:
        if plan.device != "cuda":
            return "host memory (a CPU plan: a second RAM copy while in use)"
        return "pinned host memory" if plan.placement_of(name).pinned else "pageable host memory"

    lines = ["offload (MODEL_CPU_OFFLOAD: loaded once into host memory, copied in for each use, dropped after "
             "without copying back):"]
    lines += [f"  {name:<14} in {host(name)}" for name in offloaded]
    if not plan.memory.prefetch:
        lines.append("  prefetch: none recorded (compiled without weights, or by an older TeleFuser)")
    for d in plan.memory.prefetch:
        during = (f" at {d.during_stage}" if d.during_model is None else f" during {d.during_stage} ({d.during_model})") \
            if d.during_stage and d.peak_bytes else ""
        what = f"{'prefetch' if d.prefetch else 'no prefetch'}{during}: {d.reason}"
        lines.append(f"  {d.model:<14} for {d.stage:<17} {what}")
    return lines


def _image_path(plan: Plan) -> list[str]:
    """Image-to-video: what each stage does with the image, from its recorded parameters."""
    lines = []
    for s in plan.stages:
        p, models = s.params, ", ".join(s.models)
        if s.kind == "image_load":
            frame = "the frame" if not p.get("frame_sizes") else f"the SR frame ({sr_frame_list(p['frame_sizes'])})"
            what = f"--image, {p.get('resample')} resize to cover {frame} and centre crop ({p.get('fit')}), values in {p.get('value_range')}"
            what += f" -> {p['output']}" if p.get("output") else ""
            what += "; without --image the run is text-to-video" if p.get("optional") else ""
        elif s.kind == "hy15_image_encode":
            what = (f"{models}: SigLIP tokens of the {'SR-size ' if p.get('input') == 'sr_image' else ''}fitted image "
                    f"and its VAE latent -> {', '.join(p.get('outputs', []))}")
        elif s.kind == "hy15_denoise" and p.get("condition") == "i2v":
            what = f"{models}: image latent at latent frame 0 behind a mask, SigLIP tokens in both CFG branches"
        elif s.kind == "image_encode":
            what = f"{models}: CLIP tokens ({p.get('features')}) of the fitted image -> {p.get('output')}"
        elif s.kind == "vae_encode" and p.get("condition") == "image_latent":
            what = f"{models}: latent of the image alone (one latent frame, {p.get('spatial_ratio')}x smaller) -> {p.get('output')}"
        elif s.kind == "vae_encode":
            what = (f"{models}: latents of [image, {p.get('num_frames', 1) - 1} zero frames] behind a {p.get('mask_channels')}-channel "
                    f"{p.get('condition')} mask -> {p.get('output')}")
        elif p.get("first_frame"):
            what = (f"{models}: {p['first_frame']} replaces the first latent frame before and after every step; its "
                    "tokens get timestep 0, the others t")
        elif p.get("conditioning"):
            what = f"{models}: gets {', '.join(p['conditioning'])} in both CFG branches, concatenated / cross-attended"
        else:
            continue
        lines.append(f"  {s.name:<17} {s.kind:<13} {what}")
    return ["", "image path:", *lines] if lines else []


IGNORED = {"timestamp", "plan_hash"}


def _walk(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if not path and key in IGNORED:
                continue
            sub = f"{path}.{key}" if path else key
            if key not in a:
                out.append(f"+ {sub} = {json.dumps(b[key], sort_keys=True)}")
            elif key not in b:
                out.append(f"- {sub} = {json.dumps(a[key], sort_keys=True)}")
            else:
                _walk(a[key], b[key], sub, out)
    elif isinstance(a, list) and isinstance(b, list) and all(isinstance(e, dict) and "name" in e for e in a + b):
        _walk({e["name"]: e for e in a}, {e["name"]: e for e in b}, path, out)  # models/stages by name
    elif isinstance(a, list) and isinstance(b, list) and all(isinstance(e, dict) and "op" in e for e in a + b):
        _walk({f"{e['model']}.{e['op']}": e for e in a}, {f"{e['model']}.{e['op']}": e for e in b}, path, out)
    elif isinstance(a, list) and isinstance(b, list) and a + b and all(
            isinstance(e, dict) and "model" in e and "stage" not in e for e in a + b):
        _walk({e["model"]: e for e in a}, {e["model"]: e for e in b}, path, out)  # placement, block_offload by model
    elif a != b:
        out.append(f"~ {path}: {json.dumps(a, sort_keys=True)} -> {json.dumps(b, sort_keys=True)}")


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Semantic differences: by key path, models and stages matched by name, dispatch by model.op."""
    out: list[str] = []
    _walk(a, b, "", out)
    return out
