"""Checks an enhancement run passes before it writes anything: seed, device, the memory of a
tile batch, the scheduler's reachability, and (a warning only) the input's intensity range
against the model's training range.

Each check raises :class:`~emdiffuse.errors.InputError` with a one-line reason, except the
range check, which logs one warning on the ``emdiffuse`` logger (the CLI prints it).
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np

from emdiffuse.errors import InputError

SEED_MAX = 2**63 - 1  # the noise key packs the seed as a signed 64-bit integer (pipeline.noise)
CONNECT_TIMEOUT = 5.0  # seconds to reach a Dask scheduler (distributed's own default is 30)
BYTES_PER_VALUE = 4  # float32 activations (autocast halves some of them: a safe estimate)
log = logging.getLogger("emdiffuse")


def check_seed(seed) -> int:
    """``seed`` as an int when the noise generator takes it (0 … 2**63 - 1)."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not 0 <= seed <= SEED_MAX
    ):
        raise InputError(f"seed must be an integer from 0 to {SEED_MAX}, got {seed!r}")
    return int(seed)


def device_problem(device: str) -> str | None:
    """Why ``device`` (auto, cpu, cuda, cuda:N) cannot run here, or None when it can."""
    device = str(device)
    if device in ("auto", "cpu"):
        return None
    if not re.fullmatch(r"cuda(:\d+)?", device):
        return f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N"
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return (
            f"--device {device} asked for, but no CUDA GPU is available; use --device cpu or auto"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        return (
            f"--device {device} asked for, but there are {count} GPU(s): cuda:0..cuda:{count - 1}"
        )
    return None


def check_device(device: str) -> None:
    """Refuse a device this process cannot use."""
    problem = device_problem(device)
    if problem:
        raise InputError(problem)


def check_worker_devices(client, device: str) -> None:
    """Refuse a device that a worker of ``client``'s cluster cannot use."""
    if str(device) in ("auto", "cpu"):
        return
    problems = {w: p for w, p in client.run(device_problem, str(device)).items() if p}
    if problems:
        worker, problem = next(iter(problems.items()))
        raise InputError(f"worker {worker}: {problem}")


def _heads(unet, width: int) -> int:
    if unet.num_head_channels == -1:
        return unet.num_heads
    return max(1, width // unet.num_head_channels)


def tile_batch_bytes(unet, tile: int, batch: int, *, attention_matrices: bool) -> int:
    """Estimated peak memory of one network call on ``batch`` tiles of ``tile``² (output
    grid): the encoder's skip tensors, the decoder's working tensors at full resolution and,
    when attention builds its full score matrix (the CPU kernel), two ``tokens²`` matrices
    per head at the largest attention level. Within ~20 % of measured peaks on CPU."""
    c, mults, blocks = unet.base_channels, unet.channel_mults, unet.num_res_blocks

    def area(level: int) -> int:
        return (tile // 2**level) ** 2

    skips = sum((blocks + 1) * c * m * area(level) for level, m in enumerate(mults))
    work = 6 * 2 * c * mults[0] * area(0)
    attention = 0
    if attention_matrices:
        levels = {len(mults) - 1} | {
            level for level in range(len(mults)) if 2**level in unet.attention_resolutions
        }
        attention = max(2 * _heads(unet, c * mults[lv]) * area(lv) ** 2 for lv in levels)
    return BYTES_PER_VALUE * batch * (skips + work + attention)


def _free_memory(device: str) -> tuple[int, str]:
    """Bytes free for this process's tiles on ``device``, and where that is."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        return int(torch.cuda.mem_get_info(index)[0]), f"on {device}"
    import psutil

    return int(psutil.virtual_memory().available), "in this machine's memory"


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_tile_memory(unet, tile: int, batch: int, device: str) -> None:
    """Refuse tiles whose batch cannot fit in the free memory of ``device`` (this process)."""
    import torch

    on_gpu = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    need = tile_batch_bytes(unet, tile, batch, attention_matrices=not on_gpu)
    free, where = _free_memory(str(device))
    if need > free:
        raise InputError(
            f"a batch of {batch} tile(s) of {tile}x{tile} needs about {_gib(need)} of memory but "
            f"only {_gib(free)} is free {where}; pass a smaller --tile or --batch-size"
        )


def far_from_training_range(low: float, high: float, sample_low: float, sample_high: float) -> bool:
    """True when the input's sampled range ``sample_low..sample_high`` mostly lies outside
    the model's ``low..high`` or spans under 5 % of it (the output is then meaningless)."""
    x0, x1 = ((v - low) / (high - low) * 2 - 1 for v in (sample_low, sample_high))
    inside = max(0.0, min(x1, 1.0) - max(x0, -1.0))
    return x1 - x0 < 0.1 or inside < 0.5 * (x1 - x0)


def warn_if_far_from_training_range(data, model_norm, *, seed: int = 0) -> bool:
    """Sample ``data``'s percentiles (as ``normalize="auto"`` would) and log one warning when
    they are far from the model's training range ``model_norm``. Returns whether it warned."""
    from emdiffuse.models.normalization import PERCENTILES, sample_percentiles

    try:
        sample = sample_percentiles(data, seed=seed)
    except InputError:  # no contrast in the sample: nothing to compare
        return False
    low, high = model_norm.low, model_norm.high
    if not far_from_training_range(low, high, sample.low, sample.high):
        return False
    log.warning(
        "the input's intensities (%.4g..%.4g, the %g-%gth percentiles of a sample) lie far "
        "outside the model's training range (%.4g..%.4g), so the output would be meaningless; "
        "pass --normalize auto to map the input's own range (or convert the input to the "
        "model's range)",
        sample.low, sample.high, *PERCENTILES, low, high,
    )  # fmt: skip
    return True


def connect(address: str, timeout: float = CONNECT_TIMEOUT):
    """A ``distributed.Client`` on the scheduler at ``address``, or InputError when it cannot
    be reached within ``timeout`` seconds."""
    from distributed import Client

    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not (math.isfinite(timeout) and timeout > 0)
    ):
        raise InputError(f"connect timeout must be a positive number of seconds, got {timeout!r}")
    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise InputError(
            f"could not reach the Dask scheduler at {address} within {timeout:g} s ({error}); "
            "check the address and that the scheduler is running (--connect-timeout waits longer)"
        ) from None
