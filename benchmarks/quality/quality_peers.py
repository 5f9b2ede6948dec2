"""CAREamics (Noise2Void, CARE) as an external peer, run as a subprocess in its own venv.

CAREamics pins a torch/torchvision that clash with the project's, so it lives in a separate
gitignored virtual environment (``.venv-peers``). This module writes the training pairs and
test inputs as ``.npy`` files, runs ``careamics_runner.py`` with that venv's interpreter and
reads the predictions back; results are cached like the project's models. Every CAREamics
model trains for a wall-clock budget (see the runner), as the project's models do.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from quality_classical import bicubic_xy, interpolate_z
from quality_data import Neighbours, Sizes, TaskData, settings_key
from quality_linear import slice_stacks

RUNNER = Path(__file__).with_name("careamics_runner.py")


def peer_inputs(data: TaskData) -> dict[str, dict[str, Any]]:
    """Per algorithm: training input/target and the test arrays to predict (all SYX).

    denoise: N2V on the noisy training volume alone, CARE on (noisy, clean); both predict the
    two noise realisations. super-resolve: CARE on (bicubic-upsampled low-res, clean).
    isotropic: CARE on (cubic-spline-in-z slice, true slice) at every in-between position of
    the k-decimated training volume; it predicts the in-between slices of the test volume.
    """
    level, k = data.level, data.level.factor
    if level.task == "denoise":
        tests = {"A": data.test_inputs[0], "B": data.test_inputs[1]}
        noisy, clean = data.train["noisy"], data.train["clean"]
        return {"n2v": {"x": noisy, "y": None, "predict": tests},
                "care": {"x": noisy, "y": clean, "predict": tests}}  # fmt: skip
    if level.task == "super-resolve":
        from emdiffuse.training.degrade import blur_downsample_xy

        clean = data.train["clean"]
        x = bicubic_xy(blur_downsample_xy(clean, k), k)
        return {"care": {"x": x, "y": clean, "predict": {"A": bicubic_xy(data.test_inputs[0], k)}}}
    clean = data.train["clean"]
    n = (len(clean) - 1) // k + 1
    cubic = interpolate_z(clean[: (n - 1) * k + 1 : k], k, "cubic")
    between = np.array([z for z in range(len(cubic)) if z % k])
    test = interpolate_z(data.test_inputs[0], k, "cubic")[data.eval_z]
    return {"care": {"x": cubic[between], "y": clean[between], "predict": {"A": test}}}


def context_inputs(data: TaskData, neighbours: Neighbours) -> dict[str, Any]:
    """CARE reading z (``care-z1``) on a denoise level: input the noisy slices z - c … z + c
    as channels (SCYX, mirrored at the training volume's ends), target the clean slice z; it
    predicts the scored slices of both noise realisations with their noisy neighbours."""
    x = slice_stacks(data.train["noisy"], neighbours.context)
    tests = {"A": neighbours.windows(0), "B": neighbours.windows(1)}
    return {"x": x, "y": data.train["clean"], "predict": tests}


_RATES: dict[str, float] = {}  # CAREamics steps/s measured in this run, per algorithm


def run_peer(
    algorithm: str,
    arrays: dict[str, Any],
    data: TaskData,
    sizes: Sizes,
    cache: Path,
    python: Path,
    *,
    budget: float,
    source: str,
    batch_size: int,
    probe_steps: int,
    seed: int = 0,
    threads: int = 2,
) -> dict[str, Any]:
    """Train one CAREamics model for ``budget`` seconds and apply it (or reuse the cached
    result). The rate (steps/s) that sizes its epochs is measured once per algorithm and run
    (a probe in the first job), then passed on.

    Returns ``{"predictions": {name: array}, "meta": {...}}`` or ``{"error": "why"}``.
    """
    if not python.exists():
        return {"error": f"no CAREamics environment: {python} does not exist (see README of "
                         "benchmarks/quality for the install command)"}  # fmt: skip
    job = {"algorithm": algorithm, "patch": sizes.patch, "batch_size": batch_size,
           "budget_seconds": budget, "seed": seed, "threads": threads}  # fmt: skip
    key = settings_key(source, data.level, sizes, job, RUNNER.read_text())
    folder = cache / "peers" / f"{source}-{data.level.key}-{algorithm}-{budget:g}s-{key}"
    names = list(arrays["predict"])
    result_path = folder / "out" / "result.json"
    if result_path.exists() and all((folder / "out" / f"pred_{n}.npy").exists() for n in names):
        meta = json.loads(result_path.read_text())
        return {"predictions": {n: np.load(folder / "out" / f"pred_{n}.npy") for n in names},
                "meta": {**meta, "cached": True}}  # fmt: skip
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    np.save(folder / "train_input.npy", np.asarray(arrays["x"], np.float32))
    if arrays["y"] is not None:
        np.save(folder / "train_target.npy", np.asarray(arrays["y"], np.float32))
    for n in names:
        np.save(folder / f"test_{n}.npy", np.asarray(arrays["predict"][n], np.float32))
    job.update(
        rate=_RATES.get(f"{algorithm}-{sizes.patch}-{batch_size}-{threads}"),
        probe_steps=probe_steps,
        train_input=str(folder / "train_input.npy"),
        train_target=None if arrays["y"] is None else str(folder / "train_target.npy"),
        predict={n: str(folder / f"test_{n}.npy") for n in names},
        out=str(folder / "out"),
    )
    (folder / "job.json").write_text(json.dumps(job, indent=1))
    start = time.perf_counter()
    with (folder / "log.txt").open("w") as log:
        proc = subprocess.run([str(python), str(RUNNER), str(folder / "job.json")],
                              stdout=log, stderr=subprocess.STDOUT, check=False)  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result_path.exists():
        tail = (folder / "log.txt").read_text()[-1500:]
        return {"error": f"careamics_runner exited {proc.returncode}; log tail: {tail}"}
    meta = json.loads(result_path.read_text())
    _RATES.setdefault(f"{algorithm}-{sizes.patch}-{batch_size}-{threads}",
                      float(meta["rate"]["steps_per_second"]))  # fmt: skip
    meta.update(subprocess_seconds=wall, cached=False)
    for n in names:  # the arrays are rewritten for every run: keep only results and log
        (folder / f"test_{n}.npy").unlink(missing_ok=True)
    for f in ("train_input.npy", "train_target.npy"):
        (folder / f).unlink(missing_ok=True)
    shutil.rmtree(folder / "out" / "work", ignore_errors=True)
    shutil.rmtree(folder / "out" / "probe", ignore_errors=True)
    return {"predictions": {n: np.load(folder / "out" / f"pred_{n}.npy") for n in names},
            "meta": meta}  # fmt: skip
