"""The runtime's output: uint8 frames plus how long each stage took; written to mp4 atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from telefuser.atomic import atomic_output
from telefuser.errors import OutputPathError


@dataclass
class Timings:
    """Seconds per stage of one run (load is the pipeline's, shared by its runs)."""

    load: float = 0.0
    encode: float = 0.0
    steps: list[float] = field(default_factory=list)
    decode: float = 0.0
    vfi: float = 0.0  # frame interpolation (plans with layer2.enable_vfi)
    write: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    # the plan's step caches: {model: {branch: {"computed": n, "reused": n}}} (branch "cond" / "uncond")
    step_cache: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    def summary(self) -> str:
        """The closing summary `telefuser-run` prints."""
        steps = self.steps
        per_step = f"{sum(steps) / len(steps):.3f} s/step" if steps else "no steps"
        lines = [
            f"load      {self.load:8.2f} s",
            f"encode    {self.encode:8.2f} s",
            f"denoise   {sum(steps):8.2f} s  ({len(steps)} steps, {per_step})",
            f"decode    {self.decode:8.2f} s",
            *([f"vfi       {self.vfi:8.2f} s"] if self.vfi else []),
            f"write     {self.write:8.2f} s",
            f"peak mem  {self.peak_memory_bytes / 2**20:8.1f} MiB ({self.peak_memory_kind})",
        ]
        for model, branches in self.step_cache.items():
            counts = ", ".join(f"{b} {c['computed']} computed / {c['reused']} reused" for b, c in branches.items())
            lines.append(f"cache     {model}: {counts}")
        return "\n".join(lines)


@dataclass
class Video:
    """Frames `[F, H, W, 3]` uint8 (RGB) at `fps`."""

    frames: np.ndarray
    fps: int
    timings: Timings = field(default_factory=Timings)

    def __post_init__(self) -> None:
        if self.frames.dtype != np.uint8 or self.frames.ndim != 4 or self.frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [F, H, W, 3], got {self.frames.dtype} {self.frames.shape}")

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.frames.shape[2], self.frames.shape[1]

    def save(self, path: str | os.PathLike) -> Path:
        """Write an H.264 (yuv420p) mp4; the file appears complete or not at all."""
        start = time.perf_counter()
        target = check_output_path(path)
        write_mp4_atomically(target, self.frames, self.fps)
        self.timings.write = time.perf_counter() - start
        return target


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse, before any work is done, an output that cannot be written as an mp4."""
    hint = "choose a writable folder and a file name ending in .mp4 (for example -o out/video.mp4)"
    if "\x00" in os.fspath(path):
        raise OutputPathError(f"output path {os.fspath(path)!r} holds a NUL character, which no path can; {hint}.")
    target = Path(path).expanduser().absolute()
    if target.suffix.lower() != ".mp4":
        raise OutputPathError(f"output path {str(path)!r} does not end in .mp4; {hint}.")
    try:
        if target.is_dir():
            raise OutputPathError(f"output path {str(path)!r} is a folder, not a file; {hint}.")
        folder = target.parent
        if not folder.is_dir():
            raise OutputPathError(f"the folder {str(folder)!r} of output {str(path)!r} does not exist; create it or {hint}.")
        # A real probe (os.access says yes to root even on read-only mounts), named like the temporary file
        # of write_mp4_atomically plus a character: a name too long for that is refused now, not after the run.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{target.name}.", suffix=".partial.probe"):
            pass
        if target.exists() and not os.access(target, os.W_OK):
            raise OutputPathError(f"output {str(path)!r} exists and is not writable; {hint}.")
    except OSError as exc:  # not writable, name too long, a path through a file, ...
        raise OutputPathError(f"output {str(path)!r} is not writable ({exc.strerror or exc}); {hint}.") from exc
    return target


def write_mp4_atomically(target: Path, frames: np.ndarray, fps: int) -> None:
    """Encode into a temporary file beside the target, then rename it over the target.

    The rename happens only when ffmpeg finished a complete mp4; a failed encoder, a full disk, an
    exception or an interrupt (KeyboardInterrupt, SIGTERM under telefuser-run) removes the temporary file
    and leaves the target as it was."""
    try:
        with atomic_output(target, suffix=".partial.mp4") as tmp:
            _encode(tmp, frames, fps)
            _check_complete_mp4(tmp)
    except OSError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, BrokenPipeError) or isinstance(exc.__context__, BrokenPipeError):
            reason = f"the encoder (ffmpeg) stopped before it had every frame ({reason})"
        raise OutputPathError(
            f"could not write {str(target)!r}: {reason}{_space_hint(target.parent)}; nothing was written. "
            "Check free disk space and permissions (ffmpeg's own message, if any, is above)."
        ) from exc


# imageio-ffmpeg's quality 1-10; for libx264 it passes -crf int((1 - quality / 10) * 51): 8 is -crf 10, below the
# crf 17-18 that x264's documentation calls visually lossless, so the file shows what the model made, not the encoder.
VIDEO_QUALITY = 8
# A write that failed with less free space than this left on its disk is reported as a full disk: more than the
# encoder's and the container's buffered writes (a few MiB) and less than one video of the largest plans (81 frames
# at 1280x720 at VIDEO_QUALITY: tens of MiB), so below it the write most likely ran out of room.
DISK_FULL_MARGIN_BYTES = 64 << 20


def _space_hint(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    if free >= DISK_FULL_MARGIN_BYTES:
        return ""
    return f" (the disk holding {str(folder)!r} is full: {free / 2**20:.1f} MiB free)"


class IncompleteVideo(OSError):
    """ffmpeg ended without writing a whole mp4 (it failed, or the disk filled up)."""


def _check_complete_mp4(path: Path) -> None:
    """The file must be an mp4 that ffmpeg finished: top-level boxes that cover it exactly, `mdat` and
    `moov` among them (ffmpeg writes `moov` last, so a file cut short lacks it or ends inside it)."""
    size = path.stat().st_size
    seen, offset = set(), 0
    with path.open("rb") as f:
        while offset < size:
            f.seek(offset)
            head = f.read(8)
            if len(head) < 8:
                break
            box_size, kind = struct.unpack(">I4s", head)
            if box_size == 1:  # 64-bit size follows
                large = f.read(8)
                box_size = struct.unpack(">Q", large)[0] if len(large) == 8 else 0
            elif box_size == 0:  # the last box runs to the end of the file
                box_size = size - offset
            if box_size < 8 or offset + box_size > size:
                break
            seen.add(kind)
            offset += box_size
    if offset != size or not {b"ftyp", b"mdat", b"moov"} <= seen:
        raise IncompleteVideo(f"the encoder (ffmpeg) ended without finishing the mp4 ({size} bytes, "
                              f"{'incomplete' if offset != size else 'no index'})")


def _encode(path: Path, frames: np.ndarray, fps: int) -> None:
    """H.264 (yuv420p) through imageio-ffmpeg's bundled ffmpeg."""
    import imageio_ffmpeg  # lazy: only writers need ffmpeg

    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p",
        fps=fps,
        codec="libx264",
        quality=VIDEO_QUALITY,
        macro_block_size=1,  # sizes come from the resolution table (multiples of 16); never rescale
        ffmpeg_log_level="error",
    )
    try:
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    except BaseException as exc:
        if not isinstance(exc, Exception):
            # KeyboardInterrupt / SIGTERM / SystemExit: thrown into the writer, it kills ffmpeg at once
            # instead of waiting for it to encode what it was sent; the caller removes the file.
            with contextlib.suppress(BaseException):
                writer.throw(exc)
        raise
    finally:
        writer.close()  # waits for ffmpeg, or stops it when a frame failed
