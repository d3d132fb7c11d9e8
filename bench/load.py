"""Loading a Wan2.1 plan (`--model`: 1.3B, 14B or I2V-14B 480P) against diffusers' / transformers' from_pretrained
of the same weights, same run: in a fresh process per side (cold: what a user of `telefuser-run` pays every time)
and in this process (warm).

Random bf16 weights of the real shapes (bench/weights_random.py: DiT 1.42B / 14B / I2V 14B, VAE, umT5-XXL encoder
5.7B, for I2V the CLIP ViT-H/14 image encoder) are generated on the GPU and written twice, the same tensors: in Wan's
layout (what the plan names: the shipped recipe, `recipes/wan21_t2v_1.3b.toml`, `wan21_t2v_14b.toml` or
`wan21_i2v_14b_480p.toml`, with its model paths set to these files) and in diffusers' / transformers' folders
(config.json + weights for WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel and CLIPVisionModel). Every
file is read once before timing, so both sides load from a warm page cache.

- Cold: for each side, a fresh interpreter imports its libraries and model classes (timed on their own), then
  loads, CUDA context creation included, on both sides: ours `telefuser.load_plan(plan)`, theirs `from_pretrained(torch_dtype=bf16)`
  then `.to("cuda")` for the DiT, the VAE and the umT5 encoder, plus the tokenizer. Each side `--cold-runs` times,
  alternating; the table gives the load (imports excluded on both sides) and the whole process (imports included on
  both sides).
- Warm: in this process (libraries imported, CUDA initialised before timing), ours, theirs `.to("cuda")` and theirs
  `device_map="cuda"`, alternating; our per-phase breakdown is what the loader records (`Pipeline.load_phases`).

Finally the loaded tensors of both sides are compared (every tensor equal). Writes $OUT/load_<model>.md.

GPU: `PYTHONPATH=. python3 bench/load.py --model 1.3b` (then 14b, i2v14b). CPU check of the logic at tiny sizes:
`python bench/load.py --cpu-smoke [--model i2v14b]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import free, sync

BF16 = torch.bfloat16
REPO = Path(__file__).resolve().parents[1]
RECIPES = {"1.3b": "wan21_t2v_1.3b", "14b": "wan21_t2v_14b", "i2v14b": "wan21_i2v_14b_480p"}  # --model
WAN_FILES = {"dit": "diffusion_pytorch_model.safetensors", "vae": "Wan2.1_VAE.safetensors",
             "text_encoder": "models_t5_umt5-xxl-enc-bf16.safetensors", "tokenizer": "tokenizer.json",
             "image_encoder": "models_clip_open-clip-xlm-roberta-large-vit-huge-14.safetensors"}


def configs(model: str, smoke: bool):
    """(DiT, VAE, umT5 (a dict without vocab_size at tiny sizes), CLIP or None) configs of `--model`."""
    import dataclasses

    from telefuser.models.clip.vision import VIT_H_14, ClipVisionConfig
    from telefuser.models.t5.umt5 import UMT5_XXL
    from telefuser.models.wan.dit import WAN21_1_3B, WAN21_14B, WanDiTConfig
    from telefuser.models.wan.vae import WanVAEConfig

    i2v = model == "i2v14b"
    if not smoke:
        dit = {"1.3b": WAN21_1_3B, "14b": WAN21_14B}.get(model) or dataclasses.replace(
            WAN21_14B, model_type="i2v", in_dim=36, image_dim=VIT_H_14.dim)
        return dit, WanVAEConfig(), UMT5_XXL, VIT_H_14 if i2v else None
    from telefuser.models.tiny import TINY_ARCH

    return (WanDiTConfig(**TINY_ARCH["dit_i2v" if i2v else "dit"]), WanVAEConfig(**TINY_ARCH["vae"]),
            dict(TINY_ARCH["text_encoder"]), ClipVisionConfig(**TINY_ARCH["image_encoder"]) if i2v else None)


# ---------------------------------------------------------------------------------------------- weights


def write_weights(root: Path, model: str, smoke: bool, device: str, one_layout: bool) -> None:
    """Wan-layout files in root/wan (not with `one_layout`), diffusers / transformers folders in
    root/{transformer,vae,text_encoder,image_encoder}."""
    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig
    from transformers import UMT5Config as HFConfig

    from bench.weights_random import diffusers_transformer, meta_model, random_state
    from telefuser.models.clip.vision import ClipVisionEncoder
    from telefuser.models.clip.vision_keys import wan_to_hf as clip_to_hf
    from telefuser.models.t5.tokenizer import build_tiny_tokenizer
    from telefuser.models.t5.umt5 import UMT5Config, UMT5Encoder
    from telefuser.models.t5.umt5_keys import wan_to_hf
    from telefuser.models.wan.dit import WanDiT
    from telefuser.models.wan.dit_keys import wan_to_diffusers as dit_to_diffusers
    from telefuser.models.wan.vae import WanVAE
    from telefuser.models.wan.vae_keys import wan_to_diffusers as vae_to_diffusers

    done = root / "done.json"
    if done.is_file():
        return
    start = time.perf_counter()
    dit_cfg, vae_cfg, t5_cfg, clip_cfg = configs(model, smoke)
    wan = root / "wan"
    wan.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(wan / WAN_FILES["tokenizer"])
    if isinstance(t5_cfg, dict):
        from tokenizers import Tokenizer

        t5_cfg = UMT5Config(**dict(t5_cfg, vocab_size=Tokenizer.from_file(str(tok)).get_vocab_size()))

    def t5_to_hf(state):
        hf = wan_to_hf(state)
        hf.pop("encoder.embed_tokens.weight")  # tied to shared.weight, saved once (as save_pretrained does)
        return hf

    models = [
        ("dit", lambda: WanDiT(dit_cfg), "transformer", "diffusion_pytorch_model.safetensors", dit_to_diffusers),
        ("vae", lambda: WanVAE(vae_cfg), "vae", "diffusion_pytorch_model.safetensors", vae_to_diffusers),
        ("text_encoder", lambda: UMT5Encoder(t5_cfg), "text_encoder", "model.safetensors", t5_to_hf),
    ]
    if clip_cfg is not None:
        models.append(("image_encoder", lambda: ClipVisionEncoder(clip_cfg), "image_encoder", "model.safetensors",
                       clip_to_hf))
    for role, make, folder, name, convert in models:
        state = {k: v.cpu() for k, v in random_state(meta_model(make), device).items()}
        if not one_layout:
            save_file(state, wan / WAN_FILES[role])
        (root / folder).mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in convert(state).items()}, root / folder / name)
        del state
    diffusers_transformer(dit_cfg, dit_cfg.image_dim if clip_cfg is not None else None).save_config(root / "transformer")
    if clip_cfg is not None:
        CLIPVisionConfig(hidden_size=clip_cfg.dim, intermediate_size=clip_cfg.mlp_dim,
                         num_attention_heads=clip_cfg.num_heads, num_hidden_layers=clip_cfg.num_layers,
                         image_size=clip_cfg.image_size, patch_size=clip_cfg.patch_size,
                         hidden_act=clip_cfg.activation, layer_norm_eps=clip_cfg.eps,
                         torch_dtype="float16").save_pretrained(root / "image_encoder")
    meta_model(lambda: AutoencoderKLWan(
        base_dim=vae_cfg.base_dim, z_dim=vae_cfg.z_dim, dim_mult=list(vae_cfg.dim_mult),
        num_res_blocks=vae_cfg.num_res_blocks, temperal_downsample=list(vae_cfg.temporal_downsample),
    )).save_config(root / "vae")
    HFConfig(vocab_size=t5_cfg.vocab_size, d_model=t5_cfg.dim, d_kv=t5_cfg.dim_attn // t5_cfg.num_heads,
             d_ff=t5_cfg.dim_ffn, num_layers=t5_cfg.num_layers, num_heads=t5_cfg.num_heads,
             relative_attention_num_buckets=t5_cfg.num_buckets, relative_attention_max_distance=128,
             feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
             torch_dtype="bfloat16").save_pretrained(root / "text_encoder")
    done.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    print(f"weights written in {time.perf_counter() - start:.0f} s")


# --one-layout: our plan reads the diffusers / transformers files too (the compiler detects their key layouts)
THEIR_FILES = {"dit": "transformer/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
               "text_encoder": "text_encoder/model.safetensors", "tokenizer": "wan/tokenizer.json",
               "image_encoder": "image_encoder/model.safetensors"}


def compile_plan(root: Path, model: str, smoke: bool, one_layout: bool) -> Path:
    """The shipped recipe of `--model`, its model paths set to root/wan's files (with `one_layout`, to the diffusers /
    transformers files) (`--set`); smoke: tiny sizes on the CPU."""
    from bench.common import compile_shipped, size_overrides, target_overrides

    dit_cfg, _, t5_cfg, clip_cfg = configs(model, smoke)
    paths = {role: root / THEIR_FILES[role] if one_layout else root / "wan" / name for role, name in WAN_FILES.items()
             if role != "image_encoder" or clip_cfg is not None}
    overrides = target_overrides(smoke)
    if smoke:
        i2v = ', model_type = "i2v"' if clip_cfg is not None else ""
        overrides += [f"layer1.models.dit.arch={{num_heads={dit_cfg.num_heads}{i2v}}}",
                      f"layer1.models.text_encoder.arch={{num_heads={t5_cfg['num_heads']}}}",
                      *size_overrides(9, 64, "144p")]
        if clip_cfg is not None:
            overrides.append(f"layer1.models.image_encoder.arch={{num_heads={clip_cfg.num_heads}}}")
    return compile_shipped(RECIPES[model], root / "plan.json", paths, overrides)


def warm_page_cache(root: Path) -> tuple[int, float]:
    """Read every file once (so both sides load from the page cache); (bytes, seconds)."""
    total, start = 0, time.perf_counter()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
    return total, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- loading


def load_theirs(root: Path, device: str, device_map: bool):
    """diffusers' / transformers' from_pretrained of the models (bf16; the CLIP image encoder float16, as our I2V
    recipe runs it) and the tokenizer; (models, seconds, [(phase, seconds)])."""
    import transformers
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionModel, PreTrainedTokenizerFast, UMT5EncoderModel

    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    rows, models = [], {}
    sync()
    start = time.perf_counter()
    loads = [
        ("transformer", lambda kw: WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=BF16, **kw)),
        ("vae", lambda kw: AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=BF16, **kw)),
        ("text_encoder", lambda kw: UMT5EncoderModel.from_pretrained(root / "text_encoder", **{dtype_kw: BF16}, **kw)),
    ]
    if (root / "image_encoder").is_dir():
        loads.append(("image_encoder", lambda kw: CLIPVisionModel.from_pretrained(
            root / "image_encoder", **{dtype_kw: torch.float16}, **kw)))
    for name, load in loads:
        t0 = time.perf_counter()
        if device_map:
            model = load({"device_map": device})
        else:
            model = load({})
            rows.append((f"{name}: from_pretrained (CPU)", time.perf_counter() - t0))
            t1 = time.perf_counter()
            model = model.to(device)
            sync()
            rows.append((f"{name}: .to({device!r})", time.perf_counter() - t1))
        sync()
        models[name] = model.eval().requires_grad_(False)
    t0 = time.perf_counter()
    models["tokenizer"] = PreTrainedTokenizerFast(tokenizer_file=str(root / "wan" / WAN_FILES["tokenizer"]))
    rows.append(("tokenizer", time.perf_counter() - t0))
    sync()
    return models, time.perf_counter() - start, rows


def load_ours(plan: Path):
    """telefuser.load_plan; (pipeline, seconds, the phases the loader recorded)."""
    import telefuser

    sync()
    start = time.perf_counter()
    pipe = telefuser.load_plan(str(plan))
    sync()
    return pipe, time.perf_counter() - start, pipe.load_phases.rows


# A fresh interpreter per side: imports timed, then the load with CUDA's context created inside it (nothing touches
# CUDA before), the result as one JSON line.
COLD_OURS = """\
import json, sys, time
start = time.perf_counter()
import torch, telefuser, telefuser.runtime.api, telefuser.runtime.pipeline, telefuser.runtime.load.build
from telefuser.models import registry
from telefuser.models.t5 import tokenizer
for name in ("WanDiT", "WanVAE", "UMT5Encoder", "CLIPVision"):  # the model modules (and the ops they import)
    registry.get(name).model_class
imported = time.perf_counter()
profile = None
if len(sys.argv) > 2:  # --profile: where the cold load's time goes, by function (cumulative), to that file
    import cProfile
    profile = cProfile.Profile()
    profile.enable()
pipe = telefuser.load_plan(sys.argv[1])
if torch.cuda.is_available():
    torch.cuda.synchronize()
done = time.perf_counter()
if profile is not None:
    import io, pstats
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(45)
    open(sys.argv[2], "w").write(text.getvalue())
print(json.dumps({"imports": imported - start, "load": done - imported, "phases": pipe.load_phases.rows}))
"""
COLD_THEIRS = """\
import json, sys, time
from pathlib import Path
start = time.perf_counter()
import torch, diffusers, transformers
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import CLIPVisionModel, PreTrainedTokenizerFast, UMT5EncoderModel
from bench.load import load_theirs
imported = time.perf_counter()
_, seconds, rows = load_theirs(Path(sys.argv[1]), sys.argv[2], device_map=False)
done = time.perf_counter()
print(json.dumps({"imports": imported - start, "load": done - imported, "phases": rows}))
"""


def cold(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no message"
        raise RuntimeError(f"cold load failed (exit {proc.returncode}): {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(pipe, theirs) -> str:
    """Every tensor of ours equals theirs (after the key conversion)."""
    from telefuser.models.clip.vision_keys import wan_to_hf as clip_to_hf
    from telefuser.models.t5.umt5_keys import wan_to_hf
    from telefuser.models.wan.dit_keys import wan_to_diffusers as dit_to_diffusers
    from telefuser.models.wan.vae_keys import wan_to_diffusers as vae_to_diffusers

    checked, bad = 0, []
    for ours_name, their_name, convert in (("dit", "transformer", dit_to_diffusers), ("vae", "vae", vae_to_diffusers),
                                           ("text_encoder", "text_encoder", wan_to_hf),
                                           ("image_encoder", "image_encoder", clip_to_hf)):
        if ours_name not in pipe.placements:
            continue
        ours = convert(pipe.placements[ours_name].module.state_dict())
        ref = theirs[their_name].state_dict()
        if not any(k.startswith("vision_model.") for k in ref):  # a bare CLIPVisionModel (transformers >= 5)
            ref = {**ref, **{f"vision_model.{k}": v for k, v in ref.items()}}
        for key, value in ours.items():
            checked += 1
            other = ref.get(key)
            # diffusers keeps some modules in float32: values compared exactly in float32 (bf16 upcasts exactly)
            if other is None or not torch.equal(value.float(), other.to(value.device).float()):
                bad.append(f"{ours_name}.{key}")
    return f"{checked} tensors compared, {len(bad)} differ" + (f" (first: {bad[:3]})" if bad else "")


def environment(device: str) -> str:
    import diffusers
    import safetensors
    import transformers

    parts = [f"PyTorch {torch.__version__}", f"diffusers {diffusers.__version__}",
             f"transformers {transformers.__version__}", f"safetensors {safetensors.__version__}"]
    try:
        import accelerate

        parts.append(f"accelerate {accelerate.__version__}")
    except ImportError:
        parts.append("no accelerate (diffusers then initialises weights randomly)")
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        parts.insert(0, f"{props.name} ({props.total_memory / 2**30:.0f} GiB)")
    parts += [f"Python {platform.python_version()}", f"{os.cpu_count()} CPUs", datetime.date.today().isoformat()]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU (checks the logic)")
    parser.add_argument("--model", choices=sorted(RECIPES), default="1.3b", help="the plan to load (default 1.3b)")
    parser.add_argument("--root", default=os.environ.get("WAN_LOAD_ROOT", "/tmp/wan21_load"))
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh processes per side (alternating)")
    parser.add_argument("--one-layout", action="store_true",
                        help="write the weights once, in diffusers' / transformers' layout, and load our plan from "
                             "the same files (the 14B files twice do not fit a 64 GiB disk)")
    parser.add_argument("--cold-only", action="store_true", help="skip the warm (one-process) rows")
    parser.add_argument("--profile", action="store_true",
                        help="one more cold load of ours under cProfile: $OUT/load_<model>_profile.txt")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    root = Path(f"{args.root}_{args.model}" + ("_smoke" if smoke else ""))
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    write_weights(root, args.model, smoke, device, args.one_layout)
    plan = compile_plan(root, args.model, smoke, args.one_layout)
    nbytes, seconds = warm_page_cache(root)

    emit(f"# Loading the `{RECIPES[args.model]}` plan vs diffusers / transformers from_pretrained (`bench/load.py`)")
    emit()
    emit(f"Measured: {environment(device)}.")
    emit()
    emit(f"Files: {nbytes / 1e9:.2f} GB "
         f"{'in diffusers/transformers layout, read by both sides' if args.one_layout else 'in both layouts'}, read once before timing ({seconds:.1f} s): warm page cache "
         "on both sides.")
    emit()

    # Cold first: this process has not touched CUDA yet (the children create their own contexts either way).
    colds: dict[str, list[dict]] = {"ours": [], "theirs": []}
    for _ in range(args.cold_runs):
        colds["ours"].append(cold(COLD_OURS, str(plan)))
        try:
            colds["theirs"].append(cold(COLD_THEIRS, str(root), device))
        except RuntimeError as exc:  # the peer's failure leaves our numbers standing
            emit(f"- peer cold load failed: {exc}")
    if args.profile:
        cold(COLD_OURS, str(plan), str(out / f"load_{args.model}_profile.txt"))
    emit("## Cold: a fresh process per load (CUDA context and weights read inside the timing on both sides)")
    emit()
    emit("| side | load (imports excluded), best | median | imports | whole process (imports included), best |")
    emit("|---|---|---|---|---|")
    best = {}
    for side, label in (("ours", "TeleFuser load_plan"), ("theirs", "diffusers/transformers from_pretrained(...).to")):
        runs = colds[side]
        if not runs:
            continue
        loads = sorted(r["load"] for r in runs)
        best[side] = loads[0]
        whole = min(r["load"] + r["imports"] for r in runs)
        emit(f"| {label} | {loads[0]:.2f} s | {loads[len(loads) // 2]:.2f} s | "
             f"{min(r['imports'] for r in runs):.2f} s | {whole:.2f} s |")
    if len(best) == 2:
        emit(f"| TeleFuser / peer (best loads) | {best['ours'] / best['theirs']:.2f}x "
             f"(target <= 1.0x: {'met' if best['ours'] <= best['theirs'] else 'MISSED'}) | | | |")
    emit()
    if colds["ours"]:
        fastest = min(colds["ours"], key=lambda r: r["load"])
        emit(f"Phases of the fastest cold `load_plan` ({fastest['load']:.2f} s; the time outside them is the CUDA "
             "context and what runs between phases):")
        emit()
        emit("| phase | seconds |")
        emit("|---|---|")
        for name, sec in fastest["phases"]:
            emit(f"| {name} | {sec:.3f} |")
        emit()

    # Warm: libraries imported and CUDA initialised in this process before timing.
    import diffusers  # noqa: F401
    import telefuser.runtime.pipeline  # noqa: F401

    if device == "cuda":
        torch.zeros(1, device="cuda")
        sync()
    results: list[tuple[str, float, list]] = []
    pipe = theirs = None
    for kind in () if args.cold_only else ("ours", "theirs-to", "theirs-device_map", "ours", "theirs-to", "ours"):
        pipe = theirs = None
        free()
        if kind == "ours":
            pipe, total, rows = load_ours(plan)
            label = "TeleFuser load_plan"
        else:
            dm = kind == "theirs-device_map"
            try:
                theirs, total, rows = load_theirs(root, device, device_map=dm)
            except Exception as exc:  # the peer's failure leaves our numbers standing
                emit(f"- peer load failed: {type(exc).__name__}: {exc}")
                continue
            label = (f"diffusers/transformers from_pretrained(device_map={device!r})" if dm else
                     f"diffusers/transformers from_pretrained(...).to({device!r})")
        results.append((label, total, rows))
    if results:
        emit("## Warm: in one process (libraries imported, CUDA initialised before timing)")
        emit()
        emit("| load | seconds |")
        emit("|---|---|")
        for label, total, _ in results:
            emit(f"| {label} | {total:.2f} |")
        emit()
        for label, total, rows in results[:3]:
            emit(f"Phases of `{label}` ({total:.2f} s):")
            emit()
            emit("| phase | seconds |")
            emit("|---|---|")
            for name, sec in rows:
                emit(f"| {name} | {sec:.3f} |")
            emit()
    try:
        if pipe is None:  # --cold-only
            pipe = load_ours(plan)[0]
        theirs, _, _ = load_theirs(root, device, device_map=False)
        emit(f"Equality of the loaded weights (ours vs theirs): {compare(pipe, theirs)}.")
    except Exception as exc:
        emit(f"Equality not checked: {type(exc).__name__}: {exc}")
    emit(f"Peak host RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB.")
    (out / f"load_{args.model}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
