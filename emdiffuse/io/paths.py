"""Where a volume lives: a local path (``file://`` allowed) or an fsspec URL."""

from __future__ import annotations

from pathlib import Path

import fsspec


def is_url(path: str) -> bool:
    """A remote location (``s3://``, ``https://``, ...); ``file://`` is local."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> Path:
    """The local path of ``path`` (a ``file://`` prefix removed)."""
    return Path(path[len("file://") :]) if path.startswith("file://") else Path(path)


def exists(path: str) -> bool:
    """Whether ``path`` (local or URL) exists."""
    if is_url(path):
        fs, _, paths = fsspec.get_fs_token_paths(path)
        return fs.exists(paths[0])
    return local_path(path).exists()
