"""How a model's input slices are laid out along z: the z context.

A denoising model (emdiffuse-n) with a z context ``c`` reads the noisy slice and ``c`` noisy
slices on each side, input slices ``z - c .. z + c`` in z order (``1 + 2c`` channels, the
slice to denoise being channel ``c``): in volume EM the neighbouring slices image the same
structures with independent noise, so they carry real signal a one-slice model cannot see
(on FlyEM 3 slices gave +1.65 dB at 8 e⁻/px and +1.90 dB at 2 e⁻/px over one:
``benchmarks/results/quality/z_context_denoise``). Super-resolution reads one slice.

An isotropic model fills the ``k - 1`` slices between two input slices ``i`` and ``i + 1``.
With a z context ``c`` it also reads ``c`` input slices beyond each of them: its condition
is input slices ``i - c .. i + 1 + c`` in z order (``2 + 2c`` channels), the bounding pair
being channels ``c`` and ``c + 1``. On a grid ``k`` times finer in z (training on an
isotropic volume), those are the slices ``0, k, …, (2c + 1) k`` of a footprint of
``(2c + 1) k + 1`` slices, and the target the ``k - 1`` slices between the pair.

Torch-free, so the settings and the command line can read it without importing torch.
"""

from __future__ import annotations

from emdiffuse.errors import InputError

# input slices a model may read beyond its own (denoise) or the bounding pair (isotropic) on
# each side
MAX_Z_CONTEXT = 3
# the tasks whose models may read a z context
CONTEXT_TASKS = ("denoise", "isotropic", "anisotropic")
# a new isotropic model's (emdiffuse train): see docs/tasks.md for the measurement
DEFAULT_Z_CONTEXT = 0


def check_z_context(value: object, *, task: str, what: str, prefix: str = "") -> int:
    """``value`` as a z context: an integer in ``0..MAX_Z_CONTEXT``, and 0 unless ``task``
    (a task or training recipe) is one of :data:`CONTEXT_TASKS`. ``what`` names the model or
    recipe and ``prefix`` starts the message (e.g. ``"model config: "``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_Z_CONTEXT:
        raise InputError(
            f"{prefix}z_context must be an integer in 0..{MAX_Z_CONTEXT}, got {value!r}"
        )
    if value and task not in CONTEXT_TASKS:
        raise InputError(
            f"{prefix}z_context {value} is for denoising and isotropic reconstruction "
            f"(neighbouring slices); {what} reads one slice: leave it at 0"
        )
    return value


def condition_slices(z_context: int, *, isotropic: bool = True) -> int:
    """Channels of a model's condition: ``2 + 2c`` for isotropic models (the bounding pair
    and its context), ``1 + 2c`` for the 2D variants (the slice and its context)."""
    return (2 if isotropic else 1) + 2 * int(z_context)


def footprint_span(k: int, z_context: int) -> int:
    """Slices (on the fine grid) one training sample spans: ``(2c + 1) k + 1``."""
    return (2 * int(z_context) + 1) * int(k) + 1


def context_layout(k: int, z_context: int) -> tuple[list[int], slice]:
    """The condition's slice indices within a footprint (``0, k, …, (2c + 1) k``) and the
    target's slice range (the ``k - 1`` between the bounding pair)."""
    c = int(z_context)
    return [i * k for i in range(2 * c + 2)], slice(c * k + 1, c * k + k)


__all__ = [
    "MAX_Z_CONTEXT",
    "CONTEXT_TASKS",
    "DEFAULT_Z_CONTEXT",
    "check_z_context",
    "condition_slices",
    "footprint_span",
    "context_layout",
]
