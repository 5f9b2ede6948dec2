"""Settings and data of the quality benchmark: tasks, difficulty levels, synthetic volumes.

Training data come from one region of the seeded synthetic EM generator (origin 0); test
data from a region far away (``TEST_ORIGIN``), never seen in training, with other noise seeds.
Everything is a pure function of the settings below, so a run is reproducible.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from emdiffuse.training.degrade import add_poisson_gaussian_noise, blur_downsample_xy
from emdiffuse.training.synthetic import synthetic_block

VOXEL_NM = 8.0  # isotropic voxel of the synthetic volume
WORLD_SEED = 0  # seed of the synthetic generator (one "world")
TRAIN_ORIGIN = (0, 0, 0)
TEST_ORIGIN = (10_000, 5_000, 5_000)  # far from every training voxel
TRAIN_NOISE_SEED = 1
TEST_NOISE_SEEDS = (101, 102)  # two independent noise realisations of the test volume


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


LEVELS: tuple[Level, ...] = (
    Level("denoise", "dose 8 e⁻, read noise 1 e⁻ (the sampler benchmark's)", 8.0, 1.0),
    Level("denoise", "dose 2 e⁻, read noise 0.05 e⁻ (the demo's, harsher)", 2.0, 0.05),
    Level("super-resolve", "k = 4", factor=4),
    Level("super-resolve", "k = 8", factor=8),
    Level("isotropic", "k = 4", factor=4),
    Level("isotropic", "k = 8", factor=8),
)
TASKS = ("denoise", "super-resolve", "isotropic")


@dataclass(frozen=True)
class Sizes:
    """Volume sizes and budgets of a run (full or quick)."""

    train_shape: tuple[int, int, int]  # clean training volume (zyx)
    aniso_train_slices: int  # z-slices of the anisotropic training volume (vemdiffuse-a)
    test_yx: int  # test images are test_yx x test_yx
    test_slices: int  # test slices for denoise and super-resolve
    test_intervals: int  # intervals between input slices for isotropic (k-1 slices each)
    steps: int  # training steps of every project model (diffusion and regression)
    patch: int  # training patch (target grid)
    region: int  # loader validation-split region
    peer_patch: int  # CAREamics training patch
    tune_slices: int  # training slices used to tune the classical baselines


FULL = Sizes((64, 256, 256), 64, 192, 8, 6, 1000, 48, 96, 64, 4)
QUICK = Sizes((33, 128, 128), 40, 64, 2, 3, 20, 32, 64, 32, 2)


def settings_key(*parts: object) -> str:
    """A short stable hash of JSON-able settings (cache keys)."""
    text = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts],
                      sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def clean_block(origin: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    """Clean synthetic EM (float32 in [0, 1]) of ``shape`` at global ``origin``."""
    return np.asarray(synthetic_block(origin, shape, seed=WORLD_SEED, voxel_size=VOXEL_NM),
                      dtype=np.float32)  # fmt: skip


def noisy(clean: np.ndarray, level: Level, seed: int, origin: tuple[int, int, int]) -> np.ndarray:
    """Poisson-Gaussian noise of ``level`` on ``clean`` (keyed on global coordinates)."""
    return add_poisson_gaussian_noise(clean, dose=level.dose, read_noise=level.read_noise,
                                      seed=seed, origin=origin)  # fmt: skip


def decimated_slices(
    origin: tuple[int, int, int], n: int, k: int, yx: tuple[int, int]
) -> np.ndarray:
    """Every k-th z-slice of the clean volume from ``origin``: ``n`` thin sections k voxels
    apart (an anisotropic volume with z step k x 8 nm), generated slice by slice."""
    z0, y0, x0 = origin
    return np.concatenate([clean_block((z0 + i * k, y0, x0), (1, *yx)) for i in range(n)])


@dataclass
class TaskData:
    """Arrays of one level: training inputs, and test input(s) with their ground truth.

    ``test_inputs``: the degraded test volume(s) on their own grid (denoise: two noise
    realisations A and B); ``truth``: the clean test volume on the output grid;
    ``eval_z``: the slices scored (isotropic: only those between input slices).
    """

    level: Level
    train: dict[str, np.ndarray]
    test_inputs: list[np.ndarray]
    truth: np.ndarray
    eval_z: np.ndarray
    input_voxel: tuple[float, float, float]


def make_task_data(level: Level, sizes: Sizes, clean_train: np.ndarray) -> TaskData:
    """Training and held-out test arrays of ``level``."""
    yx = (sizes.test_yx, sizes.test_yx)
    k = level.factor
    v = VOXEL_NM
    if level.task == "denoise":
        truth = clean_block(TEST_ORIGIN, (sizes.test_slices, *yx))
        tests = [noisy(truth, level, s, TEST_ORIGIN) for s in TEST_NOISE_SEEDS]
        train = {"noisy": noisy(clean_train, level, TRAIN_NOISE_SEED, TRAIN_ORIGIN),
                 "clean": clean_train}  # fmt: skip
        return TaskData(level, train, tests, truth, np.arange(len(truth)), (v, v, v))
    if level.task == "super-resolve":
        truth = clean_block(TEST_ORIGIN, (sizes.test_slices, *yx))
        low = blur_downsample_xy(truth, k)
        return TaskData(level, {"clean": clean_train}, [low], truth, np.arange(len(truth)),
                        (v, v * k, v * k))  # fmt: skip
    if level.task == "isotropic":
        n_z = sizes.test_intervals * k + 1
        truth = clean_block(TEST_ORIGIN, (n_z, *yx))
        aniso_train = decimated_slices(TRAIN_ORIGIN, sizes.aniso_train_slices, k,
                                       clean_train.shape[1:])  # fmt: skip
        eval_z = np.array([z for z in range(n_z) if z % k])
        return TaskData(level, {"clean": clean_train, "aniso": aniso_train}, [truth[::k]], truth,
                        eval_z, (v * k, v, v))  # fmt: skip
    raise ValueError(f"unknown task {level.task!r}")
