"""Fixtures shared by the test suite (see docs/internals.md, "Tests").

Paths
    ``repo_root`` (the checkout), ``reference_data`` (``tests/data/reference``: files written
    by the reference EMDiffuse code), ``source_env`` (the environment of a subprocess that
    must run this checkout's ``emdiffuse``).
Models
    ``tiny_checkpoint(variant, ...)`` builds a tiny real checkpoint (``.safetensors`` and its
    ``.json``) once per session for each distinct model; ``denoise_checkpoint``,
    ``super_resolve_checkpoint`` (×2) and ``isotropic_checkpoint`` (×3) are the one model per
    task most tests run (intensities 0..1). A freshly initialised network's last layer is
    zero, so the seed of the weights does not change what these models compute; tests that
    need other weights (perturbed, conditioning only) keep a builder of their own.
Volumes
    ``random_volume(shape, ...)`` writes a small random OME-Zarr 0.5 image once per session
    for each distinct set of arguments. Shared between test files: read it, never write it.
Pickled code
    ``pickled_code(marker, how="system")``: an object whose unpickling would run code that
    creates ``marker`` (``os.system``, ``exec``, ``eval`` or an ``eval``-built lambda), for
    the tests that prove no loader ever unpickles.
Threads
    ``one_torch_thread``: torch on one thread for a module of tiny networks
    (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from emdiffuse.io import write_image
from emdiffuse.models.checkpoints import save_checkpoint, sidecar_path
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.presets import make_config

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- paths ----------------------------------------------------------------------------------
# A test run started in the background of a non-interactive shell (`cmd &`, as CI runners and
# `nohup` launches do) inherits SIGINT as *ignored*, and so would every command a test starts;
# the tests that press Ctrl-C on a command (view, enhance, the reliability tests) would then
# wait forever. Give this process Python's usual handler: commands it starts begin with the
# default disposition (a handler, unlike "ignored", is reset at exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# ---- threads --------------------------------------------------------------------------------
# Under pytest-xdist every worker process would start torch with one thread per core, so two
# workers on two cores run four busy OpenMP threads: tiny networks then run 6-10x slower than
# alone (a 14 s training test took 90-160 s). Give each worker, and the commands it starts,
# its share of the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _SHARE = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_SHARE)
    os.environ.setdefault("OMP_NUM_THREADS", str(_SHARE))  # and the commands tests start


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The root of this checkout (where pyproject.toml is)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def reference_data() -> Path:
    """``tests/data/reference``: checkpoints, configs and outputs of the reference's code."""
    return REPO_ROOT / "tests" / "data" / "reference"


@pytest.fixture(scope="session")
def source_env() -> dict[str, str]:
    """``os.environ`` with this checkout first on PYTHONPATH, for ``python -m emdiffuse``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


# ---- models ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(variant, *, scale_factor=None, low=0.0, high=1.0, folder=None)``:
    the path of a tiny real checkpoint of ``variant`` whose training intensities were
    ``low..high``, written once per session. With ``folder``, a copy (with its ``.json``)
    placed there, for a test that watches the folder its model lives in."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[tuple, Path] = {}

    def make(variant: str, *, scale_factor: int | None = None, low: float = 0.0,
             high: float = 1.0, folder: Path | None = None) -> Path:  # fmt: skip
        key = (variant, scale_factor, float(low), float(high))
        if key not in built:
            kwargs = {} if scale_factor is None else {"scale_factor": scale_factor}
            config = make_config(
                variant, "tiny", normalization={"low": float(low), "high": float(high)}, **kwargs
            )
            name = f"{variant}-x{scale_factor or 1}-{low:g}-{high:g}.safetensors"
            state = Enhancer.from_config(config, seed=0).net.state_dict()
            built[key] = save_checkpoint(root / name, state, config)
        path = built[key]
        if folder is None:
            return path
        copy = Path(folder) / f"{variant}-x{scale_factor or 1}.safetensors"
        shutil.copyfile(path, copy)
        shutil.copyfile(sidecar_path(path), sidecar_path(copy))
        return copy

    return make


@pytest.fixture(scope="session")
def denoise_checkpoint(tiny_checkpoint) -> Path:
    """A tiny EMDiffuse-n denoiser (intensities 0..1)."""
    return tiny_checkpoint("emdiffuse-n")


@pytest.fixture(scope="session")
def super_resolve_checkpoint(tiny_checkpoint) -> Path:
    """A tiny EMDiffuse-r model, 2× finer in y and x (intensities 0..1)."""
    return tiny_checkpoint("emdiffuse-r", scale_factor=2)


@pytest.fixture(scope="session")
def isotropic_checkpoint(tiny_checkpoint) -> Path:
    """A tiny vEMDiffuse-i model, 3× as many z-slices (intensities 0..1)."""
    return tiny_checkpoint("vemdiffuse-i", scale_factor=3)


# ---- volumes --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def random_volume(tmp_path_factory):
    """``random_volume(shape, *, dtype="float32", seed=0, voxel_size=None, chunks=None,
    translation=None)``: the path of an OME-Zarr image (zyx, or yx for a 2D shape) of
    ``numpy.random.default_rng(seed)`` draws: uniform in 0.2..0.8 for a float dtype,
    integers in 20..229 for an integer one. Voxel size 8 nm per axis unless given."""
    root = tmp_path_factory.mktemp("volumes")
    written: dict[tuple, Path] = {}

    def make(shape, *, dtype="float32", seed=0, voxel_size=None, chunks=None,
             translation=None) -> Path:  # fmt: skip
        shape = tuple(shape)
        voxel_size = tuple(voxel_size or (8.0,) * len(shape))
        key = (shape, np.dtype(dtype).str, seed, voxel_size,
               chunks and tuple(chunks), translation and tuple(translation))  # fmt: skip
        if key not in written:
            rng = np.random.default_rng(seed)
            if np.issubdtype(np.dtype(dtype), np.integer):
                data = rng.integers(20, 230, size=shape, dtype=dtype)
            else:
                data = rng.uniform(0.2, 0.8, size=shape).astype(dtype)
            path = root / f"volume{len(written)}.ome.zarr"
            write_image(data, path, voxel_size=voxel_size, chunks=chunks, translation=translation)
            written[key] = path
        return written[key]

    return make


# ---- pickled code --------------------------------------------------------------------------
class CodeOnUnpickle:
    """Unpickling this object runs ``how``'s call, which creates the file ``marker``."""

    CALLS = {
        "system": lambda marker: (os.system, (f"touch {marker}",)),
        "exec": lambda marker: (exec, (f"open({str(marker)!r}, 'w').write('pwned')",)),
        "eval": lambda marker: (eval, (f"open({str(marker)!r}, 'w').close()",)),
        "lambda": lambda marker: (eval, (f"(lambda p: open(p, 'w').close())({str(marker)!r})",)),
    }

    def __init__(self, marker: Path, how: str = "system"):
        self.marker = marker
        self.how = how

    def __reduce__(self):
        return self.CALLS[self.how](self.marker)


@pytest.fixture(scope="session")
def pickled_code():
    """``pickled_code(marker, how="system")``: see :class:`CodeOnUnpickle`."""
    return CodeOnUnpickle


# ---- threads --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks gain nothing from threads; on a busy 2-core machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
