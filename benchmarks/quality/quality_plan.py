"""Which learned methods train at which wall-clock budget: the run's plan.

A plan is a list of ``METHOD@SECONDS`` entries. Every learned method trains for the same wall
time on the same cores: the project's models through ``trainer.train(time_limit=…)``
(``steps``, the cosine horizon, from a measured rate), CAREamics with its epochs sized
from a measured rate and stopped at the same wall time. Methods:

=========== =================================================================================
residual    emdiffuse mean-plus-residual model (``objective="residual"``), the task's variant
sr3         emdiffuse SR3-style conditional diffusion (``objective="diffusion"``, the
            reference's way)
regression  the same UNet as a plain L1 regression (``objective="regression"``)
residual-a  vemdiffuse-a, residual kind (isotropic levels only: trained on the z-subsampled
sr3-a       volume alone); sr3-a the same with the SR3 kind
residual-z1 emdiffuse-n, residual kind, reading 3 noisy slices z - 1, z, z + 1 (``z_context=1``;
residual-z2 denoise only); residual-z2 reads 5 slices, z - 2 … z + 2 (``z_context=2``)
care        CAREamics CARE (every task)
care-z1     CAREamics CARE with 3 input channels, the noisy slices z - 1, z, z + 1 (mirrored at
care-z2     the volume's ends), and the clean slice z as target (denoise only); care-z2 the same
            with 5 slices
n2v         CAREamics Noise2Void (denoise only)
=========== =================================================================================

Entries that do not apply to a level (``n2v`` and the ``-z1``/``-z2`` methods outside denoising,
``-a`` outside isotropic) are skipped there; a kind the installed library does not offer yet
(``residual`` before its objective lands) is skipped with the reason recorded in the results.
"""

from __future__ import annotations

from dataclasses import dataclass

SHORT, LONG = 150.0, 1200.0  # ~2.5 min and ~20 min on 2 CPU cores
QUICK_SCALE = 0.01  # --quick: budgets x 0.01 (1.5 s and 12 s): a smoke run, not a result

PROJECT = ("residual", "sr3", "regression", "residual-a", "sr3-a", "residual-z1", "residual-z2")
PEERS = ("care", "n2v", "care-z1", "care-z2")
METHODS = PROJECT + PEERS
OBJECTIVE = {"residual": "residual", "sr3": "diffusion", "regression": "regression"}


@dataclass(frozen=True)
class Entry:
    method: str
    budget: float  # seconds of training (the nominal budget, before --quick scaling)

    @property
    def token(self) -> str:
        return f"{self.method}@{self.budget:g}"

    @property
    def kind(self) -> str:
        """The trainer objective's short name: residual | sr3 | regression (peers: the
        algorithm, care | n2v)."""
        return self.method.partition("-")[0]

    @property
    def family(self) -> str:
        """The kind and what it reads: ``residual``, ``residual-z1``, ``care-z1``."""
        return self.method.removesuffix("-a")

    @property
    def aniso(self) -> bool:
        return self.method.endswith("-a")

    @property
    def z_context(self) -> int:
        """Noisy slices read on each side of the denoised one (``-z1``: 1, ``-z2``: 2)."""
        _, sep, context = self.method.rpartition("-z")
        return int(context) if sep else 0

    @property
    def reads(self) -> str:
        """What a row name adds for a method reading z (``", 3 slices"``), else ``""``."""
        return f", {1 + 2 * self.z_context} slices" if self.z_context else ""


def default_plan(residual_available: bool) -> list[Entry]:
    """At ~2.5 min every learned method; at ~20 min the residual kind, CARE and the L1
    regression UNet only (2 CPU cores cannot afford more). vemdiffuse-a uses the residual
    kind when the library offers it, the SR3 kind otherwise."""
    a = "residual-a" if residual_available else "sr3-a"
    short = ["residual", "sr3", "regression", a, "care", "n2v"]
    long = ["residual", "regression", "care"]
    return [Entry(m, SHORT) for m in short] + [Entry(m, LONG) for m in long]


def parse_plan(tokens: list[str]) -> list[Entry]:
    """``["residual@150", "care@1200", …]`` -> entries (``short``/``long`` name the two
    standard budgets)."""
    entries = []
    for token in tokens:
        method, sep, budget = token.partition("@")
        if not sep or method not in METHODS:
            raise SystemExit(f"--plan: {token!r} is not METHOD@SECONDS with METHOD one of "
                             f"{', '.join(METHODS)}")  # fmt: skip
        value = {"short": SHORT, "long": LONG}.get(budget)
        try:
            value = float(budget) if value is None else value
        except ValueError:
            raise SystemExit(f"--plan: budget of {token!r} is not seconds") from None
        if value <= 0:
            raise SystemExit(f"--plan: budget of {token!r} must be positive")
        entries.append(Entry(method, value))
    return list(dict.fromkeys(entries))


def applies(entry: Entry, task: str) -> bool:
    """Whether ``entry`` has a row on a level of ``task``."""
    if entry.aniso:
        return task == "isotropic"
    if entry.method == "n2v" or entry.z_context:
        return task == "denoise"
    return True


def budget_label(seconds: float) -> str:
    """'2.5 min', '20 min', or seconds for short (quick) budgets."""
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
