"""Machine, software versions and command line of a benchmark run, recorded in every result JSON."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import socket
import subprocess
import sys

from kiln import envs


def _version(package: str) -> str | None:
    try:
        module = __import__(package)
        return getattr(module, "__version__", None) or importlib.metadata.version(package)
    except Exception:
        try:
            return importlib.metadata.version(package)
        except Exception:
            return None


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def kiln_git() -> dict:
    """The git commit of the kiln source tree (``KILN_GIT_SHA`` wins, for copies without ``.git``)."""
    sha = envs.git_sha()
    if sha:
        return {"sha": sha, "dirty": None, "source": "KILN_GIT_SHA"}
    import kiln

    root = os.path.dirname(os.path.dirname(os.path.abspath(kiln.__file__)))
    sha = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if sha is None:
        return {"sha": None, "dirty": None, "source": "unavailable"}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return {"sha": sha, "dirty": bool(status), "source": "git"}


def machine_info() -> dict:
    import torch

    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["host_memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 2),
            gpu_compute_capability=f"{props.major}.{props.minor}",
            gpu_multiprocessors=props.multi_processor_count,
            cuda_runtime=torch.version.cuda,
        )
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["gpu_driver"] = smi.splitlines()[0].strip() if smi else None
    return info


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "kiln": _version("kiln"),
        "kiln_git": kiln_git(),
    }


def collect(argv: list[str] | None = None, config: dict | None = None) -> dict:
    """Everything needed to reproduce and compare a run."""
    argv = list(sys.argv if argv is None else argv)
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(argv),
        "argv": argv,
        "cwd": os.getcwd(),
        "machine": machine_info(),
        "versions": versions(),
        "config": config or {},
    }
