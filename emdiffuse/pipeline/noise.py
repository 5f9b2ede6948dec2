"""Counter-based noise keyed on global coordinates: the same tile gets the same noise in
every chunk that needs it and on every worker, whatever the order of computation.

A draw is a numpy ``Generator(Philox(key=k))`` where ``k`` is a 128-bit BLAKE2b hash of
``(seed, sample, origin z, y, x, step)``. Steps: ``INITIAL_STEP`` (-1) for the sampler's
starting noise x_T, ``0, 1, ...`` for the per-step noise of a stochastic sampler.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

INITIAL_STEP = -1


def noise_key(seed: int, sample: int, origin: tuple[int, ...], step: int) -> np.ndarray:
    """The 128-bit Philox key (two uint64) for one draw."""
    fields = (int(seed), int(sample), len(origin), *map(int, origin), int(step))
    packed = struct.pack(f"<{len(fields)}q", *fields)
    digest = hashlib.blake2b(packed, digest_size=16, person=b"emdiffuse-noise").digest()
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)


def tile_noise(
    seed: int, sample: int, origin: tuple[int, ...], step: int, shape: tuple[int, ...]
) -> np.ndarray:
    """Standard normal float32 noise of ``shape`` for the tile at global output-grid
    ``origin`` (zyx), sample index ``sample`` and sampler step ``step``."""
    generator = np.random.Generator(np.random.Philox(key=noise_key(seed, sample, origin, step)))
    return generator.standard_normal(shape, dtype=np.float32)
