"""Never harm data: what emdiffuse wrote, and what a run must not touch.

:func:`refuse_output` checks an output before anything is written (not an input of the run,
not someone else's folder, writable); :func:`remove_output` deletes only what emdiffuse
wrote; :func:`make_output_folder` marks a folder as emdiffuse's. Recognised by
:func:`written_by_emdiffuse`: the folder marker, an image's run record or attributes, a
checkpoint's format tag.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from emdiffuse import __version__
from emdiffuse.errors import InputError
from emdiffuse.io.paths import is_url, local_path

# The folder inside an output that holds what emdiffuse records about it (zarr ignores it):
# the marker below, and an image's run record (emdiffuse.pipeline.run_record).
RECORD_DIR = ".emdiffuse"
# The mark of the folders emdiffuse fills (train, synth, demo).
OUTPUT_MARKER = Path(RECORD_DIR) / "output.json"
OUTPUT_KINDS = {
    "image": "an OME-Zarr image",
    "train": "a training run",
    "synth": "a synth folder",
    "demo": "an earlier demo folder",
    "checkpoint": "a checkpoint",
}
# Outputs that are folders a command fills: their parents are made, an empty one is taken.
_FILLED_FOLDERS = ("train", "synth", "demo")


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _is_our_checkpoint(path: Path) -> bool:
    """A .safetensors file whose header names the emdiffuse checkpoint format."""
    try:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= 1 << 26:
                return False
            header = json.loads(handle.read(size))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith("emdiffuse-checkpoint")


def written_by_emdiffuse(path: str | Path) -> str | None:
    """The kind (a key of ``OUTPUT_KINDS``) of the emdiffuse output at ``path``, or None.

    Recognised by what emdiffuse writes: the folder marker ``.emdiffuse/output.json``; an
    image's run record ``.emdiffuse/run.json`` or the ``emdiffuse`` attributes of its
    ``zarr.json``; a checkpoint's format tag (its ``.json`` sidecar: the model config keys);
    and, from before the marker, a demo's ``.emdiffuse-demo`` and a training run's settings.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return "checkpoint" if _is_our_checkpoint(path) else None
        config = _json(path) if path.suffix == ".json" else None
        return "checkpoint" if config is not None and {"variant", "unet"} <= set(config) else None
    if not path.is_dir():
        return None
    marker = _json(path / OUTPUT_MARKER) or {}
    if marker.get("kind") in OUTPUT_KINDS:
        return marker["kind"]
    if (path / RECORD_DIR / "run.json").is_file():
        return "image"
    attributes = (_json(path / "zarr.json") or {}).get("attributes")
    if isinstance(attributes, dict) and isinstance(attributes.get("emdiffuse"), dict):
        return "image"
    if (path / ".emdiffuse-demo").is_file():
        return "demo"
    settings = _json(path / "settings.json") or {}
    if {"task", "data", "patch"} <= set(settings) and (
        (path / "model.safetensors").is_file() or (path / "checkpoints").is_dir()
    ):
        return "train"
    return None


def _holdings(path: Path, limit: int = 3) -> str:
    """What is at ``path``, briefly: ``thesis.txt, data/, ...`` (or ``a file``)."""
    if not path.is_dir():
        return "a file"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def _not_ours(
    path_out, found: str | None, kind: str, resumable: bool, name: str = "output"
) -> str:
    """The refusal of an existing ``path_out`` that is not an emdiffuse output of ``kind``."""
    wanted = OUTPUT_KINDS[kind]
    options = "--overwrite and --resume act" if resumable else "--overwrite acts"
    if found is None:
        return (
            f"{name} {path_out} exists and was not written by emdiffuse, so it is not {wanted} "
            f"(it holds {_holdings(Path(path_out))}); {options} only on emdiffuse's own outputs: "
            "choose another output"
        )
    return (
        f"{name} {path_out} is {OUTPUT_KINDS[found]} written by emdiffuse, not {wanted}; "
        f"{options} only on {wanted}: choose another output"
    )


def _same(a: Path, b: Path) -> bool:
    try:
        return a == b or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _refuse_read_paths(path_out, out_path: Path, sources, name: str) -> None:
    """Refuse an output that is, holds or lies inside one of ``sources`` (label, path)."""
    for label, read in sources:
        if read is None or is_url(str(read)):
            continue
        read_path = local_path(str(read)).resolve()
        if _same(out_path, read_path):
            raise InputError(
                f"{name} {path_out} is the {label} {read}, an input of this run; "
                "choose another output"
            )
        if read_path in out_path.parents:
            raise InputError(
                f"{name} {path_out} is inside the {label} {read}; choose an output elsewhere"
            )
        if out_path in read_path.parents:
            raise InputError(
                f"{name} {path_out} contains the {label} {read}; choose an output elsewhere"
            )


def _refuse_existing(
    path_out, out_path: Path, kind: str, replace: bool, resumable: bool, name: str
) -> None:
    """Refuse an existing output that is not emdiffuse's own of ``kind`` (an empty folder
    excepted), or that is and ``replace`` (overwrite or resume) was not asked for."""
    empty = out_path.is_dir() and not any(out_path.iterdir())
    if kind != "checkpoint" and not out_path.is_dir():
        raise InputError(f"{name} {path_out} is a file, not a folder; choose another output")
    found = None if empty else written_by_emdiffuse(out_path)
    if not empty and found != kind:
        raise InputError(_not_ours(path_out, found, kind, resumable, name))
    if not (replace or (empty and kind in _FILLED_FOLDERS)):
        again = " or --resume to continue it" if resumable else ""
        what = "an empty folder" if empty else f"{OUTPUT_KINDS[kind]} written by emdiffuse"
        raise InputError(
            f"{name} {path_out} exists ({what}); pass --overwrite to replace it{again}"
        )


def refuse_output(
    path_out: str | Path,
    path_in: str | Path | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    reads: Sequence[tuple[str, str | Path | None]] = (),
    kind: str = "image",
    resumable: bool | None = None,
    name: str = "output",
) -> None:
    """Refuse an output that would harm data, before anything is written.

    Refused: an output that is, holds or lies inside a path the run reads (``path_in``, the
    input, and ``reads``: ``(label, path)`` pairs such as ``("model", ckpt)``); an existing
    output without ``overwrite``/``resume``; and, whatever the flags, an existing output
    that is not an emdiffuse output of ``kind`` (:func:`written_by_emdiffuse`) — an empty
    folder excepted. ``resumable`` (default: ``resume`` is an option here, true for images)
    words the messages; ``name`` names the output in them.
    """
    out = str(path_out)
    if is_url(out):
        return
    resumable = kind in ("image", "train") if resumable is None else resumable
    out_path = local_path(out).resolve()
    _refuse_read_paths(path_out, out_path, [("input", path_in), *reads], name)
    if out_path.exists():
        _refuse_existing(path_out, out_path, kind, overwrite or resume, resumable, name)
    parent = out_path.parent
    if kind != "image":  # made with its parents: check the nearest folder that exists
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.exists():
        raise InputError(
            f"the folder {parent} for {name} {path_out} does not exist; create it first"
        )
    if not parent.is_dir():
        raise InputError(
            f"{parent} is a file, not a folder, so {name} {path_out} cannot go there; "
            "choose another output"
        )
    _check_writable(out_path if out_path.is_dir() else parent, path_out)


def remove_output(path: str | Path, kind: str) -> None:
    """Delete an earlier output of ``kind`` at ``path`` (nothing when absent). Only what
    emdiffuse wrote, or an empty folder, is ever deleted: anything else raises InputError."""
    path = local_path(str(path))
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        path.rmdir()
        return
    found = written_by_emdiffuse(path)
    if found != kind or path.is_symlink():
        raise InputError(_not_ours(path, found, kind, resumable=False))
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def make_output_folder(path: str | Path, kind: str, *, replace: bool = False) -> Path:
    """Create the folder ``path`` (and its parents) for an output of ``kind`` and mark it as
    emdiffuse's (``.emdiffuse/output.json``); ``replace`` first removes an earlier output of
    that kind (:func:`remove_output`). An existing folder is kept and marked."""
    path = Path(path)
    if replace:
        remove_output(path, kind)
    marker = path / OUTPUT_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"kind": kind, "emdiffuse": __version__}) + "\n")
    return path


def _check_writable(folder: Path, path_out) -> None:
    """Refuse an output whose folder cannot take new entries (read-only file system, no
    permission, a virtual file system such as /proc): try to make and remove an empty folder
    there, which catches what ``os.access`` misses (it says yes to root everywhere)."""
    try:
        probe = tempfile.mkdtemp(prefix=".emdiffuse-write-test-", dir=folder)
    except OSError as error:
        raise InputError(
            f"cannot write output {path_out}: {folder} is not writable ({error.strerror or error}); "
            "choose an output in a writable folder"
        ) from None
    Path(probe).rmdir()
