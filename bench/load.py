"""Loading a Wan2.1-1.3B plan against diffusers' / transformers' from_pretrained of the same weights, same run.

Random bf16 weights of the real shapes (DiT 1.42B, VAE, umT5-XXL encoder 5.7B: ~14.5 GB) are generated on
the GPU and written twice: in Wan's layout (what the plan names) and in diffusers' / transformers' folders
(config.json + diffusion_pytorch_model.safetensors for WanTransformer3DModel and AutoencoderKLWan,
config.json + model.safetensors for UMT5EncoderModel), the same tensors under the converted names. Every
file is read once before timing, so both sides load from a warm page cache. CUDA is initialised and every
library imported before the timed loads (import times are printed on their own). Then, in this process:

- ours: `telefuser.load_plan(plan)` with a per-phase breakdown (plan read + hash, fingerprints, per model
  read_state_dict / instantiate / load_state_dict / to(device), tokenizer), before the loading fix (the
  previous reader, `safe_open(device="cuda")` per tensor, and the VAE built for real; replayed here) and after;
- theirs: `from_pretrained(folder, torch_dtype=bfloat16)` then `.to("cuda")`, and with `device_map="cuda"`,
  for the DiT, the VAE and the umT5 encoder, plus the tokenizer (PreTrainedTokenizerFast of the same file);

in the order ours-before, theirs(.to), theirs(device_map), ours, theirs(.to), ours. Finally the loaded
tensors of both sides are compared (every tensor equal). Writes $OUT/load.md.

GPU: `PYTHONPATH=. python3 bench/load.py`. CPU check of the logic at tiny sizes: `python bench/load.py --cpu-smoke`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

BF16 = torch.bfloat16
RECIPE = """\
name = "wan21_t2v_1.3b_load"
[target]
device = "{device}"
[layer1]
torch_dtype = "bfloat16"
[[layer1.models]]
name = "dit"
role = "dit"
class = "WanDiT"
path = "{root}/wan/diffusion_pytorch_model.safetensors"
arch = {{ num_heads = {heads} }}
[[layer1.models]]
name = "vae"
role = "vae"
class = "WanVAE"
path = "{root}/wan/Wan2.1_VAE.safetensors"
[[layer1.models]]
name = "text_encoder"
role = "text_encoder"
class = "UMT5Encoder"
path = "{root}/wan/models_t5_umt5-xxl-enc-bf16.safetensors"
arch = {{ num_heads = {t5_heads} }}
[[layer1.models]]
name = "tokenizer"
role = "tokenizer"
class = "UMT5Tokenizer"
path = "{root}/wan/tokenizer.json"
[layer2]
num_inference_steps = 4
num_frames = {frames}
text_len = {text_len}
[layer3.resolution]
default = "{res}"
choices = ["{res}"]
"""


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def configs(smoke: bool):
    from telefuser.models.t5.umt5 import UMT5_XXL, UMT5Config
    from telefuser.models.wan.dit import WAN21_1_3B, WanDiTConfig
    from telefuser.models.wan.vae import WanVAEConfig

    if not smoke:
        return WAN21_1_3B, WanVAEConfig(), UMT5_XXL
    from telefuser.models.tiny import TINY_ARCH

    t5 = dict(TINY_ARCH["text_encoder"], vocab_size=None)
    return (WanDiTConfig(**TINY_ARCH["dit"]), WanVAEConfig(**TINY_ARCH["vae"]), t5)


# ---------------------------------------------------------------------------------------------- weights


def random_state(model: torch.nn.Module, device: str) -> dict[str, torch.Tensor]:
    """The model's persistent tensors, random (norm gains 1), bf16, on the CPU (for save_file)."""
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, t in model.state_dict().items():
        v = torch.empty(t.shape, dtype=BF16, device=device)
        v.fill_(1.0) if ("norm" in name or name.endswith("gamma")) else v.normal_(0, 0.02, generator=gen)
        out[name] = v.cpu()
    return out


def write_weights(root: Path, smoke: bool, device: str) -> None:
    """Wan-layout files in root/wan, diffusers / transformers folders in root/{transformer,vae,text_encoder}."""
    from safetensors.torch import save_file

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
    dit_cfg, vae_cfg, t5_cfg = configs(smoke)
    (root / "wan").mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(root / "wan" / "tokenizer.json")
    if isinstance(t5_cfg, dict):
        from tokenizers import Tokenizer

        t5_cfg = UMT5Config(**dict(t5_cfg, vocab_size=Tokenizer.from_file(str(tok)).get_vocab_size()))
    with torch.device("meta"):
        dit, vae, t5 = WanDiT(dit_cfg), WanVAE(vae_cfg), UMT5Encoder(t5_cfg)

    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config as HFConfig

    for sub in ("transformer", "vae", "text_encoder"):
        (root / sub).mkdir(exist_ok=True)
    state = random_state(dit, device)
    save_file(state, root / "wan" / "diffusion_pytorch_model.safetensors")
    save_file(dit_to_diffusers(state), root / "transformer" / "diffusion_pytorch_model.safetensors")
    with torch.device("meta"):
        ref = WanTransformer3DModel(
            patch_size=tuple(dit_cfg.patch_size), num_attention_heads=dit_cfg.num_heads,
            attention_head_dim=dit_cfg.head_dim, in_channels=dit_cfg.in_dim, out_channels=dit_cfg.out_dim,
            text_dim=dit_cfg.text_dim, freq_dim=dit_cfg.freq_dim, ffn_dim=dit_cfg.ffn_dim,
            num_layers=dit_cfg.num_layers, cross_attn_norm=dit_cfg.cross_attn_norm,
            qk_norm="rms_norm_across_heads", eps=dit_cfg.eps)
    ref.save_config(root / "transformer")
    del state, ref
    state = random_state(vae, device)
    save_file(state, root / "wan" / "Wan2.1_VAE.safetensors")
    save_file(vae_to_diffusers(state), root / "vae" / "diffusion_pytorch_model.safetensors")
    with torch.device("meta"):
        ref = AutoencoderKLWan(base_dim=vae_cfg.base_dim, z_dim=vae_cfg.z_dim, dim_mult=list(vae_cfg.dim_mult),
                               num_res_blocks=vae_cfg.num_res_blocks,
                               temperal_downsample=list(vae_cfg.temporal_downsample))
    ref.save_config(root / "vae")
    del state, ref
    state = random_state(t5, device)
    save_file(state, root / "wan" / "models_t5_umt5-xxl-enc-bf16.safetensors")
    hf = wan_to_hf(state)
    hf.pop("encoder.embed_tokens.weight")  # tied to shared.weight, saved once (as save_pretrained does)
    save_file(hf, root / "text_encoder" / "model.safetensors")
    HFConfig(vocab_size=t5_cfg.vocab_size, d_model=t5_cfg.dim, d_kv=t5_cfg.dim_attn // t5_cfg.num_heads,
             d_ff=t5_cfg.dim_ffn, num_layers=t5_cfg.num_layers, num_heads=t5_cfg.num_heads,
             relative_attention_num_buckets=t5_cfg.num_buckets, relative_attention_max_distance=128,
             feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
             torch_dtype="bfloat16").save_pretrained(root / "text_encoder")
    del state, hf
    done.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    print(f"weights written in {time.perf_counter() - start:.0f} s")


def warm_page_cache(root: Path) -> tuple[int, float]:
    """Read every file once (so both sides load from the page cache); (bytes, seconds)."""
    total, start = 0, time.perf_counter()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
    return total, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- ours


class Phases:
    """Wall time of the loader's phases, by wrapping its functions for the duration of one load."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []
        self.model = ""

    def wrap(self, owner, attr: str, label: str, per_model: bool = True):
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync()
                self.rows.append((f"{self.model}: {label}" if per_model else label, time.perf_counter() - start))

        setattr(owner, attr, timed)
        return owner, attr, original

    @contextlib.contextmanager
    def installed(self):
        import telefuser.runtime.api as api
        import telefuser.runtime.load.build as loading
        import telefuser.runtime.pipeline as pipeline
        import telefuser.runtime.plan_io as plan_io

        phases = self
        build = loading.build_model

        def build_model(planned, *args, **kwargs):
            phases.model = planned.name
            return build(planned, *args, **kwargs)

        saved = [(loading, "build_model", build)]
        loading.build_model = build_model
        saved.append(self.wrap(api, "read_plan", "read plan", per_model=False))
        saved.append(self.wrap(api, "check_plan_hash", "plan hash", per_model=False))
        saved.append(self.wrap(plan_io, "check_fingerprints", "weight fingerprints (headers)", per_model=False))
        saved.append(self.wrap(loading, "read_state_dict", "read_state_dict"))
        saved.append(self.wrap(loading, "_instantiate", "instantiate"))
        saved.append(self.wrap(torch.nn.Module, "load_state_dict", "load_state_dict"))
        saved.append(self.wrap(torch.nn.Module, "to", "to(device, dtype)"))
        saved.append(self.wrap(pipeline, "_load_tokenizer", "tokenizer", per_model=False))
        try:
            yield self
        finally:
            for owner, attr, original in reversed(saved):
                setattr(owner, attr, original)


@contextlib.contextmanager
def previous_loader():
    """The loader before this fix: safe_open(device=...) per tensor (a synchronous pageable copy each) and
    models with derived buffers (the VAE) built for real on the device. Replayed for the before/after."""
    import telefuser.runtime.load.build as loading
    import telefuser.runtime.load.weights as weights
    from safetensors import safe_open

    def read(path, device, dtype):
        out = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                out[key] = weights._cast(f.get_tensor(key), dtype)
        return out

    def instantiate(entry, planned, device):
        config = entry.config_class(**planned.arch)
        with torch.device("meta"):
            model = entry.model_class(config)
        persistent = model.state_dict().keys()
        if any(name not in persistent for name, _ in model.named_buffers()):
            with torch.device(device):
                model = entry.model_class(config)
        return model

    saved = (weights._read_safetensors, loading._instantiate)
    weights._read_safetensors, loading._instantiate = read, instantiate
    try:
        yield
    finally:
        weights._read_safetensors, loading._instantiate = saved


def load_ours(plan: Path, before: bool):
    import telefuser

    sync()
    with (previous_loader() if before else contextlib.nullcontext()), Phases().installed() as phases:
        start = time.perf_counter()
        pipe = telefuser.load_plan(str(plan))
        sync()
        total = time.perf_counter() - start
    return pipe, total, phases.rows


def reader_variants(path: Path) -> str:
    """read_state_dict of one file to the GPU by each reader and staging setting (best of 2)."""
    import safetensors.torch
    import telefuser.runtime.load.weights as weights

    size = path.stat().st_size
    variants = [("safe_open(device='cuda') per tensor (before)", "before", None),
                ("safetensors.torch.load_file(device='cuda')", "load_file", None)]
    variants += [(f"staged: {slots} x {mb} MiB pinned", "staged", (slots, mb)) for slots, mb in
                 ((8, 32), (16, 16), (16, 32), (16, 64))]
    rows = ["", f"Reader variants, {path.name} ({size / 1e9:.2f} GB) to the GPU, best of 2:", "",
            "| reader | seconds | GB/s |", "|---|---|---|"]
    saved = (weights.STAGE_SLOTS, weights.STAGE_BYTES)
    for label, kind, stage in variants:
        best = float("inf")
        for _ in range(2):
            gc.collect()
            torch.cuda.empty_cache()
            sync()
            start = time.perf_counter()
            if kind == "before":
                with previous_loader():
                    state = weights.read_state_dict([path], "cuda", BF16)
            elif kind == "load_file":
                state = safetensors.torch.load_file(str(path), device="cuda")
            else:
                weights.STAGE_SLOTS, weights.STAGE_BYTES = stage[0], stage[1] << 20
                try:
                    state = weights.read_state_dict([path], "cuda", BF16)
                finally:
                    weights.STAGE_SLOTS, weights.STAGE_BYTES = saved
            sync()
            best = min(best, time.perf_counter() - start)
            del state
        rows.append(f"| {label} | {best:.2f} | {size / best / 1e9:.1f} |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------------- theirs


def load_theirs(root: Path, device: str, device_map: bool):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    import transformers
    from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    rows, models = [], {}
    sync()
    start = time.perf_counter()
    for name, load in (
        ("transformer", lambda kw: WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=BF16, **kw)),
        ("vae", lambda kw: AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=BF16, **kw)),
        ("text_encoder", lambda kw: UMT5EncoderModel.from_pretrained(root / "text_encoder", **{dtype_kw: BF16}, **kw)),
    ):
        t0 = time.perf_counter()
        if device_map:
            model = load({"device_map": device})
        else:
            model = load({})
            sync()
            rows.append((f"{name}: from_pretrained (CPU)", time.perf_counter() - t0))
            t1 = time.perf_counter()
            model = model.to(device)
            sync()
            rows.append((f"{name}: .to({device!r})", time.perf_counter() - t1))
        sync()
        rows.append((f"{name}: total", time.perf_counter() - t0))
        models[name] = model.eval().requires_grad_(False)
    t0 = time.perf_counter()
    models["tokenizer"] = PreTrainedTokenizerFast(tokenizer_file=str(root / "wan" / "tokenizer.json"))
    rows.append(("tokenizer", time.perf_counter() - t0))
    sync()
    return models, time.perf_counter() - start, rows


def compare(pipe, theirs) -> str:
    """Every tensor of ours equals theirs (after the key conversion); the VAE's too."""
    from telefuser.models.t5.umt5_keys import wan_to_hf
    from telefuser.models.wan.dit_keys import wan_to_diffusers as dit_to_diffusers
    from telefuser.models.wan.vae_keys import wan_to_diffusers as vae_to_diffusers

    checked, bad = 0, []
    for ours_name, their_name, convert in (("dit", "transformer", dit_to_diffusers), ("vae", "vae", vae_to_diffusers),
                                           ("text_encoder", "text_encoder", wan_to_hf)):
        ours = convert(pipe.placements[ours_name].module.state_dict())
        ref = theirs[their_name].state_dict()
        for key, value in ours.items():
            checked += 1
            other = ref.get(key)
            # diffusers keeps some modules in float32: values compared exactly in float32 (bf16 upcasts exactly)
            if other is None or not torch.equal(value.float(), other.to(value.device).float()):
                bad.append(f"{ours_name}.{key}")
    return f"{checked} tensors compared, {len(bad)} differ" + (f" (first: {bad[:3]})" if bad else "")


# ---------------------------------------------------------------------------------------------- main


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU (checks the logic)")
    parser.add_argument("--root", default=os.environ.get("WAN_LOAD_ROOT", "/tmp/wan21_load"))
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    root = Path(args.root + ("_smoke" if smoke else ""))
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    t0 = time.perf_counter()
    import telefuser.runtime.pipeline  # noqa: F401  (the loader's imports)
    import telefuser.models.wan.dit, telefuser.models.wan.vae, telefuser.models.t5.umt5  # noqa: E401,F401
    t_ours_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    import diffusers  # noqa: F401
    from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: F401
    from transformers import UMT5EncoderModel  # noqa: F401
    t_theirs_import = time.perf_counter() - t0
    if device == "cuda":
        torch.zeros(1, device="cuda")  # CUDA context outside every timing
        sync()

    write_weights(root, smoke, device)
    from telefuser.cli.compile import main as compile_main

    dit_cfg, _, t5_cfg = configs(smoke)
    recipe = root / "recipe.toml"
    recipe.write_text(RECIPE.format(
        device="cpu" if smoke else "auto", root=root, heads=dit_cfg.num_heads,
        t5_heads=t5_cfg["num_heads"] if isinstance(t5_cfg, dict) else t5_cfg.num_heads,
        frames=9 if smoke else 81, text_len=64 if smoke else 512, res="144p" if smoke else "480p"))
    plan = root / "plan.json"
    assert compile_main([str(recipe), "-o", str(plan)]) == 0
    nbytes, seconds = warm_page_cache(root)

    emit("# Loading a Wan2.1-1.3B plan vs diffusers / transformers from_pretrained (`bench/load.py`)")
    emit()
    emit(f"Measured: {environment(device)}.")
    emit()
    emit(f"Files: {nbytes / 1e9:.2f} GB in both layouts, read once before timing ({seconds:.1f} s): "
         "warm page cache on both sides. CUDA initialised and libraries imported before timing "
         f"(imports: telefuser {t_ours_import:.2f} s, diffusers + transformers {t_theirs_import:.2f} s).")
    emit()

    results: list[tuple[str, float, list]] = []
    pipe = theirs = None
    for kind in ("ours-before", "theirs-to", "theirs-device_map", "ours", "theirs-to", "ours"):
        pipe = theirs = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        if kind.startswith("ours"):
            pipe, total, rows = load_ours(plan, before=kind == "ours-before")
            label = ("TeleFuser load_plan, before the fix (safe_open(device) per tensor, VAE built for real)"
                     if kind == "ours-before" else "TeleFuser load_plan")
        else:
            dm = kind == "theirs-device_map"
            try:
                theirs, total, rows = load_theirs(root, device, device_map=dm)
            except Exception as exc:  # the peer's failure leaves our numbers standing
                emit(f"- peer load failed: {type(exc).__name__}: {exc}")
                continue
            label = ("diffusers/transformers from_pretrained(device_map=%r)" % device if dm else
                     "diffusers/transformers from_pretrained(...).to(%r)" % device)
        emit(f"- {label}: {total:.2f} s")
        results.append((label, total, rows))

    emit()
    emit("| load | seconds |")
    emit("|---|---|")
    for label, total, _ in results:
        emit(f"| {label} | {total:.2f} |")
    ours_best = min(t for label, t, _ in results if label == "TeleFuser load_plan")
    theirs_best = min((t for label, t, _ in results if "from_pretrained" in label), default=float("nan"))
    emit(f"| best TeleFuser / best peer | {ours_best / theirs_best:.2f}x "
         f"(target <= 1.0x: {'met' if ours_best <= theirs_best else 'MISSED'}) |")
    emit()
    for label, total, rows in results:
        emit(f"Phases of `{label}` ({total:.2f} s):")
        emit()
        emit("| phase | seconds |")
        emit("|---|---|")
        for name, sec in rows:
            emit(f"| {name} | {sec:.3f} |")
        emit()
    if device == "cuda":
        emit(reader_variants(root / "wan" / "models_t5_umt5-xxl-enc-bf16.safetensors"))
    try:
        theirs, _, _ = load_theirs(root, device, device_map=False)
        emit(f"Equality of the loaded weights (ours vs theirs): {compare(pipe, theirs)}.")
    except Exception as exc:
        emit(f"Equality not checked: {type(exc).__name__}: {exc}")
    emit(f"Peak host RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB.")
    (out / "load.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
