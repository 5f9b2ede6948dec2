"""Training: patches from OME-Zarr through :class:`PatchDataset` into a diffusion UNet.

:func:`train` runs AdamW with linear warm-up (then constant or cosine), an EMA of the
weights, gradient clipping, bf16 autocast where the hardware has it (``precision``),
validation PSNR/SSIM with a few-step sampler, a progress bar, scalars to ``scalars.csv``
(and TensorBoard when installed), a PNG of validation samples, and checkpoints every
``ckpt_every`` steps that resume exactly. Under ``torchrun`` (or any initialised process
group) it runs data-parallel (DDP): each rank takes
its own ``batch_size`` samples of the global batch.

This module is the loop; its parts live next to it: :mod:`~emdiffuse.training.settings` (the
settings and their defaults), :mod:`~emdiffuse.training.build` (dataset, config, network),
:mod:`~emdiffuse.training.step` (one step, keyed noise, learning rate),
:mod:`~emdiffuse.training.state` (checkpoints, resume), :mod:`~emdiffuse.training.validation`,
:mod:`~emdiffuse.training.scalars` and :mod:`~emdiffuse.training.distributed`; what the end of
a run does for the final model: :mod:`~emdiffuse.training.norm_stats` (batch-norm
statistics), :mod:`~emdiffuse.training.error_refit` (the error head refitted to the final
mean, inside a time limit) and the calibration (:func:`~emdiffuse.training.validation.calibrate`).

Exactness. Every random draw is keyed: sample ``key`` of the loader, and its diffusion noise
and noise level (a generator seeded from ``(seed, key)``); the only global RNG state (torch's,
used by dropout) is saved in the checkpoints. So a run resumed from a checkpoint ends with
the same weights as an uninterrupted run, and ``R`` ranks × ``B`` samples compute the same
gradient as one process with ``R·B``. A run with a time limit is exact only with
``lr_follows_time`` off: by default its cosine follows the clock (rank 0's on every rank),
and where it stops depends on the clock either way.

Output directory::

    out/model.safetensors (+ model.json)   final EMA weights and ModelConfig
    out/checkpoints/step_00000100.pt       resumable state (torch.save of tensors/dicts only)
    out/scalars.csv                        step, loss, lr, grad_norm, val_* , elapsed_s
    out/validation/step_00000100.png       cond | output | target
    out/settings.json                      the run's settings
    out/.emdiffuse/output.json             marks the folder as an emdiffuse training run

``--overwrite`` replaces only a training run emdiffuse wrote; nothing is written before the
data, the model and the settings (the patch side included) are checked.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from emdiffuse.errors import InputError
from emdiffuse.io import make_output_folder, refuse_output
from emdiffuse.models import step_fit
from emdiffuse.models.calibration import levels as calibration_levels
from emdiffuse.models.device import TRAIN_PRECISIONS, autocast_dtype, resolve_device
from emdiffuse.models.diffusion import Schedule
from emdiffuse.models.ema import EMA
from emdiffuse.models.mean_net import skip_gains
from emdiffuse.models.variants import ModelConfig
from emdiffuse.training import distributed
from emdiffuse.training.build import (
    build_config,
    build_dataset,
    build_net,
    check_patch,
    fit_mean_skip,
    load_init,
    make_optimizer,
    resolve_objective,
    resolve_z_context,
    skip_is_fixed,
    split_data,
)
from emdiffuse.training.error_refit import refit_error_head
from emdiffuse.training.loader import PatchDataset, make_loader
from emdiffuse.training.norm_stats import NORM_BATCHES, refresh_mean_network
from emdiffuse.training.scalars import Scalars
from emdiffuse.training.settings import TrainSettings, data_labels, refit_steps
from emdiffuse.training.state import (
    FINAL_NAME,
    checkpoint_path,
    make_state,
    move_optimizer,
    restore,
    resume_state,
    save_final,
    save_state,
    saved_normalization,
)
from emdiffuse.training.step import lr_at, mean_warmup_steps, train_step
from emdiffuse.training.validation import (
    calibrate,
    calibration_axes,
    condition_on_output_grid,
    fit_step_schedule,
    hardest_axis,
    save_validation_png,
    validate,
)

log = logging.getLogger(__name__)
LOG_EVERY = 10  # steps between loss rows in scalars.csv


def train(
    task: str,
    data: str | Sequence[Any],
    out: str | os.PathLike,
    *,
    device: str = "auto",
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    normalization: Any = None,
    **settings: Any,
) -> Path:
    """Train a model for ``task`` on ``data`` and write ``out/model.safetensors``.

    ``task``: denoise | super-resolve | isotropic | anisotropic. ``data``: sources (paths,
    Volumes or arrays; or one comma-separated string), see :class:`PatchDataset`.
    ``settings``: any fields of :class:`~emdiffuse.training.settings.TrainSettings` (``size``,
    ``steps``, ``batch_size`` — per process: the global batch is ``batch_size × world size`` —,
    ``patch``, ``lr``, ``factor``, ``init``, ``seed``, ``val_steps``, ``lr_schedule``,
    ``workers``, ``time_limit``, …); every default is there, unknown names raise
    ``TypeError``. ``normalization``: the raw ranges mapped to [-1, 1] — one
    ``{"low", "high"}`` for condition and target alike, or the pair as
    ``{"condition": {…}, "target": {…}}`` or ``(condition, target)`` (default: the
    0.5/99.5 percentiles of a sample of each side's own source, or the resumed run's). The
    checkpoint stores both (``normalization`` = the target's, ``condition_normalization``).
    Returns the path of the final checkpoint (EMA weights).

    ``objective="auto"`` (the default) is ``"residual"`` for a new model, the ``init``
    model's kind when fine-tuning and the run's own objective when resuming
    (:func:`~emdiffuse.training.build.resolve_objective`).

    ``objective="residual"`` trains a mean-plus-residual model: a regression network for
    the posterior mean (``mean_net``, ``mean_loss``) and a diffusion UNet for the residual
    ``(target - mean) / residual_scale``, in the same steps, one EMA, one checkpoint
    (:class:`~emdiffuse.models.networks.MeanResidualNet`). ``objective="diffusion"`` is the
    SR3 kind (the reference's).

    At the end, when there is a validation split and ``calibration_samples`` >= 2, the
    spread of that many samples (the run's default sampling for this model) on
    ``calibration_patches`` held-out patches is calibrated into
    ``config.calibration`` (:mod:`emdiffuse.models.calibration`).

    ``objective="regression"`` trains the same network as a plain regression model (the
    CARE-style baseline): every sample sits at the noisiest level of the schedule, where the
    noisy-target channel holds no information about the target, and the network predicts
    the clean target directly (``prediction="x0"``, ``loss="l1"``, both forced). The
    checkpoint is an ordinary one; run it with ``steps=1`` (one network evaluation: the
    first step of every sampler returns the network's prediction).
    """
    sources = split_data(data)
    s = TrainSettings.build(task, data_labels(sources), settings)
    out = Path(out)
    check_out(out, sources, s.init, resume, overwrite)
    resolve_objective(s, out, resume)
    resolve_z_context(s, out, resume)
    d = distributed.setup("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        run = _prepare(s, sources, out, d, device, resume, normalization)
        return _train(run, out, progress=progress, replace=overwrite and not resume)
    finally:
        distributed.teardown(d)


def check_out(out: Path, sources: Sequence[Any], init, resume: bool, overwrite: bool) -> None:
    """Refuse an ``out`` that is not free for this run (see ``io.refuse_output``): it may be
    new, an empty folder or, with --resume/--overwrite, a training run emdiffuse wrote; it
    may not hold, equal or lie inside the training data or the --init model."""
    if resume and overwrite:
        raise InputError("pass either --resume or --overwrite, not both")
    reads = [("training data", s) for s in sources if isinstance(s, (str, os.PathLike))]
    if init is not None:
        reads.append(("--init model", init))
    refuse_output(out, overwrite=overwrite, resume=resume, reads=reads, kind="train", name="--out")


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
@dataclass
class _Run:
    """Everything the loop works on, built and checked before the first write."""

    s: TrainSettings
    d: distributed.Dist
    device: torch.device
    dataset: PatchDataset
    config: ModelConfig
    schedule: Schedule
    net: torch.nn.Module
    model: torch.nn.Module  # what the loss is computed through: net, or net in DDP
    ema: EMA
    optimizer: torch.optim.Optimizer
    start: int
    elapsed: float  # seconds of training before this process (a resumed run's)
    autocast: torch.dtype | None  # the forward pass's autocast dtype (None: fp32)

    def state(self, step: int, t0: float) -> dict[str, Any]:
        return make_state(
            step, self.net, self.ema, self.optimizer, self.config, self.s,
            self.dataset.normalization, self.device, time.perf_counter() - t0,
            self.dataset.condition_normalization,
        )  # fmt: skip


def _device(name: str, d: distributed.Dist) -> torch.device:
    """The run's device: one GPU per rank (its local rank among the GPUs)."""
    dev = resolve_device(name, index=d.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def _prepare(
    s: TrainSettings,
    sources: list[Any],
    out: Path,
    d: distributed.Dist,
    device: str,
    resume: bool,
    normalization: Any,
) -> _Run:
    """Read the state to resume (or the model to fine-tune), build the dataset, config,
    network, EMA and optimizer, and restore the state: nothing is written."""
    dev = _device(device, d)
    state = resume_state(out, s) if resume else None
    if state is not None and normalization is None:
        normalization = saved_normalization(state)
    init_config, init_state = None, None
    if s.init is not None and state is None:
        init_config, init_state = load_init(s)
    start = 0 if state is None else int(state["step"])
    dataset = build_dataset(s, sources, normalization=normalization, start_step=start)
    dataset.rank, dataset.world_size = d.rank, d.world
    config = build_config(s, dataset, init_config)
    check_patch(s, config)
    if init_config is not None:  # fine-tuning keeps the model's prediction target
        s.prediction = config.prediction
    net = build_net(config, s.seed)
    if init_state is not None:
        net.load_state_dict(init_state, strict=True)
    elif state is None and config.residual and s.mean_init == "least-squares":
        weights, bias = fit_mean_skip(net, config, dataset)
        log.info("mean network starts at the least-squares skip (%s wide; gain per input "
                 "slice %s, offset %s)", config.mean_net.skip_size, skip_gains(weights),
                 [round(b, 4) for b in bias])  # fmt: skip
    if skip_is_fixed(s, config):
        net.mean.skip.requires_grad_(False)
    ema = EMA(net, s.ema_decay)
    optimizer = make_optimizer(net, s, dev)
    if state is not None:
        restore(state, net, ema, optimizer, dev)
    net.to(dev)
    ema.to(dev)
    move_optimizer(optimizer, dev)
    return _Run(
        s, d, dev, dataset, config, Schedule.from_dict(dict(config.schedule)), net,
        distributed.wrap(net, d, dev, unused=config.residual and s.mean_warmup > 0), ema,
        optimizer, start,
        0.0 if state is None else float(state.get("elapsed", 0.0)),
        autocast_dtype(s.precision, dev, choices=TRAIN_PRECISIONS),
    )  # fmt: skip


def _train(run: _Run, out: Path, *, progress: bool, replace: bool) -> Path:
    """Write the run folder, loop to ``steps`` (or the time limit), save the final state."""
    s, d = run.s, run.d
    val_batch = None
    if d.main and run.dataset.regions["val"]:
        val_batch = run.dataset.batch(range(s.val_batch), split="val")
    if d.main:  # the first write: everything above is checked
        make_output_folder(out, "train", replace=replace)
        (out / "settings.json").write_text(s.to_json() + "\n")
    log.info("training %s from step %d to %d into %s", s.task, run.start, s.steps, out)
    scalars = Scalars(out, run.start, d.main)
    loader = iter(make_loader(run.dataset, workers=s.workers))
    bar = None
    if d.main and progress:
        bar = tqdm(total=s.steps, initial=run.start, desc=f"train {s.task}", unit="step")
    t0 = time.perf_counter() - run.elapsed
    try:
        step = _loop(run, out, loader, val_batch, scalars, bar, t0)
    finally:
        if bar is not None:
            bar.close()
        scalars.close()
    final = out / FINAL_NAME
    if d.main:
        # the state to resume from as training left it; what follows (batch-norm statistics,
        # output offset, calibration) is for the final model only, so that a run resumed
        # from this step goes on exactly as an uninterrupted one would
        save_state(checkpoint_path(out, step), run.state(step, t0))
        _refresh_mean_network(run)
        _refit_error_head(run, t0)
        _fit_step_schedule(run)
        _calibrate(run)
        save_final(out, run.ema, run.config)
    distributed.barrier(d)
    return final


def _loop(
    run: _Run,
    out: Path,
    loader: Iterator[dict[str, Any]],
    val_batch: dict[str, torch.Tensor] | None,
    scalars: Scalars,
    bar,
    t0: float,
) -> int:
    """The optimisation steps from ``run.start``; returns the step reached."""
    s, d = run.s, run.d
    step = run.start
    warmup = mean_warmup_steps(s)
    limit = loop_time_limit(s, run.config)
    losses: list[float] = []
    last: dict[str, float] = {}  # the last step's learning rate and gradient norm
    while step < s.steps:
        spent = 0.0  # the share of the time limit spent, on rank 0's clock
        if limit is not None:
            spent = distributed.rank0_value(d, time.perf_counter() - t0, run.device) / limit
            if spent > 1:
                log.info("time limit of %.0f s reached at step %d%s", limit, step,
                         "" if limit == s.time_limit else
                         f" ({s.time_limit:.0f} s less the error head's refit)")  # fmt: skip
                if d.main and losses:  # the steps since the last row: scalars.csv ends here
                    scalars.write(step, {"loss": float(np.mean(losses)), **last,
                                         "elapsed_s": time.perf_counter() - t0})  # fmt: skip
                break
        batch = next(loader)
        lr = lr_at(step, s, spent if s.lr_follows_time else 0.0)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm = train_step(
            run.model, run.net, run.optimizer, batch, run.schedule, run.config, s, run.device,
            run.autocast, mean_only=run.config.residual and step < warmup,
        )  # fmt: skip
        run.ema.update(run.net)
        step += 1
        losses.append(loss)
        last = {"lr": lr, "grad_norm": grad_norm}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        row: dict[str, Any] = {}
        if d.main and (step % LOG_EVERY == 0 or step == s.steps):
            row.update(loss=float(np.mean(losses)), lr=lr, grad_norm=grad_norm)
            losses = []
        if d.main and val_batch is not None and (step % s.val_every == 0 or step == s.steps):
            row.update(_validate(run, out, step, val_batch))
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", psnr=f"{row['val_psnr']:.2f}")
        if row:
            row["elapsed_s"] = time.perf_counter() - t0
            scalars.write(step, row)
        if step % s.ckpt_every == 0 and step < s.steps:
            if d.main:
                save_state(checkpoint_path(out, step), run.state(step, t0))
                log.debug("saved checkpoint at step %d", step)
            distributed.barrier(d)
    return step


def _refresh_mean_network(run: _Run) -> None:
    """The averaged mean network's batch-norm statistics, estimated on its own activations,
    then its output offset (:mod:`emdiffuse.training.norm_stats`); nothing for a network
    without batch norm."""
    if not run.config.residual:
        return
    layers, offset = refresh_mean_network(run.ema.module.mean, run.dataset, run.s.batch_size,
                                          run.config, run.device, run.autocast)  # fmt: skip
    if layers:
        log.info("batch norm: statistics of %d layers re-estimated on %d training batches; "
                 "output offset %s (model space)", layers, NORM_BATCHES,
                 ", ".join(f"{v:+.4f}" for v in offset.tolist()))  # fmt: skip


def has_refit(s: TrainSettings, config: ModelConfig) -> bool:
    """Whether the run refits an error head at its end (:mod:`emdiffuse.training.error_refit`)."""
    return bool(config.residual and config.mean_net.error_channels and refit_steps(s))


def loop_time_limit(s: TrainSettings, config: ModelConfig) -> float | None:
    """Seconds the optimisation loop may run: the time limit, less the share kept for the
    error head's refit when there is one (None: no limit)."""
    if s.time_limit is None:
        return None
    return s.time_limit * (1 - s.error_refit_share) if has_refit(s, config) else s.time_limit


def _refit_error_head(run: _Run, t0: float) -> None:
    """Refit the averaged model's error head to its final mean, within the time limit."""
    s = run.s
    if not has_refit(s, run.config):
        return
    deadline = None if s.time_limit is None else t0 + s.time_limit
    record = refit_error_head(run.ema.module, run.dataset, run.config,
                              batch_size=s.batch_size, steps=refit_steps(s),
                              device=run.device, autocast=run.autocast, deadline=deadline,
                              grad_clip=s.grad_clip)  # fmt: skip
    log.info("error head refitted to the final mean: %d steps in %.1f s (likelihood %.4f -> "
             "%.4f)", record.steps, record.seconds, record.nll_first, record.nll_last)  # fmt: skip


def _fit_step_schedule(run: _Run) -> None:
    """Fit the model's few-step schedule (residual kind, ``fit_steps`` > 0) on held-out
    patches into the config (:mod:`emdiffuse.models.step_fit`)."""
    s = run.s
    if not (run.config.residual and s.fit_steps and run.dataset.regions["val"]):
        return
    axis = calibration_axes(run.dataset)[0]
    patches = min(s.calibration_patches, step_fit.FIT_PATCHES)
    batch = run.dataset.batch(range(patches), split="val", axis=axis)
    record = fit_step_schedule(run.ema.module, run.config, batch, s, run.device)
    fitted = record["schedules"][str(s.fit_steps)]
    log.info("step schedule: %d steps at σ %s, %.3f RMS from the %d-step solution (logsnr "
             "spacing: %.3f); enhance samples on it by default", s.fit_steps,
             ", ".join(f"{v:.3g}" for v in fitted["sigmas"]), fitted["rms"],
             record["reference_steps"], fitted["rms_logsnr"])  # fmt: skip
    run.config = run.config.replace(step_schedules=record)


def _calibrate(run: _Run) -> None:
    """Fit the conformal scale of the sample spread (and of the error head's σ, when the
    model has one) on held-out patches into the config."""
    s = run.s
    if s.calibration_samples < 2 or not run.dataset.regions["val"]:
        return
    records = {}
    for axis in calibration_axes(run.dataset):
        batch = run.dataset.batch(range(s.calibration_patches), split="val", axis=axis)
        records[axis] = calibrate(run.ema.module, run.config, batch, s, run.device)
    calibration = hardest_axis(records)
    log.info(
        "calibration: %.0f %% intervals are %.2f x the spread of %d samples (Spearman %.2f)%s",
        100 * calibration["level"], calibration["scale"], calibration["samples"],
        calibration["spearman"],
        "" if "axis" not in calibration else
        f", fitted along {calibration['axis']}, the hardest of {calibration['scale_by_axis']}",
    )  # fmt: skip
    log.info("calibration: intervals stored at %s %% (enhance --interval-level)",
             ", ".join(f"{100 * lv:g}" for lv in calibration_levels(calibration)))  # fmt: skip
    if "mean_interval" in calibration:
        mean = calibration["mean_interval"]
        log.info("calibration: the mean's %.0f %% intervals are %.2f x the error head's σ "
                 "(Spearman %.2f)", 100 * mean["level"], mean["scale"], mean["spearman"])  # fmt: skip
    run.config = run.config.replace(calibration=calibration)


def _validate(run: _Run, out: Path, step: int, val_batch: dict[str, torch.Tensor]) -> dict:
    """Validation scalars of the EMA model at ``step``, and its PNG."""
    values, output = validate(run.ema.module, run.config, val_batch, run.s, run.device)
    save_validation_png(
        out / "validation" / f"step_{step:08d}.png",
        condition_on_output_grid(val_batch["cond"], run.config),
        output,
        val_batch["target"].numpy(),
    )
    log.debug("step %d: validation PSNR %.2f dB", step, values["val_psnr"])
    return values


__all__ = ["train", "check_out", "FINAL_NAME", "TrainSettings"]
