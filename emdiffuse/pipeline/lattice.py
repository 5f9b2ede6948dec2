"""Tile lattice fixed in global voxel coordinates, and output chunk -> covering tiles.

A run enhances a volume tile by tile. Tiles live on a lattice that is a function of the
volume shape, the task, the tile size and the overlap only — never of the output chunking —
so every output chunk that needs a tile computes the very same tile (same input, same noise)
and a voxel's blended value does not depend on how the output is chunked.

Grids. The *input grid* is the volume as read (axes zyx). The *output grid* is what the
model writes:

- denoise (``xy_scale = z_scale = 1``): the same grid.
- super-resolution (``xy_scale = k``): ``(nz, k*ny, k*nx)``; voxel size yx divided by k.
- isotropic reconstruction (``z_scale = k``): ``((nz - 1) * k + 1, ny, nx)``; voxel size z
  divided by k. Input slice ``i`` is kept unchanged as output slice ``i * k``; the ``k - 1``
  output slices ``i*k + 1 .. i*k + k - 1`` come from the model conditioned on input slices
  ``i`` and ``i + 1`` (one *z unit* per input interval).

2D variants run slice by slice: one z unit per input slice.

Lattice rule along y and x (per axis, on the input grid, tile ``t = T / k`` and stride
``s = (T - O) / k`` input voxels, with T and O on the output grid): origins ``0, s, 2s, ...``;
the last tile is shifted back so that it ends exactly at the volume edge (origin
``n_in - t``), so no tile reads outside the volume and the last overlap may be wider than O.
An axis shorter than one tile gets a single tile at origin 0 whose input is padded by
reflection (``numpy.pad(mode="symmetric")``) to the tile size; the padded part of its output
is cropped away. Output-grid origins are ``k`` times the input-grid origins.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

Box = tuple[tuple[int, int], ...]  # ((start, stop), ...) per axis, zyx


@dataclass(frozen=True)
class AxisTiling:
    """Tiles along one in-plane axis. ``length``, ``tile`` and ``overlap`` are on the output
    grid; ``scale`` is output voxels per input voxel along the axis."""

    length: int
    tile: int
    overlap: int
    scale: int = 1

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"axis length must be >= 1, got {self.length}")
        if self.tile < 1 or not 0 <= self.overlap < self.tile:
            raise ValueError(
                f"need tile >= 1 and 0 <= overlap < tile, got {self.tile}, {self.overlap}"
            )
        if self.tile % self.scale or self.overlap % self.scale or self.length % self.scale:
            raise ValueError(
                f"tile ({self.tile}), overlap ({self.overlap}) and length ({self.length}) "
                f"must be multiples of the scale factor {self.scale}"
            )

    @property
    def input_length(self) -> int:
        return self.length // self.scale

    @property
    def input_tile(self) -> int:
        return self.tile // self.scale

    @cached_property
    def origins(self) -> np.ndarray:
        """Tile origins on the output grid, strictly increasing."""
        n_in, t = self.input_length, self.input_tile
        if n_in <= t:
            return np.zeros(1, dtype=np.int64)
        stride = (self.tile - self.overlap) // self.scale
        count = math.ceil((n_in - t) / stride) + 1
        origins_in = np.minimum(np.arange(count, dtype=np.int64) * stride, n_in - t)
        return origins_in * self.scale

    def __len__(self) -> int:
        return len(self.origins)

    def tiles_between(self, start: int, stop: int) -> range:
        """Indices of the tiles whose output extent intersects ``[start, stop)``."""
        origins = self.origins
        first = int(np.searchsorted(origins + self.tile, start, side="right"))
        last = int(np.searchsorted(origins, stop, side="left"))
        return range(first, last)

    def output_extent(self, index: int) -> tuple[int, int]:
        """Output-grid ``[start, stop)`` of tile ``index``, cropped to the volume."""
        origin = int(self.origins[index])
        return origin, min(origin + self.tile, self.length)

    def input_extent(self, index: int) -> tuple[int, int]:
        """Input-grid ``[start, stop)`` read for tile ``index`` (before reflection padding)."""
        start, stop = self.output_extent(index)
        return start // self.scale, stop // self.scale


@dataclass(frozen=True)
class Tile:
    """One tile: z unit ``unit`` (an input slice, or an input interval for isotropic) and
    the in-plane lattice indices ``iy, ix``."""

    unit: int
    iy: int
    ix: int


@dataclass(frozen=True)
class Lattice:
    """The global tile lattice of one run.

    ``input_shape`` is zyx on the input grid; ``tile`` and ``overlap`` are in output-grid
    voxels along y and x (multiples of ``xy_scale``).
    """

    input_shape: tuple[int, int, int]
    tile: int
    overlap: int
    xy_scale: int = 1
    z_scale: int = 1

    def __post_init__(self) -> None:
        nz, ny, nx = self.input_shape
        if min(self.input_shape) < 1:
            raise ValueError(f"empty input shape {self.input_shape}")
        if self.z_scale > 1 and nz < 2:
            raise ValueError("isotropic reconstruction needs at least 2 input slices")

    @property
    def isotropic(self) -> bool:
        return self.z_scale > 1

    @property
    def output_shape(self) -> tuple[int, int, int]:
        nz, ny, nx = self.input_shape
        k = self.xy_scale
        out_z = (nz - 1) * self.z_scale + 1 if self.isotropic else nz
        return out_z, ny * k, nx * k

    @cached_property
    def y(self) -> AxisTiling:
        return AxisTiling(self.output_shape[1], self.tile, self.overlap, self.xy_scale)

    @cached_property
    def x(self) -> AxisTiling:
        return AxisTiling(self.output_shape[2], self.tile, self.overlap, self.xy_scale)

    @property
    def n_units(self) -> int:
        nz = self.input_shape[0]
        return nz - 1 if self.isotropic else nz

    @property
    def n_tiles(self) -> int:
        return self.n_units * len(self.y) * len(self.x)

    @property
    def tile_output_slices(self) -> int:
        """Output slices one tile produces (k - 1 for isotropic, else 1)."""
        return self.z_scale - 1 if self.isotropic else 1

    # --- z units -----------------------------------------------------------------------
    def unit_output_z(self, unit: int) -> tuple[int, int]:
        """Output-grid z ``[start, stop)`` written by the model for ``unit``."""
        if self.isotropic:
            k = self.z_scale
            return unit * k + 1, unit * k + k
        return unit, unit + 1

    def unit_input_z(self, unit: int) -> tuple[int, int]:
        """Input-grid z ``[start, stop)`` the model is conditioned on for ``unit``."""
        return (unit, unit + 2) if self.isotropic else (unit, unit + 1)

    def units_between(self, z0: int, z1: int) -> range:
        """z units whose model output intersects output z ``[z0, z1)``."""
        if not self.isotropic:
            return range(max(z0, 0), min(z1, self.n_units))
        k = self.z_scale
        # unit u writes [u*k + 1, u*k + k): it meets [z0, z1) iff u*k + k > z0 and u*k + 1 < z1
        first = max(0, z0 // k)
        last = min(self.n_units, -(-(z1 - 1) // k))
        return range(first, max(first, last))

    def kept_slices(self, z0: int, z1: int) -> list[tuple[int, int]]:
        """Isotropic only: ``(output z, input z)`` of the original slices in ``[z0, z1)``."""
        if not self.isotropic:
            return []
        k = self.z_scale
        return [(z, z // k) for z in range(z0, min(z1, self.output_shape[0])) if z % k == 0]

    # --- tiles -------------------------------------------------------------------------
    def tiles_in(self, box: Box) -> list[Tile]:
        """Tiles whose output intersects the output-grid ``box``, in global lattice order."""
        (z0, z1), (y0, y1), (x0, x1) = box
        return [
            Tile(u, iy, ix)
            for u in self.units_between(z0, z1)
            for iy in self.y.tiles_between(y0, y1)
            for ix in self.x.tiles_between(x0, x1)
        ]

    def all_tiles(self) -> Iterator[Tile]:
        for u in range(self.n_units):
            for iy in range(len(self.y)):
                for ix in range(len(self.x)):
                    yield Tile(u, iy, ix)

    def tile_origin(self, tile: Tile) -> tuple[int, int, int]:
        """Global output-grid origin (z, y, x) of a tile: the key of its noise."""
        return (
            self.unit_output_z(tile.unit)[0],
            int(self.y.origins[tile.iy]),
            int(self.x.origins[tile.ix]),
        )

    def tile_output_box(self, tile: Tile) -> Box:
        """Output-grid region the tile writes (cropped to the volume)."""
        return (
            self.unit_output_z(tile.unit),
            self.y.output_extent(tile.iy),
            self.x.output_extent(tile.ix),
        )

    def tile_input_box(self, tile: Tile) -> Box:
        """Input-grid region the tile reads (before reflection padding to the tile size)."""
        return (
            self.unit_input_z(tile.unit),
            self.y.input_extent(tile.iy),
            self.x.input_extent(tile.ix),
        )

    def read_box(self, box: Box) -> Box | None:
        """Input-grid region an output chunk needs: the union of its tiles' inputs and the
        kept original slices (isotropic). None when it needs nothing."""
        boxes = [self.tile_input_box(t) for t in self.tiles_in(box)]
        (z0, z1), (y0, y1), (x0, x1) = box
        k = self.xy_scale
        for _, zin in self.kept_slices(z0, z1):
            boxes.append(((zin, zin + 1), (y0 // k, -(-y1 // k)), (x0 // k, -(-x1 // k))))
        if not boxes:
            return None
        return tuple((min(b[a][0] for b in boxes), max(b[a][1] for b in boxes)) for a in range(3))


def chunk_grid(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    """Number of chunks per axis."""
    return tuple(-(-s // c) for s, c in zip(shape, chunks, strict=True))


def chunk_box(index: tuple[int, ...], shape: tuple[int, ...], chunks: tuple[int, ...]) -> Box:
    """Output-grid region of chunk ``index`` (clipped at the far border)."""
    return tuple((i * c, min((i + 1) * c, s)) for i, s, c in zip(index, shape, chunks, strict=True))


def iter_chunks(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """All chunk indices in C order."""
    yield from np.ndindex(*chunk_grid(shape, chunks))


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)
