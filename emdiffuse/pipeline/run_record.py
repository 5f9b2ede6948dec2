"""The record of a run inside its output: run config, finished-chunk markers, completion.

Layout under ``<out>/.emdiffuse/`` (zarr ignores it):

- ``run.json`` — what the run computes (input, model hash, steps, seed, tile, ...: the
  :meth:`~emdiffuse.pipeline.settings.RunSpec.record` of its settings), written before the
  first chunk; ``--resume`` refuses to continue a run whose record differs.
- ``done/<z>.<y>.<x>`` — one empty marker per finished output chunk, written after the
  chunk's data (and uncertainty) via an atomic rename, so a marker never exists for a chunk
  whose data was not fully written.
- ``complete`` — written after the pyramid and metadata: the run is finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from emdiffuse.errors import InputError
from emdiffuse.io.output_safety import RECORD_DIR  # the folder an output's marks live in


def record_dir(out: str | os.PathLike) -> Path:
    return Path(out) / RECORD_DIR


def file_sha256(path: str | os.PathLike, *, block: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (identifies a checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (against a crashed or killed process): a hidden
    temporary file renamed over ``path``. On failure (disk full, ...) the temporary file is
    removed and ``path`` keeps its old content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_run_config(out: str | os.PathLike, config: dict) -> None:
    _atomic_write(record_dir(out) / "run.json", json.dumps(config, indent=2, sort_keys=True))


def read_run_config(out: str | os.PathLike) -> dict | None:
    path = record_dir(out) / "run.json"
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict):
        raise InputError(
            f"the run record {path} is unreadable, so {out} cannot be resumed; "
            "pass --overwrite to start over"
        )
    return config


def check_run_config(out: str | os.PathLike, config: dict) -> None:
    """Raise InputError when ``out`` holds a run with a different config (or none)."""
    stored = read_run_config(out)
    if stored is None:
        raise InputError(
            f"{out} exists but holds no emdiffuse run record; "
            "choose another output or pass --overwrite"
        )
    # compare through JSON so tuples and lists are alike
    config = json.loads(json.dumps(config, sort_keys=True))
    differing = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
    if differing:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {config.get(k)!r}" for k in differing)
        raise InputError(
            f"cannot resume {out}: the run differs ({details}); "
            "rerun with the same settings or pass --overwrite"
        )


def marker_name(index: tuple[int, ...]) -> str:
    return ".".join(str(int(i)) for i in index)


def mark_done(out: str | os.PathLike, index: tuple[int, ...]) -> None:
    """Record chunk ``index`` as finished (call after its data is written)."""
    _atomic_write(record_dir(out) / "done" / marker_name(index), "")


def done_chunks(out: str | os.PathLike) -> set[tuple[int, ...]]:
    """Indices of the chunks recorded as finished."""
    folder = record_dir(out) / "done"
    if not folder.is_dir():
        return set()
    done = set()
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue  # an unfinished atomic write
        try:
            done.add(tuple(int(p) for p in entry.name.split(".")))
        except ValueError:
            continue
    return done


def mark_complete(out: str | os.PathLike) -> None:
    _atomic_write(record_dir(out) / "complete", "")


def is_complete(out: str | os.PathLike) -> bool:
    return (record_dir(out) / "complete").exists()


def clear_record(out: str | os.PathLike) -> None:
    """Forget a previous run's record (overwrite)."""
    shutil.rmtree(record_dir(out), ignore_errors=True)
