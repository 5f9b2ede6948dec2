"""Training: patches from OME-Zarr through :class:`PatchDataset` into a diffusion UNet.

:func:`train` runs AdamW with linear warm-up (then constant or cosine), an EMA of the
weights, gradient clipping, bf16 autocast on GPUs, validation PSNR/SSIM with a few-step
sampler, a progress bar, scalars to ``scalars.csv`` (and TensorBoard when installed), a PNG
of validation samples, and checkpoints every ``ckpt_every`` steps that resume exactly. Under
``torchrun`` (or any initialised process group) it runs data-parallel (DDP): each rank takes
its own ``batch_size`` samples of the global batch.

Exactness. Every random draw is keyed: sample ``key`` of the loader, and its diffusion noise
and noise level (a generator seeded from ``(seed, key)``); the only global RNG state (torch's,
used by dropout) is saved in the checkpoints. So a run resumed from a checkpoint ends with
the same weights as an uninterrupted run, and ``R`` ranks × ``B`` samples compute the same
gradient as one process with ``R·B``.

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

import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emdiffuse.errors import InputError
from emdiffuse.models.conditioning import upsample_xy

TASK_VARIANTS = {
    "denoise": "emdiffuse-n",
    "super-resolve": "emdiffuse-r",
    "isotropic": "vemdiffuse-i",
    "anisotropic": "vemdiffuse-a",
}
FINAL_NAME = "model.safetensors"
OBJECTIVES = ("diffusion", "regression")


@dataclass
class TrainSettings:
    """Everything that decides a run (stored in ``settings.json`` and every checkpoint)."""

    task: str
    data: list[str]
    size: str = "tiny"
    steps: int = 2000
    batch_size: int = 8
    patch: int = 64
    lr: float = 2e-4
    warmup: int = 100
    lr_schedule: str = "constant"  # or "cosine" (to lr * min_lr_ratio at `steps`)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    prediction: str = "v"
    loss: str = "mse"
    sampler: str = "ddim"
    val_steps: int = 4
    val_every: int = 250
    val_batch: int = 8
    ckpt_every: int = 250
    factor: int | None = None
    axis: str = "both"
    val_fraction: float = 0.1
    region: int | None = None
    workers: int = 0
    seed: int = 0
    init: str | None = None
    voxel_size: list[float] | None = None
    schedule: dict[str, Any] | None = None
    time_limit: float | None = None  # seconds; stops early (demo)
    objective: str = "diffusion"  # or "regression" (CARE-style baseline, see train())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


# --------------------------------------------------------------------------------------
# small pieces (pure, reused by tests)
# --------------------------------------------------------------------------------------
def lr_at(step: int, s: TrainSettings) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then constant or cosine."""
    if s.warmup > 0 and step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    if s.lr_schedule == "cosine":
        span = max(s.steps - 1 - s.warmup, 1)
        t = min(max(step - s.warmup, 0) / span, 1.0)
        return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    return s.lr


def _key_seed(seed: int, key: int, salt: int = 0) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_noise(
    keys: Sequence[int], shape: Sequence[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample diffusion noise (B, *shape) and uniforms (B,) in [0, 1), each a function of
    ``(seed, key)`` only (CPU generators, so the same on any device or rank)."""
    noise, uniforms = [], []
    for key in keys:
        g = torch.Generator().manual_seed(_key_seed(seed, int(key)))
        uniforms.append(torch.rand((), generator=g))
        noise.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(noise), torch.stack(uniforms)


def upsample_cond(cond: torch.Tensor, k: int, mode: str = "bicubic") -> torch.Tensor:
    """Condition onto the output grid, as the Enhancer does (``mode``: the model's
    ``cond_upsample``; clamped to [-1, 1])."""
    return upsample_xy(cond, k, mode)


def training_loss(
    net: torch.nn.Module,
    cond: torch.Tensor,
    target: torch.Tensor,
    schedule,
    prediction: str,
    loss: str,
    noise: torch.Tensor,
    uniforms: torch.Tensor,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The diffusion objective with the noise and noise levels given by the caller."""
    from emdiffuse.models import diffusion

    return diffusion.diffusion_loss(
        net, cond, target, schedule, prediction, loss, noise=noise, u=uniforms, index=index
    )


# --------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_kind: str) -> _Dist:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _resolve_device(device: str, d: _Dist) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device cuda asked for but no GPU is available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", d.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------
def _split_data(data) -> list[Any]:
    if isinstance(data, (str, os.PathLike)):
        return [p for p in str(data).split(",") if p]
    return list(data)


def build_dataset(s: TrainSettings, sources: Sequence[Any], **kw) -> Any:
    from emdiffuse.training.loader import PatchDataset

    recipe = s.task
    return PatchDataset(
        recipe,
        sources,
        s.patch,
        factor=s.factor,
        val_fraction=s.val_fraction,
        region=s.region,
        seed=s.seed,
        batch_size=s.batch_size,
        axis=s.axis,
        voxel_size=s.voxel_size,
        **kw,
    )


def build_config(s: TrainSettings, dataset, init_config=None):
    """The ModelConfig of a run: a preset (or the --init model's) plus the data's statistics."""
    from emdiffuse.models.variants import make_config

    variant = TASK_VARIANTS[s.task]
    voxel = dataset.voxel_size
    training_data = ",".join(str(d) for d in s.data)
    if init_config is not None:
        if init_config.variant != variant and not (
            init_config.task == "isotropic" and s.task in ("isotropic", "anisotropic")
        ):
            raise InputError(
                f"--init model is {init_config.describe()} but this run trains {s.task}; "
                "fine-tune from a model of the same task"
            )
        if init_config.scale_factor != dataset.k:
            raise InputError(
                f"--init model has scale factor {init_config.scale_factor} but --factor is "
                f"{dataset.k}; use the same factor"
            )
        return init_config.replace(
            variant=variant,
            normalization=dict(dataset.normalization),
            voxel_size_nm=voxel,
            training_data=training_data,
        )
    kwargs: dict[str, Any] = {}
    if s.schedule is not None:
        kwargs["schedule"] = s.schedule
    return make_config(
        variant,
        s.size,
        scale_factor=dataset.k,
        prediction=s.prediction,
        loss=s.loss,
        normalization=dict(dataset.normalization),
        voxel_size_nm=voxel,
        training_data=training_data,
        **kwargs,
    )


def build_net(config, seed: int) -> torch.nn.Module:
    from emdiffuse.models.unet import UNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(config.unet)


@torch.no_grad()
def ema_update(ema_net: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * net`` for parameters; buffers copied."""
    ema_params = list(ema_net.parameters())
    params = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for eb, b in zip(ema_net.buffers(), net.buffers(), strict=True):
        eb.copy_(b)


def _ema_decay_at(step: int, decay: float) -> float:
    """Warm-up of the EMA (short runs would otherwise keep the random init)."""
    return min(decay, (1.0 + step) / (10.0 + step))


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
def _ckpt_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(_ckpt_dir(out).glob("step_*.pt"))
    return found[-1] if found else None


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(
            f"cannot resume from {path}: {type(error).__name__}; delete it to use the one before"
        ) from None


# --------------------------------------------------------------------------------------
# logging, validation
# --------------------------------------------------------------------------------------
CSV_FIELDS = [
    "step", "loss", "lr", "grad_norm", "val_psnr", "val_ssim", "val_psnr_input",
    "val_ssim_input", "elapsed_s",
]  # fmt: skip


class _Scalars:
    def __init__(self, out: Path, resume_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / "scalars.csv"
        self.tb = None
        if not enabled:
            return
        rows = []
        if resume_step > 0 and self.path.exists():
            with self.path.open() as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        try:  # TensorBoard-format logs only if the package is there
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step or None)
        except Exception:
            self.tb = None

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {k: "" for k in CSV_FIELDS}
        row.update({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()})
        row["step"] = step
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, CSV_FIELDS).writerow(row)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def baseline(cond: np.ndarray, task: str, k: int, out_channels: int) -> np.ndarray:
    """What the input alone gives on the target grid: the noisy image, bicubic upsampling,
    or linear interpolation between the two bounding slices."""
    if task == "denoise":
        return cond
    if task == "super-resolve":
        return upsample_cond(torch.from_numpy(cond), k).numpy()
    w = (np.arange(1, out_channels + 1, dtype=np.float32) / k)[None, :, None, None]
    return (1 - w) * cond[:, :1] + w * cond[:, 1:2]


def validate(
    ema_net: torch.nn.Module,
    config,
    batch: dict[str, torch.Tensor],
    s: TrainSettings,
    device: torch.device,
) -> tuple[dict[str, float], np.ndarray]:
    """Few-step sampling of the fixed validation batch with the EMA weights."""
    from emdiffuse import metrics
    from emdiffuse.models.enhancer import Enhancer

    net = copy.deepcopy(ema_net)
    enhancer = Enhancer(config, net, device=device, precision="auto", channels_last=False)
    cond = batch["cond"].numpy()
    target = batch["target"].numpy()
    noise = np.random.default_rng([s.seed, 0xA11]).standard_normal(target.shape)
    output = enhancer.enhance(cond, noise.astype(np.float32), sampler=s.sampler, steps=s.val_steps)
    base = baseline(cond, config.task, config.k, target.shape[1])
    values = {
        "val_psnr": metrics.psnr(output, target, data_range=2.0),
        "val_ssim": metrics.ssim(output, target, data_range=2.0),
        "val_psnr_input": metrics.psnr(base, target, data_range=2.0),
        "val_ssim_input": metrics.ssim(base, target, data_range=2.0),
    }
    return values, output


def save_validation_png(
    path: Path, cond: np.ndarray, output: np.ndarray, target: np.ndarray, rows: int = 4
) -> None:
    """A grid: one row per sample, columns condition | output | target (first channel)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = min(rows, len(target))
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n + 0.3), squeeze=False)
    for i in range(n):
        for j, (img, title) in enumerate(
            ((cond[i, 0], "condition"), (output[i, 0], "output"), (target[i, 0], "target"))
        ):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------
def _check_out(out: Path, sources: Sequence[Any], init, resume: bool, overwrite: bool) -> None:
    """Refuse an ``out`` that is not free for this run (see ``io.refuse_output``): it may be
    new, an empty folder or, with --resume/--overwrite, a training run emdiffuse wrote; it
    may not hold, equal or lie inside the training data or the --init model."""
    from emdiffuse.io import refuse_output

    if resume and overwrite:
        raise InputError("pass either --resume or --overwrite, not both")
    reads = [("training data", s) for s in sources if isinstance(s, (str, os.PathLike))]
    if init is not None:
        reads.append(("--init model", init))
    refuse_output(out, overwrite=overwrite, resume=resume, reads=reads, kind="train", name="--out")


def _check_patch(s: TrainSettings, config) -> None:
    """The patch side must suit the network (its downsampling) and the scale factor."""
    multiple = math.lcm(config.unet.multiple, config.xy_scale)
    if s.patch % multiple:
        raise InputError(
            f"--patch {s.patch} must be a multiple of {multiple} for this model; "
            f"try --patch {-(-s.patch // multiple) * multiple}"
        )


def train(
    task: str,
    data: str | Sequence[Any],
    out: str | os.PathLike,
    *,
    size: str = "tiny",
    steps: int = 2000,
    batch_size: int = 8,
    patch: int = 64,
    lr: float = 2e-4,
    warmup: int = 100,
    ema_decay: float = 0.999,
    grad_clip: float = 1.0,
    prediction: str = "v",
    sampler: str = "ddim",
    val_every: int = 250,
    ckpt_every: int = 250,
    init: str | os.PathLike | None = None,
    resume: bool = False,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    normalization: dict[str, float] | None = None,
    **options: Any,
) -> Path:
    """Train a model for ``task`` on ``data`` and write ``out/model.safetensors``.

    ``task``: denoise | super-resolve | isotropic | anisotropic. ``data``: sources (paths,
    Volumes or arrays; or one comma-separated string), see :class:`PatchDataset`.
    ``batch_size`` is per process (the global batch is ``batch_size × world size``).
    Other settings are the fields of :class:`TrainSettings` (``factor``, ``val_steps``,
    ``val_batch``, ``lr_schedule``, ``workers``, ``time_limit``, …). Returns the path of
    the final checkpoint (EMA weights).

    ``objective="regression"`` trains the same network as a plain regression model (the
    CARE-style baseline): every sample sits at the noisiest level of the schedule, where the
    noisy-target channel holds no information about the target, and the network predicts
    the clean target directly (``prediction="x0"``, ``loss="l1"``, both forced). The
    checkpoint is an ordinary one; run it with ``steps=1`` (one network evaluation: the
    first step of every sampler returns the network's prediction).
    """
    if task not in TASK_VARIANTS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASK_VARIANTS)}")
    sources = _split_data(data)
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"train() got unknown option(s) {', '.join(unknown)}")
    s = TrainSettings(
        task=task,
        data=[str(x) if isinstance(x, (str, os.PathLike)) else type(x).__name__ for x in sources],
        size=size,
        steps=int(steps),
        batch_size=int(batch_size),
        patch=int(patch),
        lr=float(lr),
        warmup=int(warmup),
        ema_decay=float(ema_decay),
        grad_clip=float(grad_clip),
        prediction=prediction,
        sampler=sampler,
        val_every=int(val_every),
        ckpt_every=int(ckpt_every),
        seed=int(seed),
        init=None if init is None else str(init),
        **options,
    )
    for name in ("steps", "batch_size", "val_every", "ckpt_every"):
        if getattr(s, name) < 1:
            raise InputError(f"{name} must be a positive integer, got {getattr(s, name)}")
    if s.lr <= 0 or not math.isfinite(s.lr):
        raise InputError(f"lr must be positive, got {s.lr}")
    if s.lr_schedule not in ("constant", "cosine"):
        raise InputError(f"lr_schedule must be constant or cosine, got {s.lr_schedule!r}")
    if s.objective not in OBJECTIVES:
        raise InputError(f"objective must be {' or '.join(OBJECTIVES)}, got {s.objective!r}")
    if s.objective == "regression":
        s.prediction, s.loss, s.val_steps = "x0", "l1", 1
    out = Path(out)
    _check_out(out, sources, init, resume, overwrite)

    d = _setup_distributed("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        return _train(s, sources, out, resume, device, d, progress, normalization, overwrite)
    finally:
        if d.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(
    s: TrainSettings,
    sources: list[Any],
    out: Path,
    resume: bool,
    device_name: str,
    d: _Dist,
    progress: bool,
    normalization: dict[str, float] | None,
    overwrite: bool = False,
) -> Path:
    from emdiffuse.io import make_output_folder
    from emdiffuse.models import diffusion

    dev = _resolve_device(device_name, d)
    # ---- state to resume from (read before anything is written) ----
    state = None
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            state = _load_state(ckpt)
            saved = json.loads(state["settings"])
            saved.setdefault("objective", "diffusion")  # checkpoints from before the option
            for name in ("task", "batch_size", "patch", "seed", "prediction", "size", "objective"):
                if saved.get(name) != getattr(s, name):
                    raise InputError(
                        f"--resume: {name} was {saved.get(name)!r} in {ckpt.name} but is "
                        f"{getattr(s, name)!r} now; use the same settings to resume"
                    )
            if normalization is None:
                normalization = dict(state["normalization"])
    init_config, init_state = None, None
    if s.init is not None and state is None:
        from emdiffuse.models.checkpoints import load_checkpoint

        init_config, init_state = load_checkpoint(s.init)
        if s.objective == "regression" and init_config.prediction != "x0":
            raise InputError(
                f"--init model predicts {init_config.prediction!r}; a regression run "
                "fine-tunes only a regression (x0) model"
            )

    start = 0 if state is None else int(state["step"])
    dataset = build_dataset(s, sources, normalization=normalization, start_step=start)
    dataset.rank, dataset.world_size = d.rank, d.world
    config = build_config(s, dataset, init_config)
    _check_patch(s, config)
    if init_config is not None:  # fine-tuning keeps the model's prediction target
        s.prediction = config.prediction
    schedule = diffusion.Schedule.from_dict(dict(config.schedule))

    net = build_net(config, s.seed)
    if init_state is not None:
        net.load_state_dict(init_state, strict=True)
    ema_net = copy.deepcopy(net)
    for p in ema_net.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.999)
    )
    if state is not None:
        net.load_state_dict(state["model"])
        ema_net.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if dev.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], dev)
    net.to(dev)
    ema_net.to(dev)
    _move_optimizer(optimizer, dev)
    model = net
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)

    val_batch = None
    if d.main and dataset.regions["val"]:
        val_batch = dataset.batch(range(s.val_batch), split="val")
    if d.main:  # the first write: everything above is checked
        make_output_folder(out, "train", replace=overwrite and not resume)
        (out / "settings.json").write_text(s.to_json() + "\n")
    scalars = _Scalars(out, start, d.main)
    amp = dev.type == "cuda" and torch.cuda.is_bf16_supported()

    from emdiffuse.training.loader import make_loader

    loader = iter(make_loader(dataset, workers=s.workers))
    bar = None
    if d.main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.steps, initial=start, desc=f"train {s.task}", unit="step")
    t0 = time.perf_counter() - (0.0 if state is None else float(state.get("elapsed", 0.0)))
    step = start
    losses: list[float] = []
    try:
        while step < s.steps:
            if s.time_limit is not None and time.perf_counter() - t0 > s.time_limit:
                break
            batch = next(loader)
            lr = lr_at(step, s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = _step(model, net, optimizer, batch, schedule, config, s, dev, amp)
            ema_update(ema_net, net, _ema_decay_at(step, s.ema_decay))
            step += 1
            losses.append(loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
            row: dict[str, Any] = {}
            if d.main and (step % 10 == 0 or step == s.steps):
                row.update(loss=float(np.mean(losses)), lr=lr, grad_norm=grad_norm)
                losses = []
            if d.main and val_batch is not None and (step % s.val_every == 0 or step == s.steps):
                values, output = validate(ema_net, config, val_batch, s, dev)
                row.update(values)
                save_validation_png(
                    out / "validation" / f"step_{step:08d}.png",
                    val_batch["cond"].numpy() if config.xy_scale == 1 else
                    upsample_cond(val_batch["cond"], config.xy_scale, config.cond_upsample).numpy(),
                    output,
                    val_batch["target"].numpy(),
                )  # fmt: skip
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", psnr=f"{values['val_psnr']:.2f}")
            if row:
                row["elapsed_s"] = time.perf_counter() - t0
                scalars.write(step, row)
            if step % s.ckpt_every == 0 and step < s.steps:
                if d.main:
                    _save_state(
                        _ckpt_dir(out) / f"step_{step:08d}.pt",
                        _state(step, net, ema_net, optimizer, config, s, dataset, dev, t0),
                    )
                _barrier(d)
    finally:
        if bar is not None:
            bar.close()
        scalars.close()
    final = out / FINAL_NAME
    if d.main:
        from emdiffuse.models.checkpoints import save_checkpoint

        _save_state(
            _ckpt_dir(out) / f"step_{step:08d}.pt",
            _state(step, net, ema_net, optimizer, config, s, dataset, dev, t0),
        )
        ema_cpu = {k: v.detach().to("cpu") for k, v in ema_net.state_dict().items()}
        save_checkpoint(final, ema_cpu, config)
    _barrier(d)
    return final


def _move_optimizer(optimizer: torch.optim.Optimizer, dev: torch.device) -> None:
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                st[k] = v.to(dev)


def _state(step, net, ema_net, optimizer, config, s, dataset, dev, t0) -> dict[str, Any]:
    return {
        "step": int(step),
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "ema": {k: v.detach().cpu() for k, v in ema_net.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
        "config": config.to_json(indent=None),
        "settings": json.dumps(dataclasses.asdict(s)),
        "normalization": dict(dataset.normalization),
        "data": {"seed": s.seed, "next_step": int(step), "batch_size": s.batch_size},
        "elapsed": float(time.perf_counter() - t0),
    }


def _step(model, net, optimizer, batch, schedule, config, s, dev, amp) -> tuple[float, float]:
    cond = batch["cond"].to(dev, non_blocking=True)
    target = batch["target"].to(dev, non_blocking=True)
    cond = upsample_cond(cond, config.xy_scale, config.cond_upsample)
    noise, uniforms = keyed_noise(batch["key"].tolist(), target.shape[1:], s.seed)
    if s.objective == "regression":  # always the noisiest level: the sampler's first step
        uniforms = torch.ones_like(uniforms)
    index = batch.get("index")
    if index is not None:
        index = index.to(dev)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
        loss = training_loss(
            model, cond, target, schedule, config.prediction, config.loss,
            noise.to(dev), uniforms.to(dev), index,
        )  # fmt: skip
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), s.grad_clip)
    optimizer.step()
    return float(loss.detach()), float(grad_norm)


__all__ = [
    "train",
    "TrainSettings",
    "lr_at",
    "keyed_noise",
    "training_loss",
    "validate",
    "latest_checkpoint",
    "TASK_VARIANTS",
]


# --------------------------------------------------------------------------------------
# the demo model
# --------------------------------------------------------------------------------------
# Settings that learn the synthetic denoising task on 2 CPU cores in about 5 minutes: the
# tiny preset, v-prediction (good at few sampler steps), a high learning rate with cosine
# decay, small 48² patches in batches of 8, and a fast EMA.
DEMO_SETTINGS: dict[str, Any] = {
    "size": "tiny",
    "batch_size": 8,
    "patch": 48,
    "lr": 2e-3,
    "warmup": 50,
    "lr_schedule": "cosine",
    "min_lr_ratio": 0.05,
    "ema_decay": 0.995,
    "grad_clip": 1.0,
    "prediction": "v",
    "sampler": "ddim",
    "val_steps": 4,
    "val_every": 500,
    "val_batch": 4,
    "ckpt_every": 500,
    "region": 96,
    "val_fraction": 0.1,
}
DEMO_NOISE = {"dose": 2.0, "read_noise": 0.05}
DEMO_STEPS_PER_MINUTE = 300  # cosine horizon; training also stops at the time limit


def demo_pair(
    shape: tuple[int, int, int] = (8, 256, 256),
    *,
    origin: tuple[int, int, int] = (0, 0, 0),
    seed: int = 0,
    noise_seed: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic (noisy, clean) pair of EM-like data, float32 raw units."""
    from emdiffuse.training.degrade import add_poisson_gaussian_noise
    from emdiffuse.training.synthetic import synthetic_block

    clean = np.asarray(synthetic_block(origin, shape, seed=seed), dtype=np.float32)
    noisy = add_poisson_gaussian_noise(clean, seed=noise_seed, **DEMO_NOISE)
    return np.asarray(noisy, dtype=np.float32), clean


def evaluate_denoiser(
    checkpoint: str | os.PathLike,
    noisy: np.ndarray,
    clean: np.ndarray,
    *,
    sampler: str = "ddim",
    steps: int = 4,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """PSNR/SSIM of the noisy input and of the enhanced output against ``clean`` (raw units,
    data range of ``clean``), slice by slice with whole-slice tiles."""
    from emdiffuse import metrics
    from emdiffuse.models.enhancer import Enhancer, denormalize, normalize

    enhancer = Enhancer.load(checkpoint, device=device, expect_task="denoise")
    m = enhancer.multiple
    z, h, w = noisy.shape
    h, w = h - h % m, w - w % m
    noisy, clean = noisy[:, :h, :w], clean[:, :h, :w]
    cond = normalize(noisy, enhancer.config)[:, None]
    noise = np.random.default_rng(seed).standard_normal(cond.shape).astype(np.float32)
    out = np.concatenate(
        [
            enhancer.enhance(cond[i : i + 2], noise[i : i + 2], sampler=sampler, steps=steps)
            for i in range(0, z, 2)
        ]
    )[:, 0]
    enhanced = denormalize(out, enhancer.config)
    rng_ = float(clean.max() - clean.min())
    return {
        "psnr_noisy": metrics.psnr(noisy, clean, data_range=rng_),
        "psnr_enhanced": metrics.psnr(enhanced, clean, data_range=rng_),
        "ssim_noisy": metrics.ssim(noisy, clean, data_range=rng_),
        "ssim_enhanced": metrics.ssim(enhanced, clean, data_range=rng_),
    }


def train_demo_denoiser(
    out: str | os.PathLike,
    *,
    minutes: float = 5.0,
    seed: int = 0,
    shape: tuple[int, int, int] = (8, 256, 256),
    evaluate: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    **overrides: Any,
) -> tuple[Path, dict[str, float]]:
    """Train the demo denoiser on synthetic data for about ``minutes`` (CPU) and measure it
    on held-out synthetic data (another region of the generator, other noise).

    Returns ``(checkpoint, report)``; ``report`` has ``psnr_noisy``, ``psnr_enhanced``,
    ``gain_db``, ``steps`` and ``seconds``.
    """
    noisy, clean = demo_pair(shape, seed=seed, noise_seed=seed + 1)
    settings = {**DEMO_SETTINGS, **overrides}
    steps = int(settings.pop("steps", max(50, round(DEMO_STEPS_PER_MINUTE * minutes))))
    t0 = time.perf_counter()
    path = train(
        "denoise",
        [noisy, clean],
        out,
        steps=steps,
        seed=seed,
        time_limit=minutes * 60.0,
        progress=progress,
        overwrite=overwrite,
        voxel_size=[8.0, 8.0, 8.0],
        **settings,
    )
    report: dict[str, float] = {"seconds": time.perf_counter() - t0}
    state = torch.load(latest_checkpoint(Path(out)), map_location="cpu", weights_only=True)
    report["steps"] = int(state["step"])
    if evaluate:
        held_noisy, held_clean = demo_pair(
            (4, 128, 128), origin=(10_000, 5_000, 5_000), seed=seed, noise_seed=seed + 101
        )
        report.update(
            evaluate_denoiser(path, held_noisy, held_clean, steps=settings.get("val_steps", 4))
        )
        report["gain_db"] = report["psnr_enhanced"] - report["psnr_noisy"]
    return path, report
