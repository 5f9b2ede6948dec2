"""Property tests (hypothesis) of the tile lattice and the blending, for random volumes
(tiny ones included, 2D and 3D), tiles, overlaps, super-resolution and isotropic factors,
sample counts and output chunkings.

- every output voxel is covered: by a tile with positive blend weight, or (isotropic) it is
  a kept input slice, and nothing else;
- the blend weights sum to one at every voxel: through the pipeline's own chunk code, a
  model that outputs a constant gives exactly that constant everywhere;
- the tiles touching a chunk are exactly the ones its region needs, and the input it reads
  is exactly the union of what those tiles (and its kept slices) read, inside the volume;
- the assembled output does not depend on the chunking, and equals a brute-force blend of
  the whole volume computed here from the definitions (tile input boxes, reflection
  padding, global noise keys, windows).

tests/pipeline/test_lattice.py has the per-axis and ownership properties; the pipeline runs here
through ``inprocess.run_in_process`` (the same reads, tiles and blending as a Dask run, minus
Dask and Zarr writes) with a small numpy stand-in for the network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_blend import Accumulator

from emdiffuse.io import write_image
from emdiffuse.models.normalization import Normalization
from emdiffuse.pipeline.blend import window_1d, window_2d
from emdiffuse.pipeline.inprocess import run_in_process
from emdiffuse.pipeline.lattice import Lattice, chunk_box, iter_chunks
from emdiffuse.pipeline.noise import INITIAL_STEP, tile_noise
from emdiffuse.pipeline.settings import RunSettings, RunSpec

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PIPELINE = settings(SETTINGS, max_examples=25)  # these read a real OME-Zarr per example


@st.composite
def lattices(draw) -> tuple[Lattice, int]:
    """A lattice and the input's ndim (2: one yx slice)."""
    kind = draw(st.sampled_from(["denoise", "super-resolve", "isotropic", "2d"]))
    k = draw(st.sampled_from([2, 3, 4])) if kind == "super-resolve" else 1
    if kind == "2d":
        k = draw(st.sampled_from([1, 2]))
    z_scale = draw(st.sampled_from([2, 3, 4])) if kind == "isotropic" else 1
    z_context = draw(st.sampled_from([0, 1, 2])) if kind in ("isotropic", "denoise") else 0
    fewest = 2 if z_scale > 1 or z_context else 1  # a denoiser's z context needs 2 slices
    nz = 1 if kind == "2d" else draw(st.integers(fewest, 4))
    ny, nx = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    t_in = draw(st.integers(1, 12))
    o_in = draw(st.integers(0, t_in - 1))
    lattice = Lattice((nz, ny, nx), k * t_in, k * o_in, xy_scale=k, z_scale=z_scale,
                      z_context=z_context)  # fmt: skip
    return lattice, 2 if kind == "2d" else 3


@st.composite
def chunkings(draw, shape: tuple[int, int, int], ndim: int) -> tuple[int, int, int]:
    z = 1 if ndim == 2 else draw(st.integers(1, shape[0]))
    return (z, draw(st.integers(1, shape[1])), draw(st.integers(1, shape[2])))


def modelled_mask(lattice: Lattice) -> np.ndarray:
    """Output voxels the model writes (all but the kept input slices of isotropic runs)."""
    mask = np.ones(lattice.output_shape, dtype=bool)
    for z_out, _ in lattice.kept_slices(0, lattice.output_shape[0]):
        mask[z_out] = False
    return mask


def boxes_meet(a, b) -> bool:
    return all(max(p, q) < min(r, s) for (p, r), (q, s) in zip(a, b, strict=True))


# ---- coverage and partition of unity --------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_every_voxel_covered_and_weights_sum_to_one(data):
    lattice, ndim = data.draw(lattices())
    shape = lattice.output_shape
    T, overlap = lattice.tile, lattice.overlap
    window = window_2d(T, overlap)
    assert (window > 0).all() and (window <= 1).all()
    assert np.array_equal(window_1d(T, overlap), window_1d(T, overlap)[::-1])  # symmetric

    weight = np.zeros(shape)
    for tile in lattice.all_tiles():
        (z0, z1), (y0, y1), (x0, x1) = lattice.tile_output_box(tile)
        assert 0 <= z0 < z1 <= shape[0] and 0 <= y0 < y1 <= shape[1] and 0 <= x0 < x1 <= shape[2]
        weight[z0:z1, y0:y1, x0:x1] += window[: y1 - y0, : x1 - x0]
    modelled = modelled_mask(lattice)
    assert (weight[modelled] > 0).all()  # every modelled voxel is covered
    assert (weight[~modelled] == 0).all()  # kept slices are left to the input

    # the normalised weights of the covering tiles sum to one, in any chunking
    chunks = data.draw(chunkings(shape, ndim))
    for index in iter_chunks(shape, chunks):
        box = chunk_box(index, shape, chunks)
        acc = Accumulator(box)
        for tile in lattice.tiles_in(box):
            ones = np.ones((lattice.tile_output_slices, T, T))
            acc.add(lattice.tile_output_box(tile), ones, window)
        sl = tuple(slice(a, b) for a, b in box)
        np.testing.assert_allclose(acc.weight, weight[sl], rtol=1e-12, atol=0)
        result = acc.result()
        np.testing.assert_allclose(result[modelled[sl]], 1.0, rtol=0, atol=1e-12)


# ---- which tiles, which input -----------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_tiles_of_a_chunk_are_exactly_what_its_region_needs(data):
    lattice, ndim = data.draw(lattices())
    shape = lattice.output_shape
    nz, ny, nx = lattice.input_shape
    k = lattice.xy_scale
    every = list(lattice.all_tiles())
    chunks = data.draw(chunkings(shape, ndim))
    for index in iter_chunks(shape, chunks):
        box = chunk_box(index, shape, chunks)
        tiles = lattice.tiles_in(box)
        brute = [t for t in every if boxes_meet(lattice.tile_output_box(t), box)]
        assert tiles == brute  # exactly those, in global lattice order
        needed = [lattice.tile_input_box(t) for t in tiles]
        (z0, z1), (y0, y1), (x0, x1) = box
        for _, z_in in lattice.kept_slices(z0, z1):
            needed.append(((z_in, z_in + 1), (y0 // k, -(-y1 // k)), (x0 // k, -(-x1 // k))))
        read = lattice.read_box(box)
        if not needed:
            assert read is None
            continue
        for tile_box in needed:  # never reads outside the volume
            assert all(0 <= a < b <= n for (a, b), n in zip(tile_box, (nz, ny, nx), strict=True))
        union = tuple((min(b[a][0] for b in needed), max(b[a][1] for b in needed))
                      for a in range(3))
        assert read == union  # reads all it needs and nothing more


# ---- the assembled output ---------------------------------------------------------------------
class StandIn:
    """A numpy stand-in for the network: a function of the tile's conditioning and noise
    (so a wrong input region or a wrong noise key changes the output), or a constant."""

    def __init__(self, lattice: Lattice, constant: float | None = None):
        self.k = lattice.xy_scale
        self.constant = constant

    def enhance(self, cond, noise, *, sampler, steps, step_noise=None, spacing=None):
        if self.constant is not None:
            return np.full(noise.shape, self.constant, dtype=np.float32)
        return stand_in(cond, noise, self.k)

    def sample_parts(self, cond, noise, *, mean=None, **kw):
        """The pipeline's entry: the whole sample as the mean, no residual (an SR3 model
        with ε-prediction has exactly this split)."""
        out = self.enhance(cond, noise, **kw)
        return out, np.zeros_like(out)


def stand_in(cond: np.ndarray, noise: np.ndarray, k: int) -> np.ndarray:
    """Local (each voxel's own input and noise), positional (where in the tile) and global
    over the tile (its mean, as a network's normalisation layers: so the reflection padding
    of tiles larger than the volume shows in the output)."""
    level = np.repeat(np.repeat(cond, k, axis=-2), k, axis=-1)  # to the output grid
    mix = np.tanh(level.sum(axis=-3, keepdims=True) + 0.25 * noise)
    ramp = np.linspace(0.0, 0.1, noise.shape[-1], dtype=np.float32)  # position in the tile
    tile_mean = 0.5 * cond.mean(axis=(-3, -2, -1), keepdims=True)
    return (mix + ramp + tile_mean).astype(np.float32)


_VOLUMES: dict = {}


def input_volume(folder: Path, lattice: Lattice, ndim: int) -> tuple[str, np.ndarray]:
    """A random OME-Zarr input of the lattice's shape (made once per shape)."""
    key = (lattice.input_shape, ndim)
    if key not in _VOLUMES:
        rng = np.random.default_rng(abs(hash(key)) % 2**32)
        data = rng.uniform(0.0, 1.0, size=lattice.input_shape).astype(np.float32)
        path = folder / f"in-{len(_VOLUMES)}.ome.zarr"
        if ndim == 2:
            write_image(data[0], path, voxel_size=(8.0, 8.0), axes="yx", levels=0)
        else:
            write_image(data, path, voxel_size=(8.0, 8.0, 8.0), levels=0)
        _VOLUMES[key] = (str(path), data)
    return _VOLUMES[key]


def make_spec(lattice, ndim, path, chunks, samples, seed=3) -> RunSpec:
    settings = RunSettings(
        device="cpu", precision="fp32", chunks=chunks, dtype="float32", seed=seed, steps=1,
        samples=samples, sampler="ddim", batch_size=3,
    )
    return RunSpec(
        settings=settings, input_path=path, input_level=0, input_voxel_size=None,
        input_ndim=ndim, checkpoint="unused", lattice=lattice, output_path="unused",
        normalization=Normalization(0.0, 1.0),
    )


def assemble(spec: RunSpec, enhancer) -> np.ndarray:
    out = np.full(spec.lattice.output_shape, np.nan)

    def keep(index, mean):
        out[tuple(slice(a, b) for a, b in chunk_box(index, out.shape, spec.chunks))] = mean

    run_in_process(spec, enhancer=enhancer, on_chunk=keep)
    return out


def z_slices(lattice: Lattice, unit: int) -> list[int]:
    """The input slices a unit's model reads, by definition: ``u - c .. u + 1 + c`` for
    isotropic runs, ``u - c .. u + c`` for the others (z context ``c``), an index beyond the
    volume mirrored about its end slice (-1 -> 1, nz -> nz - 2) until it lies inside."""
    nz, c = lattice.input_shape[0], lattice.z_context
    out = []
    for i in range(unit - c, unit + (2 if lattice.isotropic else 1) + c):
        while not 0 <= i < nz:
            i = -i if i < 0 else 2 * (nz - 1) - i
        out.append(i)
    return out


def brute_force(lattice: Lattice, data: np.ndarray, samples: int, seed: int = 3) -> np.ndarray:
    """The definition: blend every tile of the lattice over the whole volume at once."""
    norm = Normalization(0.0, 1.0)
    cond_all = np.clip(norm.forward(data), -1, 1)
    t = lattice.tile // lattice.xy_scale
    T = lattice.tile
    window = window_2d(T, lattice.overlap).astype(np.float64)
    blends = []
    for sample in range(samples):
        total = np.zeros(lattice.output_shape)
        weight = np.zeros(lattice.output_shape)
        for tile in lattice.all_tiles():
            sl = tuple(slice(a, b) for a, b in lattice.tile_input_box(tile))
            cond = cond_all[(z_slices(lattice, tile.unit), *sl[1:])]
            cond = np.pad(cond, ((0, 0), (0, t - cond.shape[1]), (0, t - cond.shape[2])),
                          mode="symmetric")
            noise = tile_noise(seed, sample, lattice.tile_origin(tile), INITIAL_STEP,
                               (lattice.tile_output_slices, T, T))
            # every tile's sample is clamped to model space, as the Enhancer's are
            values = np.clip(stand_in(cond[None], noise[None], lattice.xy_scale)[0], -1.0, 1.0)
            (z0, z1), (y0, y1), (x0, x1) = lattice.tile_output_box(tile)
            w = window[: y1 - y0, : x1 - x0]
            total[z0:z1, y0:y1, x0:x1] += values[:, : y1 - y0, : x1 - x0] * w
            weight[z0:z1, y0:y1, x0:x1] += w
        with np.errstate(invalid="ignore", divide="ignore"):
            blends.append(np.where(weight > 0, total / weight, 0.0))
    mean = norm.inverse(np.mean(blends, axis=0))
    for z_out, z_in in lattice.kept_slices(0, lattice.output_shape[0]):
        mean[z_out] = data[z_in]  # isotropic runs keep the input slices (xy_scale is 1)
    return mean


@PIPELINE
@given(data=st.data(), samples=st.sampled_from([1, 2]))
def test_output_independent_of_chunking_and_equal_to_brute_force(tmp_path_factory, data,
                                                                 samples):
    lattice, ndim = data.draw(lattices())
    folder = tmp_path_factory.getbasetemp() / "properties"
    folder.mkdir(exist_ok=True)
    path, volume = input_volume(folder, lattice, ndim)
    shape = lattice.output_shape
    outputs = []
    for _ in range(2):
        chunks = data.draw(chunkings(shape, ndim))
        spec = make_spec(lattice, ndim, path, chunks, samples)
        outputs.append(assemble(spec, StandIn(lattice)))
    a, b = outputs
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)  # float32 partial sums only
    np.testing.assert_allclose(a, brute_force(lattice, volume, samples), rtol=0, atol=2e-6)


@PIPELINE
@given(data=st.data())
def test_constant_model_gives_that_constant_everywhere(tmp_path_factory, data):
    """Weights sum to one through the pipeline's chunk code: a model that answers a
    constant c yields c at every modelled voxel (in raw units), whatever the chunking."""
    lattice, ndim = data.draw(lattices())
    folder = tmp_path_factory.getbasetemp() / "properties"
    folder.mkdir(exist_ok=True)
    path, volume = input_volume(folder, lattice, ndim)
    c = data.draw(st.floats(-0.9, 0.9))
    chunks = data.draw(chunkings(lattice.output_shape, ndim))
    enhancer = StandIn(lattice, constant=c)
    out = assemble(make_spec(lattice, ndim, path, chunks, 1), enhancer)
    modelled = modelled_mask(lattice)
    expected = Normalization(0.0, 1.0).inverse(np.float32(c))
    np.testing.assert_allclose(out[modelled], expected, rtol=0, atol=1e-6)
    for z_out, z_in in lattice.kept_slices(0, lattice.output_shape[0]):
        assert np.array_equal(out[z_out], volume[z_in])


def test_strategies_reach_every_case():
    """The strategies above do produce 2D, super-resolution, isotropic (with a z context
    mirrored at both ends of the volume), tiny volumes,
    single-tile axes, shifted last tiles and zero overlap (so the properties cover them)."""
    seen = set()

    @settings(max_examples=300, deadline=None, database=None)
    @given(lattices())
    def collect(drawn):
        lattice, ndim = drawn
        nz, ny, nx = lattice.input_shape
        t = lattice.tile // lattice.xy_scale
        seen.update(
            name
            for name, hit in [
                ("2d", ndim == 2),
                ("sr", lattice.xy_scale > 1),
                ("iso", lattice.isotropic),
                ("z-context-mirrored", lattice.z_context >= nz - 1 and lattice.isotropic),
                ("denoise-z-context", lattice.z_context and not lattice.isotropic),
                ("tiny", min(ny, nx) <= 2),
                ("single-tile", len(lattice.y) == 1),
                ("shifted-last", ny > t and (ny - t) % (t - lattice.overlap // lattice.xy_scale)),
                ("no-overlap", lattice.overlap == 0),
            ]
            if hit
        )

    collect()
    assert seen == {"2d", "sr", "iso", "z-context-mirrored", "denoise-z-context", "tiny",
                    "single-tile", "shifted-last", "no-overlap"}  # fmt: skip

