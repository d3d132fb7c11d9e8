"""Wan2.1-1.3B on one GPU: TeleFuser's DiT step and VAE decode against diffusers', same weights, same run.

Full-size random bf16 weights generated on the GPU in Wan's layout (converted
for diffusers), 480p 16:9, 81 frames: latent [1, 16, 21, 60, 104] = 32760
tokens, text context [1, 512, 4096]. A denoising step with CFG is one forward
at batch 2 (conditional + unconditional), as both pipelines run it.
Run on the device: `PYTHONPATH=. python3 bench/wan21.py`; writes $OUT/wan21.md.
"""

from __future__ import annotations

import gc

import torch

from bench.common import bf16_matmul_tflops, environment, out_dir, wall_ms
from telefuser.models.wan.dit import WAN21_1_3B, WanDiT
from telefuser.models.wan.dit_keys import wan_to_diffusers
from telefuser.models.wan.vae import WanVAE, WanVAEConfig
from telefuser.models.wan.vae_keys import wan_to_diffusers as vae_to_diffusers
from telefuser.ops.dispatch import use_dispatch

BF16 = torch.bfloat16
LATENT = (2, 16, 21, 60, 104)
TEXT_LEN = 512
KERNELS = {"attention": "TORCH_SDPA", **{op: "triton" for op in
                                          ("rms_norm", "layer_norm", "norm_modulate", "modulate", "rotary", "gated_add")}}


def dit_flops(batch: int, tokens: int, cfg=WAN21_1_3B) -> float:
    d, f, L = cfg.dim, cfg.ffn_dim, cfg.num_layers
    per_token = (8 * d * d          # self-attention q, k, v, o
                 + 4 * d * d        # cross-attention q, o
                 + 4 * d * f        # FFN up and down
                 + 4 * tokens * d   # self-attention QK^T and PV
                 + 4 * TEXT_LEN * d)  # cross-attention QK^T and PV
    context = 4 * TEXT_LEN * d * d  # cross-attention k, v over the text tokens
    return batch * L * (tokens * per_token + context)


def random_state(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)


def peak_of(fn) -> tuple[float, float]:
    """(median ms, peak GiB allocated) of fn."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ms = wall_ms(fn)
    return ms, torch.cuda.max_memory_allocated() / 2**30


def bench_dit(peak_tflops: float) -> list[str]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ours = WanDiT(WAN21_1_3B).to("cuda", BF16).eval().requires_grad_(False)
    random_state(ours)
    x = torch.randn(LATENT, device="cuda", dtype=BF16)
    t = torch.tensor([900.0, 900.0], device="cuda")
    context = torch.randn(2, TEXT_LEN, 4096, device="cuda", dtype=BF16)
    tokens = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    flops = dit_flops(2, tokens)
    rows = []
    with torch.inference_mode(), use_dispatch(KERNELS):
        ms, mem = peak_of(lambda: ours(x, t, context))
        out_ours = ours(x, t, context).float()
    rows.append(("TeleFuser WanDiT (eager, Triton kernels, SDPA)", ms, mem))
    # The plan's compile option: each block through torch.compile (Inductor fuses the native ops;
    # attention stays outside the graph).
    for block in ours.blocks:
        block.compile()
    with torch.inference_mode(), use_dispatch({"attention": "TORCH_SDPA"}):
        ours(x, t, context)  # compile
        ms_c, mem_c = peak_of(lambda: ours(x, t, context))
    compiled_row = ("TeleFuser WanDiT (blocks torch.compile'd, SDPA)", ms_c, mem_c)
    state = wan_to_diffusers(ours.state_dict())
    del ours
    gc.collect()
    cfg = WAN21_1_3B
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=cfg.ffn_dim,
                                num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    ref.load_state_dict(state)
    del state
    ref = ref.to("cuda", BF16).eval().requires_grad_(False)
    with torch.inference_mode():
        ms_ref, mem_ref = peak_of(lambda: ref(x, t, context, return_dict=False))
        out_ref = ref(x, t, context, return_dict=False)[0].float()
    rows.append(("diffusers WanTransformer3DModel (eager, SDPA)", ms_ref, mem_ref))
    rows.insert(1, compiled_row)
    err = ((out_ours - out_ref).norm() / out_ref.norm()).item()
    del ref
    gc.collect()
    lines = []
    for name, ms, mem in rows:
        tf = flops / ms / 1e9
        lines.append(f"| {name} | {ms:.0f} | {tf:.0f} ({tf / peak_tflops:.0%}) | {mem:.1f} |")
    best = min(rows[:2], key=lambda r: r[1])[1]
    ratio = best / rows[2][1]
    mfu = flops / best / 1e9 / peak_tflops
    lines.append(f"| ratio best TeleFuser / diffusers | {ratio:.2f}x (target <= 0.75x: {'met' if ratio <= 0.75 else 'MISSED'}) | "
                 f"MFU {mfu:.0%} (target >= 50%: {'met' if mfu >= 0.5 else 'MISSED'}) | |")
    lines.append(f"| relative error TeleFuser vs diffusers output (bf16) | {err:.2e} | | |")
    return lines


def bench_vae() -> list[str]:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ours = WanVAE(WanVAEConfig()).to("cuda", BF16).eval()
    random_state(ours)
    z = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=BF16)
    with torch.inference_mode(), use_dispatch(KERNELS):
        ms, mem = peak_of(lambda: ours.decode(z))
    state = vae_to_diffusers(ours.state_dict())
    stats = ours.latent_stats
    del ours
    gc.collect()
    ref = AutoencoderKLWan()
    ref.load_state_dict(state)
    ref = ref.to("cuda", BF16).eval()
    raw = z * stats[1] + stats[0]
    with torch.inference_mode():
        ms_ref, mem_ref = peak_of(lambda: ref.decode(raw, return_dict=False))
    del ref
    gc.collect()
    verdict = "met" if ms <= ms_ref * 1.02 and mem <= mem_ref * 1.02 else "MISSED"
    return [f"| TeleFuser WanVAE.decode | {ms / 1e3:.2f} | {mem:.1f} |",
            f"| diffusers AutoencoderKLWan.decode | {ms_ref / 1e3:.2f} | {mem_ref:.1f} |",
            f"| target: no slower, no hungrier | {verdict} | |"]


def main() -> None:
    peak = bf16_matmul_tflops()
    lines = [f"Measured: {environment()}; bf16 matmul peak {peak:.0f} TFLOP/s in this run.", "",
             "DiT forward at batch 2 (one denoising step with CFG), Wan2.1-1.3B, latent [2, 16, 21, 60, 104] "
             "(32760 tokens), text [2, 512, 4096], bf16, random weights:", "",
             "| implementation | ms / step | TFLOP/s (of peak) | peak GiB |", "|---|---|---|---|", *bench_dit(peak), "",
             "VAE decode, latent [1, 16, 21, 60, 104] -> 81 frames 832x480, bf16, random weights:", "",
             "| implementation | seconds | peak GiB |", "|---|---|---|", *bench_vae()]
    table = "\n".join(lines)
    (out_dir() / "wan21.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
