"""Frame interpolation (RIFE) and the TAEHV decoder as plan features: recipes/tiny_vfi.toml end to end, on one
rank and with the pairs split over two gloo ranks, and the compiler's refusals (exit 2, the file or key named)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import telefuser
from telefuser.cli.compile import main
from telefuser.compiler import compile_recipe, load_recipe
from telefuser.schema.canonical import pretty_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE = RECIPES / "tiny_vfi.toml"
PROMPT, SEED = "a red fox running through fresh snow", 3


def _write(plan, path: Path) -> Path:
    path.write_text(pretty_json(plan.model_dump(mode="json", by_alias=True)))
    return path


def _without_vfi():
    """tiny_vfi's recipe (TAEHV decoder) without the RIFE model and enable_vfi: the frames the vfi stage gets."""
    recipe = load_recipe(RECIPE).recipe
    data = recipe.to_data()
    data["layer1"]["models"] = [m for m in data["layer1"]["models"] if m["role"] != "vfi"]
    data["layer2"] = {k: v for k, v in data["layer2"].items() if not k.startswith(("enable_vfi", "vfi_"))}
    data["name"] = "tiny_taehv"
    return type(recipe).model_validate(data)


@pytest.fixture(scope="module")
def videos():
    torch.set_num_threads(1)
    with_vfi = telefuser.load_plan(str(_write(compile_recipe(RECIPE), Path(os.environ.get("TMPDIR", "/tmp"))
                                              / "tiny_vfi_plan.json")))
    plan = compile_recipe(_without_vfi(), base_dir=RECIPES)
    without = telefuser.load_plan(str(_write(plan, Path(os.environ.get("TMPDIR", "/tmp")) / "tiny_taehv_plan.json")))
    return (with_vfi.run(prompt=PROMPT, seed=SEED, progress=False), without.run(prompt=PROMPT, seed=SEED, progress=False))


def test_tiny_vfi_plan_records_the_stage():
    plan = compile_recipe(RECIPE)
    kinds = [s.kind for s in plan.stages]
    assert kinds[-3:] == ["vae_decode", "vfi", "write_video"]
    decode, vfi, write = plan.stages[-3:]
    assert decode.params["decoder"] == "taehv" and decode.params["chunk_frames"] == 4 and not decode.params["tiled"]
    assert decode.params["output"] == "device_frames"  # handed to the vfi stage on the device
    assert vfi.models == ["vfi"]
    assert {k: vfi.params[k] for k in ("multiplier", "batch_size", "dtype", "input_frames", "output_frames", "fps",
                                       "parallel_ranks")} == {
        "multiplier": 2, "batch_size": 4, "dtype": "float32", "input_frames": 9, "output_frames": 17, "fps": 16,
        "parallel_ranks": 1}
    assert write.params["fps"] == 16
    by_name = {m.name: m for m in plan.layer1_model_definition.models}
    assert by_name["vfi"].class_ == "RIFE" and by_name["vfi"].key_layout == "ddp" and by_name["vfi"].parameter_count
    assert by_name["vae"].class_ == "TAEHV" and by_name["vae"].arch["z_dim"] == 16
    assert by_name["vfi"].files[0].path.endswith("flownet.pkl")
    stage = next(s for s in plan.memory.stages if s.stage == vfi.name)
    assert stage.components["activations"] == plan.memory.breakdown["activations.vfi"] > 0
    assert plan.memory.breakdown["weights.vfi"] == by_name["vfi"].parameter_count * 4


def test_multiplier_4_records_4x(tmp_path):
    plan = compile_recipe(RECIPE, ["layer2.vfi_multiplier=4", "layer2.num_frames=81", "layer2.fps=16"])
    vfi = next(s for s in plan.stages if s.kind == "vfi")
    assert (vfi.params["output_frames"], vfi.params["fps"]) == (321, 64)
    plan = compile_recipe(RECIPE, ["layer2.num_frames=81", "layer2.fps=16"])
    vfi = next(s for s in plan.stages if s.kind == "vfi")
    assert (vfi.params["output_frames"], vfi.params["fps"]) == (161, 32)


def test_tiny_vfi_end_to_end(videos):
    video, plain = videos
    assert plain.frames.shape[0] == 9 and plain.fps == 8
    assert video.frames.shape == (2 * 9 - 1, *plain.frames.shape[1:]) and video.fps == 16
    assert np.array_equal(video.frames[::2], plain.frames)  # the originals at even indices, untouched
    between = video.frames[1::2].astype(int)
    assert between.std() > 0  # RIFE's frames: not copies of black
    assert video.timings.vfi > 0 and "vfi" in video.timings.summary()


def test_tiny_vfi_mp4(videos, tmp_path):
    video, _ = videos
    out = tmp_path / "fox.mp4"
    video.save(out)
    assert out.stat().st_size > 0


DRIVER = (
    "import os, sys, numpy as np, telefuser\n"
    "video = telefuser.load_plan(sys.argv[1]).run(prompt=sys.argv[2], seed=int(sys.argv[3]), progress=False)\n"
    "assert (video is None) == (os.environ['RANK'] != '0')\n"
    "if video is not None:\n"
    "    np.save(sys.argv[4], video.frames)\n"
    "    assert video.fps == 16\n"
)


def test_two_ranks_split_the_pairs_and_give_the_one_rank_video(videos, tmp_path, monkeypatch):
    """cfg parallel over 2 gloo ranks: the vfi stage splits the 8 pairs 4 + 4, rank 1 sends its share to rank 0."""
    from telefuser.distributed.launch import run_local_ranks

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = compile_recipe(RECIPE, ["target.num_devices=2", "layer2.parallel_config.cfg_degree=2"])
    vfi = next(s for s in plan.stages if s.kind == "vfi")
    assert vfi.params["parallel_ranks"] == 2 and plan.placement_of("vfi").ranks == "all"
    path = _write(plan, tmp_path / "plan.json")
    out = tmp_path / "frames.npy"
    assert run_local_ranks([sys.executable, "-c", DRIVER, str(path), PROMPT, str(SEED), str(out)], 2) == 0
    frames, reference = np.load(out), videos[0].frames
    assert frames.shape == reference.shape
    diff = np.abs(frames.astype(int) - reference.astype(int))  # cfg's two branches on two ranks: rounding only
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_rank_shares_equal_one_rank_on_the_same_frames(monkeypatch):
    """The stage's split alone, exactly: 3 gloo ranks (uneven shares) against interpolate on one."""
    from gloo_ranks import spawn

    spawn(_three_rank_stage, 3, monkeypatch)


def _fake_ctx(rank: int, world: int, model):
    """What the vfi stage reads of a loaded pipeline, on `world` ranks of one replica led by rank 0."""
    import contextlib

    import torch.distributed as dist

    class Placement:
        def active(self):
            return contextlib.nullcontext(model)

    class Rank:
        def __init__(self):
            self.rank, self.replica_lead, self.dp_index, self.is_writer = rank, 0, 0, rank == 0

        def broadcast(self, t):
            if world > 1:
                dist.broadcast(t, src=0)
            return t

    class Ctx:
        plan = type("P", (), {"mesh": type("M", (), {"ranks": [type("R", (), {"rank": r, "coords": {"cfg": r}})()
                                                                for r in range(world)]})()})()
        placements = {"vfi": Placement()}

        def dispatch(self, name):
            return contextlib.nullcontext()

        def sync(self):
            pass

    ctx = Ctx()
    ctx.rank = Rank()
    return ctx


def _run_stage(rank: int, world: int, frames: np.ndarray, on_device: bool):
    from telefuser.models.rife.ifnet import load_flownet
    from telefuser.runtime.io.video import Timings
    from telefuser.runtime.stages.vfi import vfi
    from telefuser.schema.plan import Stage

    model = load_flownet(RECIPES / "tiny_vfi" / "flownet.pkl")
    state = type("S", (), {})()
    state.frames, state.device_frames = None, None
    if rank == 0:
        if on_device:
            state.device_frames = torch.from_numpy(frames)  # as the decode leaves them before a vfi stage
        else:
            state.frames = frames
    state.timings = Timings()
    state.params = type("Params", (), {"height": frames.shape[1], "width": frames.shape[2]})()
    stage = Stage(name="interpolate_frames", kind="vfi", models=["vfi"],
                  params={"multiplier": 2, "batch_size": 2, "scale": 1.0, "pad_to": 128,
                          "input_frames": frames.shape[0], "parallel_ranks": world})
    vfi(_fake_ctx(rank, world, model), state, stage)
    return state, model


FRAMES = (np.random.default_rng(0).random((6, 64, 96, 3)) * 255).astype(np.uint8)  # 5 pairs: 2 + 2 + 1 on 3 ranks


def _three_rank_stage() -> None:
    import torch.distributed as dist

    from telefuser.models.rife.interpolate import interpolate

    rank = dist.get_rank()
    state, model = _run_stage(rank, 3, FRAMES, on_device=True)
    if rank == 0:
        assert np.array_equal(state.frames, interpolate(FRAMES, model, 2, 2, channels_last=True))
    else:
        assert state.frames is None


def test_one_rank_stage_from_host_frames_equals_interpolate():
    from telefuser.models.rife.interpolate import interpolate

    state, model = _run_stage(0, 1, FRAMES, on_device=False)
    assert state.frames.shape == (11, 64, 96, 3) and state.device_frames is None
    assert np.array_equal(state.frames, interpolate(FRAMES, model, 2, 2, channels_last=True))
    assert state.timings.vfi > 0


# ---------------------------------------------------------------- refusals at compile time (exit 2)


def _copy_vfi_recipe(tmp_path: Path) -> Path:
    shutil.copytree(RECIPES / "tiny", tmp_path / "tiny")
    shutil.copytree(RECIPES / "tiny_vfi", tmp_path / "tiny_vfi")
    shutil.copy(RECIPES / "tiny.toml", tmp_path / "tiny.toml")
    shutil.copy(RECIPE, tmp_path / "tiny_vfi.toml")
    return tmp_path / "tiny_vfi.toml"


def _refused(capsys, args: list[str], *needles: str) -> str:
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("damage", ["garbage", "truncated", "taehv", "wrong_shape"])
def test_corrupt_or_mismatched_flownet_exits_2_naming_the_file(damage, tmp_path, capsys):
    recipe = _copy_vfi_recipe(tmp_path)
    flownet = tmp_path / "tiny_vfi" / "flownet.pkl"
    if damage == "garbage":
        flownet.write_bytes(b"not a checkpoint at all" * 100)
    elif damage == "truncated":
        flownet.write_bytes(flownet.read_bytes()[:5000])
    elif damage == "taehv":
        shutil.copy(tmp_path / "tiny_vfi" / "taew2_1.pth", flownet)
    else:
        state = torch.load(flownet, weights_only=True)
        state["module.block2.conv0.1.0.bias"] = torch.zeros(3)
        torch.save(state, flownet)
    _refused(capsys, [str(recipe), "-o", str(tmp_path / "p.json")], "tiny_vfi/flownet.pkl")
    assert not (tmp_path / "p.json").exists()


def test_a_legacy_format_flownet_compiles_and_loads(tmp_path):
    """Practical-RIFE's older releases ship flownet.pkl in torch.save's pre-1.6 format: no zip, no mmap."""
    recipe = _copy_vfi_recipe(tmp_path)
    flownet = tmp_path / "tiny_vfi" / "flownet.pkl"
    state = torch.load(flownet, weights_only=True)
    torch.save(state, flownet, _use_new_zipfile_serialization=False)
    plan = compile_recipe(recipe)
    pipe = telefuser.load_plan(str(_write(plan, tmp_path / "p.json")))
    model = pipe.placements["vfi"].module
    assert torch.equal(model.block0.conv0[0][0].weight, state["module.block0.conv0.0.0.weight"])


def test_taehv_whose_channels_differ_from_the_dit_exits_2(tmp_path, capsys):
    recipe = _copy_vfi_recipe(tmp_path)
    _refused(capsys, [str(recipe), "-o", str(tmp_path / "p.json"), "--set",
                      "layer1.models.vae.path=tiny_vfi/taew2_2.pth"],
             "outputs 16 latent channels", "(TAEHV) decodes 48", "taew2_1.pth")


@pytest.mark.parametrize("overrides, needles", [
    (["layer2.tiled=true"], ["layer2.tiled = true", "TAEHV", "tiled = false"]),
    (["layer2.enable_vae_parallel=true"], ["layer2.enable_vae_parallel = true", "TAEHV"]),
    (["layer2.models.vfi.quant_config.quant_type=fp8_e4m3fn"], ["layer2.models.vfi.quant_config.quant_type",
                                                                "convolutions only"]),
    (["layer2.models.vfi.compile_config.enabled=true"], ["compile_config.enabled = true", "RIFE"]),
    (["layer2.enable_vfi=false"], ["role 'vfi'", "enable_vfi = true"]),
    (["layer2.vfi_multiplier=3"], ["vfi_multiplier"]),
])
def test_settings_the_vfi_plan_cannot_run_exit_2(overrides, needles, tmp_path, capsys):
    args = [str(RECIPE), "-o", str(tmp_path / "p.json")]
    for o in overrides:
        args += ["--set", o]
    _refused(capsys, args, *needles)


def test_enable_vfi_without_a_vfi_model_exits_2(tmp_path, capsys):
    _refused(capsys, [str(RECIPES / "tiny.toml"), "-o", str(tmp_path / "p.json"), "--set", "layer2.enable_vfi=true"],
             "layer2.enable_vfi = true needs a model with role 'vfi'")


def test_taehv_refused_for_image_to_video(tmp_path, capsys):
    _copy_vfi_recipe(tmp_path)
    shutil.copy(RECIPES / "tiny_i2v.toml", tmp_path / "tiny_i2v.toml")
    recipe = tmp_path / "i2v_taehv.toml"
    recipe.write_text('extends = "tiny_i2v.toml"\nname = "i2v_taehv"\n\n[[layer1.models]]\nname = "vae"\n'
                      'role = "vae"\nclass = "TAEHV"\npath = "tiny_vfi/taew2_1.pth"\n')
    _refused(capsys, [str(recipe), "-o", str(tmp_path / "p.json")], "TAEHV is a decoder only", "WanVAE")


def test_explain_shows_the_vfi_stage(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main([str(RECIPE), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["--explain", str(out)]) == 0
    text = capsys.readouterr().out
    assert "-> decode_vae -> interpolate_frames -> write_video" in text
    assert "RIFE 2x, 9 -> 17 frames, 16 fps, 4 pairs per batch in float32" in text
    assert "(interpolated 2x: 17 frames at 16 fps)" in text and "TAEHV preview decoder" in text


def test_compiling_the_vfi_plan_imports_no_torch(tmp_path):
    import subprocess

    code = ("import sys; from telefuser.cli.compile import main; "
            f"rc = main([{str(RECIPE)!r}, '-o', {str(tmp_path / 'p.json')!r}]); print(rc, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(RECIPES.parent)})
    assert run.stdout.split()[-2:] == ["0", "False"], run.stdout + run.stderr


# --- HunyuanVideo-1.5: RIFE works on decoded frames, so the same model and stage follow its decode ---------------


def _hy15_with(tmp_path: Path, base: str, extra: str) -> Path:
    """recipes/`base`.toml plus the TOML `extra`, beside links to the recipes' files (a recipe's paths are relative
    to itself)."""
    for entry in RECIPES.iterdir():
        if not (tmp_path / entry.name).exists():
            (tmp_path / entry.name).symlink_to(entry)
    recipe = tmp_path / f"{base}_with.toml"
    recipe.write_text(f'extends = "{base}.toml"\nname = "{base}_with"\n\n{extra}')
    return recipe


def _hy15_with_rife(tmp_path: Path, base: str) -> Path:
    """recipes/`base`.toml plus tiny_vfi's RIFE and enable_vfi."""
    return _hy15_with(tmp_path, base, '[[layer1.models]]\nname = "vfi"\nrole = "vfi"\nclass = "RIFE"\n'
                                      'path = "tiny_vfi/flownet.pkl"\n\n[layer2]\nenable_vfi = true\n'
                                      'vfi_batch_size = 3\n')


def _hy15_with_taehv(tmp_path: Path, base: str, file: str = "taehv1_5.pth") -> Path:
    """recipes/`base`.toml with a tiny TAEHV decoder in place of its VAE (models merge by name)."""
    return _hy15_with(tmp_path, base, f'[[layer1.models]]\nname = "vae"\nrole = "vae"\nclass = "TAEHV"\n'
                                      f'path = "tiny_vfi/{file}"\n')


def test_hy15_with_rife_interpolates_its_frames(tmp_path):
    """tiny_hy15 (5 frames at 8 fps) with RIFE 2x: 9 frames at 16 fps, the plain plan's frames at even indices."""
    torch.set_num_threads(1)
    plan = compile_recipe(_hy15_with_rife(tmp_path, "tiny_hy15"))
    assert [s.kind for s in plan.stages][-3:] == ["vae_decode", "vfi", "write_video"]
    assert plan.stages[-3].params["output"] == "device_frames" and plan.stages[-1].params["fps"] == 16
    video = telefuser.load_plan(str(_write(plan, tmp_path / "hy15_vfi.json"))).run(prompt=PROMPT, seed=SEED,
                                                                                   progress=False)
    plain = telefuser.load_plan(str(_write(compile_recipe(RECIPES / "tiny_hy15.toml"), tmp_path / "hy15.json"))).run(
        prompt=PROMPT, seed=SEED, progress=False)
    assert plain.frames.shape[0] == 5 and (video.frames.shape[0], video.fps) == (9, 16)
    assert np.array_equal(video.frames[::2], plain.frames)
    assert video.frames[1::2].std() > 0 and video.timings.vfi > 0
    out = tmp_path / "hy15.mp4"
    video.save(out)
    assert out.stat().st_size > 0


def test_hy15_sr_with_rife_counts_the_sr_frame(tmp_path):
    """With the SR stage, RIFE gets the SR frames: its workspace is counted at the SR frame, not the base frame."""
    from telefuser.compiler.memory import RIFE_BYTES_PER_PAIR_PIXEL

    plan = compile_recipe(_hy15_with_rife(tmp_path, "tiny_hy15_sr"))
    assert [s.kind for s in plan.stages][-4:] == ["hy15_sr", "vae_decode", "vfi", "write_video"]
    (w, h), = next(s for s in plan.stages if s.kind == "hy15_sr_upsample").params["frame_sizes"].values()
    assert (w, h) != (plan.memory.at["width"], plan.memory.at["height"])
    padded = -(-w // 128) * 128 * (-(-h // 128) * 128)
    frames = next(s for s in plan.stages if s.kind == "vfi").params["output_frames"]
    assert plan.memory.breakdown["activations.vfi"] == 3 * padded * RIFE_BYTES_PER_PAIR_PIXEL + frames * w * h * 3


def test_hy15_refuses_a_wan_model_beside_rife(tmp_path, capsys):
    recipe = _hy15_with_rife(tmp_path, "tiny_hy15")
    recipe.write_text(recipe.read_text() + '\n[[layer1.models]]\nname = "vae"\nrole = "vae"\nclass = "WanVAE"\n'
                      'path = "tiny/vae.safetensors"\n')  # in place of tiny_hy15's VAE (models merge by name)
    _refused(capsys, [str(recipe), "-o", str(tmp_path / "p.json")], "another family (WanVAE)")


def test_hy15_with_taehv_decodes_the_dits_latents(tmp_path, monkeypatch):
    """taehv1_5's layout (patch 2) in place of HunyuanVideo-1.5's VAE: the decoder gets the latents the VAE would
    (the DiT's, unscaled: TAEHV decodes what the diffusion model makes), and the frames are its decode of them: within
    one uint8 level of the float64 decoder (float32 rounding can cross a rounding boundary)."""
    from telefuser.models.hunyuan15.vae import HunyuanVideo15VAE
    from telefuser.models.taehv.decoder import TAEHV, load_taehv

    torch.set_num_threads(1)
    seen: dict[str, torch.Tensor] = {}

    def recording(cls, key):
        original = cls.decode

        def decode(self, z, *args, **kwargs):
            seen[key] = z.detach().clone()
            return original(self, z, *args, **kwargs)
        monkeypatch.setattr(cls, "decode", decode)

    recording(TAEHV, "taehv")
    recording(HunyuanVideo15VAE, "vae")
    plan = compile_recipe(_hy15_with_taehv(tmp_path, "tiny_hy15"))
    decode = next(s for s in plan.stages if s.kind == "vae_decode")
    assert decode.params["decoder"] == "taehv" and not decode.params["tiled"]
    assert plan.memory.breakdown["activations.vae_decode"] > 0
    video = telefuser.load_plan(str(_write(plan, tmp_path / "hy15_taehv.json"))).run(prompt=PROMPT, seed=SEED,
                                                                                     progress=False)
    plain = telefuser.load_plan(str(_write(compile_recipe(RECIPES / "tiny_hy15.toml"), tmp_path / "hy15.json"))).run(
        prompt=PROMPT, seed=SEED, progress=False)
    assert torch.equal(seen["taehv"], seen["vae"])
    assert video.frames.shape == plain.frames.shape and video.fps == plain.fps
    exact = load_taehv(RECIPES / "tiny_vfi" / "taehv1_5.pth", dtype=torch.float64).decode(seen["taehv"].double())
    expected = ((exact[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.abs(video.frames.astype(int) - expected.astype(int)).max() <= 1
    assert video.frames.std() > 0


def test_hy15_sr_with_taehv_counts_its_decode_at_the_sr_frame(tmp_path):
    from telefuser.compiler.memory import _taehv_workspace

    plan = compile_recipe(_hy15_with_taehv(tmp_path, "tiny_hy15_sr"))
    (w, h), = next(s for s in plan.stages if s.kind == "hy15_sr_upsample").params["frame_sizes"].values()
    vae = next(m for m in plan.layer1_model_definition.models if m.role == "vae")
    recipe = load_recipe(_hy15_with_taehv(tmp_path, "tiny_hy15_sr")).recipe
    assert plan.memory.breakdown["activations.vae_decode"] == _taehv_workspace(recipe, vae, w, h, 4)


@pytest.mark.parametrize("base,file,needle", [
    ("tiny_hy15", "taew2_1.pth", "outputs 4 latent channels, but VAE 'vae' decodes 16"),
    ("tiny_hy15_i2v", "taehv1_5.pth", "TAEHV is a decoder only"),
])
def test_hy15_taehv_refusals_exit_2(base, file, needle, tmp_path, capsys):
    _refused(capsys, [str(_hy15_with_taehv(tmp_path, base, file)), "-o", str(tmp_path / "p.json")], needle)
