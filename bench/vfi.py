"""Frame interpolation and the fast preview decoder on one GPU (issue 19), beside peers in the same call.

RIFE 2x on 81 frames of 832x480 and of 1280x720 (uint8 [F, H, W, 3] already on the GPU, as the VAE decode leaves
them; 161 frames out): our `interpolate` with float32 and with bf16 convolutions at a few batch sizes, beside
ccvfi 0.0.3's RIFE run as its RIFEModel.inference runs it (one pair at a time, bilinear resize to a multiple of
64 and back, float32 and its fp16 mode), on the same weights. ccvfi's network is RIFE v4.26 "heavy" (16 head
channels), so the side-by-side rows use random weights of that shape (ccvfi's own initialisation, seed 0), loaded
into both; our v4.26 (LightX2V's, 4 head channels) rows use random weights of the published shapes. Per row:
seconds, output frames per second, peak memory (max_memory_allocated, reset per row), and the max abs difference
of its uint8 frames from our float32 row on the same weights (ccvfi resizes where we pad, and truncates to uint8
where we round: both move border and rounding values).

TAEHV decode of the 480p 81-frame latent [1, 16, 21, 60, 104] (bf16; all at once and in chunks of 4 latents)
beside WanVAE.decode of the same latent (bf16, untiled and tiled 32/24), random weights of the published shapes.

GPU: `PYTHONPATH=. python3 bench/vfi.py` (needs ccvfi 0.0.3 importable, e.g. `pip install --no-deps` of its
wheel; its rows are skipped otherwise); RIFE_FLOWNET=/path/to/flownet.pkl runs the v4.26 rows on the published
weights (the bf16 error worth quoting). CPU check of the logic at tiny sizes: `--cpu-smoke`.
Writes $OUT/vfi.md (the table for docs/benchmarks.md) and $OUT/vfi.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ccvfi_peer import SUPPORTED, ccvfi_version, load_ccvfi  # noqa: E402

from telefuser.models.rife.ifnet import IFNet, IFNetConfig, load_flownet  # noqa: E402
from telefuser.models.rife.interpolate import interpolate  # noqa: E402
from telefuser.models.taehv.decoder import TAEHV, TAEHVConfig  # noqa: E402
from telefuser.models.tiny_vfi import TINY_RIFE, TINY_TAEW2_1, tiny_flownet_state  # noqa: E402
from telefuser.models.wan.vae import WanVAE, WanVAEConfig  # noqa: E402

BF16 = torch.bfloat16
V426 = {"head_channels": 4, "block_channels": [192, 128, 96, 64, 32], "num_res_convs": 8, "feature_channels": 8,
        "scales": [16, 8, 4, 2, 1]}
HEAVY = {**V426, "head_channels": 16}
ROWS: list[dict] = []
COMPILE = {"on": False}  # --compile
PROFILE = {"on": False}  # --profile


def environment(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return (f"{where}, PyTorch {torch.__version__}, CUDA {torch.version.cuda}, ccvfi {ccvfi_version()}, "
            f"Python {platform.python_version()}, {datetime.date.today().isoformat()}")


def timed(fn, device: torch.device, runs: int = 2):
    """(result of the last run, median seconds over `runs` after one warm-up, peak bytes)."""
    fn()
    times, result = [], None
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return result, sorted(times)[len(times) // 2], peak


def video(n: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """uint8 [n, h, w, 3]: a smooth random picture panning 4 px a frame (the flows have something to find)."""
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(1, 3, h // 16 + 1, (w + 4 * n) // 16 + 1, generator=g),
                         size=(h, w + 4 * n), mode="bicubic", align_corners=False).clamp(0, 1)
    frames = torch.stack([base[0, :, :, 4 * i:4 * i + w] for i in range(n)])
    return (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().to(device)


def row(part: str, label: str, seconds: float, frames: int, peak: int, diff: int | None) -> None:
    ROWS.append({"part": part, "label": label, "seconds": seconds, "fps": frames / seconds if seconds else 0.0,
                 "peak_gib": peak / 2**30, "max_abs_diff_uint8": diff})
    print(f"{part:10s} {label:44s} {seconds:8.3f} s {frames / seconds:9.1f} f/s {peak / 2**30:6.2f} GiB"
          f"  diff {diff}", flush=True)


def ours(part: str, arch_name: str, model: IFNet, frames: torch.Tensor, batches: list[int], device) -> torch.Tensor:
    reference = None
    for dtype in (torch.float32, BF16):
        m = model.to(dtype)
        for bs in batches:
            out, s, peak = timed(lambda: interpolate(frames, m, 2, batch_size=bs), device)
            reference = out if reference is None else reference
            diff = int((out.int() - reference.int()).abs().max())
            row(part, f"TeleFuser {arch_name} {str(dtype)[6:]} batch {bs}", s, out.shape[0], peak, diff)
    m = model.to(dtype=BF16, memory_format=torch.channels_last)  # NHWC convolutions (cuDNN's fast bf16 path)
    for pad_to in (128, 64):  # 64: vs-rife's padding for 4.26, ccvfi's multiple (832 px wide stays 832)
        out, s, peak = timed(lambda: interpolate(frames, m, 2, batch_size=batches[-1], pad_to=pad_to), device)
        diff = int((out.int() - reference.int()).abs().max())
        row(part, f"TeleFuser {arch_name} bfloat16 channels_last batch {batches[-1]} pad {pad_to}", s,
            out.shape[0], peak, diff)
    if PROFILE["on"] and arch_name == "v4.26-heavy":  # where the time goes: kernels by total device time
        from torch.profiler import ProfilerActivity, profile

        m = model.to(dtype=BF16)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            interpolate(frames, m, 2, batch_size=batches[-1])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=30)
        out_dir = Path(os.environ.get("OUT", "bench_out"))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"vfi_profile_{part.split()[-1]}.txt").write_text(table)
        print(table, flush=True)
    if COMPILE["on"]:  # inductor fuses the full-size float32 resizes, warps and activations between the convolutions
        m = model.to(dtype=BF16, memory_format=torch.contiguous_format)
        compiled = torch.compile(m)
        start = time.perf_counter()
        interpolate(frames, compiled, 2, batch_size=batches[-1])
        print(f"torch.compile of {arch_name}: first call {time.perf_counter() - start:.1f} s", flush=True)
        out, s, peak = timed(lambda: interpolate(frames, compiled, 2, batch_size=batches[-1]), device)
        diff = int((out.int() - reference.int()).abs().max())
        row(part, f"TeleFuser {arch_name} bfloat16 torch.compile batch {batches[-1]}", s, out.shape[0], peak, diff)
    model.to(dtype=torch.float32, memory_format=torch.contiguous_format)
    return reference


def ccvfi_interpolate(net, resize, de_resize, frames: torch.Tensor, half: bool, pad: bool = False) -> torch.Tensor:
    """2x as ccvfi's RIFEModel.inference does it, pair by pair (originals copied), into one output. `pad`: our
    zero pad to 128 / crop and rounding instead of its resize and truncation (the network alone compared)."""
    n = frames.shape[0]
    out = torch.empty((2 * n - 1, *frames.shape[1:]), dtype=torch.uint8, device=frames.device)
    out[::2] = frames
    dtype = torch.float16 if half else torch.float32
    h, w = frames.shape[1:3]
    with torch.inference_mode():
        for i in range(n - 1):
            i0 = frames[i].permute(2, 0, 1)[None].to(dtype) / 255
            i1 = frames[i + 1].permute(2, 0, 1)[None].to(dtype) / 255
            if pad:
                padding = (0, (-w) % 128, 0, (-h) % 128)
                y = net(torch.cat([F.pad(i0, padding), F.pad(i1, padding)], 1), 0.5, [16, 8, 4, 2, 1])
                y = (y[0, :, :h, :w].float().clamp(0, 1) * 255).round()
            else:
                y = net(torch.cat([resize(i0, 1.0), resize(i1, 1.0)], 1), 0.5, [16, 8, 4, 2, 1])
                y = (de_resize(y, h, w)[0].float() * 255).clamp(0, 255)
            out[2 * i + 1] = y.to(torch.uint8).permute(1, 2, 0)
    return out


def rife(device: torch.device, sizes: dict[str, tuple[int, int]], n: int, batches: list[int], smoke: bool) -> None:
    torch.manual_seed(0)
    if os.environ.get("RIFE_FLOWNET"):  # the published flownet.pkl, for bf16's error on the real weights
        v426, v426_name = load_flownet(os.environ["RIFE_FLOWNET"], device), "v4.26 (published weights)"
    else:
        arch = TINY_RIFE if smoke else V426
        v426, v426_name = IFNet(IFNetConfig(**arch)), "v4.26 (random weights)"
        v426.load_state_dict({k[len("module."):]: v for k, v in tiny_flownet_state(arch).items()})
        v426 = v426.to(device).eval()
    peer = None
    if ccvfi_version() == SUPPORTED:
        peer = load_ccvfi()
        torch.manual_seed(0)
        theirs = peer["IFNet"]().eval()
        heavy = IFNet(IFNetConfig(**HEAVY))
        heavy.load_state_dict(theirs.state_dict())
        theirs, heavy = theirs.to(device), heavy.to(device).eval()
    else:
        print(f"ccvfi {ccvfi_version()} is not {SUPPORTED}: its rows are skipped", flush=True)
    for name, (h, w) in sizes.items():
        frames = video(n, h, w, device)
        part = f"RIFE {name}"
        ours(part, v426_name, v426, frames, batches, device)
        if peer is None:
            continue
        reference = ours(part, "v4.26-heavy", heavy, frames, batches, device)
        for half, pad in ((False, False), (True, False), (False, True)):
            net = theirs.half() if half else theirs.float()
            out, s, peak = timed(lambda: ccvfi_interpolate(net, peer["resize"], peer["de_resize"], frames, half,
                                                           pad), device)
            diff = int((out.int() - reference.int()).abs().max())
            how = " (our pad and rounding)" if pad else ""
            row(part, f"ccvfi {SUPPORTED} v4.26-heavy {'fp16' if half else 'float32'} batch 1{how}", s,
                out.shape[0], peak, diff)
        theirs.float()
        del frames


def decoders(device: torch.device, latent: tuple[int, ...], smoke: bool) -> None:
    torch.manual_seed(0)
    z = torch.randn(latent, device=device, dtype=BF16)
    taehv = TAEHV(TAEHVConfig(**TINY_TAEW2_1) if smoke else TAEHVConfig()).to(device, BF16).eval()
    vae_cfg = WanVAEConfig(base_dim=4, num_res_blocks=1) if smoke else WanVAEConfig()
    vae = WanVAE(vae_cfg).to(device, BF16).eval()
    part = "decode"
    frames = taehv.num_frames(latent[2])
    for chunk in (None, 4):
        _, s, peak = timed(lambda: taehv.decode(z, chunk_frames=chunk), device)
        row(part, f"TAEHV (taew2_1 shapes) bf16 chunk {chunk or 'all'}", s, frames, peak, None)
    with torch.no_grad():
        for tiled in (False, True):
            _, s, peak = timed(lambda: vae.decode(z, tiled=tiled), device, runs=1)
            row(part, f"WanVAE bf16 {'tiled 32/24' if tiled else 'untiled'}", s, frames, peak, None)


def table(env: str) -> str:
    lines = [f"Measured on {env}.", "",
             "| part | run | seconds | frames/s | peak GiB | max abs diff (uint8) |", "|---|---|---|---|---|---|"]
    for r in ROWS:
        diff = "" if r["max_abs_diff_uint8"] is None else str(r["max_abs_diff_uint8"])
        lines.append(f"| {r['part']} | {r['label']} | {r['seconds']:.3f} | {r['fps']:.1f} | {r['peak_gib']:.2f} "
                     f"| {diff} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes and weights on the CPU")
    parser.add_argument("--sizes", default="480p,720p", help="RIFE sizes, of 480p,720p (default both)")
    parser.add_argument("--compile", action="store_true", help="also a torch.compile'd bf16 row per network and size")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler of the heavy net's bf16 interpolation per size: $OUT/vfi_profile_<size>.txt")
    parser.add_argument("--no-decode", action="store_true", help="skip the TAEHV / Wan VAE decode rows")
    args = parser.parse_args(argv)
    COMPILE["on"] = args.compile
    PROFILE["on"] = args.profile
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    torch.backends.cudnn.benchmark = True
    if smoke:
        rife(device, {"smoke": (40, 72)}, 4, [2], smoke)
        decoders(device, (1, 16, 3, 4, 6), smoke)
    else:
        sizes = {"480p": (480, 832), "720p": (720, 1280)}
        rife(device, {k: sizes[k] for k in args.sizes.split(",")}, 81, [8, 16], smoke)
        if not args.no_decode:
            decoders(device, (1, 16, 21, 60, 104), smoke)
    env = environment(device)
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vfi.json").write_text(json.dumps({"environment": env, "rows": ROWS}, indent=1))
    text = table(env)
    (out / "vfi.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
