"""Damaged chunks: a zarr array whose failed reads name the chunk that cannot be decoded.

Every array the readers open is wrapped in :class:`CheckedArray`, so a corrupt chunk is an
:class:`~emdiffuse.errors.InputError` with the array, the chunk index and (for Zarr) its
stored key, wherever the read runs: on the client, in threads or on Dask workers.
"""

from __future__ import annotations

import itertools

import numpy as np
import zarr

from emdiffuse.errors import InputError


class CheckedArray(zarr.Array):
    """A zarr array whose reads turn an undecodable chunk into an ``InputError`` naming the
    array and the chunk, wherever the read runs (client, threads, Dask workers)."""

    label: str = ""
    show_keys: bool = True

    @classmethod
    def wrap(cls, array: zarr.Array, label: str, *, show_keys: bool = True) -> CheckedArray:
        checked = cls(array._async_array)
        checked.label, checked.show_keys = label, show_keys
        return checked

    def __getitem__(self, selection):
        try:
            return super().__getitem__(selection)
        except (InputError, MemoryError):
            raise
        except Exception as error:
            if isinstance(error, OSError) and error.errno is not None:
                raise  # the operating system failed, not the data
            damaged = self._damaged(selection, error)
            if damaged is None:
                raise
            raise damaged from None

    def _damaged(self, selection, error: Exception) -> InputError | None:
        """The first chunk under ``selection`` that fails on its own, as an InputError."""
        box = _box(selection, self.shape)
        if box is None:
            return None
        ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(box, self.chunks, strict=True)]
        for index in itertools.product(*ranges):
            region = tuple(
                slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.chunks, self.shape, strict=True)
            )
            try:
                super().__getitem__(region)
            except Exception:
                break
        else:
            return None
        where = f"chunk {index}"
        if self.show_keys:
            grid = self.shards or self.chunks
            shard = tuple(i * c // g for i, c, g in zip(index, self.chunks, grid, strict=True))
            where += f" (stored as {self.metadata.encode_chunk_key(shard)})"
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        return InputError(
            f"{self.label}: {where} cannot be decoded ({reason}); the input is damaged: "
            "restore it from a good copy (or re-export it) and run again"
        )


def _box(selection, shape: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """``selection`` (ints and unit-step slices) as (start, stop) per axis, else None."""
    items = selection if isinstance(selection, tuple) else (selection,)
    if len(items) > len(shape):
        return None
    box = []
    for item, n in zip(items, shape, strict=False):
        if isinstance(item, slice) and item.step in (None, 1):
            start, stop, _ = item.indices(n)
            box.append((start, max(start, stop)))
        elif isinstance(item, int | np.integer):
            i = int(item) % n if n else 0
            box.append((i, i + 1))
        else:
            return None
    return box + [(0, n) for n in shape[len(items) :]]

