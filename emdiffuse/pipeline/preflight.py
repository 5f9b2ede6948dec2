"""Checks an enhancement run passes before it writes anything: the device (here and on a
cluster's workers) and the memory of a tile batch. (The settings themselves are checked when
:class:`~emdiffuse.pipeline.settings.RunSettings` is built; the input's intensity range in
:mod:`~emdiffuse.pipeline.intensity`; the scheduler's reachability in
:mod:`~emdiffuse.pipeline.cluster`.)

Each check raises :class:`~emdiffuse.errors.InputError` with a one-line reason.
"""

from __future__ import annotations

import psutil
import torch

from emdiffuse.errors import InputError
from emdiffuse.models.device import resolve_device

BYTES_PER_VALUE = 4  # float32 activations (autocast halves some of them: a safe estimate)


def device_problem(device: str) -> str | None:
    """Why ``device`` (auto, cpu, cuda, cuda:N) cannot run here, or None when it can."""
    if str(device) in ("auto", "cpu"):
        return None
    try:
        resolve_device(str(device))
    except InputError as error:
        return str(error)
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


def _free_memory(device: torch.device) -> tuple[int, str]:
    """Bytes free for this process's tiles on ``device``, and where that is."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device.index)[0]), f"on {device}"
    return int(psutil.virtual_memory().available), "in this machine's memory"


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_tile_memory(unet, tile: int, batch: int, device: str) -> None:
    """Refuse tiles whose batch cannot fit in the free memory of ``device`` (this process)."""
    resolved = resolve_device(str(device))
    on_gpu = resolved.type == "cuda"
    need = tile_batch_bytes(unet, tile, batch, attention_matrices=not on_gpu)
    free, where = _free_memory(resolved)
    if need > free:
        raise InputError(
            f"a batch of {batch} tile(s) of {tile}x{tile} needs about {_gib(need)} of memory but "
            f"only {_gib(free)} is free {where}; pass a smaller --tile or --batch-size"
        )
