"""Fixtures of the pipeline tests: ``residual_model``, a tiny mean-plus-residual denoiser
(intensities 0..1, no calibration record) whose output depends on its input."""

from __future__ import annotations

import pytest
from perturbed import perturbed_checkpoint

from emdiffuse.models.presets import make_config


@pytest.fixture(scope="session")
def residual_model(tmp_path_factory) -> str:
    config = make_config("emdiffuse-n", "tiny", normalization={"low": 0.0, "high": 1.0},
                         kind="residual")  # fmt: skip
    return perturbed_checkpoint(config, tmp_path_factory.mktemp("models") / "residual.safetensors")
