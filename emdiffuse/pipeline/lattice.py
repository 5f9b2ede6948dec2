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
  ``i`` and ``i + 1`` (one *z unit* per input interval), and on ``z_context`` slices beyond
  each of them where the model reads a z context (mirrored at the volume's ends).

2D variants run slice by slice: one z unit per input slice, conditioned on that slice and on
``z_context`` slices beyond it on each side where the model reads a z context (a denoiser
reading neighbouring slices; mirrored at the volume's ends in the same way).

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
    z_context: int = 0

    def __post_init__(self) -> None:
        nz, ny, nx = self.input_shape
        if min(self.input_shape) < 1:
            raise ValueError(f"empty input shape {self.input_shape}")
        if self.z_scale > 1 and nz < 2:
            raise ValueError("isotropic reconstruction needs at least 2 input slices")
        if self.z_context and self.xy_scale > 1:
            raise ValueError("z_context is for isotropic reconstruction and denoising")

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

    @property
    def redundancy(self) -> float:
        """Computed output voxels per output voxel: every tile whole (padding and overlaps
        included) over the output volume (the kept slices of an isotropic run cost nothing)."""
        computed = self.n_tiles * self.tile_output_slices * self.tile**2
        return computed / float(np.prod(self.output_shape))

    # --- z units -----------------------------------------------------------------------
    def unit_output_z(self, unit: int) -> tuple[int, int]:
        """Output-grid z ``[start, stop)`` written by the model for ``unit``."""
        if self.isotropic:
            k = self.z_scale
            return unit * k + 1, unit * k + k
        return unit, unit + 1

    def unit_input_z(self, unit: int) -> tuple[int, int]:
        """Input-grid z ``[start, stop)`` the model is conditioned on for ``unit`` and that
        lies in the volume (the z context beyond the volume is mirrored:
        :meth:`unit_input_pad`)."""
        c = self.z_context
        return max(unit - c, 0), min(unit + self._unit_slices + c, self.input_shape[0])

    def unit_input_pad(self, unit: int) -> tuple[int, int]:
        """Context slices of ``unit`` beyond the volume's first and last slice, ``(before,
        after)``: filled by mirroring the volume about its end slice (``numpy.pad``'s
        ``reflect``: slice ``-1`` is slice ``1``), a function of the volume, not of the
        chunking."""
        c = self.z_context
        return max(c - unit, 0), max(unit + self._unit_slices + c - self.input_shape[0], 0)

    @property
    def _unit_slices(self) -> int:
        """Input slices a z unit is made of: the bounding pair (isotropic), else the slice."""
        return 2 if self.isotropic else 1

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

    def input_box_of(self, tiles: list[Tile]) -> Box | None:
        """Input-grid union of the tiles' input boxes (None for no tiles)."""
        return _union([self.tile_input_box(t) for t in tiles])

    def output_box_of(self, tiles: list[Tile]) -> Box | None:
        """Output-grid union of the tiles' output boxes (None for no tiles)."""
        return _union([self.tile_output_box(t) for t in tiles])

    def read_box(self, box: Box) -> Box | None:
        """Input-grid region an output chunk needs: the union of its tiles' inputs and the
        kept original slices (isotropic). None when it needs nothing."""
        boxes = [self.tile_input_box(t) for t in self.tiles_in(box)]
        (z0, z1), (y0, y1), (x0, x1) = box
        k = self.xy_scale
        for _, zin in self.kept_slices(z0, z1):
            boxes.append(((zin, zin + 1), (y0 // k, -(-y1 // k)), (x0 // k, -(-x1 // k))))
        return _union(boxes)


def _union(boxes: list[Box]) -> Box | None:
    """Bounding box of ``boxes`` (None when empty)."""
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


# --- ownership: every tile is computed once, by the block of the chunk grid holding its origin
@dataclass(frozen=True)
class Ownership:
    """Tiles of a lattice assigned to the blocks of an output chunk grid.

    A tile belongs to the block (same indexing as the chunks) that holds its output origin:
    first output z of its unit, and its y and x origins. So every tile has exactly one
    owner and is computed once per run, whatever the number of chunks it overlaps; a chunk
    is blended from the tiles of its *source* blocks (itself and the blocks just before it
    along y and x whose tiles reach into it). Everything is separable per axis, so the
    tables cost microseconds per chunk row, not a walk over the tiles.
    """

    lattice: Lattice
    chunks: tuple[int, int, int]

    @cached_property
    def _starts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lat = self.lattice
        if lat.isotropic:
            z = np.arange(lat.n_units, dtype=np.int64) * lat.z_scale + 1
        else:
            z = np.arange(lat.n_units, dtype=np.int64)
        return z, lat.y.origins, lat.x.origins

    @cached_property
    def grid(self) -> tuple[int, ...]:
        return chunk_grid(self.lattice.output_shape, self.chunks)

    @cached_property
    def _owned(self) -> tuple[tuple[range, ...], ...]:
        """Per axis, per block row: the range of entries (units, y or x tiles) it owns."""
        tables = []
        for starts, c, n in zip(self._starts, self.chunks, self.grid, strict=True):
            owner = starts // c
            lo = np.searchsorted(owner, np.arange(n), side="left")
            hi = np.searchsorted(owner, np.arange(n), side="right")
            tables.append(tuple(range(int(a), int(b)) for a, b in zip(lo, hi, strict=True)))
        return tuple(tables)

    @cached_property
    def _sources(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """Per axis, per chunk row: the block rows owning entries that meet the row."""
        lat = self.lattice
        shape = lat.output_shape
        tables = []
        betweens = (lat.units_between, lat.y.tiles_between, lat.x.tiles_between)
        for axis, (starts, between) in enumerate(zip(self._starts, betweens, strict=True)):
            c = self.chunks[axis]
            owner = starts // c
            rows = []
            for r in range(self.grid[axis]):
                met = between(r * c, min((r + 1) * c, shape[axis]))
                # owners rise with the entry index: the rows from the first's to the last's
                first, last = (int(owner[met[0]]), int(owner[met[-1]])) if met else (0, -1)
                rows.append(tuple(range(first, last + 1)))
            tables.append(tuple(rows))
        return tuple(tables)

    def owned_tiles(self, block: tuple[int, ...]) -> list[Tile]:
        """The tiles block ``block`` owns, in global lattice order."""
        units, ys, xs = (table[i] for table, i in zip(self._owned, block, strict=True))
        return [Tile(u, iy, ix) for u in units for iy in ys for ix in xs]

    def n_owned(self, block: tuple[int, ...]) -> int:
        """How many tiles block ``block`` owns."""
        return math.prod(len(table[i]) for table, i in zip(self._owned, block, strict=True))

    def sources(self, index: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """Blocks owning the tiles that chunk ``index`` blends, in C order (each owns at
        least one of those tiles)."""
        zs, ys, xs = (table[i] for table, i in zip(self._sources, index, strict=True))
        return [(bz, by, bx) for bz in zs for by in ys for bx in xs if self.n_owned((bz, by, bx))]
