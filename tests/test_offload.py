"""MODEL_CPU_OFFLOAD: host copies loaded once, copied in per use, dropped without copying back; prefetch as planned.

On the CPU the "device" copy is a second CPU buffer, so the swap, the no-copy-back rule and the prefetch schedule
run here; the gpu-marked test covers pinned memory and the side stream.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compiler_fixtures import model_set, write_recipe
from telefuser.compiler import compile_recipe
from telefuser.compiler.explain import explain
from telefuser.compiler.memory import PREFETCH_HEADROOM
from telefuser.runtime.memory import offload
from telefuser.runtime.memory.offload import CHUNK_GRANULE, OffloadedWeights, PrefetchSchedule, plan_chunks
from telefuser.runtime.memory.placement import Placement
from telefuser.schema.plan import PrefetchDecision

ALL_OFFLOADED = "\n".join(f'[layer2.models.{m}]\noffload_config = {{ offload_type = "MODEL_CPU_OFFLOAD" }}'
                          for m in ("text_encoder", "dit", "vae"))


class Toy(torch.nn.Module):
    """Parameters and buffers of several dtypes and shapes, a tied weight, a shared submodule, a scalar."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(11, 8)
        self.lin = torch.nn.Linear(8, 8)
        self.low = torch.nn.Linear(8, 8).to(torch.bfloat16)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter in two modules
        self.again = self.lin  # the same submodule twice
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.register_buffer("mask", torch.rand(8, generator=g) > 0.5)
        self.register_buffer("phase", torch.polar(torch.ones(4), torch.rand(4, generator=g)))
        self.register_buffer("ids", torch.arange(3, dtype=torch.int64), persistent=False)
        self.register_buffer("empty", torch.zeros(0, 8))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens + self.ids[0])
        x = self.again(self.lin(x)) * self.mask + self.phase.abs().sum() + self.empty.sum()
        x = self.low(x.to(torch.bfloat16)).float()
        return self.head(self.norm(x)) * self.scale


def tokens() -> torch.Tensor:
    return torch.tensor([[1, 4, 9, 2], [0, 10, 3, 3]])


def ranges(tensors) -> list[tuple[int, int]]:
    return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]


def inside(tensor: torch.Tensor, spans) -> bool:
    return tensor.numel() > 0 and any(lo <= tensor.data_ptr() < hi for lo, hi in spans)


def host_tensors(weights: OffloadedWeights) -> list[torch.Tensor]:
    """The host copy of every tensor (the views the module holds while inactive), once packed."""
    weights._wait_packed()
    return [slot.host for slot in weights.slots]


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *(b for b in module.buffers() if b.numel())]


class Copies(TorchDispatchMode):
    """Every aten copy (in place, or into a new tensor) as (source, destination) data pointers and bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("copy_", "_copy_from"):
            self.seen.append((args[1], args[0]))
        elif name in ("_to_copy", "clone", "to"):
            self.seen.append((args[0], out))
        return out


def test_offloaded_outputs_are_bit_identical_to_resident():
    resident = Toy().eval()
    expected = resident(tokens())
    model = Toy().eval()
    placement = Placement(model, torch.device("cpu"), offload=True, name="toy")
    for _ in range(3):  # several in/out cycles
        with torch.inference_mode(), placement.active() as active:
            assert torch.equal(active(tokens()), expected)
    assert torch.equal(model(tokens()), expected)  # inactive: the host copies themselves, still exact


def test_active_points_at_the_device_copy_and_back_at_the_same_host_memory():
    model = Toy().eval()
    placement = Placement(model, torch.device("cpu"), offload=True, name="toy")
    weights = placement.weights
    chunks = ranges(weights.chunks)
    before = [t.data_ptr() for t in module_tensors(model)]
    assert all(inside(t, chunks) for t in module_tensors(model))
    chunk_ptrs = [c.data_ptr() for c in weights.chunks]
    for _ in range(2):
        with placement.active():
            device = ranges([weights.device_buffer])
            assert all(inside(t, device) and not inside(t, chunks) for t in module_tensors(model))
            assert model.head.weight is model.embed.weight  # still tied
        assert weights.device_buffer is None  # dropped, not kept
        assert [t.data_ptr() for t in module_tensors(model)] == before
    assert [c.data_ptr() for c in weights.chunks] == chunk_ptrs
    assert weights.copies_in == 2 and weights.bytes_in == 2 * weights.nbytes


def test_moving_out_copies_nothing_back(monkeypatch):
    model = Toy().eval()
    placement = Placement(model, torch.device("cpu"), offload=True, name="toy")
    weights = placement.weights
    host = ranges(weights.chunks)
    snapshot = [c.clone() for c in weights.chunks]
    applied = []
    original_apply = torch.nn.Module._apply
    monkeypatch.setattr(torch.nn.Module, "_apply",
                        lambda self, *a, **k: applied.append(self) or original_apply(self, *a, **k))
    with Copies() as copies:
        for _ in range(2):
            start = len(copies.seen)
            with torch.inference_mode(), placement.active() as active:
                device = ranges([weights.device_buffer])
                active(tokens())
            # moving in: one copy per host chunk, from the chunk into the device buffer
            copied_in = [(s, d) for s, d in copies.seen[start:] if inside(d, device)]
            assert len(copied_in) == len(weights.chunks) and all(inside(s, host) for s, _ in copied_in)
            assert sum(d.numel() * d.element_size() for _, d in copied_in) == weights.nbytes
    assert not applied, "module.to()/_apply moved the model"
    assert not [d for _, d in copies.seen if inside(d, host)], "something was copied into the host copies"
    assert all(torch.equal(a, b) for a, b in zip(weights.chunks, snapshot))


def test_a_model_loaded_on_the_device_copies_nothing_in_first_and_is_packed_in_the_background(monkeypatch):
    expected = Toy().eval()(tokens())
    model = Toy().eval()
    originals = [t.clone() for t in module_tensors(model)]
    loaded = [t.data_ptr() for t in module_tensors(model)]
    threading = __import__("threading")
    gate, packed = threading.Event(), threading.Event()
    pack = OffloadedWeights._pack

    def held(self, *args, **kwargs):  # the background copy finishes only when the test says so
        gate.wait(10)
        pack(self, *args, **kwargs)
        packed.set()

    monkeypatch.setattr(OffloadedWeights, "_pack", held)
    placement = Placement(model, torch.device("cpu"), offload=True, name="toy", loaded_on_device=True)
    weights = placement.weights
    with placement.active() as active:  # first use: the tensors it was loaded with, nothing copied
        assert torch.equal(active(tokens()), expected)
        assert [t.data_ptr() for t in module_tensors(model)] == loaded
        assert not packed.is_set()
        threading.Timer(0.2, gate.set).start()  # the host copy completes while the use is still running
    # the use's end waited for the host copy, then dropped the device copy: the next stage's estimate holds
    assert packed.is_set() and not weights.loaded_on_device and weights.copies_in == 0
    assert all(torch.equal(t, o) for t, o in zip(module_tensors(model), originals))
    host = {t.data_ptr() for t in host_tensors(weights) if t.numel()}
    assert {t.data_ptr() for t in module_tensors(model) if t.numel()} == host
    for _ in range(2):  # from then on it moves like any offloaded model
        with placement.active() as active:
            assert torch.equal(active(tokens()), expected)
    assert weights.copies_in == 2 and {t.data_ptr() for t in module_tensors(model) if t.numel()} == host


def test_a_failed_background_copy_is_raised_where_the_model_is_released(monkeypatch):
    def fail(self, *args, **kwargs):
        raise RuntimeError("can't allocate memory: pinned host memory exhausted")

    monkeypatch.setattr(OffloadedWeights, "_pack", fail)
    placement = Placement(Toy().eval(), torch.device("cpu"), offload=True, name="toy", loaded_on_device=True)
    placement.weights._packer.join()
    with pytest.raises(RuntimeError, match="pinned host memory exhausted"):
        with placement.active():
            pass


def test_chunks_are_powers_of_two_and_waste_little():
    mib = 1 << 20
    sizes = [2100 * mib, 700 * mib, 3, 0, *[37 * mib] * 90, *[5000] * 400]
    capacities, where = plan_chunks(sizes, granule=32 * mib)
    assert all(c % (32 * mib) == 0 and (c // (32 * mib)) & (c // (32 * mib) - 1) == 0 for c in capacities)
    spans = sorted((chunk, offset, offset + offload._aligned(n)) for n, (chunk, offset) in zip(sizes, where) if n)
    for (c1, _, end), (c2, start, _) in zip(spans, spans[1:]):
        assert c1 != c2 or end <= start  # no overlap
    assert all(end <= capacities[c] for c, _, end in spans)
    assert all(offset % offload.ALIGN == 0 for _, offset in where)
    aligned_total = sum(offload._aligned(n) for n in sizes)
    assert sum(capacities) <= aligned_total + 32 * mib  # not the 2x a single rounded-up allocation can cost
    one, _ = plan_chunks([CHUNK_GRANULE * 5 + 1])  # a tensor larger than the decomposition's chunks
    assert sum(one) >= CHUNK_GRANULE * 5 + 1


def test_prefetch_copies_during_the_previous_use_and_activation_waits_for_it():
    first, second = Toy().eval(), Toy().eval()
    expected = Toy().eval()(tokens())
    placements: dict[str, Placement] = {}
    decision = PrefetchDecision(model="second", stage="late", during_stage="early", during_model="first",
                                prefetch=True, peak_bytes=1, reason="fits")
    schedule = PrefetchSchedule([decision], placements, torch.device("cpu"))
    placements["first"] = Placement(first, torch.device("cpu"), offload=False, name="first", schedule=schedule)
    placements["second"] = Placement(second, torch.device("cpu"), offload=True, name="second", schedule=schedule)
    weights = placements["second"].weights
    schedule.enter_stage("elsewhere")
    with placements["first"].active():
        assert weights.device_buffer is None  # only in the recorded stage
    schedule.enter_stage("early")
    with placements["first"].active():
        assert weights.copies_in == 1 and weights.device_buffer is not None
        assert all(not inside(t, ranges([weights.device_buffer])) for t in module_tensors(second))  # not yet swapped
    schedule.enter_stage("late")
    with torch.inference_mode(), placements["second"].active() as model:
        assert weights.copies_in == 1  # used the prefetched copy
        assert torch.equal(model(tokens()), expected)
    assert schedule.started == [("early", "second")]


def test_a_prefetched_model_its_stage_did_not_use_is_dropped_after_that_stage():
    placements: dict[str, Placement] = {}
    decision = PrefetchDecision(model="low", stage="denoise", during_stage="denoise", during_model="high",
                                prefetch=True, peak_bytes=1, reason="fits")
    schedule = PrefetchSchedule([decision], placements, torch.device("cpu"))
    for name in ("high", "low"):
        placements[name] = Placement(Toy().eval(), torch.device("cpu"), offload=True, name=name, schedule=schedule)
    schedule.enter_stage("denoise")
    with placements["high"].active():  # every step above the boundary: the low-noise phase has none
        pass
    assert placements["low"].weights.device_buffer is not None
    schedule.enter_stage("decode_vae")
    assert placements["low"].weights.device_buffer is None and schedule.pending == {}
    schedule.enter_stage("denoise")  # next video: used this time, kept until its use
    with placements["high"].active():
        pass
    with placements["low"].active():
        assert placements["low"].weights.copies_in == 2
    schedule.enter_stage("decode_vae")
    assert schedule.pending == {}


def test_a_prefetch_that_runs_out_of_memory_falls_back_to_copying_at_use(monkeypatch):
    placement = Placement(Toy().eval(), torch.device("cpu"), offload=True, name="toy")

    def oom(stream=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 11.4 GiB")

    monkeypatch.setattr(placement.weights, "fetch", oom)
    with pytest.warns(RuntimeWarning, match="prefetching model 'toy' ran out of device memory"):
        assert placement.prefetch() is False
    monkeypatch.undo()
    with placement.active():
        assert placement.weights.copies_in == 1


def _compile(tmp_path, layer2_extra: str = ALL_OFFLOADED, overrides=()):
    recipe = write_recipe(model_set(tmp_path / "models"), layer2_extra=layer2_extra)
    return compile_recipe(recipe, overrides=list(overrides))


def test_prefetch_decisions_recorded_and_explained(tmp_path):
    plan = _compile(tmp_path)
    got = [(d.model, d.stage, d.during_stage, d.during_model, d.prefetch) for d in plan.memory.prefetch]
    assert got == [("text_encoder", "encode_text", "load_models", None, True),
                   ("dit", "denoise", "encode_text", "text_encoder", True),
                   ("vae", "decode_vae", "denoise", "dit", True)]
    assert plan.memory.prefetch[0].reason.startswith("read straight to the device at load for the first video")
    assert all(d.peak_bytes <= plan.memory.peak_bytes for d in plan.memory.prefetch)
    text = explain(plan)
    assert "dit            for denoise           prefetch during encode_text (text_encoder): both fit" in text
    assert "vae            for decode_vae        prefetch during denoise (dit)" in text
    assert "text_encoder   for encode_text       prefetch at load_models: read straight to the device" in text


def test_cli_explain_prints_the_prefetch_decisions(tmp_path, capsys):
    from telefuser.cli.compile import main

    recipe = write_recipe(model_set(tmp_path / "models"), layer2_extra=ALL_OFFLOADED)
    assert main([str(recipe), "-o", str(tmp_path / "plan.json")]) == 0
    assert main(["--explain", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "offload (MODEL_CPU_OFFLOAD" in out and "prefetch during denoise (dit)" in out


def test_a_prefetch_that_would_not_fit_records_no_prefetch(tmp_path):
    # The tiny models' peak is the 1 GiB workspace plus the VAE decode at 144p: a capacity just above it leaves
    # the plan valid but not 10% to spare for two models at once.
    plan = _compile(tmp_path, overrides=["target.memory_gib=1.05"])
    assert plan.memory.peak_bytes <= plan.memory.capacity_bytes
    later = plan.memory.prefetch[1:]
    assert later and not any(d.prefetch for d in later)
    for d in later:
        assert d.peak_bytes > PREFETCH_HEADROOM * plan.memory.capacity_bytes
        assert "over the limit of 0.94 GiB (90% of 1.05 GiB)" in d.reason
    assert "dit            for denoise           no prefetch during encode_text (text_encoder): both would need" in explain(plan)

    import telefuser

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.model_dump(mode="json", by_alias=True)))
    pipe = telefuser.load_plan(path)
    assert pipe.prefetch.triggers == {}
    pipe.run(prompt="a fox", seed=1, progress=False)
    assert pipe.prefetch.started == []
    assert all(p.weights.copies_in == 1 for p in pipe.placements.values())
    assert not plan.memory.prefetch[0].prefetch and "loading it on the device would need" in plan.memory.prefetch[0].reason


def test_prefetch_size_zero_turns_prefetch_off(tmp_path):
    extra = ALL_OFFLOADED.replace('[layer2.models.vae]\noffload_config = { offload_type = "MODEL_CPU_OFFLOAD" }',
                                  '[layer2.models.vae]\noffload_config = { offload_type = "MODEL_CPU_OFFLOAD", '
                                  'prefetch_size = 0 }')
    plan = _compile(tmp_path, layer2_extra=extra)
    vae = next(d for d in plan.memory.prefetch if d.model == "vae")
    assert not vae.prefetch and vae.reason == "layer2.models.vae.offload_config.prefetch_size = 0"


def test_pipeline_with_every_model_offloaded_makes_the_resident_video(tmp_path):
    import telefuser

    models = model_set(tmp_path / "models")
    plans = {}
    for name, extra in (("resident", ""), ("offloaded", ALL_OFFLOADED)):
        recipe = write_recipe(models, layer2_extra=extra, name=f"{name}.toml")
        plan = compile_recipe(recipe)
        path = tmp_path / f"{name}.plan.json"
        path.write_text(json.dumps(plan.model_dump(mode="json", by_alias=True)))
        plans[name] = telefuser.load_plan(path)
    expected = plans["resident"].run(prompt="a red fox", seed=5, progress=False).frames
    pipe = plans["offloaded"]
    assert all(p.offload for p in pipe.placements.values())
    # the text encoder, used first, was read straight to the "device" and is packed into host memory meanwhile
    assert pipe.placements["text_encoder"].weights.loaded_on_device
    host = {n: {t.data_ptr() for t in host_tensors(p.weights) if t.numel()} for n, p in pipe.placements.items()}
    first = None
    for round_ in (1, 2):
        video = pipe.run(prompt="a red fox", seed=5, progress=False)
        assert_same_arithmetic_up_to_kernel_choice(video.frames, expected)
        first = video.frames if first is None else first
        assert np.array_equal(video.frames, first)  # the same packed path twice: bit-identical, nothing drifts
        assert pipe.prefetch.started == [("encode_text", "dit"), ("denoise", "vae")] * round_
        for name, placement in pipe.placements.items():
            assert placement.weights.device_buffer is None  # nothing left on the device between videos
            assert not placement.weights.loaded_on_device
            # a prefetched model is not copied twice; the text encoder's first use copied nothing in
            assert placement.weights.copies_in == (round_ - 1 if name == "text_encoder" else round_)
            assert {t.data_ptr() for t in module_tensors(placement.module) if t.numel()} == host[name]
    # the offloaded models compute with exactly the resident weights, bit for bit
    for name, placement in pipe.placements.items():
        resident = plans["resident"].placements[name].module.state_dict()
        with placement.active() as module:
            for key, tensor in module.state_dict().items():
                assert torch.equal(tensor, resident[key]), (name, key)


def assert_same_arithmetic_up_to_kernel_choice(frames: np.ndarray, expected: np.ndarray) -> None:
    """The offloaded video against the resident one. On a CPU the resident weights are memory-mapped from the
    safetensors file (data at the header's end: 8-byte alignment) while the offloaded ones are views of a packed
    buffer (512-byte alignment); BLAS picks its GEMM code path by pointer alignment on some CPUs, which reorders
    float32 sums (~1e-7 relative). With bit-identical weights (checked above) that can only flip a uint8 rounding
    at a .5 boundary: at most 1 level, in well under 0.1% of the values (seen: 0.005%). A wrong weight, a stale
    device buffer or a model used before its copy landed changes most pixels by far more."""
    diff = np.abs(frames.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size, (diff.max(), np.count_nonzero(diff))


def test_a_text_encoder_read_to_the_device_at_load_is_run_once_there(tmp_path, monkeypatch):
    import telefuser
    import telefuser.runtime.stages.text_encode as text

    calls = []
    encode = text.encode_prompts
    monkeypatch.setattr(text, "encode_prompts", lambda *args: calls.append(args[2]) or encode(*args))
    models = model_set(tmp_path / "models")
    for name, extra, warmed in (("resident", "", []), ("offloaded", ALL_OFFLOADED, [[""]])):
        calls.clear()
        plan = compile_recipe(write_recipe(models, layer2_extra=extra, name=f"{name}.toml"))
        path = tmp_path / f"{name}.plan.json"
        path.write_text(json.dumps(plan.model_dump(mode="json", by_alias=True)))
        pipe = telefuser.load_plan(path)
        assert calls == warmed  # an empty prompt, at load, only for the model the plan reads to the device then
        if warmed:
            weights = pipe.placements["text_encoder"].weights
            assert weights.loaded_on_device and weights.copies_in == 0  # not counted as its first use
            pipe.run(prompt="a fox", seed=1, progress=False)
            assert weights.copies_in == 0 and calls == [[""], ["a fox", ""]]


def test_plans_without_prefetch_decisions_still_load(tmp_path):
    from telefuser.schema.canonical import plan_hash
    from telefuser.schema.plan import Plan

    raw = _compile(tmp_path).model_dump(mode="json", by_alias=True)
    del raw["memory"]["prefetch"]  # as an older TeleFuser wrote it
    raw["plan_hash"] = plan_hash(raw)
    plan = Plan.model_validate(raw)
    assert plan.memory.prefetch == []
    assert "prefetch: none recorded" in explain(plan)
    assert PrefetchSchedule(plan.memory.prefetch, {}, torch.device("cpu")).triggers == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offload_is_pinned_copies_nothing_back_and_prefetches_on_a_side_stream():
    device = torch.device("cuda")
    expected = Toy().eval().to(device)(tokens().to(device))
    placements: dict[str, Placement] = {}
    decision = PrefetchDecision(model="toy", stage="late", during_stage="early", during_model="first",
                                prefetch=True, peak_bytes=1, reason="fits")
    schedule = PrefetchSchedule([decision], placements, device)
    placements["first"] = Placement(torch.nn.Linear(4, 4).to(device), device, offload=False, name="first",
                                    schedule=schedule)
    placements["toy"] = Placement(Toy().eval(), device, offload=True, name="toy", schedule=schedule)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(device)  # the resident model included
    weights = placements["toy"].weights
    assert weights.pinned and all(c.is_pinned() for c in weights.chunks)
    assert all(not t.is_cuda for t in module_tensors(placements["toy"].module))
    with Copies() as copies:
        for _ in range(3):
            with torch.inference_mode(), placements["toy"].active() as model:  # copied in on the current stream
                assert all(t.is_cuda for t in module_tensors(model))
                assert torch.equal(model(tokens().to(device)), expected)
            schedule.enter_stage("early")
            with placements["first"].active():  # prefetch on the side stream
                torch.cuda._sleep(10_000_000)  # work on the current stream while the side stream copies
            schedule.enter_stage("late")
            with torch.inference_mode(), placements["toy"].active() as model:
                assert torch.equal(model(tokens().to(device)), expected)
            assert not any(t.is_cuda for t in module_tensors(placements["toy"].module))
    d2h = [(s, d) for s, d in copies.seen if s.is_cuda and not d.is_cuda]
    assert not d2h, "a device-to-host copy happened while moving the model out"
    assert weights.copies_in == 6 and len(schedule.started) == 3
    del d2h
    copies.seen.clear()  # the recorded copies hold the device buffers' views
    torch.cuda.synchronize()
    # A buffer used on the side stream is released once its recorded use is seen complete, which the caching
    # allocator checks at its next allocation: make one before reading the count.
    flush = torch.empty(1, device=device)
    assert torch.cuda.memory_allocated(device) - baseline - flush.nbytes < weights.nbytes  # the buffers were freed
