"""Train and apply one CAREamics model (Noise2Void or CARE); runs in the peers' venv.

The quality benchmark runs this file as a subprocess with the interpreter of a separate,
gitignored virtual environment holding CAREamics (``.venv-peers``), so the project never
imports CAREamics and keeps its own torch. It reads a job JSON::

    {"algorithm": "n2v" | "care" | "care-z1" | "care-z2", "train_input": "x.npy",
     "train_target": "y.npy" | null, "predict": {"name": "p.npy", ...}, "patch": 48,
     "batch_size": 8, "budget_seconds": 150, "rate": null | steps/s, "probe_steps": 40,
     "seed": 0, "threads": 2, "out": "folder"}

(arrays are float32 stacks of 2D images, axes SYX; every algorithm but ``n2v`` is CARE) and
writes ``out/pred_<name>.npy`` and ``out/result.json`` (steps and epochs trained, wall times,
the measured rate, versions, the configuration). CARE's inputs may have channels (axes SCYX,
e.g. a slice and its neighbours in z) for a target of one (SYX).

Wall-clock budget, as the project's trainer has: when ``rate`` is not given, a probe
training of ``probe_steps`` steps measures it (steps/s after two warm-up steps); the run
then plans ``steps = rate x budget x 1.1`` in about ``EPOCHS`` epochs (validation and the
plateau scheduler run per epoch) and a Lightning ``Timer`` stops it at ``budget_seconds``
of training. The run may take ``EPOCH_HEADROOM`` times the planned epochs, so the timer is
what stops it: a probe that underestimates the rate (a 20-minute run once stopped after 856
of its 1200 s at the planned count) no longer cuts the budget short.

    .venv-peers/bin/python benchmarks/quality/careamics_runner.py job.json
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

EPOCHS = 8  # validation passes in a budget
HORIZON_MARGIN = 1.1
EPOCH_HEADROOM = 4  # epochs allowed beyond the plan: the Timer, not the plan, ends the run
N_VAL = 8


def _set_seeds(value: Any, seed: int) -> Any:
    """Every ``seed`` field of a configuration dump set to ``seed``."""
    if isinstance(value, dict):
        return {k: (seed if k == "seed" else _set_seeds(v, seed)) for k, v in value.items()}
    if isinstance(value, list):
        return [_set_seeds(v, seed) for v in value]
    return value


def patches_per_epoch(n_images: int, shape_yx: tuple[int, int], patch: int) -> int:
    return max(1, n_images * (shape_yx[0] // patch) * (shape_yx[1] // patch) - N_VAL)


def axes(image: Any) -> str:
    """CAREamics axes of an input stack: SYX, or SCYX with channels."""
    return "SCYX" if image.ndim == 4 else "SYX"


def make_config(job: dict[str, Any], epochs: int, per_epoch: int, x: Any) -> Any:
    """The CAREamics configuration: the library's defaults (UNet depth 2, 32 channels,
    Adam, MAE for CARE), our patch, batch and seed, ``epochs`` x ``per_epoch`` steps; for
    an input ``x`` with channels (SCYX), CARE from them to one channel."""
    from careamics.config import create_care_config, create_n2v_config

    patch, batch = int(job["patch"]), int(job["batch_size"])
    common = dict(experiment_name=job["algorithm"], data_type="array", axes=axes(x),
                  patch_size=[patch, patch], batch_size=batch, num_epochs=epochs,
                  num_steps=per_epoch, n_val_patches=N_VAL)  # fmt: skip
    if x.ndim == 4:
        common.update(n_channels_in=x.shape[1], n_channels_out=1, target_axes="SYX")
    config = (
        create_n2v_config(**common) if job["algorithm"] == "n2v" else create_care_config(**common)
    )
    dump = _set_seeds(config.model_dump(), int(job["seed"]) + 1)  # CAREamics seeds are > 0
    dump["training_config"]["early_stopping_params"] = None  # the full budget, like the others
    return type(config).model_validate(dump)


def step_clock() -> Any:
    """A Lightning callback recording the wall time of every finished training step in
    its ``times``."""
    from lightning.pytorch.callbacks import Callback

    class StepClock(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_end(self, *args, **kwargs) -> None:
            self.times.append(time.perf_counter())

    return StepClock()


def probe_rate(job: dict[str, Any], x, y) -> dict[str, float]:
    """Steps per second of this algorithm on this data (``probe_steps`` steps, 2 warm-up)."""
    from careamics import CAREamist

    n = max(4, int(job.get("probe_steps", 40)))
    clock = step_clock()
    config = make_config(job, 1, n, x)
    cam = CAREamist(config, work_dir=str(Path(job["out"]) / "probe"), callbacks=[clock],
                    enable_progress_bar=False)  # fmt: skip
    start = time.perf_counter()
    cam.train(train_data=x, train_data_target=y)
    wall = time.perf_counter() - start
    t = clock.times
    rate = (len(t) - 3) / (t[-1] - t[2]) if len(t) >= 4 and t[-1] > t[2] else n / wall
    return {"steps_per_second": rate, "probe_steps": len(t), "probe_wall": wall}


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Train on the job's arrays for the budget, predict every ``predict`` array, write the
    results."""
    from datetime import timedelta

    import numpy as np
    import torch
    from careamics import CAREamist, __version__
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import Timer

    torch.set_num_threads(int(job.get("threads", 2)))
    seed_everything(int(job["seed"]), workers=True)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    x = np.load(job["train_input"]).astype(np.float32)
    y = None if job.get("train_target") is None else np.load(job["train_target"]).astype(np.float32)
    budget = float(job["budget_seconds"])
    probe = None
    rate = job.get("rate")
    if rate is None:
        probe = probe_rate(job, x, y)
        rate = probe["steps_per_second"]
        seed_everything(int(job["seed"]), workers=True)
    planned = max(1, math.ceil(float(rate) * budget * HORIZON_MARGIN))
    per_epoch = max(1, min(math.ceil(planned / EPOCHS),
                           patches_per_epoch(x.shape[0], x.shape[-2:], int(job["patch"])) // int(job["batch_size"])))  # fmt: skip
    epochs = max(1, math.ceil(planned / per_epoch)) * EPOCH_HEADROOM
    config = make_config(job, epochs, per_epoch, x)
    timer = Timer(duration=timedelta(seconds=budget), interval="step")
    cam = CAREamist(config, work_dir=str(out / "work"), callbacks=[timer],
                    enable_progress_bar=False)  # fmt: skip
    start = time.perf_counter()
    cam.train(train_data=x, train_data_target=y)
    train_seconds = time.perf_counter() - start
    loop_seconds = float(timer.time_elapsed("train"))  # read now: it runs on until the end
    trained_steps = int(cam.trainer.global_step)
    predict_seconds = {}
    for name, path in job["predict"].items():
        image = np.load(path).astype(np.float32)
        start = time.perf_counter()
        result = cam.predict(image, axes=axes(image), data_type="array", batch_size=1,
                             tile_size=None)  # fmt: skip
        predictions = result[0] if isinstance(result, tuple) else result
        stack = np.concatenate([np.asarray(p).reshape(-1, *image.shape[-2:]) for p in predictions])
        np.save(out / f"pred_{name}.npy", stack.astype(np.float32))
        predict_seconds[name] = time.perf_counter() - start
    params = sum(p.numel() for p in cam.model.parameters())
    result = {"algorithm": job["algorithm"], "careamics": __version__, "torch": torch.__version__,
              "budget_seconds": budget, "train_seconds": train_seconds,
              "loop_seconds": loop_seconds,
              "rate": {"steps_per_second": float(rate), "measured": probe is not None,
                       **(probe or {})},
              "planned_steps": planned, "steps_per_epoch": per_epoch, "planned_epochs": epochs,
              "steps": trained_steps, "epochs": int(cam.trainer.current_epoch),
              "stopped_by_timer": trained_steps < epochs * per_epoch,
              "predict_seconds": predict_seconds, "params": int(params),
              "train_images": list(x.shape), "config": json.loads(config.model_dump_json())}  # fmt: skip
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: careamics_runner.py JOB.json")
    run(json.loads(Path(sys.argv[1]).read_text()))
