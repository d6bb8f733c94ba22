"""What every benchmark records about where it ran (device name, git state, load), device sync, and
the phase timer."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"


def git(*cmd: str) -> str:
    """Output of ``git CMD`` in the checkout ("" when git is unavailable)."""
    try:
        out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    """The commit, "+dirty" when tracked files differ from it (the code measured is not that commit's)."""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + "+dirty" if git("status", "--porcelain", "--untracked-files=no") else commit


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Timestamps at phase boundaries, read after the phases ran.

    On CUDA each :meth:`mark` records a ``torch.cuda.Event`` on the current stream: the elapsed time
    between two marks is what that stream spent between them, and nothing waits for the device while
    the phases run. A device-wide ``torch.cuda.synchronize()`` between phases would also wait for
    work on side streams and charge it to the phase that happens to end there, hiding the gain of
    moving work off the main stream. :meth:`elapsed_ms` waits for the last event only (that stream,
    up to that point). On CPU the marks are ``time.perf_counter()``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def elapsed_ms(self) -> list[float]:
        """Milliseconds between consecutive marks; then the timer is empty again."""
        marks, self.marks = self.marks, []
        if self.cuda:
            marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]

    @staticmethod
    def describe(device: torch.device) -> str:
        return ("CUDA events on the current stream (no device-wide synchronize inside the timed phases)"
                if device.type == "cuda" else "time.perf_counter")


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def write_json(path: Path, data, indent: int = 2) -> None:
    """Write ``data`` as JSON atomically: a temporary file in the same folder, then a rename, so a
    reader (or a run killed mid-write) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n")
    os.replace(tmp, path)
