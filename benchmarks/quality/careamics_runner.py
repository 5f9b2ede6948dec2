"""Train and apply one CAREamics model (Noise2Void or CARE); runs in the peers' venv.

The quality benchmark runs this file as a subprocess with the interpreter of a separate,
gitignored virtual environment holding CAREamics (``.venv-peers``), so the project never
imports CAREamics and keeps its own torch. It reads a job JSON::

    {"algorithm": "n2v" | "care", "train_input": "x.npy", "train_target": "y.npy" | null,
     "predict": {"name": "p.npy", ...}, "patch": 48, "batch_size": 8, "steps": 1000,
     "seed": 0, "threads": 2, "out": "folder"}

(arrays are float32 stacks of 2D images, axes SYX) and writes ``out/pred_<name>.npy`` and
``out/result.json`` (steps and epochs trained, wall times, versions, the configuration).

    .venv-peers/bin/python benchmarks/quality/careamics_runner.py job.json
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


def _set_seeds(value: Any, seed: int) -> Any:
    """Every ``seed`` field of a configuration dump set to ``seed``."""
    if isinstance(value, dict):
        return {k: (seed if k == "seed" else _set_seeds(v, seed)) for k, v in value.items()}
    if isinstance(value, list):
        return [_set_seeds(v, seed) for v in value]
    return value


def make_config(job: dict[str, Any], n_images: int, shape_yx: tuple[int, int]) -> Any:
    """The CAREamics configuration: the library's defaults (UNet depth 2, 32 channels,
    Adam, MAE for CARE), our patch, batch and seed, and epochs x batches ~ ``steps``."""
    from careamics.config import create_care_config, create_n2v_config

    patch, batch = int(job["patch"]), int(job["batch_size"])
    n_val = 8
    patches = n_images * (shape_yx[0] // patch) * (shape_yx[1] // patch) - n_val
    per_epoch = max(1, min(int(job["steps"]), patches // batch))
    epochs = max(1, math.ceil(int(job["steps"]) / per_epoch))
    common = dict(experiment_name=job["algorithm"], data_type="array", axes="SYX",
                  patch_size=[patch, patch], batch_size=batch, num_epochs=epochs,
                  num_steps=per_epoch, n_val_patches=n_val)  # fmt: skip
    config = (
        create_n2v_config(**common) if job["algorithm"] == "n2v" else create_care_config(**common)
    )
    dump = _set_seeds(config.model_dump(), int(job["seed"]) + 1)  # CAREamics seeds are > 0
    dump["training_config"]["early_stopping_params"] = None  # the full budget, like the others
    return type(config).model_validate(dump)


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Train on the job's arrays, predict every ``predict`` array, write the results."""
    import numpy as np
    import torch
    from careamics import CAREamist, __version__
    from lightning.pytorch import seed_everything

    torch.set_num_threads(int(job.get("threads", 2)))
    seed_everything(int(job["seed"]), workers=True)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    x = np.load(job["train_input"]).astype(np.float32)
    y = None if job.get("train_target") is None else np.load(job["train_target"]).astype(np.float32)
    config = make_config(job, x.shape[0], x.shape[1:])
    cam = CAREamist(config, work_dir=str(out / "work"), enable_progress_bar=False)
    start = time.perf_counter()
    cam.train(train_data=x, train_data_target=y)
    train_seconds = time.perf_counter() - start
    trained_steps = int(cam.trainer.global_step)
    epochs = int(cam.trainer.current_epoch)
    predict_seconds = {}
    for name, path in job["predict"].items():
        image = np.load(path).astype(np.float32)
        start = time.perf_counter()
        result = cam.predict(image, axes="SYX", data_type="array", batch_size=1, tile_size=None)
        predictions = result[0] if isinstance(result, tuple) else result
        stack = np.concatenate([np.asarray(p).reshape(-1, *image.shape[1:]) for p in predictions])
        np.save(out / f"pred_{name}.npy", stack.astype(np.float32))
        predict_seconds[name] = time.perf_counter() - start
    params = sum(p.numel() for p in cam.model.parameters())
    result = {"algorithm": job["algorithm"], "careamics": __version__, "torch": torch.__version__,
              "train_seconds": train_seconds, "predict_seconds": predict_seconds,
              "steps": trained_steps, "epochs": epochs, "params": int(params),
              "train_images": list(x.shape), "config": json.loads(config.model_dump_json())}  # fmt: skip
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: careamics_runner.py JOB.json")
    run(json.loads(Path(sys.argv[1]).read_text()))
