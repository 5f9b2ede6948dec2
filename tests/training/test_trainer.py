"""Trainer: exact resume, outputs (checkpoint, CSV, PNG), fine-tuning, CLI, refusals.

Tiny real models on tiny real zarr volumes; ~10 steps each.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore

from emdiffuse import io
from emdiffuse.errors import InputError
from emdiffuse.training import trainer
from emdiffuse.training.settings import TrainSettings
from emdiffuse.training.step import keyed_noise, lr_at


def _smooth(shape, seed):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.random(shape), (0, 2, 2)).astype(np.float32)


def _write(path, data, chunks=(2, 16, 16)):
    arr = zarr.create_array(store=LocalStore(str(path)), shape=data.shape, dtype=data.dtype,
                            chunks=chunks)  # fmt: skip
    arr[...] = data
    return zarr.open_array(store=LocalStore(str(path), read_only=True), mode="r")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    clean = _smooth((4, 64, 64), 0)
    noisy = clean + np.random.default_rng(1).normal(0, 0.05, clean.shape).astype(np.float32)
    return [_write(root / "noisy.zarr", noisy), _write(root / "clean.zarr", clean)]


FAST = dict(
    size="tiny", batch_size=2, patch=16, lr=1e-3, warmup=2, val_every=1000, val_batch=2,
    val_steps=2, progress=False, region=32, val_fraction=0.25, device="cpu", fit_steps=0,
)  # fmt: skip


def _ckpt(out, step):
    """A training checkpoint (load it once per comparison: each load unpickles every tensor)."""
    return torch.load(out / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)


def _assert_same_weights(expected, actual):
    """The same parameter names, bit-identical tensors."""
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip


def test_resume_is_exact(tmp_path, pair):
    a, b = tmp_path / "a", tmp_path / "b"
    trainer.train("denoise", pair, a, steps=8, ckpt_every=4, **FAST)
    trainer.train("denoise", pair, b, steps=4, ckpt_every=4, **FAST)  # "interrupted" at 4
    # the resumed run continues from step 4's state, data position and RNG
    trainer.train("denoise", pair, b, steps=8, ckpt_every=4, resume=True, **FAST)
    sa, sb = _ckpt(a, 8), _ckpt(b, 8)
    assert sa["step"] == sb["step"] == 8
    for part in ("model", "ema"):
        for name, tensor in sa[part].items():
            torch.testing.assert_close(tensor, sb[part][name], rtol=0, atol=0)
    # and training moved the weights at all
    s4 = _ckpt(a, 4)
    assert any(not torch.equal(s4["model"][k], sa["model"][k]) for k in sa["model"])


def test_optimizer_is_fused_and_a_loop_optimizers_checkpoint_resumes_exactly(
    tmp_path, pair, monkeypatch
):
    """New runs step AdamW as one fused kernel; a checkpoint written by the per-parameter
    loop (every run before it) resumes with that loop, and ends where its own run would."""
    fresh = tmp_path / "fresh"
    trainer.train("denoise", pair, fresh, steps=2, ckpt_every=1, **FAST)
    assert all(group["fused"] for group in _ckpt(fresh, 1)["optimizer"]["param_groups"])

    def loop_adamw(net, s, device):
        return torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)

    a, b = tmp_path / "a", tmp_path / "b"
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "make_optimizer", loop_adamw)
        trainer.train("denoise", pair, a, steps=8, ckpt_every=4, **FAST)
        trainer.train("denoise", pair, b, steps=4, ckpt_every=4, **FAST)
    assert not any(group["fused"] for group in _ckpt(b, 4)["optimizer"]["param_groups"])
    trainer.train("denoise", pair, b, steps=8, ckpt_every=4, resume=True, **FAST)
    _assert_same_weights(_ckpt(a, 8)["model"], _ckpt(b, 8)["model"])


def test_move_optimizer_moves_step_counters_only_for_fused_groups():
    from emdiffuse.training.state import move_optimizer

    for fused in (False, True):
        net = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=fused)
        net(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        move_optimizer(optimizer, torch.device("meta"))
        for state in optimizer.state.values():
            assert state["exp_avg"].device.type == "meta"
            assert state["step"].device.type == ("meta" if fused else "cpu")


def test_outputs_checkpoint_csv_png(tmp_path, pair):
    from emdiffuse.models.checkpoints import load_checkpoint

    out = tmp_path / "run"
    path = trainer.train("denoise", pair, out, steps=10, ckpt_every=5, **{**FAST, "val_every": 5})
    assert path == out / "model.safetensors"
    config, state = load_checkpoint(path, expect_task="denoise")
    assert config.prediction == "v" and config.variant == "emdiffuse-n"
    low, high = config.normalization["low"], config.normalization["high"]
    assert -0.3 < low < high < 1.3
    # the stored weights are the EMA ones, but for what the end of the run re-fits for the
    # final model only: the mean network's batch-norm statistics and its output bias
    # (training/norm_stats.py), and the error head (training/error_refit.py); the
    # checkpoint keeps them as training left them
    ema = _ckpt(out, 10)["ema"]
    final_only = {k for k in state if k.startswith("error.") or k.startswith("mean.") and k.endswith(
        ("running_mean", "running_var", "num_batches_tracked"))} | {"mean.out.bias"}  # fmt: skip
    assert config.mean_net.batch_norm and len(final_only) > 1
    for k, v in state.items():
        if k not in final_only:
            torch.testing.assert_close(v, ema[k])
    assert not torch.equal(state["mean.out.bias"], ema["mean.out.bias"])
    assert not torch.equal(state["error.out.bias"], ema["error.out.bias"])
    rows = list(csv.DictReader((out / "scalars.csv").open()))
    assert [int(r["step"]) for r in rows] == [5, 10]  # log every 10 + validation every 5
    val = [r for r in rows if r["val_psnr"]]
    assert len(val) == 2 and all(np.isfinite(float(r["val_psnr"])) for r in val)
    assert float(rows[-1]["loss"]) > 0
    assert (out / "validation" / "step_00000005.png").stat().st_size > 1000
    assert (out / "settings.json").exists()
    # a second run into the same directory is refused
    with pytest.raises(InputError, match="--resume"):
        trainer.train("denoise", pair, out, steps=2, **FAST)


def test_finetune_from_init_and_isotropic(tmp_path, pair):
    base = trainer.train("isotropic", pair[1:], tmp_path / "iso", steps=3, factor=2,
                         ckpt_every=10, **FAST)  # fmt: skip
    from emdiffuse.models.checkpoints import load_checkpoint

    config, state = load_checkpoint(base)
    assert config.variant == "vemdiffuse-i" and config.out_slices == 1
    tuned = trainer.train("anisotropic", pair[1:], tmp_path / "tuned", steps=2, factor=2,
                          init=base, ckpt_every=10, **{**FAST, "patch": 4, "region": 16})  # fmt: skip
    config2, _ = load_checkpoint(tuned)
    assert config2.variant == "vemdiffuse-a"
    with pytest.raises(InputError, match="same task"):
        trainer.train("denoise", pair, tmp_path / "bad", steps=1, init=base, **FAST)


def test_auto_objective_is_residual_new_and_follows_init_and_resume(tmp_path, pair):
    """``objective="auto"`` (the default): a new model is of the residual kind, fine-tuning
    keeps the --init model's kind (reference weights are SR3) and a resumed run keeps its
    own objective; the run records the resolved one."""
    from emdiffuse.models.checkpoints import load_checkpoint

    def objective(out):
        return json.loads((out / "settings.json").read_text())["objective"]

    fast = {**FAST, "calibration_samples": 0}
    new = trainer.train("denoise", pair, tmp_path / "new", steps=1, **{**fast, "fit_steps": 1})
    assert load_checkpoint(new)[0].kind == "residual" and objective(tmp_path / "new") == "residual"
    assert load_checkpoint(new)[0].step_schedules is not None
    sr3 = trainer.train("denoise", pair, tmp_path / "sr3", steps=2, ckpt_every=1,
                        objective="diffusion", **fast)  # fmt: skip
    tuned = trainer.train("denoise", pair, tmp_path / "tuned", steps=1, init=str(sr3), **fast)
    assert load_checkpoint(tuned)[0].kind == "sr3" and objective(tmp_path / "tuned") == "diffusion"
    tuned = trainer.train("denoise", pair, tmp_path / "tuned_r", steps=1, init=str(new), **fast)
    assert load_checkpoint(tuned)[0].kind == "residual"
    # what was fitted to the init model's weights is not carried over to the new ones
    assert load_checkpoint(tuned)[0].step_schedules is None
    # resuming the SR3 run with the default continues it as SR3 (its settings say so)
    trainer.train("denoise", pair, tmp_path / "sr3", steps=3, resume=True, **fast)
    assert load_checkpoint(tmp_path / "sr3" / "model.safetensors")[0].kind == "sr3"
    (tmp_path / "sr3" / "settings.json").unlink()  # then the latest checkpoint says so
    trainer.train("denoise", pair, tmp_path / "sr3", steps=4, resume=True, **fast)
    assert objective(tmp_path / "sr3") == "diffusion"
    with pytest.raises(InputError, match="residual_scale: for objective .residual. only .this run.s is .diffusion.."):
        trainer.train("denoise", pair, tmp_path / "bad", steps=1, init=str(sr3),
                      residual_scale=0.5, **fast)  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_mean_warmup_trains_the_mean_network_alone_first(tmp_path, pair):
    """``mean_warmup``: the first fraction of the steps moves only the mean network's weights
    (the residual network is not evaluated); after it both train, and resume stays exact."""
    fast = {**FAST, "calibration_samples": 0, "mean_warmup": 0.5}
    out = tmp_path / "warm"
    trainer.train("denoise", pair, out, steps=4, ckpt_every=1, **fast)
    s1, s2, s3 = (_ckpt(out, k)["model"] for k in (1, 2, 3))
    residual = [k for k in s1 if k.startswith("residual.")]
    mean = [k for k in s1 if k.startswith("mean.")]
    assert residual and mean
    assert all(torch.equal(s1[k], s2[k]) for k in residual)  # step 2 was still warm-up
    assert any(not torch.equal(s1[k], s2[k]) for k in mean)
    assert any(not torch.equal(s2[k], s3[k]) for k in residual)  # step 3: both train
    # a run killed inside the warm-up (its later checkpoints lost) resumes to the same weights
    for step in (2, 3, 4):
        (out / "checkpoints" / f"step_{step:08d}.pt").unlink()
    trainer.train("denoise", pair, out, steps=4, ckpt_every=1, resume=True, **fast)
    _assert_same_weights(s3, _ckpt(out, 3)["model"])
    with pytest.raises(InputError, match="mean_warmup"):
        trainer.train("denoise", pair, tmp_path / "bad", steps=1, **{**fast, "mean_warmup": 1.0})
    with pytest.raises(InputError, match="mean_warmup"):  # no mean network to warm up
        trainer.train("denoise", pair, tmp_path / "bad", steps=1, objective="diffusion", **fast)
    assert not (tmp_path / "bad").exists()


def test_residual_batch_trains_the_residual_on_part_of_each_batch(tmp_path, pair):
    """``residual_batch``: a cheaper step in which the residual network sees the first N
    samples of the batch; recorded in the settings, resumable exactly, bad values refused
    before anything is written."""
    fast = {**FAST, "batch_size": 4, "calibration_samples": 0}
    out = tmp_path / "part"
    trainer.train("denoise", pair, out, steps=3, ckpt_every=1, residual_batch=1, **fast)
    full = tmp_path / "full"
    trainer.train("denoise", pair, full, steps=3, ckpt_every=1, **fast)
    part3, full3 = _ckpt(out, 3), _ckpt(full, 3)
    assert json.loads(part3["settings"])["residual_batch"] == 1
    residual = [k for k in part3["model"] if k.startswith("residual.")]
    assert any(not torch.equal(part3["model"][k], full3["model"][k]) for k in residual)
    part1 = _ckpt(out, 1)["model"]
    assert any(not torch.equal(part1[k], part3["model"][k]) for k in residual)
    (out / "checkpoints" / "step_00000003.pt").unlink()
    trainer.train("denoise", pair, out, steps=3, ckpt_every=1, residual_batch=1, resume=True,
                  **fast)  # fmt: skip
    _assert_same_weights(part3["model"], _ckpt(out, 3)["model"])
    with pytest.raises(InputError, match=r"residual_batch must be in 1..batch_size \(4\)"):
        trainer.train("denoise", pair, tmp_path / "bad", steps=1, residual_batch=5, **fast)
    with pytest.raises(InputError, match="residual_batch"):
        trainer.train("denoise", pair, tmp_path / "bad", steps=1, objective="diffusion",
                      residual_batch=2, **fast)  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_intensity_jitter_setting_reaches_the_training_patches(pair):
    """``intensity_jitter`` is recorded and decides the loader's gain/offset draw: at 0 the
    patches are the normalised data; at the default the same patches under one affine
    intensity map that is not the identity."""
    from emdiffuse.training.build import build_dataset

    options = {"patch": 16, "region": 32, "val_fraction": 0.25, "batch_size": 2}
    patches = {}
    for jitter in (0.0, 0.1):
        s = TrainSettings.build(
            "denoise", ["noisy", "clean"], {**options, "intensity_jitter": jitter}
        )
        assert s.intensity_jitter == jitter
        ds = build_dataset(s, pair)
        assert (ds.augment.scale, ds.augment.offset) == (jitter, jitter)
        patches[jitter] = [ds.sample(key) for key in range(4)]
    for plain, jittered in zip(patches[0.0], patches[0.1], strict=True):
        assert torch.equal(plain["origin"], jittered["origin"])
        x, y = plain["target"].numpy().ravel(), jittered["target"].numpy().ravel()
        gain, offset = np.polyfit(x, y, 1)
        np.testing.assert_allclose(gain * x + offset, y, atol=1e-4)
        assert abs(gain - 1) <= 0.1 + 1e-6 and abs(offset) <= 0.1 + 1e-6
        assert abs(gain - 1) + abs(offset) > 1e-3


def test_rotations_setting_decides_whether_training_patches_turn(pair):
    """``rotations=False`` draws flips only: every training patch is its unaugmented self
    flipped in y and/or x, so the data's y and x never swap; the default also turns patches
    by 90° (a transposed patch appears among a few draws). A non-boolean is refused."""
    from emdiffuse.training.build import build_dataset

    options = {"patch": 16, "region": 32, "val_fraction": 0.25, "batch_size": 2,
               "intensity_jitter": 0.0}  # fmt: skip
    turned = {}
    for rotations in (True, False):
        s = TrainSettings.build("denoise", ["noisy", "clean"], {**options, "rotations": rotations})
        ds = build_dataset(s, pair)
        assert ds.augment.rotations is rotations and ds.augment.flips
        turned[rotations] = 0
        for key in range(16):
            drawn = ds.sample(key)["target"].numpy()[0]
            plain = ds.sample(key, augment=False)["target"].numpy()[0]
            flips = [plain, plain[::-1], plain[:, ::-1], plain[::-1, ::-1]]
            if not any(np.array_equal(drawn, f) for f in flips):
                assert any(np.array_equal(drawn, f.T) for f in flips)
                turned[rotations] += 1
    assert turned[False] == 0 and turned[True] > 0
    with pytest.raises(InputError, match="rotations must be true or false, got 'no'"):
        TrainSettings.build("denoise", ["noisy", "clean"], {"rotations": "no"})


def test_the_demo_recipe_builds_for_every_objective(tmp_path, pair):
    """``demo_recipe``: the residual kind keeps its split batch (16, the residual network on 4);
    a kind with one network gets batches of 8 and none of the residual kind's fields, so the
    short-CPU recipe trains every objective (the bare DEMO_SETTINGS with another objective
    are refused, naming the field)."""
    from emdiffuse.training.settings import (
        DEMO_SETTINGS,
        OBJECTIVES,
        RESIDUAL_FIELDS,
        SINGLE_NETWORK_BATCH,
        demo_recipe,
    )  # fmt: skip

    residual = TrainSettings.build("denoise", ["noisy", "clean"], demo_recipe("residual"))
    assert (residual.batch_size, residual.residual_batch) == (16, 4)
    for objective in OBJECTIVES:
        s = TrainSettings.build("denoise", ["noisy", "clean"], demo_recipe(objective))
        assert s.objective == objective
        if objective != "residual":
            assert s.batch_size == SINGLE_NETWORK_BATCH
            assert all(getattr(s, name) in (None, 0) for name in RESIDUAL_FIELDS)
    # overrides (a benchmark's --train-set) apply; the residual kind's own only to that kind
    tuned = demo_recipe("diffusion", {"batch_size": 4, "residual_batch": 2, "patch": 32})
    assert (tuned["batch_size"], tuned["patch"]) == (4, 32) and "residual_batch" not in tuned
    assert demo_recipe("residual", {"residual_batch": 2})["residual_batch"] == 2
    with pytest.raises(InputError, match="residual_batch: for objective 'residual' only"):
        TrainSettings.build("denoise", ["noisy", "clean"], {**DEMO_SETTINGS, "objective": "diffusion"})
    tiny = {"steps": 1, "patch": 16, "region": 32, "val_fraction": 0.25, "val_every": 1,
            "ckpt_every": 1, "val_batch": 1, "progress": False, "device": "cpu"}  # fmt: skip
    trainer.train("denoise", pair, tmp_path / "sr3", **{**demo_recipe("diffusion"), **tiny})
    assert json.loads(_ckpt(tmp_path / "sr3", 1)["settings"])["batch_size"] == SINGLE_NETWORK_BATCH


def test_precision_setting_decides_the_dtype_the_network_trains_in(tmp_path, pair):
    """``precision="bf16"`` runs every convolution of the run (training steps and the
    final validation) under bf16 autocast, ``"fp32"`` none; ``"auto"`` is what :func:`autocast_dtype` resolves for the CPU
    (bf16 with Intel AMX); the run records its setting and fp16 is refused before anything
    is written."""
    from emdiffuse.models.device import autocast_dtype

    seen: list[torch.dtype] = []

    def record(module, args, output):
        if isinstance(module, torch.nn.Conv2d):
            seen.append((module.training, output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        dtypes = {}
        for precision in ("fp32", "bf16", "auto"):
            seen.clear()
            out = tmp_path / precision
            trainer.train("denoise", pair, out, steps=2, ckpt_every=10, calibration_samples=0,
                          precision=precision, **FAST)  # fmt: skip
            assert json.loads((out / "settings.json").read_text())["precision"] == precision
            assert {training for training, _ in seen} == {True, False}  # steps, validation
            dtypes[precision] = {dtype for _, dtype in seen}
    finally:
        handle.remove()
    assert dtypes["fp32"] == {torch.float32}
    assert dtypes["bf16"] == {torch.bfloat16}
    assert dtypes["auto"] == {autocast_dtype("auto", torch.device("cpu")) or torch.float32}
    with pytest.raises(InputError, match="precision must be auto, fp32, bf16, got 'fp16'"):
        trainer.train("denoise", pair, tmp_path / "fp16", steps=2, precision="fp16", **FAST)
    assert not (tmp_path / "fp16").exists()


def test_lr_warmup_and_keyed_noise():
    s = TrainSettings(task="denoise", data=[], lr=1.0, warmup=4, steps=10,
                      lr_schedule="cosine", min_lr_ratio=0.0)  # fmt: skip
    assert [lr_at(i, s) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, s) == pytest.approx(0.0, abs=1e-12)
    n1, u1 = keyed_noise([3, 4], (1, 4, 4), seed=0)
    n2, u2 = keyed_noise([4], (1, 4, 4), seed=0)
    torch.testing.assert_close(n1[1], n2[0])
    torch.testing.assert_close(u1[1], u2[0])


def test_the_cosine_follows_the_time_limit_when_time_runs_out_before_the_steps():
    s = TrainSettings(task="denoise", data=[], lr=1.0, warmup=0, steps=1001,
                      lr_schedule="cosine", min_lr_ratio=0.0)  # fmt: skip
    assert lr_at(0, s, 0.5) == pytest.approx(0.5)  # half the time spent: half-way down
    assert lr_at(500, s, 0.1) == pytest.approx(0.5)  # the steps ahead of the clock lead
    assert lr_at(10, s, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(10, s, 2.0) == pytest.approx(0.0, abs=1e-12)  # never past the floor
    assert lr_at(1, TrainSettings(task="denoise", data=[], lr=1.0, warmup=4), 0.9) == 0.5
    constant = TrainSettings(task="denoise", data=[], lr=1.0, warmup=0)
    assert lr_at(7, constant, 0.9) == 1.0  # a constant rate ignores the clock
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(InputError, match="time_limit must be a positive number of seconds"):
            TrainSettings.build("denoise", [], {"time_limit": bad})
    with pytest.raises(InputError, match="lr_follows_time must be true or false"):
        TrainSettings.build("denoise", [], {"lr_follows_time": "yes"})


@pytest.mark.parametrize("follows", [True, False])
def test_a_time_limited_run_anneals_by_its_clock(tmp_path, pair, follows):
    """Far more steps than the time allows: the logged rates lie between the cosine at the
    share of the limit spent when the row was written (a bound reached later than the step
    read the clock) and the cosine by steps; without ``lr_follows_time`` they are the cosine
    by steps alone."""
    limit, steps = 4.0, 10**6
    out = tmp_path / "run"
    opts = {**FAST, "warmup": 0, "lr_schedule": "cosine", "min_lr_ratio": 0.0,
            "error_refit_steps": 0, "calibration_samples": 0}  # fmt: skip
    trainer.train("denoise", pair, out, steps=steps, time_limit=limit, ckpt_every=steps,
                  lr_follows_time=follows, **opts)  # fmt: skip
    s = TrainSettings(task="denoise", data=[], lr=opts["lr"], warmup=0, steps=steps,
                      lr_schedule="cosine", min_lr_ratio=0.0)  # fmt: skip
    with open(out / "scalars.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr")]
    assert len(rows) >= 2
    for r in rows:
        step, lr = int(r["step"]), float(r["lr"])
        by_steps = lr_at(step - 1, s)
        if follows:
            at_row = lr_at(step - 1, s, float(r["elapsed_s"]) / limit)
            assert at_row * (1 - 1e-5) <= lr <= by_steps * (1 + 1e-5)  # as the CSV rounds
        else:
            assert lr == pytest.approx(by_steps, rel=1e-5)
    assert (float(rows[-1]["lr"]) < 0.9 * opts["lr"]) == follows  # a million steps: by steps ~lr


def _ome_pair(folder, pair) -> list[str]:
    """The noisy / clean pair as OME-Zarr images in ``folder`` (8 nm voxels)."""
    paths = []
    for name, arr in zip(("noisy", "clean"), pair, strict=True):
        p = folder / f"{name}.ome.zarr"
        io.write_image(__import__("dask.array").array.from_array(arr[...], chunks=(2, 32, 32)),
                       str(p), voxel_size=(8.0, 8.0, 8.0))  # fmt: skip
        paths.append(str(p))
    return paths


def _assert_cli_refuses(base, bad, cases, capsys) -> None:
    """Each ``(extra arguments, message)`` of ``cases``: ``base --out bad extra`` exits 2
    with the message in one line of stderr, no traceback, and creates nothing."""
    from emdiffuse.cli import main

    for extra, message in cases:
        code = main([*base, "--out", str(bad), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (extra, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not bad.exists()


def test_cli_train_and_bad_input(tmp_path, pair, capsys):
    from emdiffuse.cli import main

    paths = _ome_pair(tmp_path, pair)
    out = tmp_path / "cli"
    code = main(["train", "--task", "denoise", "--data", ",".join(paths), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--patch", "16", "--no-progress",
                 "--device", "cpu", "--val-every", "2", "--no-rotations",
                 "--calibration-level", "0.8", "--error-refit-steps", "0",
                 "--no-lr-follows-time"])  # fmt: skip
    assert code == 0 and (out / "model.safetensors").exists()
    recorded = json.loads((out / "settings.json").read_text())
    assert recorded["rotations"] is False and recorded["error_refit_steps"] == 0
    assert recorded["lr_follows_time"] is False
    from emdiffuse.models.calibration import INTERVAL_LEVELS, levels
    from emdiffuse.models.checkpoints import load_checkpoint

    config, state = load_checkpoint(out / "model.safetensors")
    # calibrated at 0.8, and every usual level stored beside it (enhance --interval-level)
    assert config.calibration["level"] == 0.8
    assert set(levels(config.calibration)) == set(INTERVAL_LEVELS)
    assert set(levels(config.calibration["mean_interval"])) == set(INTERVAL_LEVELS)
    assert tuple(config.voxel_size_nm) == (8.0, 8.0, 8.0)
    assert config.kind == "residual"  # the default objective for a new model
    assert any(name.startswith("mean.") for name in state)
    code = main(["train", "--task", "denoise", "--data", ",".join(paths), "--out",
                 str(tmp_path / "sr3"), "--objective", "diffusion",
                 "--steps", "2", "--batch-size", "2", "--patch", "16", "--no-progress",
                 "--device", "cpu", "--val-every", "2"])  # fmt: skip
    assert code == 0
    config, state = load_checkpoint(tmp_path / "sr3" / "model.safetensors")
    assert config.kind == "sr3" and not any(name.startswith("mean.") for name in state)
    code = main(["train", "--task", "denoise", "--data", ",".join(paths), "--out",
                 str(tmp_path / "scaled"), "--residual-scale", "0.5", "--mean-init", "input",
                 "--steps", "1", "--batch-size", "2", "--patch", "16", "--no-progress",
                 "--device", "cpu", "--val-every", "2"])  # fmt: skip
    assert code == 0
    config, _ = load_checkpoint(tmp_path / "scaled" / "model.safetensors")
    assert config.kind == "residual" and config.residual_scale == 0.5
    code = main(["train", "--task", "isotropic", "--data", paths[1], "--out",
                 str(tmp_path / "y"), "--patch", "4", "--factor", "2", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--patch 4 is narrower than the mean network's 7-voxel skip" in err
    assert "try --patch 8" in err and "Traceback" not in err and not (tmp_path / "y").exists()
    code = main(["train", "--task", "denoise", "--data", ",".join(paths), "--out",
                 str(tmp_path / "y"), "--mean-init", "zero"])  # fmt: skip
    assert code == 2 and "--mean-init" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    code = main(["train", "--task", "denoise", "--data", ",".join(paths), "--out",
                 str(tmp_path / "y"), "--batch-size", "2", "--residual-batch", "3"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "residual_batch must be in 1..batch_size (2), got 3" in err
    assert "Traceback" not in err and not (tmp_path / "y").exists()
    code = main(["train", "--task", "denoise", "--data", ",".join(paths), "--out",
                 str(tmp_path / "y"), "--intensity-jitter", "1.5"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "intensity_jitter must be a fraction in [0, 1), got 1.5" in err
    assert "Traceback" not in err and not (tmp_path / "y").exists()
    code = main(["train", "--task", "denoise", "--data", ",".join(paths), "--out",
                 str(tmp_path / "y"), "--time-limit", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "time_limit must be a positive number of seconds, got 0.0" in err
    assert "Traceback" not in err and not (tmp_path / "y").exists()
    code = main(["train", "--task", "denoise", "--data", ",".join(paths), "--out",
                 str(tmp_path / "y"), "--calibration-level", "90"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "calibration_level must be in (0, 1), got 90" in err
    assert "Traceback" not in err and not (tmp_path / "y").exists()
    code = main(["train", "--task", "super-resolve", "--data", paths[1], "--out",
                 str(tmp_path / "y"), "--z-context", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "z_context 1 is for denoising and isotropic reconstruction" in err
    assert "Traceback" not in err and not (tmp_path / "y").exists()
    code = main(["train", "--task", "denoise", "--data", ",".join(paths), "--out",
                 str(tmp_path / "y"), "--precision", "fp16"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--precision" in err and "Traceback" not in err
    assert not (tmp_path / "y").exists()
    code = main(["train", "--task", "denoise", "--data", paths[0], "--out", str(tmp_path / "x")])
    assert code == 2
    assert "NOISY,CLEAN" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_mean_depth_builds_the_mean_network_it_names(tmp_path, pair, capsys):
    """``train --mean-depth N``: the residual kind's mean network downsamples N times (the
    checkpoint and settings.json say so) and the training patch must suit it; refused in
    one line, nothing created, for a depth out of range, another objective, or --init."""
    from emdiffuse import enhance
    from emdiffuse.cli import main
    from emdiffuse.models.checkpoints import load_checkpoint

    paths = _ome_pair(tmp_path, pair)
    base = ["train", "--task", "denoise", "--data", ",".join(paths), "--batch-size", "2",
            "--no-progress", "--device", "cpu", "--val-every", "2", "--steps", "1",
            "--error-refit-steps", "0"]  # fmt: skip
    out = tmp_path / "deep"
    assert main([*base, "--out", str(out), "--mean-depth", "3", "--patch", "16",
                 "--fit-steps", "2"]) == 0  # fmt: skip
    config = load_checkpoint(out / "model.safetensors")[0]
    assert config.mean_net.depth == 3 and config.unet.multiple == 4 and config.multiple == 8
    assert list(config.step_schedules["schedules"]) == ["2"]  # --fit-steps 2
    assert json.loads((out / "settings.json").read_text())["mean_net"] == {"depth": 3}
    shallow = load_checkpoint(trainer.train(
        "denoise", pair, tmp_path / "shallow", steps=1, **{**FAST, "calibration_samples": 0}
    ))[0]  # fmt: skip
    assert shallow.mean_net.depth == 2 and shallow.multiple == 4
    # enhance tiles the deeper model at its own multiple (a 12-voxel tile is refused)
    image = enhance(paths[0], out / "model.safetensors", tmp_path / "e.zarr", samples=0,
                    **{**ENHANCE_RUN, "tile": 24, "overlap": 8})  # fmt: skip
    assert image.shape == pair[0].shape and np.isfinite(np.asarray(image)).all()
    with pytest.raises(InputError, match="tile 12 must be a multiple of 8"):
        enhance(paths[0], out / "model.safetensors", tmp_path / "e12.zarr", samples=0,
                **{**ENHANCE_RUN, "tile": 12, "overlap": 4})  # fmt: skip
    assert not (tmp_path / "e12.zarr").exists()
    capsys.readouterr()  # the good runs' log
    cases = [
        (["--mean-depth", "3", "--patch", "12"], "--patch 12 must be a multiple of 8"),
        (["--mean-depth", "9"], "depth must be an integer in 0..5, got 9"),  # before the data
        (["--fit-steps", "17"], "fit_steps must be 0 (none) to 16, got 17"),
        (["--mean-depth", "3", "--objective", "diffusion"], "mean_net: for objective"),
        (["--mean-depth", "3", "--init", str(out / "model.safetensors")],
         "mean_net: a fine-tuned model keeps the --init model's architecture"),
    ]  # fmt: skip
    _assert_cli_refuses(base, tmp_path / "bad", cases, capsys)


def test_cli_mean_ssim_trains_the_mean_with_the_ssim_term(tmp_path, pair, capsys):
    """``train --mean-ssim W``: recorded in settings.json, and the logged loss is the
    weighted one (larger than a run without it from the same seed);
    refused in one line, nothing created, for a negative weight, a patch under SSIM's
    window and another objective."""
    from emdiffuse.cli import main

    paths = _ome_pair(tmp_path, pair)
    base = ["train", "--task", "denoise", "--data", ",".join(paths), "--batch-size", "2",
            "--no-progress", "--device", "cpu", "--val-every", "2", "--steps", "1",
            "--patch", "16", "--error-refit-steps", "0", "--precision", "fp32"]  # fmt: skip
    losses = {}
    for weight in ("0", "0.5"):
        out = tmp_path / f"w{weight}"
        assert main([*base, "--out", str(out), "--mean-ssim", weight]) == 0
        assert json.loads((out / "settings.json").read_text())["mean_ssim"] == float(weight)
        rows = (out / "scalars.csv").read_text().splitlines()
        column = rows[0].split(",").index("loss")
        losses[weight] = float(rows[1].split(",")[column])
    assert losses["0.5"] > losses["0"]  # one step: same weights, same batch, + the term
    capsys.readouterr()
    cases = [
        (["--mean-ssim", "-0.5"], "mean_ssim must be a weight >= 0, got -0.5"),
        (["--mean-ssim", "0.1", "--patch", "8"], "mean_ssim needs --patch 11 or more"),
        (["--mean-ssim", "0.1", "--objective", "diffusion"], "mean_ssim: for objective"),
    ]
    _assert_cli_refuses(base, tmp_path / "bad", cases, capsys)


ENHANCE_RUN = dict(tile=16, overlap=4, steps=2, sampler="ddim", seed=1, progress=False,
                   scheduler="threads", workers=1, dtype="float32")  # fmt: skip


def _assert_chunking_invariant(source, model, folder, shape):
    """``enhance`` of ``source`` (the posterior mean and one sample) gives ``shape`` and
    the same values with one output chunk as with small odd chunks."""
    from emdiffuse import enhance

    for samples in (0, 1):
        a = enhance(source, model, folder / f"a{samples}.zarr", chunks=shape, samples=samples,
                    **ENHANCE_RUN)  # fmt: skip
        b = enhance(source, model, folder / f"b{samples}.zarr", chunks=(2, 10, 7),
                    samples=samples, **ENHANCE_RUN)  # fmt: skip
        assert a.shape == shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_z_context_trains_enhances_and_is_kept_when_resuming_or_fine_tuning(tmp_path):
    """``z_context=1``: the isotropic model reads four slices (its config and channels say
    so), a resumed run keeps it, fine-tuning takes the --init model's and refuses another;
    its enhancement does not depend on the output chunking, mirrored ends included."""
    from emdiffuse.models.checkpoints import load_checkpoint

    volume = _write(tmp_path / "iso.zarr", _smooth((12, 64, 64), 4), chunks=(4, 16, 16))
    fast = {**FAST, "calibration_samples": 0}
    out = tmp_path / "ctx"
    trainer.train("isotropic", [volume], out, steps=2, factor=2, z_context=1, ckpt_every=1,
                  mean_net={"skip_size": 3}, **fast)  # fmt: skip
    config, state = load_checkpoint(out / "model.safetensors")
    assert (config.z_context, config.in_slices) == (1, 4)
    # the mean network reads the four slices through a 3×3 skip (mirrored at tile edges,
    # so the chunking test below covers it too)
    assert state["mean.skip.weight"].shape == (1, 4, 3, 3)
    assert json.loads((out / "settings.json").read_text())["z_context"] == 1
    trainer.train("isotropic", [volume], out, steps=3, factor=2, resume=True,
                  mean_net={"skip_size": 3}, **fast)  # fmt: skip
    resumed = load_checkpoint(out / "model.safetensors")[0]
    assert (resumed.z_context, resumed.mean_net.skip_size) == (1, 3)
    with pytest.raises(InputError, match="z_context"):
        trainer.train("isotropic", [volume], out, steps=4, factor=2, resume=True, z_context=0,
                      mean_net={"skip_size": 3}, **fast)  # fmt: skip
    tuned = trainer.train("anisotropic", [volume], tmp_path / "tuned", steps=1, factor=2,
                          init=str(out / "model.safetensors"), **{**fast, "patch": 4, "region": 16})  # fmt: skip
    assert load_checkpoint(tuned)[0].z_context == 1
    with pytest.raises(InputError, match="--z-context 0"):
        trainer.train("isotropic", [volume], tmp_path / "bad", steps=1, factor=2, z_context=0,
                      init=str(out / "model.safetensors"), **fast)  # fmt: skip
    assert not (tmp_path / "bad").exists()
    with pytest.raises(InputError, match="super-resolve reads one slice"):
        trainer.train("super-resolve", [volume], tmp_path / "bad", steps=1, factor=2,
                      z_context=1, **fast)  # fmt: skip

    source = tmp_path / "aniso.ome.zarr"
    io.write_image(_smooth((5, 24, 24), 5), source, voxel_size=(16.0, 8.0, 8.0), levels=0)
    _assert_chunking_invariant(source, out / "model.safetensors", tmp_path, (9, 24, 24))


def test_denoise_z_context_trains_and_enhances_a_stack_chunking_invariant(tmp_path):
    """A residual denoiser with ``z_context=1`` reads the noisy slice and its two
    neighbours: its least-squares skip is fitted on all three, its enhancement of a stack
    does not depend on the output chunking (mirrored end slices included), and a
    single-slice input is refused before anything is written."""
    from emdiffuse import enhance
    from emdiffuse.models.checkpoints import load_checkpoint

    rng = np.random.default_rng(5)
    clean = _smooth((8, 48, 48), 6)
    noisy = (clean + 0.2 * rng.standard_normal(clean.shape)).astype(np.float32)
    out = tmp_path / "n3"
    trainer.train("denoise", [_write(tmp_path / "noisy.zarr", noisy),
                              _write(tmp_path / "clean.zarr", clean)], out, steps=2, z_context=1,
                  objective="residual", mean_net={"skip_size": 3},
                  **{**FAST, "calibration_samples": 0})  # fmt: skip
    config, state = load_checkpoint(out / "model.safetensors")
    assert (config.z_context, config.in_slices, config.describe()) == (
        1, 3, "emdiffuse-n (denoise, 3 input slices)")  # fmt: skip
    weights = state["mean.skip.weight"]
    assert weights.shape == (1, 3, 3, 3) and bool(weights[:, [0, 2]].abs().sum() > 0)
    source = tmp_path / "stack.ome.zarr"
    io.write_image(noisy[:5, :24, :24], source, voxel_size=(8.0, 8.0, 8.0), levels=0)
    _assert_chunking_invariant(source, out / "model.safetensors", tmp_path, (5, 24, 24))
    single = tmp_path / "single.ome.zarr"
    io.write_image(noisy[0, :24, :24], single, voxel_size=(8.0, 8.0), axes="yx", levels=0)
    with pytest.raises(InputError, match="one slice; give the whole z stack"):
        enhance(single, out / "model.safetensors", tmp_path / "c.zarr", **ENHANCE_RUN)
    assert not (tmp_path / "c.zarr").exists()


def test_anisotropic_calibration_keeps_the_harder_lateral_axis(tmp_path):
    """vEMDiffuse-a is applied along z, which no training patch shows: its calibration is
    fitted on held-out rows (y) and columns (x), each on its own, and keeps the larger scale,
    with both recorded (on FlyEM this is what brings its z coverage to the level: the quality
    benchmark). A model trained along one axis keeps one record without an axis."""
    from scipy.ndimage import gaussian_filter

    from emdiffuse.models.checkpoints import load_checkpoint

    rng = np.random.default_rng(3)
    volume = gaussian_filter(rng.random((16, 64, 64)), (1, 6, 0.5)).astype(np.float32)
    fast = {**FAST, "patch": 8, "region": 16, "calibration_patches": 8}
    path = trainer.train("anisotropic", [volume], tmp_path / "a", steps=2, factor=2,
                         objective="residual", **fast)  # fmt: skip
    calibration = load_checkpoint(path)[0].calibration
    scales = calibration["scale_by_axis"]
    assert set(scales) == {"y", "x"} and scales["y"] != scales["x"]  # two fits, two data
    assert calibration["scale"] == max(scales.values())
    assert scales[calibration["axis"]] == calibration["scale"]
    # no fitted schedule (fit_steps 0): calibrated on the default 8 logsnr steps
    assert (calibration["steps"], calibration["spacing"]) == (8, "logsnr")
    one_axis = trainer.train("anisotropic", [volume], tmp_path / "y", steps=2, factor=2,
                             objective="residual", axis="y", **fast)  # fmt: skip
    single = load_checkpoint(one_axis)[0].calibration
    assert "axis" not in single and "scale_by_axis" not in single


def test_hardest_axis_picks_the_largest_scale_and_leaves_one_record_alone():
    from emdiffuse.training.validation import hardest_axis

    record = {"level": 0.9, "scale": 1.5, "samples": 4, "floor": 1e-3}
    assert hardest_axis({None: record}) is record
    picked = hardest_axis({"y": {**record, "scale": 1.2}, "x": {**record, "scale": 2.0}})
    assert (picked["axis"], picked["scale"]) == ("x", 2.0)
    assert picked["scale_by_axis"] == {"y": 1.2, "x": 2.0}
    # the other levels' scales: each the larger of the two axes (the levels both hold)
    y = {**record, "scale": 1.2, "scales": [[0.9, 1.2], [0.95, 1.9], [0.99, 2.5]]}
    x = {**record, "scale": 2.0, "scales": [[0.9, 2.0], [0.95, 1.8]]}
    assert hardest_axis({"y": y, "x": x})["scales"] == [[0.9, 2.0], [0.95, 1.9]]


def test_validation_baseline_interpolates_the_bounding_pair_not_the_z_context():
    from emdiffuse.training.validation import baseline

    cond = np.stack([np.full((1, 4, 4), v, np.float32) for v in (9.0, 1.0, 3.0, -9.0)], axis=1)
    base = baseline(cond, "isotropic", 4, 3, z_context=1)
    np.testing.assert_allclose(base[0, :, 0, 0], [1.5, 2.0, 2.5])
    np.testing.assert_allclose(baseline(cond[:, 1:3], "isotropic", 4, 3), base)
