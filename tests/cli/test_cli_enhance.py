"""`emdiffuse enhance` end to end: runs, plan, resume, and bad inputs (exit 2, nothing written)."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

from emdiffuse.cli import main
from emdiffuse.io import open_volume

FAST = ["--steps", "2", "--tile", "16", "--overlap", "4", "--quiet"]
SMALL = ["--steps", "2", "--tile", "16", "--overlap", "4"]
DRY = ["--dry-run", "--steps", "3", "--tile", "16", "--overlap", "4"]


@pytest.fixture(scope="module")
def files(tiny_checkpoint, random_volume):
    """Models trained on 8-bit intensities (0..255) and 8-bit inputs, 3D and 2D."""
    return {
        "emdiffuse-n": str(tiny_checkpoint("emdiffuse-n", high=255.0)),
        "vemdiffuse-i": str(tiny_checkpoint("vemdiffuse-i", scale_factor=2, high=255.0)),
        "in": str(random_volume((2, 24, 24), dtype="uint8", seed=1)),
        "2d": str(random_volume((24, 24), dtype="uint8", seed=1)),
    }


def _enhance(files, out, *options: str) -> list[str]:
    """``emdiffuse enhance`` of the 3D input with the denoiser into ``out``."""
    return ["enhance", files["in"], str(out), "--model", files["emdiffuse-n"], *options]


def test_enhance_threads_then_resume_complete(files, tmp_path, capsys):
    out = tmp_path / "out.zarr"
    code = main(_enhance(files, out, "--threads", *FAST))
    assert code == 0
    vol = open_volume(str(out))
    assert vol.shape == (2, 24, 24) and vol.dtype == np.uint8
    assert "wrote" in capsys.readouterr().out
    code = main(_enhance(files, out, "--threads", "--resume", *SMALL))
    assert code == 0
    assert "already complete" in capsys.readouterr().err


def test_finished_cluster_run_prints_no_worker_tracebacks(files, tmp_path, source_env):
    """The CLI's own LocalCluster (2 worker processes) is shut down quietly: no worker log
    errors or tracebacks on stderr after a successful run (a heartbeat can race the
    scheduler's exit)."""
    out = tmp_path / "quiet.zarr"
    args = _enhance(files, out, "--workers", "2", *SMALL, "--quiet")
    done = subprocess.run([sys.executable, "-m", "emdiffuse.cli", *args], capture_output=True,
                          text=True, env=source_env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and " ERROR " not in done.stderr, done.stderr
    assert out.is_dir()


def test_enhance_local_cluster_with_dashboard(files, tmp_path, capsys):
    out = tmp_path / "lc.zarr"
    code = main(_enhance(files, out, "--workers", "1", *SMALL, "--dtype", "float32"))
    assert code == 0
    err = capsys.readouterr().err
    assert "dashboard:" in err and "network evaluations" in err
    assert open_volume(str(out)).dtype == np.float32


def test_dry_run_prints_plan_only(files, tmp_path, capsys):
    out = tmp_path / "dry.zarr"
    code = main(_enhance(files, out, *DRY))
    assert code == 0
    err = capsys.readouterr().err
    assert "tiles:" in err and "estimated time" in err
    # which noise schedule the sampler walks (this model stores none for inference)
    assert "of linear, 2000 steps, beta 1e-06..0.01 (the model's training schedule)" in err
    assert not out.exists()


def test_log_level_warning_hides_the_plan(files, tmp_path, capsys):
    """The plan is a note on the emdiffuse logger: shown at the default --log-level info,
    not at warning; the library's handler is gone once the command returns."""
    argv = _enhance(files, tmp_path / "dry.zarr", *DRY)
    assert main(["--log-level", "warning", *argv]) == 0
    assert capsys.readouterr().err == ""
    assert main(["--log-level", "info", *argv]) == 0
    assert "network evaluations" in capsys.readouterr().err
    logger = logging.getLogger("emdiffuse")
    assert logger.level == logging.NOTSET and logger.propagate
    assert all(isinstance(h, logging.NullHandler) for h in logger.handlers)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--model", "{vemdiffuse-i}", "--threads"], "2D"),  # isotropic model on a 2D input
        (["--model", "{emdiffuse-n}", "--threads", "--tile", "10"], "multiple"),
        (["--model", "{emdiffuse-n}", "--threads", "--samples", "-1"], "samples"),
        (["--model", "/nonexistent.safetensors", "--threads"], "does not exist"),
    ],
)
def test_bad_inputs_exit_2(files, tmp_path, capsys, args, match):
    out = tmp_path / "bad.zarr"
    args = [a.format(**files) for a in args]
    code = main(["enhance", files["2d"], str(out), *args, "--steps", "2", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_existing_output_refused(files, tmp_path, capsys):
    out = tmp_path / "exists.zarr"
    out.mkdir()
    code = main(_enhance(files, out, "--threads", *FAST))
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert list(out.iterdir()) == []
