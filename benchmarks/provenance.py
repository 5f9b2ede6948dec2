"""The provenance record every benchmark result JSON carries under ``"provenance"``.

    from provenance import provenance
    record = provenance()  # at the start of the run: the commit and load the run began with

* ``command`` / ``argv``: the command line that produced the result, the interpreter written
  ``python``; absolute paths inside the repository are made relative to ``cwd``, the folder
  it ran in (relative to the repository root), so ``cd <cwd> && <command>`` repeats it;
* ``machine``: CPU model, logical CPUs, CPUs this process may use (affinity) and the cgroup v2
  CPU quota, RAM, the CUDA GPUs torch sees, OS, platform, load average;
* ``versions``: Python, emdiffuse, torch, numpy, dask, distributed, zarr;
* ``git``: the commit of the tree, whether it had uncommitted changes (``dirty``), and which
  files (``changed``: modified tracked files and untracked, non-ignored ones; at most 50);
* ``utc``: when the record was taken.

Standard library only: versions come from the installed packages' metadata; torch is imported
only to ask it for a GPU. Check it by hand: ``python benchmarks/provenance.py --any --args``
prints the record.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("emdiffuse", "torch", "numpy", "dask", "distributed", "zarr")


def provenance(argv: list[str] | None = None) -> dict:
    """The record of this run: ``command``, ``machine``, ``versions``, ``git``, ``utc``.

    ``argv`` is the command line as ``sys.argv`` spells it (script first); by default the
    interpreter's own ``sys.orig_argv``, which keeps ``-m`` and interpreter options.
    """
    if argv is None:
        argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))[1:]
    argv = ["python", *(_relative(a) for a in argv)]
    return {
        "command": shlex.join(argv),
        "argv": argv,
        "cwd": _where(Path.cwd()),
        "machine": _machine(),
        "versions": {"python": platform.python_version()}
        | {name: _version(name) for name in PACKAGES},
        "git": _git(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _relative(arg: str) -> str:
    """``arg`` relative to the working directory if both are inside the repository and
    ``arg`` is an absolute path (``command`` then runs as it is in ``cwd``)."""
    path, cwd = Path(arg), Path.cwd().resolve()
    if path.is_absolute() and path.resolve().is_relative_to(ROOT) and cwd.is_relative_to(ROOT):
        return os.path.relpath(path.resolve(), cwd)
    return arg


def _where(path: Path) -> str:
    """``path`` relative to the repository root when inside it (``.`` for the root)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _machine() -> dict:
    cpuinfo = _read("/proc/cpuinfo") or ""
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
              if ln.startswith("model name")]  # fmt: skip
    quota = (_read("/sys/fs/cgroup/cpu.max") or "max").split()  # cgroup v2: "QUOTA PERIOD"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    return {
        "cpu": models[0] if models else platform.processor() or platform.machine(),
        "cpus_logical": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_quota": float(quota[0]) / float(quota[1]) if quota[0] != "max" else None,
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "gpu": _gpu(),
        "os": _os(),
        "platform": platform.platform(),
        "load_average": load_average(),
    }  # fmt: skip


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (on a shared machine: the noise of a timing)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return []


def _gpu() -> list[str] | None:
    """The CUDA devices torch sees (None without torch or without a GPU)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _os() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", platform.system())
    except (OSError, AttributeError):
        return f"{platform.system()} {platform.release()}"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict:
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  check=False, timeout=30)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD").strip() or None
    # "XY path" lines: tracked changes, and untracked files that git does not ignore
    changed = [line[3:] for line in git("status", "--porcelain").splitlines()] if commit else []
    return {
        "commit": commit,
        "dirty": bool(changed) if commit else None,
        "changed": changed[:50],
    }


if __name__ == "__main__":
    print(json.dumps(provenance(), indent=1))
