"""Where a result came from: commit, package versions, the process that trained it."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("ltr-harness", "torch", "torchvision", "numpy", "sqlalchemy")


def git_commit() -> str:
    """HEAD of the harness checkout, with '+dirty' when tracked files other than the store
    and the generated reports are modified."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        # the store and the reports are what runs write, not what produces a result
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results.db", ":(exclude)reports"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(device=None) -> dict[str, str]:
    """Python's and the packages' versions; on a CUDA `device` also the CUDA and cuDNN that torch
    was built with, which pick the GPU's kernels."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    if device is not None and device.type == "cuda":
        import torch

        out.update(cuda=str(torch.version.cuda), cudnn=str(torch.backends.cudnn.version()))
    return out


def cpu_model() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())[:60]
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def boot_id() -> str | None:
    """This boot of this machine (Linux); None where the system does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux); None if unknown. With the
    pid it names one process: pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])   # field 22; the name before ")" may hold spaces


def this_process() -> dict:
    """What a running row records of the process that trains it, so that a later harness
    process on the same machine can tell that it died (`process_gone`)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot": boot_id(), "start": process_start(os.getpid())}


def process_gone(process: dict | None) -> bool:
    """True only when the process `this_process()` described is known to have ended: it ran on
    this machine, and the machine has rebooted since, or no process has its pid, or the one that
    has it started at another time. Another machine's process, or a row from before processes
    were recorded, cannot be told: False."""
    if not process or process.get("host") != socket.gethostname() or os.name != "posix":
        return False   # (on Windows os.kill(pid, 0) would end the process, not probe it)
    if process.get("boot") and boot_id() and process["boot"] != boot_id():
        return True
    try:
        os.kill(process["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:   # alive, another user's
        pass
    start = process_start(process["pid"])
    return process.get("start") is not None and start is not None and start != process["start"]
