"""Wan DiT against diffusers' WanTransformer3DModel with the same weights, and key layouts both ways."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from telefuser.models import registry
from telefuser.models.wan.dit import WAN21_1_3B, WAN21_14B, WanDiT, WanDiTConfig
from telefuser.models.wan.dit_keys import detect_layout, diffusers_to_wan, to_wan_layout, wan_to_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

TINY = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=256)
TINY_I2V = WanDiTConfig(**{**TINY.__dict__, "model_type": "i2v", "in_dim": 36})
I2V_EXTRA = {"image_dim": 1280, "added_kv_proj_dim": TINY.dim}


def diffusers_model(cfg: WanDiTConfig, **kw) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads" if cfg.qk_norm else None,
        eps=cfg.eps,
        **kw,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    # Fresh values everywhere: default inits leave norm weights at 1 and biases at 0, which would hide swaps.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


@pytest.mark.parametrize("cfg,extra", [(TINY, {}), (TINY_I2V, I2V_EXTRA)], ids=["t2v", "i2v"])
def test_matches_diffusers(cfg: WanDiTConfig, extra: dict) -> None:
    gen = fresh_generator()
    ref = diffusers_model(cfg, **extra).eval()
    randomize(ref, gen)
    ours = WanDiT(cfg).eval()
    ours.load_state_dict(to_wan_layout(ref.state_dict()), strict=True)

    x = torch.randn(2, 16, 3, 8, 12, generator=gen)
    t = torch.tensor([937.0, 12.5])
    # I2V: diffusers splits image from text tokens assuming 512 text tokens (Wan's text_len); ours
    # takes the image tokens apart, so any text length works.
    text_len = 512 if cfg.model_type == "i2v" else 7
    context = torch.randn(2, text_len, cfg.text_dim, generator=gen)
    kwargs, ref_kwargs, ref_in = {}, {}, x
    if cfg.model_type == "i2v":
        y = torch.randn(2, cfg.in_dim - 16, 3, 8, 12, generator=gen)
        clip = torch.randn(2, 257, 1280, generator=gen)
        kwargs = {"y": y, "clip_fea": clip}
        ref_in = torch.cat([x, y], dim=1)
        ref_kwargs = {"encoder_hidden_states_image": clip}
    with torch.no_grad():
        out = ours(x, t, context, **kwargs)
        expected = ref(ref_in, t, context, return_dict=False, **ref_kwargs)[0]
    assert out.shape == (2, cfg.out_dim, 3, 8, 12)
    # float32 on both sides: only summation order (matmuls, attention) and our float64 sinusoid
    # differ. Measured 5e-6..2e-5 over 5 seeds (weights of std 0.2 amplify rounding through the
    # blocks); 1e-4 leaves 5x margin, while a swapped weight gives O(1).
    assert rel_err(out, expected) < 1e-4


def test_bf16_stays_close_to_fp32() -> None:
    """The bf16 model (float32 modulation, bf16 residual stream) against its own float32 copy."""
    gen = fresh_generator()
    model = WanDiT(TINY).eval()
    randomize(model, gen)
    x = torch.randn(1, 16, 3, 8, 8, generator=gen)
    t = torch.tensor([500.0])
    context = torch.randn(1, 9, TINY.text_dim, generator=gen)
    with torch.no_grad():
        expected = model(x, t, context)
        out = model.to(torch.bfloat16)(x, t, context)
    assert out.dtype == torch.bfloat16
    # bf16 rounds to 2^-9 (2e-3) relative; through 2 blocks of matmuls, norms and attention it
    # compounds to 6e-3..8e-3 (measured, 5 seeds). 3e-2 leaves margin and still fails a broken
    # modulation or norm, which costs O(1e-1).
    assert rel_err(out, expected) < 3e-2


@pytest.mark.parametrize("cfg", [WAN21_1_3B, WAN21_14B], ids=["1.3B", "14B"])
def test_full_size_keys_and_shapes(cfg: WanDiTConfig) -> None:
    with torch.device("meta"):
        ours = WanDiT(cfg)
        ref = diffusers_model(cfg)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in diffusers_to_wan(ref.state_dict()).items()}
    assert ours_shapes == ref_shapes
    count = sum(v.numel() for v in ours.state_dict().values())
    expected = {1536: 1_418_996_800, 5120: 14_288_491_584}[cfg.dim]  # the published ~1.3B / ~14B
    assert count == sum(v.numel() for v in ref.state_dict().values()) == expected


def test_layout_round_trip_and_detection() -> None:
    wan = WanDiT(TINY_I2V).state_dict()
    diff = wan_to_diffusers(wan)
    assert detect_layout(wan) == "wan" and detect_layout(diff) == "diffusers"
    assert set(diff) == set(diffusers_model(TINY_I2V, **I2V_EXTRA).state_dict())
    back = diffusers_to_wan(diff)
    assert list(back) == list(wan) and all(back[k] is wan[k] for k in wan)
    with pytest.raises(ValueError, match="neither"):
        detect_layout(["encoder.conv1.weight"])


def test_registry_entry_builds_and_converts() -> None:
    entry = registry.get("WanDiT")
    model = entry.model_class(entry.config_class(**{**TINY.__dict__}))
    diff = wan_to_diffusers(model.state_dict())
    layout = entry.detect_layout(diff)
    assert layout == "diffusers"
    model.load_state_dict(entry.convert(diff, layout), strict=True)
    with pytest.raises(KeyError, match="known: WanDiT"):
        registry.get("NoSuchModel")


def test_i2v_without_image_features_is_refused() -> None:
    model = WanDiT(TINY_I2V)
    with pytest.raises(ValueError, match="clip_fea"):
        model(torch.randn(1, 36, 1, 4, 4), torch.tensor([1.0]), torch.randn(1, 3, TINY.text_dim))


@pytest.mark.parametrize("name", ["WanDiT", "WanVAE", "UMT5Encoder"])
def test_registry_names_resolve(name: str) -> None:
    entry = registry.get(name)
    assert entry.model_class.__name__ == name and entry.config_class.__name__.endswith("Config")


def test_registry_imports_no_model_module() -> None:
    """A missing or broken model module must not break the registry, so it imports none up front."""
    code = ("import sys, telefuser.models.registry as r; r.get('WanVAE'); "
            "print(sorted(m for m in sys.modules if m.startswith('telefuser.models.') and m != 'telefuser.models.registry'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
