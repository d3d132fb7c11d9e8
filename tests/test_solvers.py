"""Flow-matching solvers against the diffusers schedulers they must reproduce, step for step.

Tolerances:
- Schedules (``sigmas``, ``timesteps``) must be bit-identical: both sides build them with the
  same float64 operations in the same order and round once to float32 (integer timesteps are
  truncated from the same float64 values).
- Samples after every step: relative error ``max|ours - ref| / max|ref| < 1e-4`` in float32.
  The schedules being identical, the only differences are rounding: diffusers computes the
  step coefficients in float32 (log-SNR values up to ~14 in magnitude lose ~1e-6 absolute;
  UniPC's phi-function terms cancel, losing up to ~1e-5 relative), ours in float64, plus
  float32 reassociation in the tensor updates. Measured worst case over these loops is
  ~3e-6; an actual mistake in a coefficient or in the multistep history gives errors of
  1e-3 and more, so 1e-4 separates the two with a wide margin on both sides.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from telefuser.runtime.solvers import SOLVER_NAMES, STEP_LIST_SOLVERS, make_solver, shift_sigmas
from telefuser.schema.enums import SampleSolver

STEP_COUNTS = (1, 2, 4, 10, 50)
# 1.0: no shift; 3.0: Wan2.1 I2V 480p; 5.0: Wan2.1 T2V and Wan2.2 I2V/TI2V; 12.0: Wan2.2 T2V-A14B.
SHIFTS = (1.0, 3.0, 5.0, 12.0)
SAMPLE_SHAPE = (2, 4, 3, 6, 8)  # [B, C, F, H, W], latent layout
RELATIVE_TOLERANCE = 1e-4

# diffusers 0.42 under numpy 2 warns inside its own DPM scheduler constructor; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def reference_scheduler(name: str, num_inference_steps: int, shift: float):
    if name == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    elif name == "unipc":
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    else:
        scheduler = DPMSolverMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            algorithm_type="dpmsolver++",
            solver_order=2,
        )
    scheduler.set_timesteps(num_inference_steps)
    # Both sides step by position; this skips diffusers' timestep-value lookup.
    scheduler.set_begin_index(0)
    return scheduler


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def random_velocity(generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda sample: torch.randn(sample.shape, generator=generator)


def smooth_velocity(sample: torch.Tensor) -> torch.Tensor:
    return torch.sin(3.0 * sample) + 0.5 * sample


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_schedule_is_bit_identical_to_diffusers(name: str, shift: float, steps: int) -> None:
    ours = make_solver(name, steps, shift)
    reference = reference_scheduler(name, steps, shift)
    assert ours.timesteps.dtype == torch.float32 and ours.sigmas.dtype == torch.float32
    assert torch.equal(ours.sigmas, reference.sigmas)
    assert torch.equal(ours.timesteps, reference.timesteps.to(torch.float32))


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("model", ["random", "smooth"])
def test_every_step_matches_diffusers(name: str, shift: float, steps: int, model: str) -> None:
    generator = torch.Generator().manual_seed(zlib.crc32(f"{name}/{shift}/{steps}/{model}".encode()))
    velocity_of = random_velocity(generator) if model == "random" else smooth_velocity
    ours = make_solver(name, steps, shift)
    reference = reference_scheduler(name, steps, shift)
    our_sample = torch.randn(SAMPLE_SHAPE, generator=generator)
    reference_sample = our_sample.clone()
    for index, timestep in enumerate(ours.timesteps):
        velocity = velocity_of(reference_sample)
        reference_sample = reference.step(velocity, reference.timesteps[index], reference_sample).prev_sample
        our_sample = ours.step(velocity, timestep, our_sample)
        error = relative_error(our_sample, reference_sample)
        assert error < RELATIVE_TOLERANCE, f"step {index}: relative error {error:.2e}"


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_exact_velocity_follows_the_straight_path(name: str, shift: float) -> None:
    """With the true velocity of x = (1 - sigma) x0 + sigma n, every solver stays on the path.

    Euler is exact for a constant velocity; the exponential integrators see a constant data
    prediction, for which their first-order part is exact and the differences vanish.
    """
    generator = torch.Generator().manual_seed(7)
    data, noise = torch.randn(2, *SAMPLE_SHAPE, generator=generator)
    solver = make_solver(name, 10, shift)
    sample = (1 - solver.sigmas[0]) * data + solver.sigmas[0] * noise
    for index, timestep in enumerate(solver.timesteps):
        sample = solver.step(noise - data, timestep, sample)
        sigma = solver.sigmas[index + 1]
        torch.testing.assert_close(sample, (1 - sigma) * data + sigma * noise, rtol=0, atol=1e-5)


def test_shift_formula() -> None:
    sigmas = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(sigmas, 1.0), sigmas)
    torch.testing.assert_close(shift_sigmas(sigmas, 3.0), 3 * sigmas / (1 + 2 * sigmas))
    assert shift_sigmas(0.5, 5.0) == pytest.approx(5 / 6)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sample_is_updated_in_float32(name: str, dtype: torch.dtype) -> None:
    """A bf16/fp16 loop equals the float32 loop on the same (rounded) inputs, rounded once per step."""
    generator = torch.Generator().manual_seed(3)
    low, full = make_solver(name, 4, 5.0), make_solver(name, 4, 5.0)
    sample = torch.randn(SAMPLE_SHAPE, generator=generator).to(dtype)
    for timestep in low.timesteps:
        velocity = torch.randn(SAMPLE_SHAPE, generator=generator).to(dtype)
        expected = full.step(velocity.float(), timestep, sample.float()).to(dtype)
        sample = low.step(velocity, timestep, sample)
        assert sample.dtype == dtype
        assert torch.equal(sample, expected)


def test_solver_names_match_the_schema() -> None:
    assert set(SOLVER_NAMES) | set(STEP_LIST_SOLVERS) == {solver.value for solver in SampleSolver}


def test_unknown_solver_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="euler, unipc, dpm\\+\\+"):
        make_solver("ddim", 10, 5.0)


@pytest.mark.parametrize(
    ("steps", "shift", "train_steps"),
    [(0, 5.0, 1000), (2.5, 5.0, 1000), (10, 0.0, 1000), (10, float("nan"), 1000), (10, 5.0, 0)],
)
def test_invalid_schedule_arguments_are_rejected(steps, shift, train_steps) -> None:
    with pytest.raises(ValueError):
        make_solver("unipc", steps, shift, train_steps)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_steps_must_follow_the_timesteps(name: str) -> None:
    solver = make_solver(name, 2, 5.0)
    sample = torch.zeros(SAMPLE_SHAPE)
    with pytest.raises(ValueError, match="expects timestep"):
        solver.step(sample, solver.timesteps[1], sample)
    for timestep in solver.timesteps:
        sample = solver.step(torch.ones(SAMPLE_SHAPE), timestep, sample)
    with pytest.raises(RuntimeError, match="fresh solver"):
        solver.step(sample, solver.timesteps[-1], sample)
