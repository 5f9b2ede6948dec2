"""The one precision resolver (models/device.py): names to autocast dtypes, for inference
and training, and what ``auto`` picks on this machine's CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emdiffuse.errors import InputError
from emdiffuse.models.device import autocast_dtype, cpu_bf16_hardware, cpu_has_native_bf16
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.networks import build_network
from emdiffuse.models.precision_names import PRECISIONS, TRAIN_PRECISIONS
from emdiffuse.models.presets import make_config

CPU = torch.device("cpu")


def test_names_map_to_autocast_dtypes():
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp16", CPU) is torch.float16
    # auto on a CPU: bf16 only where the hardware multiplies bf16 natively (AMX, AVX512-BF16)
    assert autocast_dtype("auto", CPU) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert set(TRAIN_PRECISIONS) < set(PRECISIONS)


def test_auto_is_bf16_on_cpus_with_amx_or_avx512_bf16(monkeypatch):
    """Both kinds of bf16 hardware count (AVX512-BF16: AMD Zen 4, 1.4x per training step),
    AMX first; a CPU with neither, or torch without oneDNN, stays fp32."""
    real = {probe: bool(getattr(torch.cpu, probe)()) for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")}
    if real["_is_amx_tile_supported"] or real["_is_avx512_bf16_supported"]:
        assert cpu_has_native_bf16() is torch.backends.mkldnn.is_available()
    for amx, avx, expected in ((True, True, "AMX"), (False, True, "AVX512-BF16"), (False, False, None)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx=avx: avx)
        assert cpu_bf16_hardware() == expected
        assert autocast_dtype("auto", CPU) is (torch.bfloat16 if expected else None)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_bf16_hardware() is None and autocast_dtype("auto", CPU) is None


def test_unknown_and_training_refused_names_raise_one_line_errors():
    with pytest.raises(InputError, match="unknown precision 'fp8'; choose one of auto, fp32"):
        autocast_dtype("fp8", CPU)
    with pytest.raises(InputError, match="unknown precision 'fp16'; choose one of auto, fp32, bf16$"):
        autocast_dtype("fp16", CPU, choices=TRAIN_PRECISIONS)


def test_enhancer_samples_under_the_resolved_autocast():
    """The Enhancer's network runs in the resolved dtype, and bf16 changes a sample only by
    rounding (same weights, same noise): different, but close on average."""
    config = make_config("emdiffuse-n", size="tiny", kind="residual")
    net = build_network(config)
    torch.manual_seed(0)
    with torch.no_grad():  # weights away from the zero-initialised output layers
        for parameter in net.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    cond = np.random.default_rng(0).uniform(-1, 1, (1, 1, 32, 32)).astype(np.float32)
    noise = np.random.default_rng(1).standard_normal((1, 1, 32, 32)).astype(np.float32)
    outputs, seen = {}, []

    def record(module, args, output):
        if isinstance(module, torch.nn.Conv2d):
            seen.append(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        for precision in ("fp32", "bf16"):
            seen.clear()
            enhancer = Enhancer(config, net, precision=precision)
            outputs[precision] = enhancer.enhance(cond, noise, steps=2)
            assert set(seen) == {torch.float32 if precision == "fp32" else torch.bfloat16}
    finally:
        handle.remove()
    difference = np.abs(outputs["bf16"] - outputs["fp32"])
    assert outputs["bf16"].dtype == np.float32
    assert difference.max() > 0 and difference.mean() < 0.02
