"""Data sources, levels and sizes of the quality benchmark.

Two sources, one benchmark (``run.py --source``):

* ``synthetic``: the project's seeded synthetic EM generator (8 nm voxels). Training data
  come from one region (origin 0); test data from a region far away (``TEST_ORIGIN``),
  never seen in training, with other noise seeds.
* ``flyem``: two real FIB-SEM volumes of the *Drosophila* medulla (Janelia FlyEM,
  CC-BY; ``../shared/data/flyem_fibsem``, 250³ uint8 at 10 nm isotropic). Every model is
  trained on ``training_sample1`` and scored on ``training_sample2`` (never trained on).
  Intensities: ``grey value / 255`` (a fixed rule, the same for both volumes and every
  level; no per-volume stretch), so the clean data lie in about [0.10, 0.87].

Every degradation is the project's own (:mod:`emdiffuse.training.degrade`), with noise keyed
on the seed and global voxel coordinates, so a run is a pure function of the settings below.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from emdiffuse.training.degrade import add_poisson_gaussian_noise, blur_downsample_xy
from emdiffuse.training.synthetic import synthetic_block

ROOT = Path(__file__).resolve().parents[2]
FLYEM_DIR = ROOT.parent / "shared" / "data" / "flyem_fibsem"
TRAIN_NOISE_SEED = 1
TEST_NOISE_SEEDS = (101, 102)  # two independent noise realisations of the test volume
TASKS = ("denoise", "super-resolve", "isotropic")


@dataclass(frozen=True)
class Level:
    """One task at one difficulty level."""

    task: str  # denoise | super-resolve | isotropic
    label: str
    dose: float | None = None  # electrons per voxel at full brightness (denoise)
    read_noise: float | None = None  # electrons rms (denoise)
    factor: int = 1  # k: xy factor (super-resolve) or z factor (isotropic)

    @property
    def key(self) -> str:
        if self.task == "denoise":
            return f"denoise-dose{self.dose:g}"
        return f"{self.task}-k{self.factor}"


@dataclass(frozen=True)
class Sizes:
    """Region sizes of a run (full or quick). Training budgets are wall-clock seconds and
    live in the plan (``quality_plan.py``), not here."""

    train_shape: tuple[int, int, int]  # training volume (zyx): generated, or a crop of sample1
    aniso_train_slices: int  # synthetic: z-slices of the anisotropic training volume (-a)
    test_yx: int  # test images are test_yx x test_yx
    test_slices: int  # test slices for denoise and super-resolve
    test_intervals: int  # intervals between input slices for isotropic (k-1 slices each)
    patch: int  # training patch (target grid), every learned method
    region: int  # loader validation-split region
    tune_slices: int  # training slices used to tune the classical denoisers
    tune_yx: int  # ... cropped to tune_yx x tune_yx (NLM's grid search is the slow part)


@dataclass(frozen=True)
class TaskData:
    """Arrays of one level: training inputs, and test input(s) with their ground truth.

    ``train``: ``clean`` (isotropic training volume), ``noisy`` (denoise), ``aniso`` (the
    z-subsampled training volume, vemdiffuse-a); ``test_inputs``: the degraded test
    volume(s) on their own grid (denoise: two noise realisations A and B); ``truth``: the
    clean test volume on the output grid; ``eval_z``: the slices scored (isotropic: only
    those between input slices).
    """

    level: Level
    train: dict[str, np.ndarray]
    test_inputs: list[np.ndarray]
    truth: np.ndarray
    eval_z: np.ndarray
    input_voxel: tuple[float, float, float]
    voxel_nm: float
    train_voxel: dict[str, tuple[float, float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Neighbours:
    """The denoise test inputs of a model reading z: ``volumes`` (zyx, one per test input)
    hold each scored slice at ``scored``, with ``context`` noisy neighbours on each side,
    noisy as that test input (the same keyed noise)."""

    context: int
    volumes: list[np.ndarray]
    scored: np.ndarray

    def windows(self, i: int) -> np.ndarray:
        """``(n, 1 + 2 context, Y, X)``: each scored slice of test input ``i`` with its
        neighbours, in z order."""
        c = self.context
        return np.stack([self.volumes[i][z - c : z + c + 1] for z in self.scored])


def settings_key(*parts: object) -> str:
    """A short stable hash of JSON-able settings (cache keys)."""
    text = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts],
                      sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _noisy(clean: np.ndarray, level: Level, seed: int, origin: tuple[int, int, int]) -> np.ndarray:
    """Poisson(-Gaussian) noise of ``level`` on ``clean`` (keyed on global coordinates)."""
    return add_poisson_gaussian_noise(clean, dose=level.dose, read_noise=level.read_noise or 0.0,
                                      seed=seed, origin=origin)  # fmt: skip


class Source:
    """A data source: its levels, sizes, training volume and test data per level."""

    name: str
    title: str  # for figures and the report
    voxel_nm: float
    levels: tuple[Level, ...]
    full: Sizes
    quick: Sizes

    def available(self) -> str | None:
        """None, or why the source cannot run here."""
        return None

    def train_volume(self, sizes: Sizes) -> np.ndarray:
        raise NotImplementedError

    def task_data(self, level: Level, sizes: Sizes, clean_train: np.ndarray) -> TaskData:
        raise NotImplementedError

    def neighbours(self, level: Level, sizes: Sizes, context: int) -> Neighbours:
        """The denoise test inputs with ``context`` neighbours of every scored slice."""
        raise NotImplementedError

    def describe(self, sizes: Sizes) -> dict:
        """What the report says about the data (JSON-able)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------
# synthetic EM
# --------------------------------------------------------------------------------------
class Synthetic(Source):
    name = "synthetic"
    title = "held-out synthetic EM"
    voxel_nm = 8.0  # isotropic voxel of the synthetic volume
    world_seed = 0  # seed of the synthetic generator (one "world")
    train_origin = (0, 0, 0)
    test_origin = (10_000, 5_000, 5_000)  # far from every training voxel
    levels = (
        Level("denoise", "dose 8 e⁻, read noise 1 e⁻ (the sampler benchmark's)", 8.0, 1.0),
        Level("denoise", "dose 2 e⁻, read noise 0.05 e⁻ (the demo's, harsher)", 2.0, 0.05),
        Level("super-resolve", "k = 4", factor=4),
        Level("super-resolve", "k = 8", factor=8),
        Level("isotropic", "k = 4", factor=4),
        Level("isotropic", "k = 8", factor=8),
    )
    full = Sizes((64, 256, 256), 64, 192, 8, 6, 48, 96, 4, 256)
    quick = Sizes((33, 128, 128), 40, 64, 2, 3, 32, 64, 2, 64)

    def clean_block(self, origin: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
        """Clean synthetic EM (float32 in [0, 1]) of ``shape`` at global ``origin``."""
        block = synthetic_block(origin, shape, seed=self.world_seed, voxel_size=self.voxel_nm)
        return np.asarray(block, dtype=np.float32)

    def decimated_slices(self, origin, n: int, k: int, yx: tuple[int, int]) -> np.ndarray:
        """Every k-th z-slice of the clean volume from ``origin``: ``n`` thin sections k
        voxels apart (an anisotropic volume with z step k x 8 nm), slice by slice."""
        z0, y0, x0 = origin
        return np.concatenate([self.clean_block((z0 + i * k, y0, x0), (1, *yx)) for i in range(n)])

    def train_volume(self, sizes: Sizes) -> np.ndarray:
        return self.clean_block(self.train_origin, sizes.train_shape)

    def task_data(self, level: Level, sizes: Sizes, clean_train: np.ndarray) -> TaskData:
        yx = (sizes.test_yx, sizes.test_yx)
        k, v = level.factor, self.voxel_nm
        iso = (v, v, v)
        if level.task == "denoise":
            truth = self.clean_block(self.test_origin, (sizes.test_slices, *yx))
            tests = [_noisy(truth, level, s, self.test_origin) for s in TEST_NOISE_SEEDS]
            train = {"noisy": _noisy(clean_train, level, TRAIN_NOISE_SEED, self.train_origin),
                     "clean": clean_train}  # fmt: skip
            return TaskData(level, train, tests, truth, np.arange(len(truth)), iso, v,
                            {"clean": iso})  # fmt: skip
        if level.task == "super-resolve":
            truth = self.clean_block(self.test_origin, (sizes.test_slices, *yx))
            low = blur_downsample_xy(truth, k)
            return TaskData(level, {"clean": clean_train}, [low], truth, np.arange(len(truth)),
                            (v, v * k, v * k), v, {"clean": iso})  # fmt: skip
        if level.task == "isotropic":
            n_z = sizes.test_intervals * k + 1
            truth = self.clean_block(self.test_origin, (n_z, *yx))
            aniso = self.decimated_slices(self.train_origin, sizes.aniso_train_slices, k,
                                          clean_train.shape[1:])  # fmt: skip
            eval_z = np.array([z for z in range(n_z) if z % k])
            return TaskData(level, {"clean": clean_train, "aniso": aniso}, [truth[::k]], truth,
                            eval_z, (v * k, v, v), v, {"clean": iso, "aniso": (v * k, v, v)})  # fmt: skip
        raise ValueError(f"unknown task {level.task!r}")

    def neighbours(self, level: Level, sizes: Sizes, context: int) -> Neighbours:
        """The test stack grown by ``context`` slices at each end (its slices are contiguous)."""
        z0, y0, x0 = self.test_origin
        origin = (z0 - context, y0, x0)
        clean = self.clean_block(origin, (sizes.test_slices + 2 * context, sizes.test_yx,
                                          sizes.test_yx))  # fmt: skip
        return Neighbours(context, [_noisy(clean, level, s, origin) for s in TEST_NOISE_SEEDS],
                          np.arange(context, context + sizes.test_slices))  # fmt: skip

    def describe(self, sizes: Sizes) -> dict:
        return {
            "source": self.name, "title": self.title, "voxel_nm": self.voxel_nm,
            "text": (f"synthetic EM (`emdiffuse.training.synthetic`, seed {self.world_seed}, "
                     f"{self.voxel_nm:g} nm voxels). Training volume {list(sizes.train_shape)} at "
                     f"origin {list(self.train_origin)}; test volumes at origin "
                     f"{list(self.test_origin)} (never seen in training); noise seeds train "
                     f"{TRAIN_NOISE_SEED}, test {list(TEST_NOISE_SEEDS)}. vemdiffuse-a trains "
                     f"on {sizes.aniso_train_slices} slices k voxels apart."),
            "train_origin": list(self.train_origin), "test_origin": list(self.test_origin),
            "world_seed": self.world_seed,
        }  # fmt: skip


# --------------------------------------------------------------------------------------
# real FIB-SEM (FlyEM)
# --------------------------------------------------------------------------------------
class FlyEM(Source):
    name = "flyem"
    title = "real FIB-SEM (FlyEM, held-out volume)"
    voxel_nm = 10.0
    train_file = "training_sample1.tif"
    test_file = "training_sample2.tif"
    levels = (
        Level("denoise", "dose 8 e⁻/px, shot noise only", 8.0, 0.0),
        Level("denoise", "dose 2 e⁻/px, shot noise only", 2.0, 0.0),
        Level("super-resolve", "k = 4", factor=4),
        Level("isotropic", "k = 4", factor=4),
        Level("isotropic", "k = 8", factor=8),
    )
    # full: all of sample1 for training; test: 8 slices (denoise, super-resolve) or 8
    # intervals (isotropic: 33 / 65 slices) of 240 x 240 from sample2
    full = Sizes((250, 250, 250), 0, 240, 8, 8, 48, 96, 4, 128)
    quick = Sizes((128, 128, 128), 0, 64, 2, 3, 32, 64, 2, 64)

    def __init__(self, folder: Path = FLYEM_DIR) -> None:
        self.folder = Path(folder)

    def available(self) -> str | None:
        missing = [f for f in (self.train_file, self.test_file) if not (self.folder / f).exists()]
        return f"missing in {self.folder}: {', '.join(missing)}" if missing else None

    @staticmethod
    def to_unit(grey: np.ndarray) -> np.ndarray:
        """The fixed intensity rule: uint8 grey value / 255 as float32."""
        return (np.asarray(grey, dtype=np.float32) / np.float32(255.0)).astype(np.float32)

    def _read(self, name: str) -> np.ndarray:
        import tifffile

        volume = tifffile.imread(self.folder / name)
        if volume.dtype != np.uint8 or volume.ndim != 3:
            raise ValueError(
                f"{name}: expected a 3D uint8 volume, got {volume.dtype} {volume.shape}"
            )
        return volume

    def train_volume(self, sizes: Sizes) -> np.ndarray:
        vol = self._read(self.train_file)
        z, y, x = (min(a, b) for a, b in zip(sizes.train_shape, vol.shape, strict=True))
        return self.to_unit(vol[:z, :y, :x])

    def _test_box(self, sizes: Sizes, shape) -> tuple[int, int]:
        s = sizes.test_yx
        return (shape[1] - s) // 2, (shape[2] - s) // 2

    def test_slices_z(self, sizes: Sizes, n_z: int) -> np.ndarray:
        """The scored z of denoise and super-resolve: evenly spaced over the volume."""
        margin = max(1, n_z // (2 * sizes.test_slices))
        return np.linspace(margin, n_z - 1 - margin, sizes.test_slices).round().astype(int)

    def noisy_neighbours(self, level: Level, sizes: Sizes, context: int,
                         seed: int = TEST_NOISE_SEEDS[0]) -> np.ndarray:  # fmt: skip
        """``(n, 1 + 2 context, s, s)``: each scored slice of a denoising level with its
        ``context`` neighbours on each side, noisy as the test input of noise ``seed`` (the
        first by default; the noise is keyed on global coordinates, so channel ``context`` is
        that input's slice)."""
        test = self._read(self.test_file)
        y0, x0 = self._test_box(sizes, test.shape)
        s, zs = sizes.test_yx, self.test_slices_z(sizes, test.shape[0])
        if context > zs[0] or zs[-1] + context >= test.shape[0]:
            raise ValueError(f"z context {context} reaches past the test volume")
        return np.stack([
            _noisy(self.to_unit(test[z - context : z + context + 1, y0 : y0 + s, x0 : x0 + s]),
                   level, seed, (int(z) - context, y0, x0))
            for z in zs
        ])  # fmt: skip

    def neighbours(self, level: Level, sizes: Sizes, context: int) -> Neighbours:
        """The scored slices lie apart in z: one run of ``1 + 2 context`` slices per scored
        slice, the runs stacked."""
        s, width = sizes.test_yx, 1 + 2 * context
        volumes = [self.noisy_neighbours(level, sizes, context, seed).reshape(-1, s, s)
                   for seed in TEST_NOISE_SEEDS]  # fmt: skip
        return Neighbours(context, volumes, np.arange(sizes.test_slices) * width + context)

    def task_data(self, level: Level, sizes: Sizes, clean_train: np.ndarray) -> TaskData:
        test = self._read(self.test_file)
        y0, x0 = self._test_box(sizes, test.shape)
        s, k, v = sizes.test_yx, level.factor, self.voxel_nm
        iso = (v, v, v)
        if level.task in ("denoise", "super-resolve"):
            zs = self.test_slices_z(sizes, test.shape[0])
            truth = self.to_unit(test[zs, y0 : y0 + s, x0 : x0 + s])
            if level.task == "denoise":
                # noise keyed on each slice's own global position in sample2
                tests = [np.concatenate([_noisy(truth[i : i + 1], level, seed, (int(z), y0, x0))
                                         for i, z in enumerate(zs)])
                         for seed in TEST_NOISE_SEEDS]  # fmt: skip
                train = {"noisy": _noisy(clean_train, level, TRAIN_NOISE_SEED, (0, 0, 0)),
                         "clean": clean_train}  # fmt: skip
                return TaskData(level, train, tests, truth, np.arange(len(truth)), iso, v,
                                {"clean": iso})  # fmt: skip
            low = blur_downsample_xy(truth, k)
            return TaskData(level, {"clean": clean_train}, [low], truth, np.arange(len(truth)),
                            (v, v * k, v * k), v, {"clean": iso})  # fmt: skip
        if level.task == "isotropic":
            n_z = sizes.test_intervals * k + 1
            z0 = (test.shape[0] - n_z) // 2
            truth = self.to_unit(test[z0 : z0 + n_z, y0 : y0 + s, x0 : x0 + s])
            eval_z = np.array([z for z in range(n_z) if z % k])
            aniso = np.ascontiguousarray(clean_train[::k])  # every k-th slice of sample1
            return TaskData(level, {"clean": clean_train, "aniso": aniso}, [truth[::k]], truth,
                            eval_z, (v * k, v, v), v, {"clean": iso, "aniso": (v * k, v, v)})  # fmt: skip
        raise ValueError(f"unknown task {level.task!r}")

    def describe(self, sizes: Sizes) -> dict:
        return {
            "source": self.name, "title": self.title, "voxel_nm": self.voxel_nm,
            "folder": str(self.folder),
            "text": ("real FIB-SEM of the *Drosophila* medulla, 10 nm isotropic (Janelia FlyEM, "
                     "janelia-flyem/neuroproof_examples, CC-BY: credit the Janelia FlyEM "
                     f"project). Training: `{self.train_file}` "
                     f"(zyx {list(sizes.train_shape)} from the origin; vemdiffuse-a only its every "
                     f"k-th slice, voxel (10k, 10, 10) nm). Test: `{self.test_file}`, never "
                     f"trained on, centre crop {sizes.test_yx}² in yx; denoise and super-resolve "
                     f"score {sizes.test_slices} slices evenly spaced in z, isotropic "
                     f"{sizes.test_intervals} intervals of k slices from the middle of the volume. "
                     "Intensities: uint8 grey value / 255 (fixed, no per-volume stretch). "
                     f"Shot noise only (Poisson, no read noise), keyed on seed and global voxel "
                     f"position: seed {TRAIN_NOISE_SEED} on the training volume, "
                     f"{list(TEST_NOISE_SEEDS)} for the two test realisations."),
            "train_file": self.train_file, "test_file": self.test_file,
            "intensity_rule": "grey / 255",
        }  # fmt: skip


SOURCES = ("synthetic", "flyem")


def make_source(name: str, *, flyem_dir: Path | None = None) -> Source:
    if name == "synthetic":
        return Synthetic()
    if name == "flyem":
        return FlyEM(flyem_dir or FLYEM_DIR)
    raise ValueError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")


def select_levels(
    name: str,
    keys: list[str],
    quick: bool = False,
    task: str | None = None,
    flyem_dir: Path | None = None,
) -> tuple[Source, list[Level], Sizes]:
    """Source ``name`` (FlyEM read from ``flyem_dir``, default :data:`FLYEM_DIR`), its levels
    named by ``keys`` (e.g. ``denoise-dose2``; only ``task``'s when given) and its sizes
    (``quick``: the smoke run's), for the scripts that run single levels. ValueError, one
    line, when the data are missing or a key is unknown."""
    source = make_source(name, flyem_dir=flyem_dir)
    missing = source.available()
    if missing:
        raise ValueError(f"{name} data not found ({missing}); see ../shared/data/README")
    levels = {lv.key: lv for lv in source.levels if task is None or lv.task == task}
    unknown = [k for k in keys if k not in levels]
    if unknown:
        raise ValueError(f"unknown level(s) {unknown}; choose from {sorted(levels)}")
    return source, [levels[k] for k in keys], source.quick if quick else source.full


def flyem_levels(
    keys: list[str], quick: bool = False, flyem_dir: Path | None = None
) -> tuple[Source, list[Level], Sizes]:
    """:func:`select_levels` of the FlyEM source."""
    return select_levels("flyem", keys, quick, flyem_dir=flyem_dir)
