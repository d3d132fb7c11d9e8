"""RIFE (Practical-RIFE 4.26 IFNet): against ccvfi's IFNet and an independent float64 evaluation of the published
forward, frame order and count, the rank split, key layouts, and refusing bad files.

Tolerances (outputs are frames in [0, 1]):
- against ccvfi 0.0.3 (float32, the same weights): 1e-4 absolute. Both run the same float32 operations in the
  same order up to convolution algorithms; five chained blocks with flows in pixels keep the difference ~1e-6.
- against the float64 reference: 1e-4 absolute for our float32 model: float32 rounding (~1e-7 relative) through
  ~25 layers and five bilinear warps, amplified where a flow gradient is steep, stays well under this.
- uint8 frames: 1 level, where float32 noise lands on the other side of a rounding boundary.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccvfi_peer import SUPPORTED, ccvfi_version, load_ccvfi
from telefuser.errors import WeightsError
from telefuser.models import registry
from telefuser.models.rife.ifnet import IFNet, IFNetConfig, load_flownet
from telefuser.models.rife.interpolate import (interpolate, interpolate_share, output_frame_count, pad_multiple,
                                               split_pairs)
from telefuser.compiler.vfi_weights import describe_flownet
from telefuser.models.rife.keys import (MODULE_PREFIX, describe, detect_layout, expected_shapes,
                                        to_wan_layout)
from telefuser.models.tiny_vfi import TINY_RIFE, tiny_flownet_state, tiny_taehv_state

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = {"head_channels": 4, "block_channels": [192, 128, 96, 64, 32], "num_res_convs": 8, "feature_channels": 8,
             "scales": [16, 8, 4, 2, 1]}
LITE = {**PUBLISHED, "block_channels": [192, 128, 96, 64, 24], "scales": [32, 16, 8, 4, 1]}  # v4.25-lite
HEAVY = {**PUBLISHED, "head_channels": 16}  # ccvfi's RIFE_IFNet_v426_heavy
TINY_HEAVY = {**TINY_RIFE, "head_channels": 16, "feature_channels": 8}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tensors are small, and on a shared 2-core machine two threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_flownet(state: dict[str, torch.Tensor], folder: Path) -> Path:
    path = folder / "flownet.pkl"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return save_flownet(tiny_flownet_state(), tmp_path_factory.mktemp("rife"))


# ---- an independent float64 evaluation of Practical-RIFE 4.26's IFNet (IFNet_HDv3.py), functional ----------

def _lrelu(x):
    return F.leaky_relu(x, 0.2)


def _ref_warp(img, flow):
    b, _, h, w = flow.shape
    gx = torch.linspace(-1, 1, w, dtype=img.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    gy = torch.linspace(-1, 1, h, dtype=img.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    fx = flow[:, 0:1] / ((img.shape[3] - 1.0) / 2.0)
    fy = flow[:, 1:2] / ((img.shape[2] - 1.0) / 2.0)
    grid = torch.cat((gx + fx, gy + fy), 1).permute(0, 2, 3, 1)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _ref_block(sd, p, x, flow, scale, n_res):
    x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
    if flow is not None:
        x = torch.cat((x, F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear",
                                        align_corners=False) * (1.0 / scale)), 1)
    x = _lrelu(F.conv2d(x, sd[p + "conv0.0.0.weight"], sd[p + "conv0.0.0.bias"], stride=2, padding=1))
    x = _lrelu(F.conv2d(x, sd[p + "conv0.1.0.weight"], sd[p + "conv0.1.0.bias"], stride=2, padding=1))
    for k in range(n_res):
        q = f"{p}convblock.{k}."
        x = _lrelu(F.conv2d(x, sd[q + "conv.weight"], sd[q + "conv.bias"], padding=1) * sd[q + "beta"] + x)
    x = F.conv_transpose2d(x, sd[p + "lastconv.0.weight"], sd[p + "lastconv.0.bias"], stride=2, padding=1)
    x = F.interpolate(F.pixel_shuffle(x, 2), scale_factor=scale, mode="bilinear", align_corners=False)
    return x[:, :4] * scale, x[:, 4:5], x[:, 5:]


def _ref_head(sd, x):
    for i in range(3):
        x = _lrelu(F.conv2d(x, sd[f"encode.cnn{i}.weight"], sd[f"encode.cnn{i}.bias"], stride=2 if i == 0 else 1,
                            padding=1))
    return F.conv_transpose2d(x, sd["encode.cnn3.weight"], sd["encode.cnn3.bias"], stride=2, padding=1)


def reference_ifnet(state, img0, img1, timestep=0.5, scale=1.0, pyramid=(16, 8, 4, 2, 1)):
    """Practical-RIFE's Model.inference (4.26): scale_list 16/s .. 1/s, fast mode, in float64."""
    sd = {k[len(MODULE_PREFIX):] if k.startswith(MODULE_PREFIX) else k: v.double() for k, v in state.items()}
    n_res = len({k.split(".")[2] for k in sd if k.startswith("block0.convblock.")})
    img0, img1 = img0.double(), img1.double()
    t = torch.full_like(img0[:, :1], timestep)
    f0, f1 = _ref_head(sd, img0), _ref_head(sd, img1)
    flow = mask = feat = None
    w0, w1 = img0, img1
    for i, s in enumerate([p / scale for p in pyramid]):
        p = f"block{i}."
        if flow is None:
            flow, mask, feat = _ref_block(sd, p, torch.cat((img0, img1, f0, f1, t), 1), None, s, n_res)
        else:
            x = torch.cat((w0, w1, _ref_warp(f0, flow[:, :2]), _ref_warp(f1, flow[:, 2:4]), t, mask, feat), 1)
            fd, mask, feat = _ref_block(sd, p, x, flow, s, n_res)
            flow = flow + fd
        w0, w1 = _ref_warp(img0, flow[:, :2]), _ref_warp(img1, flow[:, 2:4])
    m = torch.sigmoid(mask)
    return w0 * m + w1 * (1 - m)


def frames_pair(h=64, w=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, h, w, generator=g)
    # a smooth moving pattern, so the flows are not all noise
    img0 = 0.5 * base + 0.5 * torch.sin(torch.linspace(0, 6, w)).view(1, 1, 1, w).abs()
    img1 = torch.roll(img0, shifts=3, dims=3)
    return img0.clamp(0, 1), img1.clamp(0, 1)


# ---- the network --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [TINY_RIFE, TINY_HEAVY], ids=["v4.26", "v4.26-heavy"])
def test_ifnet_matches_float64_reference(arch, tmp_path):
    state = tiny_flownet_state(arch)
    model = load_flownet(save_flownet(state, tmp_path))
    img0, img1 = frames_pair()
    with torch.no_grad():
        ours = model(img0, img1)
    ref = reference_ifnet(state, img0, img1)
    assert ours.dtype == torch.float32 and ours.shape == img0.shape
    assert (ours.double() - ref).abs().max().item() < 1e-4
    with torch.no_grad():  # another timestep (Practical-RIFE 4.x takes any t in [0, 1])
        ours = model(img0, img1, 0.25)
    assert (ours.double() - reference_ifnet(state, img0, img1, 0.25)).abs().max().item() < 1e-4
    # and at scale 0.5 (Practical-RIFE's --scale for 4K: flows at half size; sizes a multiple of 128)
    img0, img1 = frames_pair(128, 128, seed=1)
    with torch.no_grad():
        ours = model(img0, img1, 0.5, 0.5)
    assert (ours.double() - reference_ifnet(state, img0, img1, 0.5, 0.5)).abs().max().item() < 1e-4


def _ccvfi_ifnet_class():
    """ccvfi's IFNet, loaded from its network files alone (tests/ccvfi_peer.py: its package __init__ imports
    cv2 and torchvision, which the network does not need)."""
    version = ccvfi_version()
    if version is None:
        pytest.skip("ccvfi is not installed (test extra)")
    if version != SUPPORTED:
        pytest.skip(f"ccvfi {version}: this comparison is written against {SUPPORTED}'s IFNet (v4.26 heavy)")
    return load_ccvfi()["IFNet"]


def test_ifnet_matches_ccvfi_with_the_same_weights(tmp_path):
    """ccvfi 0.0.3 ships RIFE v4.26 'heavy' (16 head channels): our IFNet reads that arch off the weights."""
    ccvfi_ifnet = _ccvfi_ifnet_class()
    torch.manual_seed(0)
    theirs = ccvfi_ifnet().eval()
    state = {MODULE_PREFIX + k: v for k, v in theirs.state_dict().items()}  # as flownet.pkl holds it
    path = save_flownet(state, tmp_path)
    assert describe_flownet(path) == HEAVY
    ours = load_flownet(path)
    img0, img1 = frames_pair()
    with torch.no_grad():
        expected = theirs(torch.cat((img0, img1), 1), 0.5, [16, 8, 4, 2, 1])
        got = ours(img0, img1, 0.5, 1.0)
    assert (got - expected).abs().max().item() < 1e-4


def test_lite_pyramid_is_taken_from_the_weights(tmp_path):
    """v4.25-lite's flownet (last block 24 wide) runs at scales 32, 16, 8, 4, 1 (vs-rife): found from the
    shapes, so its weights cannot run at 4.26's scales; it needs sizes a multiple of 128."""
    lite_tiny = {**TINY_RIFE, "block_channels": [192, 128, 96, 64, 24]}
    state = tiny_flownet_state(lite_tiny)
    model = load_flownet(save_flownet(state, tmp_path))
    assert model.config.scales == [32, 16, 8, 4, 1] and model.config.min_multiple == 128
    img0, img1 = frames_pair(128, 128)
    with torch.no_grad():
        ours = model(img0, img1)
    assert (ours.double() - reference_ifnet(state, img0, img1, pyramid=(32, 16, 8, 4, 1))).abs().max() < 1e-4
    with pytest.raises(ValueError, match="multiple of 128"):
        interpolate(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), model, pad_to=64)


def test_bf16_convolutions_stay_close_to_float32(tiny_path):
    """The precision switch is the model's dtype; flows, warps and the blend stay float32. With the tiny random
    weights the bf16 frame is within 0.02 of the float32 one (measured 0.005: bf16's 2^-8 relative rounding
    through ~25 layers, damped by the float32 warps);
    the real weights' difference is what bench/vfi.py measures on the GPU."""
    fp32, bf16 = load_flownet(tiny_path), load_flownet(tiny_path, dtype=torch.bfloat16)
    img0, img1 = frames_pair()
    with torch.no_grad():
        a, b = fp32(img0, img1), bf16(img0, img1)
    assert b.dtype == torch.float32
    assert (a - b).abs().max().item() < 0.02


# ---- key layouts ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [PUBLISHED, HEAVY, LITE, TINY_RIFE],
                         ids=["v4.26", "v4.26-heavy", "v4.25-lite", "tiny"])
def test_model_keys_are_the_published_layout(arch):
    with torch.device("meta"):
        model = IFNet(IFNetConfig(**arch))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_shapes(arch)
    prefixed = {MODULE_PREFIX + k: s for k, s in shapes.items()}
    assert detect_layout(prefixed) == "ddp" and detect_layout(shapes) == "plain"
    assert describe(prefixed) == arch and describe(shapes) == arch
    assert to_wan_layout(prefixed) == shapes


def test_registry_builds_and_converts():
    entry = registry.get("RIFE")
    assert entry.model_class is IFNet and entry.config_class is IFNetConfig
    state = tiny_flownet_state()
    assert entry.detect_layout(state) == "ddp"
    own = entry.convert({**state, "module.teacher.conv0.0.0.weight": torch.zeros(1)}, "ddp")
    model = entry.model_class(entry.config_class(**describe({k: v.shape for k, v in state.items()})))
    model.load_state_dict(own)  # strict: training-only tensors dropped, nothing missing


# ---- refusing bad files -----------------------------------------------------------------------------------------

def test_corrupt_or_mismatched_flownet_is_refused_naming_the_file(tmp_path, tiny_path):
    data = tiny_path.read_bytes()
    cases = {
        "truncated.pkl": data[: len(data) // 2],
        "garbage.pkl": b"\x80\x02not a checkpoint at all" * 10,
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save(tiny_taehv_state(), tmp_path / "taehv_as_flownet.pkl")
    state = tiny_flownet_state()
    torch.save({k: v for k, v in state.items() if "block3." not in k}, tmp_path / "missing_block.pkl")
    wrong = dict(state)
    wrong["module.block1.conv0.0.0.weight"] = torch.zeros(4, 30, 3, 3)
    torch.save(wrong, tmp_path / "wrong_shape.pkl")
    expect = {"truncated.pkl": "not a readable PyTorch checkpoint", "garbage.pkl": "not a readable PyTorch checkpoint",
              "taehv_as_flownet.pkl": "no IFNet tensor", "missing_block.pkl": "lacks",
              "wrong_shape.pkl": "shapes no 4.2x IFNet has"}
    for name, message in expect.items():
        path = tmp_path / name
        with pytest.raises(WeightsError, match=message) as info:
            describe_flownet(path)
        assert str(path) in str(info.value), name
        with pytest.raises(WeightsError) as info:
            load_flownet(path)
        assert str(path) in str(info.value), name
    with pytest.raises(WeightsError, match="do not exist"):
        describe_flownet(tmp_path / "absent.pkl")


def test_legacy_format_flownet_is_read_too(tmp_path):
    """torch.save's pre-1.6 format (not a zip): indexed by the same restricted unpickler, loaded by torch.load."""
    path = tmp_path / "flownet.pkl"
    torch.save(tiny_flownet_state(), path, _use_new_zipfile_serialization=False)
    assert describe_flownet(path) == TINY_RIFE
    assert load_flownet(path).config == IFNetConfig(**TINY_RIFE)


def test_describe_flownet_needs_no_torch(tiny_path):
    code = ("import sys; from telefuser.compiler.vfi_weights import describe_flownet; "
            f"a = describe_flownet({str(tiny_path)!r}); print(a['block_channels'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split("]")[-1].strip() == "False", out.stderr


# ---- interpolating a video ----------------------------------------------------------------------------------------

class Average(nn.Module):
    """A stand-in for IFNet whose middle frame is the mean: repeated halving then gives exact linear ramps."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.calls: list[int] = []

    def forward(self, img0, img1, timestep=0.5, scale=1.0):
        assert timestep == 0.5 and img0.shape[-2] % 128 == 0 and img0.shape[-1] % 128 == 0
        self.calls.append(img0.shape[0])
        return (img0 + img1) / 2


@pytest.mark.parametrize("multiplier", [2, 4, 8])
def test_frame_count_and_order(multiplier):
    n = 6
    frames = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 5, 7) / 16  # [F, 3, H, W]
    model = Average()
    out = interpolate(frames, model, multiplier, batch_size=3)
    assert out.shape == (output_frame_count(n, multiplier), 3, 5, 7) == ((n - 1) * multiplier + 1, 3, 5, 7)
    assert torch.equal(out[::multiplier], frames)  # the originals, untouched, at indices multiple of m (even)
    ramp = torch.arange(out.shape[0], dtype=torch.float32) / (16 * multiplier)
    assert torch.equal(out[:, 0, 0, 0], ramp)  # frame i * m + k is k/m of the way from original i to i + 1
    assert max(model.calls) <= 3 and sum(model.calls) == out.shape[0] - n


def test_81_frames_make_161_and_321():
    assert output_frame_count(81, 2) == 161 and output_frame_count(81, 4) == 321
    frames = np.zeros((81, 4, 6, 3), np.uint8)
    frames[:, 0, 0, 0] = np.arange(81) * 3
    out = interpolate(frames, Average(), 2, batch_size=16)
    assert isinstance(out, np.ndarray) and out.shape == (161, 4, 6, 3) and out.dtype == np.uint8
    assert (out[::2] == frames).all()
    assert (out[1::2, 0, 0, 0].astype(int) - (frames[:-1, 0, 0, 0].astype(int) + 1) - 0).max() <= 1


def test_uint8_video_matches_the_padded_reference(tiny_path):
    """Practical-RIFE pads H, W with zeros to a multiple of 128 and crops back; uint8 by rounding."""
    model = load_flownet(tiny_path)
    g = torch.Generator().manual_seed(3)
    frames = (torch.rand(4, 40, 72, 3, generator=g) * 255).to(torch.uint8)  # the runtime's [F, H, W, 3]
    out = interpolate(frames, model, 2, batch_size=2)
    assert out.shape == (7, 40, 72, 3) and torch.equal(out[::2], frames)
    x = frames.permute(0, 3, 1, 2).double() / 255
    x = F.pad(x, (0, 128 - 72, 0, 128 - 40))
    ref = reference_ifnet(tiny_flownet_state(), x[:-1], x[1:])[:, :, :40, :72]
    ref = (ref.clamp(0, 1) * 255).round().permute(0, 2, 3, 1)
    assert (out[1::2].double() - ref).abs().max().item() <= 1
    assert pad_multiple(1.0) == 128 and pad_multiple(0.5) == 256 and pad_multiple(1.0, 64) == 64
    out64 = interpolate(frames, model, 2, batch_size=2, pad_to=64)  # vs-rife's padding: other border values
    assert out64.shape == out.shape and torch.equal(out64[::2], frames)


def test_4x_is_2x_twice(tiny_path):
    model = load_flownet(tiny_path)
    frames = (torch.rand(3, 24, 40, 3, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)
    four = interpolate(frames, model, 4, batch_size=1)
    twice = interpolate(interpolate(frames, model, 2, batch_size=1), model, 2, batch_size=1)
    assert four.shape == (9, 24, 40, 3) and torch.equal(four, twice)


def test_out_is_written_in_place():
    frames = torch.rand(3, 3, 8, 8)
    out = torch.full((5, 3, 8, 8), float("nan"))
    assert interpolate(frames, Average(), 2, out=out) is out and not out.isnan().any()
    with pytest.raises(ValueError, match="out must be"):
        interpolate(frames, Average(), 2, out=torch.empty(4, 3, 8, 8))
    with pytest.raises(ValueError, match="multiplier"):
        interpolate(frames, Average(), 3)


# ---- several ranks --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("multiplier", [2, 4])
def test_rank_split_covers_every_pair_once(multiplier):
    for n in range(1, 24):
        for world in range(1, 9):
            shares = split_pairs(n, world, multiplier)
            assert [s.rank for s in shares] == list(range(world))
            pairs = [p for s in shares for p in range(s.pair_start, s.pair_stop)]
            assert pairs == list(range(n - 1))  # each pair once, contiguous, in rank order
            sizes = [s.pair_stop - s.pair_start for s in shares]
            assert max(sizes) - min(sizes) <= 1
            outs = [i for s in shares for i in range(s.out_start, s.out_stop)]
            assert outs == list(range(output_frame_count(n, multiplier)))  # the gather layout
            assert all(s.frame_stop - s.frame_start == s.pair_stop - s.pair_start + 1 for s in shares)


def test_ranks_shares_concatenate_to_the_one_rank_result(tiny_path):
    model = load_flownet(tiny_path)
    frames = (torch.rand(7, 24, 40, 3, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    whole = interpolate(frames, model, 2, batch_size=1)
    for world in (2, 3, 8):
        parts = [interpolate_share(frames, model, s, 2, batch_size=1) for s in split_pairs(7, world, 2)]
        assert [p.shape[0] for p in parts] == [s.num_out for s in split_pairs(7, world, 2)]
        assert torch.equal(torch.cat(parts), whole), world
