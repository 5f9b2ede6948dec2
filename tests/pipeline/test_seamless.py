"""Seamless texture across tiles (issue 14, part 3), on a seeded volume.

Where tiles overlap, the blend mixes independent samples. Averaged linearly, their texture
weakens there (two equal weights leave 1/sqrt(2) of its standard deviation). The pipeline
blends a tile's mean part linearly and its zero-mean residual part variance-aware
(``sum w r / sqrt(sum w**2)``, :mod:`emdiffuse.pipeline.blend`), so overlap zones keep the
texture statistics of tile interiors and tile edges leave no gradient excess. Targets: the
overlap/interior standard-deviation ratio of the residual texture within 0.95–1.05, and no
tile-edge local-gradient excess above 2 %, on textured and on constant input.

The network here is a stand-in (:class:`TextureModel`) run through the real pipeline —
``enhance()`` on Dask's threaded scheduler, the real tile tasks, blend and graph, a real
OME-Zarr input and output. Why a stand-in: these statistics measure the blend only if every
tile's own output is stationary up to its edges. A random-weight UNet is not (zero padding
and normalisation over the tile change its output near tile borders, which would be counted
as seams), and a trained one is too slow for a test. The stand-in's mean is the input itself
(so all tiles agree on it, as a good mean network's do away from the volume's edges), and its
residual is the tile's own noise filtered circularly (a stationary Gaussian texture over the
whole tile, independent between tiles, keyed on the tile's global noise like a sampler's):
whatever differs between overlap zones and tile interiors in the output is the blend's doing.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from emdiffuse.io import write_image
from emdiffuse.pipeline import runtime
from emdiffuse.pipeline.blend import blend_parts, window_1d
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.lattice import AxisTiling, Lattice

TILE, OVERLAP = 64, 16
SHAPE = (12, 250, 250)  # the last tile of each axis is shifted back (a wider last overlap)
AMPLITUDE = 0.15  # the texture's standard deviation in model space
RUN = dict(tile=TILE, overlap=OVERLAP, steps=1, sampler="ddim", scheduler="threads",
           progress=False, dtype="float32", chunks=(4, 96, 128))  # fmt: skip


class TextureModel:
    """A stand-in for an Enhancer (see the module docstring): mean = the condition,
    residual = ``AMPLITUDE`` × the tile's noise filtered by a Gaussian of ``sigma`` voxels
    with periodic boundaries, scaled to unit variance (a stationary texture over the tile).
    ``enhance`` is what a model without parts gives: the clamped sample."""

    in_slices = out_slices = 1
    xy_scale = z_scale = 1
    multiple = 1

    def __init__(self, sigma: float = 1.2):
        self.sigma = sigma

    def _texture(self, noise: np.ndarray) -> np.ndarray:
        h, w = noise.shape[-2:]
        f2 = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2
        gain = np.exp(-2 * np.pi**2 * self.sigma**2 * f2)  # a Gaussian blur, periodic
        shaped = np.fft.ifft2(np.fft.fft2(noise) * gain).real
        # white noise of unit variance filtered by ``gain`` has variance mean(gain**2)
        return (AMPLITUDE * shaped / np.sqrt(np.mean(gain**2))).astype(np.float32)

    def posterior_mean(self, cond, noise=None):
        return np.asarray(cond, dtype=np.float32).copy()

    def sample_parts(self, cond, noise, *, sampler, steps, step_noise=None, spacing=None,
                     eta=0.0, mean=None, callback=None):  # fmt: skip
        mean = self.posterior_mean(cond) if mean is None else mean
        return mean, self._texture(np.asarray(noise, dtype=np.float64))

    def enhance(self, cond, noise, *, sampler, steps, step_noise=None, spacing=None, **_):
        mean, residual = self.sample_parts(cond, noise, sampler=sampler, steps=steps)
        return np.clip(mean + residual, -1.0, 1.0)


# ---- the statistics ---------------------------------------------------------------------------
def coverage(n: int) -> np.ndarray:
    """How many tiles cover each position of an axis of length ``n``."""
    axis = AxisTiling(n, TILE, OVERLAP)
    count = np.zeros(n, dtype=int)
    for i in range(len(axis)):
        a, b = axis.output_extent(i)
        count[a:b] += 1
    return count


def edge_boundaries(n: int) -> list[int]:
    """Boundaries ``p | p+1`` (as ``p``) where a tile starts or ends inside the axis."""
    origins = AxisTiling(n, TILE, OVERLAP).origins
    edges = {int(o) - 1 for o in origins[1:]} | {int(o) + TILE - 1 for o in origins[:-1]}
    return sorted(e for e in edges if 0 <= e < n - 1)


def seam_statistics(texture: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """``std_ratio``: standard deviation of the residual ``texture`` (zyx) in overlap zones
    (covered by two tiles or more) over that in tile interiors (one tile); ``mid_ratio`` the
    same for the middle of the overlaps (two tiles, neither weighing over 70 %), the worst
    case of a linear blend; ``edge_excess``: mean squared gradient of ``output`` across the
    boundaries where tiles start or end, over that across all other boundaries, minus one
    (the larger of y and x)."""
    _, ny, nx = texture.shape
    cy, cx = coverage(ny), coverage(nx)
    interior = (cy[:, None] == 1) & (cx[None, :] == 1)
    overlap = (cy[:, None] >= 2) | (cx[None, :] >= 2)
    mid_y, mid_x = _middle(ny), _middle(nx)
    mid = (mid_y[:, None] & (cx[None, :] == 1)) | ((cy[:, None] == 1) & mid_x[None, :])
    std_in = texture[:, interior].std()
    stats = {
        "std_ratio": float(texture[:, overlap].std() / std_in),
        "mid_ratio": float(texture[:, mid].std() / std_in),
    }
    excess = []
    for axis, n in ((1, ny), (2, nx)):
        energy = (np.diff(output.astype(np.float64), axis=axis) ** 2).mean(
            axis=tuple(a for a in range(3) if a != axis)
        )
        edges = np.zeros(n - 1, dtype=bool)
        edges[edge_boundaries(n)] = True
        excess.append(energy[edges].mean() / energy[~edges].mean() - 1.0)
    stats["edge_excess"] = float(max(excess))
    return stats


def _middle(n: int) -> np.ndarray:
    """Positions covered by exactly two tiles, neither weighing over 70 % of their sum."""
    axis = AxisTiling(n, TILE, OVERLAP)
    window = window_1d(TILE, OVERLAP)
    weights = np.zeros((len(axis), n))
    for i in range(len(axis)):
        a, b = axis.output_extent(i)
        weights[i, a:b] = window[: b - a]
    total = weights.sum(axis=0)
    share = weights.max(axis=0) / total
    return ((weights > 0).sum(axis=0) == 2) & (share <= 0.7)


# ---- running it -------------------------------------------------------------------------------
def textured_input(seed: int = 0) -> np.ndarray:
    """Real-looking EM intensities (the project's synthetic generator), 0.1..0.9."""
    from emdiffuse.training.synthetic import synthetic_block

    return synthetic_block((0, 0, 0), SHAPE, seed=seed)


def constant_input() -> np.ndarray:
    return np.full(SHAPE, 0.5, dtype=np.float32)


def run_stand_in(monkeypatch, folder, model, data: np.ndarray, name: str, **kw) -> np.ndarray:
    """``data`` written as OME-Zarr, enhanced through the pipeline with :class:`TextureModel`
    in place of ``model``'s network; the output (level 0) read back from its store."""
    path = folder / f"{name}-in.ome.zarr"
    if not path.exists():
        write_image(data, path, voxel_size=(8.0, 8.0, 8.0), chunks=(4, 128, 128))
    stand_in = TextureModel()
    monkeypatch.setattr(runtime, "spec_enhancer", lambda spec: stand_in)
    out = folder / f"{name}-{len(list(folder.glob('*-out*')))}-out.ome.zarr"
    enhance(path, model, out, **dict(RUN, **kw))
    return np.asarray(zarr.open_array(f"{out}/0", mode="r")[...])


def model_space(raw: np.ndarray) -> np.ndarray:
    """Intensities 0..1 (the test model's range) -> model space."""
    return 2.0 * raw.astype(np.float64) - 1.0


@pytest.mark.parametrize("kind", ["textured", "constant"])
def test_overlaps_keep_the_texture_of_tile_interiors(kind, monkeypatch, tmp_path,
                                                      denoise_checkpoint):  # fmt: skip
    data = textured_input() if kind == "textured" else constant_input()
    out = run_stand_in(monkeypatch, tmp_path, denoise_checkpoint, data, kind)
    texture = model_space(out) - np.clip(model_space(data), -1, 1)  # the stand-in's mean
    stats = seam_statistics(texture, out)
    assert 0.95 <= stats["std_ratio"] <= 1.05, stats
    assert 0.95 <= stats["mid_ratio"] <= 1.05, stats
    assert stats["edge_excess"] <= 0.02, stats
    # the statistics do see what a linear blend of whole samples does to the texture
    linear = seam_statistics(_linear_blend_of_samples(texture.shape), out)
    assert linear["mid_ratio"] < 0.85, linear


def _linear_blend_of_samples(shape) -> np.ndarray:
    """The stand-in's texture blended as whole samples were before: linearly (the
    statistic's own check; no pipeline)."""
    nz, ny, nx = shape
    lattice = Lattice(shape, TILE, OVERLAP)
    model = TextureModel()
    from emdiffuse.pipeline.blend import window_2d
    from emdiffuse.pipeline.noise import INITIAL_STEP, tile_noise

    window = window_2d(TILE, OVERLAP).astype(np.float64)
    total = np.zeros(shape)
    weight = np.zeros(shape)
    for tile in lattice.all_tiles():
        noise = tile_noise(0, 0, lattice.tile_origin(tile), INITIAL_STEP, (1, TILE, TILE))
        (z0, z1), (y0, y1), (x0, x1) = lattice.tile_output_box(tile)
        values = model._texture(noise.astype(np.float64))[:, : y1 - y0, : x1 - x0]
        total[z0:z1, y0:y1, x0:x1] += values * window[: y1 - y0, : x1 - x0]
        weight[z0:z1, y0:y1, x0:x1] += window[: y1 - y0, : x1 - x0]
    return total / weight


def test_chunking_and_workers_do_not_change_the_texture(monkeypatch, tmp_path,
                                                        denoise_checkpoint):  # fmt: skip
    """The variance-aware blend keeps chunking invariance: other chunks, other thread
    counts, the same output (float rounding of partial sums only)."""
    data = textured_input(seed=1)[:4, :150, :170]
    kw = dict(samples=2)
    a = run_stand_in(monkeypatch, tmp_path, denoise_checkpoint, data, "c", chunks=(4, 150, 170), **kw)
    b = run_stand_in(monkeypatch, tmp_path, denoise_checkpoint, data, "c", chunks=(1, 40, 56),
                     workers=2, **kw)  # fmt: skip
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_a_model_without_residual_is_blended_exactly_linearly():
    """Zero residual parts change nothing: the blend of the mean parts is returned as it is
    (the bytes of the linear blend that SR3 models with eps-prediction have always had)."""
    rng = np.random.default_rng(0)
    lattice = Lattice((2, 40, 44), 16, 4)
    box = ((0, 2), (0, 40), (0, 44))
    from emdiffuse.pipeline.blend import chunk_weight

    weight = chunk_weight(lattice, box)
    totals = rng.uniform(-1, 1, (3, 2, 40, 44)) * weight
    totals[:, :, :, 0] = weight[:, :, 0] * 1.0000001  # a sum of ones, rounded up
    linear = blend_parts(lattice, box, totals)
    assert np.abs(linear).max() > 1.0  # rounding may leave the unit range: the clip keeps it
    with_zero = blend_parts(lattice, box, totals, np.zeros_like(totals))
    assert linear.tobytes() == with_zero.tobytes()
    # a residual that would leave [-1, 1] is clipped
    pushed = blend_parts(lattice, box, np.zeros_like(totals), np.full_like(totals, 50.0))
    assert pushed.max() == 1.0


def test_zero_overlap_shifted_last_tile_keeps_the_texture(monkeypatch, tmp_path,
                                                          denoise_checkpoint):  # fmt: skip
    """``--overlap 0``: the last tile, shifted back to end at the volume's edge, overlaps its
    neighbour with flat windows; the texture there keeps the interiors' variance."""
    data = constant_input()[:6]
    out = run_stand_in(monkeypatch, tmp_path, denoise_checkpoint, data, "zero", overlap=0)
    texture = model_space(out)
    n = SHAPE[1]
    axis = AxisTiling(n, TILE, 0)
    last, previous = axis.output_extent(len(axis) - 1), axis.output_extent(len(axis) - 2)
    assert last[0] < previous[1]  # the shifted tile overlaps its neighbour
    band = slice(last[0], previous[1])
    interior = slice(0, previous[0])
    ratio = texture[:, band, :][..., :previous[0]].std() / texture[:, interior, interior].std()
    assert 0.95 <= ratio <= 1.05, ratio
