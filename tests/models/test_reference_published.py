"""The four published reference configurations (EMDiffuse-n, -r, vEMDiffuse-i, -a) import.

Their network and schedule numbers are test data (``tests/data/reference/published_configs.json``,
read from the reference's ``config/*.json``). For each: a config in the reference's layout,
random weights at full size in the reference's save format (``denoise_fn.`` prefix, the
training schedule's buffers, the vEMDiffuse conditioning in its order), the import, the
shapes, the schedules, and one forward pass equal to the network the weights came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emdiffuse.models.diffusion import Schedule
from emdiffuse.models.reference import load_reference_checkpoint
from emdiffuse.models.reference_config import config_from_reference
from emdiffuse.models.unet import UNet

DATA = Path(__file__).resolve().parents[1] / "data" / "reference"
PUBLISHED = json.loads((DATA / "published_configs.json").read_text())["configs"]
VARIANT = {"EMDiffuse-n": ("emdiffuse-n", 1), "EMDiffuse-r": ("emdiffuse-r", 2),
           "vEMDiffuse-i": ("vemdiffuse-i", 6), "vEMDiffuse-a": ("vemdiffuse-a", 10)}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference_config(numbers: dict) -> dict:
    """A config in the reference's layout holding the published numbers."""
    dataset = "vEMDiffuseTrainingDatasetVolume" if "vEM" in numbers["name"] else "EMDiffusenDataset"
    return {
        "name": numbers["name"],
        "task": numbers["task"],
        "datasets": {"train": {"which_dataset": {"name": ["data.dataset", dataset],
                                                 "args": dict(numbers["dataset"])}}},
        "model": {
            "which_networks": [{"name": numbers["network"], "args": {
                "norm": numbers["norm"], "unet": numbers["unet"],
                "beta_schedule": numbers["beta_schedule"]}}],
            "which_losses": numbers["losses"],
        },
    }  # fmt: skip


def _schedule_buffers(spec: dict) -> dict[str, torch.Tensor]:
    """The buffers the reference's ``set_new_noise_schedule`` registers (float32)."""
    betas = np.linspace(spec["linear_start"], spec["linear_end"], spec["n_timestep"])
    gammas = np.cumprod(1 - betas)
    prev = np.append(1.0, gammas[:-1])
    variance = betas * (1 - prev) / (1 - gammas)
    values = {
        "gammas": gammas,
        "sqrt_recip_gammas": np.sqrt(1 / gammas),
        "sqrt_recipm1_gammas": np.sqrt(1 / gammas - 1),
        "posterior_log_variance_clipped": np.log(np.maximum(variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1 - gammas),
        "posterior_mean_coef2": (1 - prev) * np.sqrt(1 - betas) / (1 - gammas),
    }
    return {key: torch.tensor(value, dtype=torch.float32) for key, value in values.items()}


def _randomize(net: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (the UNet's own init zeroes some output layers)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in net.named_parameters():
            z = torch.randn(p.shape, generator=generator)
            if p.ndim > 1:
                p.copy_(z / p[0].numel() ** 0.5)
            else:
                p.copy_(1 + 0.2 * z if key.endswith("weight") else 0.1 * z)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configuration_imports(name, tmp_path):
    numbers = PUBLISHED[name]
    variant, factor = VARIANT[name]
    opt = _reference_config(numbers)
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps(opt))
    given = {"scale_factor": factor} if variant == "emdiffuse-r" else {}
    # the source network: our UNet of the config, random weights, saved as the reference saves
    source_config = config_from_reference(opt, **given)
    torch.manual_seed(0)
    source = UNet(source_config.unet).eval()
    _randomize(source)
    weights = {key: value.clone() for key, value in source.state_dict().items()}
    first = "input_blocks.0.0.weight"
    if source_config.use_index_embedding:  # ours (upper, deeper, noisy) -> the reference's order
        weights[first] = weights[first][:, [1, 0, 2]].contiguous()
    saved = {f"denoise_fn.{key}": value for key, value in weights.items()}
    saved.update(_schedule_buffers(numbers["beta_schedule"]["train"]))
    pth = tmp_path / "best_Network.pth"
    torch.save(saved, pth)

    config, state_dict = load_reference_checkpoint(pth, config_path, **given)
    u, published = config.unet, numbers["unet"]
    assert (config.variant, config.scale_factor) == (variant, factor)
    assert (u.in_channels, u.out_channels, u.base_channels) == (
        published["in_channel"], published["out_channel"], published["inner_channel"])
    assert list(u.channel_mults) == published["channel_mults"]
    assert u.num_res_blocks == published["res_blocks"]
    assert (u.num_head_channels, u.dropout) == (published["num_head_channels"], published["dropout"])
    train, test = numbers["beta_schedule"]["train"], numbers["beta_schedule"]["test"]
    assert config.schedule == {"kind": "linear", "steps": train["n_timestep"],
                               "beta_start": train["linear_start"], "beta_end": train["linear_end"]}
    assert config.inference_schedule == {"kind": "linear", "steps": test["n_timestep"],
                                         "beta_start": test["linear_start"],
                                         "beta_end": test["linear_end"]}  # fmt: skip
    assert Schedule.from_dict(config.sampling_schedule).steps == 1000
    if config.use_index_embedding:
        assert (config.unet.num_indices, config.out_slices) == (factor - 1, factor - 1)
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == {
        k: tuple(v.shape) for k, v in source.state_dict().items()}
    assert all(torch.equal(state_dict[k], v) for k, v in source.state_dict().items())

    net = UNet(config.unet).eval()
    net.load_state_dict(state_dict, strict=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((2, u.in_channels, 32, 32), generator=generator)
    level = torch.tensor([0.9, 0.01])
    index = torch.tensor([0, factor - 2]) if config.use_index_embedding else None
    with torch.no_grad():
        out = net(x, level, index)
        expected = source(x, level, index)
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()
    assert float(out.abs().max()) > 1e-3  # a real output, not a zero layer's
    assert float((out - expected).abs().max()) <= 1e-5
