"""TAEHV decoder: against an independent float64 evaluation of madebyollin/taehv's published forward
(`decode_video(parallel=True)`: every frame at once, each MemBlock's past = its input shifted one step in time),
frame counts, the Wan2.2 variant, key layouts, refusing bad files.

Tolerances (outputs in [-1, 1]): 1e-10 with the model in float64 (the same math in another evaluation order:
rounding only); 1e-4 with float32 parameters (float32 rounding, ~1e-7 relative, through 23 layers whose
weights keep activations O(1)).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from telefuser.errors import WeightsError
from telefuser.models import registry
from telefuser.models.taehv.decoder import TAEHV, TAEHVConfig, load_taehv
from telefuser.compiler.vfi_weights import describe_taehv as describe_file
from telefuser.models.taehv.keys import describe, detect_layout, expected_shapes, to_wan_layout
from telefuser.models.tiny_vfi import TINY_TAEHV1_5, TINY_TAEW2_1, TINY_TAEW2_2, tiny_flownet_state, tiny_taehv_state

PUBLISHED_W21 = {"z_dim": 16, "patch_size": 1, "channels": [256, 128, 64, 64],
                 "decoder_time_upscale": [False, True, True]}
PUBLISHED_W22 = {**PUBLISHED_W21, "z_dim": 48, "patch_size": 2}
PUBLISHED_HV15 = {**PUBLISHED_W21, "z_dim": 32, "patch_size": 2}  # taehv1_5.pth (taehv.py: patch 2, 32 channels)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tensors are small, and on a shared 2-core machine two threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def saved(state: dict[str, torch.Tensor], folder: Path, name: str = "taew2_1.pth") -> Path:
    torch.save(state, folder / name)
    return folder / name


def reference_decode(state, z, arch):
    """taehv.py's TAEHV.decode_video(parallel=True) for the base decoder, in float64, functional; returns [0, 1]
    NTCHW as published (trim of the first t_upscale - 1 frames included)."""
    sd = {k: v.double() for k, v in state.items()}
    n, t = z.shape[0], z.shape[2]
    x = z.double().permute(0, 2, 1, 3, 4).reshape(n * t, *z.shape[1:2], *z.shape[3:])
    x = torch.tanh(x / 3) * 3
    x = F.relu(F.conv2d(x, sd["decoder.1.weight"], sd["decoder.1.bias"], padding=1))

    def memblock(x, i):
        nt, c, h, w = x.shape
        seq = x.reshape(n, nt // n, c, h, w)
        past = F.pad(seq, (0, 0, 0, 0, 0, 0, 1, 0))[:, : nt // n].reshape(x.shape)
        y = torch.cat((x, past), 1)
        y = F.relu(F.conv2d(y, sd[f"decoder.{i}.conv.0.weight"], sd[f"decoder.{i}.conv.0.bias"], padding=1))
        y = F.relu(F.conv2d(y, sd[f"decoder.{i}.conv.2.weight"], sd[f"decoder.{i}.conv.2.bias"], padding=1))
        y = F.conv2d(y, sd[f"decoder.{i}.conv.4.weight"], sd[f"decoder.{i}.conv.4.bias"], padding=1)
        return F.relu(y + x)

    for base in (3, 9, 15):
        for i in range(base, base + 3):
            x = memblock(x, i)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        c = x.shape[1]
        x = F.conv2d(x, sd[f"decoder.{base + 4}.conv.weight"]).reshape(-1, c, *x.shape[2:])  # TGrow
        x = F.conv2d(x, sd[f"decoder.{base + 5}.weight"], padding=1)
    x = F.conv2d(F.relu(x), sd["decoder.22.weight"], sd["decoder.22.bias"], padding=1)
    if arch["patch_size"] > 1:
        x = F.pixel_shuffle(x, arch["patch_size"])
    x = x.clamp(0, 1).reshape(n, -1, *x.shape[1:])
    up = 2 ** sum(arch["decoder_time_upscale"])
    return x[:, up - 1:]


def as_video(ref):  # [0, 1] NTCHW -> [-1, 1] NCTHW
    return ref.transpose(1, 2) * 2 - 1


@pytest.mark.parametrize("arch,salt", [(TINY_TAEW2_1, "taew2_1:"), (TINY_TAEW2_2, "taew2_2:"),
                                       (TINY_TAEHV1_5, "taehv1_5:")], ids=["taew2_1", "taew2_2", "taehv1_5"])
def test_decoder_matches_float64_reference(arch, salt, tmp_path):
    state = tiny_taehv_state(arch, salt)
    model = load_taehv(saved(state, tmp_path))
    z = torch.randn(2, arch["z_dim"], 5, 3, 4, generator=torch.Generator().manual_seed(0))
    ref = as_video(reference_decode(state, z, arch))
    assert ref.shape == (2, 3, 17, 3 * 8 * arch["patch_size"], 4 * 8 * arch["patch_size"])
    assert ref.std() > 0.05 and (ref.abs() < 1).float().mean() > 0.99  # neither constant nor clamped
    for chunk in (None, 1, 2):  # all latents at once, one at a time (taehv's sequential mode), uneven chunks
        got = model.decode(z, chunk_frames=chunk)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert (got.double() - ref).abs().max().item() < 1e-4, chunk
    exact = load_taehv(tmp_path / "taew2_1.pth", dtype=torch.float64)  # the file saved above
    assert (exact.decode(z, chunk_frames=2) - ref).abs().max().item() < 1e-10


def test_21_latent_frames_make_81():
    """Wan2.1 480p: 21 latent frames -> 84 decoded, the first 3 trimmed -> 81, as the Wan VAE gives."""
    model = TAEHV(TAEHVConfig(**TINY_TAEW2_1))
    assert model.num_frames(21) == 81 and model.t_upscale == 4 and model.z_dim == 16
    video = model.decode(torch.randn(1, 16, 21, 2, 2), chunk_frames=8)
    assert video.shape == (1, 3, 81, 16, 16) and video.abs().max() <= 1
    wan22 = TAEHV(TAEHVConfig(**TINY_TAEW2_2))
    assert wan22.z_dim == 48 and wan22.space_upscale == 16
    assert wan22.decode(torch.randn(1, 48, 2, 2, 3)).shape == (1, 3, 5, 32, 48)


def test_wrong_latent_channels_are_refused():
    model = TAEHV(TAEHVConfig(**TINY_TAEW2_1))
    with pytest.raises(ValueError, match=r"\[B, 16, T, h, w\]"):
        model.decode(torch.randn(1, 48, 2, 2, 2))


@pytest.mark.parametrize("arch", [PUBLISHED_W21, PUBLISHED_W22, PUBLISHED_HV15, TINY_TAEW2_1],
                         ids=["taew2_1", "taew2_2", "taehv1_5", "tiny"])
def test_model_keys_are_the_published_layout(arch):
    with torch.device("meta"):
        model = TAEHV(TAEHVConfig(**arch))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_shapes(arch)
    assert describe(shapes) == arch


def test_checkpoint_with_encoder_loads_through_the_registry(tmp_path):
    entry = registry.get("TAEHV")
    assert entry.model_class is TAEHV and entry.config_class is TAEHVConfig
    state = tiny_taehv_state()
    assert any(k.startswith("encoder.") for k in state)
    assert entry.detect_layout(state) == detect_layout(state) == "taehv"
    own = entry.convert(state, "taehv")
    assert own == to_wan_layout(state) and all(k.startswith("decoder.") for k in own)
    arch = describe_file(saved(state, tmp_path))
    assert arch == TINY_TAEW2_1
    entry.model_class(entry.config_class(**arch)).load_state_dict(own)  # strict


def test_bad_files_are_refused_naming_the_file(tmp_path):
    good = saved(tiny_taehv_state(), tmp_path)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:5000])
    torch.save(tiny_flownet_state(), tmp_path / "flownet_as_taehv.pth")
    super_keys = {"decoder.0.weight": torch.zeros(8, 16, 1, 1), "decoder.1.conv.0.weight": torch.zeros(32, 1, 7, 7)}
    torch.save(super_keys, tmp_path / "taew2_2_super.pth")
    state = tiny_taehv_state()
    del state["decoder.16.conv.2.bias"]
    torch.save(state, tmp_path / "missing.pth")
    for name, message in {"cut.pth": "not a readable", "flownet_as_taehv.pth": "not a TAEHV checkpoint",
                          "taew2_2_super.pth": "super", "missing.pth": "lacks"}.items():
        path = tmp_path / name
        with pytest.raises(WeightsError, match=message) as info:
            describe_file(path)
        assert str(path) in str(info.value)
        with pytest.raises(WeightsError) as info:
            load_taehv(path)
        assert str(path) in str(info.value)
