"""Reading a plan and refusing one that is tampered with, stale, or beyond this machine."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import pydantic

from telefuser.errors import PlanError, WeightsError
from telefuser.schema.plan import PLAN_FORMAT, PLAN_VERSION, Plan

RECOMPILE = "recompile the recipe (telefuser-compile RECIPE -o PLAN)"


def read_plan(path: str | Path) -> tuple[Plan, dict]:
    """The validated plan and its raw JSON (the hash is computed over the raw content)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PlanError(f"plan file {str(path)!r} does not exist; {RECOMPILE} or fix the path.") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PlanError(f"plan file {str(path)!r} is not readable JSON ({exc}); {RECOMPILE}.") from exc
    check_plan_version(raw, path)
    try:
        plan = Plan.model_validate(raw)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise PlanError(
            f"plan file {str(path)!r} is not a valid TeleFuser plan: at {where}: {first['msg']} "
            f"({exc.error_count()} problem(s) in all); {RECOMPILE} with this TeleFuser version."
        ) from exc
    return plan, raw


def check_plan_version(raw: object, path: str | Path) -> None:
    """A plan of another format version is refused by its version, before validation: a newer plan's new
    fields would otherwise read as a confusing 'extra field' error."""
    if not isinstance(raw, dict) or raw.get("format", PLAN_FORMAT) != PLAN_FORMAT or "version" not in raw:
        return  # not a plan at all, or without a version: the validation says what is wrong
    version = raw["version"]
    if version == PLAN_VERSION:
        return
    try:
        numbers = [tuple(int(part) for part in str(v).split(".")) for v in (version, PLAN_VERSION)]
        age = "a newer" if numbers[0] > numbers[1] else "an older"
    except ValueError:
        age = "another"
    by = raw.get("telefuser_version")
    made_by = f" (written by TeleFuser {by})" if isinstance(by, str) and by else ""
    raise PlanError(
        f"plan file {str(path)!r} is plan format version {str(version)!r}{made_by}, but this TeleFuser "
        f"reads plan format version {PLAN_VERSION!r}: it was compiled by {age} TeleFuser. "
        f"Run it with the TeleFuser that compiled it, or {RECOMPILE} with this version."
    )


def check_plan_hash(plan: Plan, raw: dict, path: str | Path) -> None:
    """The plan's content must still hash to its recorded plan_hash (no hand edits)."""
    from telefuser.schema.canonical import plan_hash

    actual = plan_hash(raw)
    if actual != plan.plan_hash:
        raise PlanError(
            f"plan file {str(path)!r} was changed after it was compiled: its content hashes to "
            f"{actual[:16]}... but it records plan_hash {plan.plan_hash[:16]}...; plans are frozen, so change "
            f"the recipe instead and {RECOMPILE}."
        )


def check_fingerprints(plan: Plan) -> None:
    """Every weight file must be present and unchanged since compilation (size + header hash)."""
    from telefuser.schema.fingerprint import fingerprint

    for model in plan.layer1_model_definition.models:
        for recorded in model.files:
            path = Path(recorded.path)
            if not path.is_file():
                raise WeightsError(
                    f"weight file {recorded.path!r} of model {model.name!r} is missing; restore it, or fix "
                    f"the model's path in the recipe and {RECOMPILE}."
                )
            try:
                now = fingerprint(path, full_hash=False)
            except (OSError, ValueError, zipfile.BadZipFile) as exc:
                raise WeightsError(
                    f"weight file {recorded.path!r} of model {model.name!r} cannot be read ({exc}): it is truncated, "
                    f"damaged or unreadable since the plan was compiled; restore the original file, or {RECOMPILE}."
                ) from exc
            if (now.size, now.header_sha256) != (recorded.size, recorded.header_sha256):
                raise WeightsError(
                    f"weight file {recorded.path!r} of model {model.name!r} changed since the plan was compiled "
                    f"(size {recorded.size} -> {now.size}, header hash {recorded.header_sha256[:12]} -> "
                    f"{now.header_sha256[:12]}); the plan's decisions may no longer hold, so {RECOMPILE}."
                )


def plan_records_sha256(plan: Plan) -> bool:
    """True when the plan was compiled with --hash-weights (some weight file has its full SHA-256)."""
    return any(f.sha256 for m in plan.layer1_model_definition.models for f in m.files)


def verify_weight_hashes(plan: Plan, progress: bool = True) -> int:
    """Every weight file whose SHA-256 the plan records must still have it: the whole file is read (in
    chunks, with a progress bar on large files). Refuses the first file that differs, naming it.

    Catches what `check_fingerprints` cannot: tensor bytes changed in place (a damaged download, a
    flipped bit, a same-size replacement with the same header). Returns the number of files checked."""
    from telefuser.schema.fingerprint import file_sha256

    checked = 0
    for model in plan.layer1_model_definition.models:
        for recorded in model.files:
            if not recorded.sha256:
                continue
            path = Path(recorded.path)
            where = f"weight file {recorded.path!r} of model {model.name!r}"
            if not path.is_file():
                raise WeightsError(f"{where} is missing; restore it, or fix the model's path in the recipe and {RECOMPILE}.")
            try:
                size = path.stat().st_size
                actual = file_sha256(path, progress=progress, what="verifying") if size == recorded.size else None
            except OSError as exc:
                raise WeightsError(f"{where} cannot be read ({exc.strerror or exc}); fix its permissions or restore "
                                   f"it, then run again (or {RECOMPILE}).") from exc
            if size != recorded.size:
                raise WeightsError(f"{where} changed since the plan was compiled (size {recorded.size} -> {size}); "
                                   f"restore the original file, or {RECOMPILE}.")
            if actual != recorded.sha256:
                raise WeightsError(
                    f"{where} is not the file the plan was compiled with: its SHA-256 is {actual[:16]}... but the "
                    f"plan records {recorded.sha256[:16]}... (the file was damaged or replaced); restore the "
                    "original file, or, if the new file is intended, recompile the recipe "
                    "(telefuser-compile --hash-weights RECIPE -o PLAN)."
                )
            checked += 1
    return checked


def check_target(plan: Plan) -> None:
    """This machine must offer what the plan was compiled for."""
    import torch

    world = plan.mesh.world_size
    needed = max(r.device_id for r in plan.mesh.ranks) + 1
    if plan.device == "cuda" and world > 1 and torch.cuda.is_available() and torch.cuda.device_count() < needed:
        raise PlanError(
            f"the plan runs {world} ranks on GPUs {sorted(r.device_id for r in plan.mesh.ranks)} but this machine "
            f"has {torch.cuda.device_count()} GPU(s); run it where {needed} GPUs are visible, or {RECOMPILE} "
            "for fewer devices (target.num_devices and layer2.parallel_config)."
        )
    missing = [name for name in plan.target.packages if importlib.util.find_spec(name) is None]
    if missing:
        raise PlanError(
            f"the plan's kernel choices assume the package(s) {', '.join(missing)}, which are not installed "
            f"here; install them, or {RECOMPILE} on this machine (target.device = \"auto\")."
        )
    if plan.device == "cuda":
        if not torch.cuda.is_available():
            raise PlanError(
                "the plan targets CUDA but this machine has no usable CUDA GPU (torch.cuda.is_available() is "
                f"False; torch {torch.__version__}); run it on a GPU machine, or set target.device = \"cpu\" "
                f"in the recipe and {RECOMPILE}."
            )
        if plan.target.compute_capability:
            have = "%d.%d" % torch.cuda.get_device_capability()
            if tuple(map(int, have.split("."))) < tuple(map(int, plan.target.compute_capability.split("."))):
                raise PlanError(
                    f"the plan was compiled for compute capability {plan.target.compute_capability} "
                    f"({plan.target.gpu or 'GPU'}) but this GPU is {have} ({torch.cuda.get_device_name()}); "
                    f"its kernel choices may not run here, so {RECOMPILE} for this GPU (target.device = \"auto\")."
                )
