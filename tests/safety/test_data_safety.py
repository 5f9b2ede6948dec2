"""Never harm data, validate before writing (issue 12, rows 1-3, 8, 11, 12, 14-17, 19).

Each test runs the real command (`emdiffuse.cli.main`, in this process unless a hang must be
bounded) on real files: tiny real checkpoints, real OME-Zarr images, a real training run, the
reference checkpoint of tests/data/reference. A refusal is checked the project's way: exit 2,
one line on stderr without a traceback, nothing created, nothing the user had changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from emdiffuse.cli import main
from emdiffuse.errors import InputError
from emdiffuse.io import write_image
from emdiffuse.models.unet import UNet
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.run_record import read_run_config
from emdiffuse.training import trainer

FAST = ["--steps", "1", "--tile", "16", "--overlap", "4", "--threads", "--quiet"]
TRAIN_FAST = ["--size", "tiny", "--steps", "1", "--batch-size", "2", "--patch", "16",
              "--val-every", "1000", "--ckpt-every", "1000", "--device", "cpu",
              "--no-progress"]  # fmt: skip


def _hand_made(path: Path, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]) -> str:
    """An OME-Zarr 0.5 image (yx, 8 nm) whose chunks are never written: any size, no bytes."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("0", shape=shape, dtype=dtype, chunks=chunks, fill_value=0)
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"[-len(shape) :]]
    scale = [{"type": "scale", "scale": [8.0] * len(shape)}]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": scale}]}
        ],
    }
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint) -> dict[str, str]:
    root = tmp_path_factory.mktemp("safety")
    w: dict[str, str] = {"root": str(root)}
    w["model"] = str(tiny_checkpoint("emdiffuse-n", low=19.0, high=255.0))
    rng = np.random.default_rng(0)
    w["in"] = write_image(rng.integers(20, 230, (2, 24, 24), dtype=np.uint8),
                          root / "in.ome.zarr", voxel_size=(8.0, 8.0, 8.0))  # fmt: skip
    w["wide"] = write_image(rng.integers(20, 230, (213, 300), dtype=np.uint8),
                            root / "wide.ome.zarr", voxel_size=(8.0, 8.0), axes="yx")  # fmt: skip
    w["u16"] = write_image(rng.integers(7710, 56283, (2, 24, 24)).astype(np.uint16),
                           root / "u16.ome.zarr", voxel_size=(8.0, 8.0, 8.0))  # fmt: skip
    w["i16"] = write_image(rng.integers(-9800, 9100, (2, 24, 24)).astype(np.int16),
                           root / "i16.ome.zarr", voxel_size=(8.0, 8.0, 8.0))  # fmt: skip
    w["f01"] = write_image(rng.uniform(0, 1, (2, 24, 24)).astype(np.float32),
                           root / "f01.ome.zarr", voxel_size=(8.0, 8.0, 8.0))  # fmt: skip
    w["huge"] = _hand_made(root / "huge.ome.zarr", (16384, 16384), "uint8", (1024, 1024))
    clean = rng.uniform(0.2, 0.8, (4, 64, 64)).astype(np.float32)
    noisy = clean + rng.normal(0, 0.05, clean.shape).astype(np.float32)
    w["clean"] = write_image(clean, root / "clean.ome.zarr", voxel_size=(8.0, 8.0, 8.0))
    w["noisy"] = write_image(noisy, root / "noisy.ome.zarr", voxel_size=(8.0, 8.0, 8.0))
    trainer.train("denoise", [w["noisy"], w["clean"]], root / "run_dn", steps=2, size="tiny",
                  batch_size=2, patch=16, val_every=1000, ckpt_every=1000, progress=False,
                  device="cpu")  # fmt: skip
    w["run"] = str(root / "run_dn")
    return w


def _tree(path: str | Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) -> SHA-256 of its bytes."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in files}  # fmt: skip


def _refused(code: int, capsys, command: str) -> str:
    """Check the refusal rule's message part; return the message."""
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert captured.err.count("\n") == 1, captured.err  # one line
    assert captured.err.startswith(f"emdiffuse {command}: error: "), captured.err
    return captured.err


def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    return folder


def _argv(command: str, w: dict[str, str], out: str) -> list[str]:
    return {
        "enhance": ["enhance", w["in"], out, "--model", w["model"], *FAST],
        "convert": ["convert", w["in"], out],
        "synth": ["synth", out, "--shape", "4,32,32", "--task", "denoise"],
        "train": [
            "train",
            "--task",
            "denoise",
            "--data",
            f"{w['noisy']},{w['clean']}",
            "--out",
            out,
            *TRAIN_FAST,
        ],
    }[command]


# ---- row 1: --overwrite replaces only what emdiffuse wrote -----------------------------------
@pytest.mark.parametrize("command", ["enhance", "convert", "synth", "train"])
def test_overwrite_refuses_a_folder_of_user_files(world, tmp_path, capsys, command):
    folder = _user_folder(tmp_path)
    before = _tree(folder)
    err = _refused(main([*_argv(command, world, str(folder)), "--overwrite"]), capsys, command)
    assert "not written by emdiffuse" in err and "thesis.txt" in err
    assert _tree(folder) == before


def test_train_without_overwrite_does_not_write_into_a_folder_of_user_files(
    world, tmp_path, capsys
):
    folder = _user_folder(tmp_path)
    (folder / "settings.json").write_text('{"mine": true}')
    before = _tree(folder)
    err = _refused(main(_argv("train", world, str(folder))), capsys, "train")
    assert "not written by emdiffuse" in err
    assert _tree(folder) == before


@pytest.mark.parametrize("command", ["enhance", "convert", "synth", "train"])
def test_overwrite_replaces_our_own_output(world, tmp_path, capsys, command):
    out = str(tmp_path / "out")
    assert main(_argv(command, world, out)) == 0
    assert main(_argv(command, world, out)) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*_argv(command, world, out), "--overwrite"]) == 0


def test_overwrite_refuses_another_kind_of_emdiffuse_output(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    before = _tree(run)
    argv = ["enhance", world["in"], str(run), "--model", world["model"], *FAST, "--overwrite"]
    err = _refused(main(argv), capsys, "enhance")
    assert "training run" in err
    assert _tree(run) == before


# ---- row 2: an output may not equal or contain what the run reads ---------------------------
@pytest.mark.parametrize("where", ["threads", "cluster"])
def test_output_that_holds_the_model_is_refused(world, tmp_path, capsys, where):
    rc = tmp_path / "rc"
    shutil.copytree(world["run"], rc)
    before = _tree(rc)
    fast = FAST if where == "threads" else [a for a in FAST if a != "--threads"]
    argv = ["enhance", world["in"], str(rc), "--model", str(rc / "model.safetensors"), *fast,
            "--overwrite"]  # fmt: skip
    err = _refused(main(argv), capsys, "enhance")
    assert "contains the model" in err
    assert _tree(rc) == before


def test_training_output_that_holds_its_init_model_is_refused(world, tmp_path, capsys):
    rc = tmp_path / "rc"
    shutil.copytree(world["run"], rc)
    before = _tree(rc)
    argv = [*_argv("train", world, str(rc)), "--init", str(rc / "model.safetensors"),
            "--overwrite"]  # fmt: skip
    err = _refused(main(argv), capsys, "train")
    assert "contains the --init model" in err
    assert _tree(rc) == before


# ---- row 3: import-reference never writes over its inputs ------------------------------------
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_import_reference_never_replaces_its_config(
    tmp_path, monkeypatch, capsys, overwrite, reference_data
):
    shutil.copy(reference_data / "emdiffuse_n_Network.pth", tmp_path / "best_Network.pth")
    shutil.copy(reference_data / "emdiffuse_n.json", tmp_path / "EMDiffuse-n.json")
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["import-reference", "best_Network.pth", "EMDiffuse-n.json",
            "EMDiffuse-n.safetensors", *overwrite]  # fmt: skip
    err = _refused(main(argv), capsys, "import-reference")
    assert "EMDiffuse-n.json" in err and "input" in err
    assert _tree(tmp_path) == before


def test_import_reference_keeps_a_foreign_json_beside_its_output(tmp_path, capsys, reference_data):
    notes = tmp_path / "model.json"
    notes.write_text('{"my": "notes"}')
    argv = [
        "import-reference",
        str(reference_data / "emdiffuse_n_Network.pth"),
        str(reference_data / "emdiffuse_n.json"),
        str(tmp_path / "model.safetensors"),
    ]
    for extra in ([], ["--overwrite"]):
        err = _refused(main([*argv, *extra]), capsys, "import-reference")
        assert "model.json" in err
    assert notes.read_text() == '{"my": "notes"}'
    assert not (tmp_path / "model.safetensors").exists()


# ---- row 8: input far from the model's training range ----------------------------------------
@pytest.mark.parametrize("name", ["u16", "i16", "f01"])
def test_input_outside_the_training_range_warns_once(world, tmp_path, capsys, name):
    out = tmp_path / "out.zarr"
    assert main(["enhance", world[name], str(out), "--model", world["model"], *FAST]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "training range" in lines[0] and "--normalize auto" in lines[0]
    assert main(["enhance", world[name], str(tmp_path / "auto.zarr"), "--model", world["model"],
                 *FAST, "--normalize", "auto"]) == 0  # fmt: skip
    assert capsys.readouterr().err == ""


def test_input_inside_the_training_range_does_not_warn(world, tmp_path, capsys):
    assert main(["enhance", world["in"], str(tmp_path / "o.zarr"), "--model", world["model"],
                 *FAST]) == 0  # fmt: skip
    assert capsys.readouterr().err == ""


# ---- row 11: seeds the noise generator cannot take ------------------------------------------
@pytest.mark.parametrize("seed", [str(2**70), str(2**63), "-1"])
def test_seed_out_of_range_is_refused(world, tmp_path, capsys, seed):
    out = tmp_path / "out.zarr"
    argv = ["enhance", world["in"], str(out), "--model", world["model"], *FAST, "--seed", seed]
    err = _refused(main(argv), capsys, "enhance")
    assert "seed" in err and str(2**63 - 1) in err
    assert not out.exists()


# ---- row 12: tiles larger than the image, tile batches larger than memory --------------------
def test_tile_larger_than_the_image_is_capped(world, tmp_path, capsys):
    out = tmp_path / "out.zarr"
    argv = ["enhance", world["wide"], str(out), "--model", world["model"], "--tile", "1024",
            "--steps", "1", "--threads", "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert read_run_config(out)["tile"] == 300  # the longer side, a multiple of 4 already


def test_dry_run_with_a_huge_tile_reports_the_capped_tile(world, tmp_path, capsys):
    argv = ["enhance", world["wide"], str(tmp_path / "o.zarr"), "--model", world["model"],
            "--tile", "100000", "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "tiles: 1 of 300x300" in err and "Traceback" not in err


@pytest.mark.parametrize("dry_run", [["--dry-run"], ["--threads", "--quiet"]])
def test_tile_batch_larger_than_memory_is_refused(world, tmp_path, capsys, dry_run):
    out = tmp_path / "out.zarr"
    argv = ["enhance", world["huge"], str(out), "--model", world["model"], "--tile", "16384",
            "--steps", "1", *dry_run]  # fmt: skip
    err = _refused(main(argv), capsys, "enhance")
    assert "memory" in err and "--tile" in err and "--batch-size" in err
    assert not out.exists()


# ---- row 14: workers and threads per worker ---------------------------------------------------
def test_negative_workers_is_refused_at_once(world, tmp_path, source_env):
    out = tmp_path / "out.zarr"
    done = subprocess.run(
        [sys.executable, "-m", "emdiffuse.cli", "enhance", world["in"], str(out), "--model",
         world["model"], "--steps", "1", "--quiet", "--workers", "-2"],
        capture_output=True, text=True, env=source_env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "--workers" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("option", [["--workers", "0"], ["--threads-per-worker", "0"]])
def test_zero_workers_or_threads_is_refused(world, tmp_path, capsys, option):
    out = tmp_path / "out.zarr"
    argv = ["enhance", world["in"], str(out), "--model", world["model"], "--steps", "1",
            "--tile", "16", "--quiet", *option]  # fmt: skip
    err = _refused(main(argv), capsys, "enhance")
    assert option[0] in err and "positive" in err
    assert not out.exists()


def test_api_refuses_zero_workers(world, tmp_path):
    with pytest.raises(InputError, match="workers"):
        enhance(world["in"], world["model"], tmp_path / "o.zarr", workers=0, progress=False)
    assert not (tmp_path / "o.zarr").exists()


# ---- row 15: a dry run costs one network evaluation ------------------------------------------
def test_dry_run_times_one_network_evaluation(world, tmp_path, capsys, monkeypatch):
    """The time estimate costs the same few evaluations (a warm-up on the smallest tile, then
    one on the run's tile) whatever the steps and samples: it times one and multiplies."""
    calls = []
    forward = UNet.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", counting)
    counts = []
    for steps, samples in (("1", "1"), ("200", "3")):
        argv = ["enhance", world["in"], str(tmp_path / "o.zarr"), "--model", world["model"],
                "--steps", steps, "--samples", samples, "--sampler", "ddpm", "--dry-run"]  # fmt: skip
        calls.clear()
        assert main(argv) == 0
        assert "estimated time" in capsys.readouterr().err
        counts.append(len(calls))
    assert counts[0] == counts[1] <= 2
    assert not (tmp_path / "o.zarr").exists()


# ---- row 16: a device that is not there --------------------------------------------------------
def _absent_device() -> str:
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("where", [["--threads"], ["--workers", "1"]])
def test_absent_device_is_refused_before_anything_is_created(world, tmp_path, capsys, where):
    out = tmp_path / "out.zarr"
    argv = ["enhance", world["in"], str(out), "--model", world["model"], "--steps", "1",
            "--tile", "16", "--quiet", "--device", _absent_device(), *where]  # fmt: skip
    err = _refused(main(argv), capsys, "enhance")
    assert "--device" in err
    assert not out.exists()


# ---- row 17: a scheduler that cannot be reached -------------------------------------------------
def test_unreachable_scheduler_is_reported_before_anything_is_created(world, tmp_path, capsys):
    out = tmp_path / "out.zarr"
    argv = ["enhance", world["in"], str(out), "--model", world["model"], "--steps", "1",
            "--tile", "16", "--quiet", "--scheduler-address", "tcp://127.0.0.1:1",
            "--connect-timeout", "1"]  # fmt: skip
    err = _refused(main(argv), capsys, "enhance")
    assert "could not reach the Dask scheduler" in err and "--resume" not in err
    assert not out.exists()


# ---- row 19: train --patch, convert --levels ---------------------------------------------------
def test_train_bad_patch_is_refused_before_the_output_exists(world, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*_argv("train", world, str(out)), "--patch", "5"]
    err = _refused(main(argv), capsys, "train")
    assert "--patch" in err
    assert not out.exists()


def test_convert_negative_levels_is_refused(world, tmp_path, capsys):
    out = tmp_path / "out.ome.zarr"
    err = _refused(main(["convert", world["in"], str(out), "--levels", "-3"]), capsys, "convert")
    assert "--levels" in err
    assert not out.exists()


def test_synth_marks_its_folder_as_emdiffuse_output(tmp_path):
    out = tmp_path / "s"
    assert main(["synth", str(out), "--shape", "4,32,32", "--task", "denoise"]) == 0
    assert json.loads((out / ".emdiffuse" / "output.json").read_text())["kind"] == "synth"
