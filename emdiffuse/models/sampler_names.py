"""The samplers' names, defaults and network-evaluation counts, without importing torch.

The one list the pipeline, its plan and the CLI take their choices from (importing
:mod:`emdiffuse.models.samplers` would pull in torch, which the CLI and the plan do not need).
:mod:`emdiffuse.models.samplers` implements exactly these names; a test keeps them equal.
"""

from __future__ import annotations

from emdiffuse.errors import InputError

# the default first, then the reference's ancestral sampler, then the others
SAMPLER_NAMES: tuple[str, ...] = ("dpmpp_2m", "ddpm", "ddim", "dpmpp_2m_sde", "dpmpp_3m_sde")
STOCHASTIC: frozenset[str] = frozenset({"ddpm", "dpmpp_2m_sde", "dpmpp_3m_sde"})  # ddim if eta > 0
DEFAULT_SAMPLER = "dpmpp_2m"
DEFAULT_STEPS = 8
# network evaluations per step: every sampler here is single-step or multistep (one call a step)
_EVALS_PER_STEP = dict.fromkeys(SAMPLER_NAMES, 1)


def check_sampler(sampler: str) -> str:
    """``sampler`` if it is known, else :class:`~emdiffuse.errors.InputError`."""
    if sampler not in SAMPLER_NAMES:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    return sampler


def network_evaluations(sampler: str, steps: int) -> int:
    """Network evaluations (NFE) one sample of one tile costs: ``steps`` of ``sampler``."""
    return _EVALS_PER_STEP[check_sampler(sampler)] * int(steps)


__all__ = [
    "SAMPLER_NAMES", "STOCHASTIC", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "check_sampler",
    "network_evaluations",
]  # fmt: skip
