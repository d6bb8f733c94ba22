"""What every benchmark records about where it ran: device name, git state, load, device sync."""

from __future__ import annotations

import os
import platform
import subprocess
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


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
