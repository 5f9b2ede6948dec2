"""Checkpoints: bit-exact round trip, never unpickling, clear errors naming mismatches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from emdiffuse.errors import InputError
from emdiffuse.models.checkpoints import (
    CONFIG_KEY,
    load_checkpoint,
    save_checkpoint,
    sidecar_path,
)
from emdiffuse.models.presets import make_config
from emdiffuse.models.unet import UNet
from emdiffuse.models.variants import ModelConfig


def _model(variant="emdiffuse-n", seed=0, **kwargs):
    config = make_config(
        variant,
        "tiny",
        normalization={"low": 10.0, "high": 200.0},
        voxel_size_nm=(8.0, 4.0, 4.0),
        training_data="synthetic test volume",
        **kwargs,
    )
    torch.manual_seed(seed)
    net = UNet(config.unet)
    # perturb every entry so the round trip cannot pass on default inits
    state = {
        name: t + 0.01 * torch.randn_like(t) if t.is_floating_point() else t
        for name, t in net.state_dict().items()
    }
    return config, state


@pytest.mark.parametrize(
    "variant,kwargs",
    [
        ("emdiffuse-n", {}),
        ("emdiffuse-r", {"scale_factor": 4}),
        ("vemdiffuse-a", {"scale_factor": 6}),
        ("vemdiffuse-i", {"scale_factor": 5, "use_index_embedding": True}),
    ],
)
def test_round_trip_bit_exact(tmp_path, variant, kwargs):
    config, state = _model(variant, **kwargs)
    path = save_checkpoint(tmp_path / "model.safetensors", state, config)
    assert path.is_file() and path.suffix == ".safetensors"
    sidecar = sidecar_path(path)
    assert sidecar == tmp_path / "model.json"
    assert json.loads(sidecar.read_text())["variant"] == variant

    loaded_config, loaded = load_checkpoint(path)
    assert loaded_config == config
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
    # config sits inside the file: the sidecar is only for people
    sidecar.unlink()
    assert load_checkpoint(path)[0] == config


def test_fp16_weights_stay_fp16(tmp_path):
    config, state = _model()
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    path = save_checkpoint(tmp_path / "half.safetensors", state, config)
    _, loaded = load_checkpoint(path)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())


def test_weights_load_into_network(tmp_path):
    config, state = _model("vemdiffuse-i", scale_factor=4)
    path = save_checkpoint(tmp_path / "iso.safetensors", state, config)
    config2, loaded = load_checkpoint(path, expect_task="isotropic", expect_scale_factor=4)
    net = UNet(config2.unet)
    net.load_state_dict(loaded, strict=True)


def test_torch_file_weights_only(tmp_path):
    config, state = _model()
    # {"config", "state_dict"} bundle
    bundle = tmp_path / "bundle.pt"
    torch.save({"config": config.to_json(), "state_dict": state}, bundle)
    got_config, got = load_checkpoint(bundle)
    assert got_config == config
    assert all(torch.equal(got[k], v) for k, v in state.items())
    # bare state dict with the config beside it
    bare = tmp_path / "bare.pth"
    torch.save(state, bare)
    with pytest.raises(InputError, match="no config"):
        load_checkpoint(bare)
    sidecar_path(bare).write_text(config.to_json())
    assert load_checkpoint(bare)[0] == config


class _Payload:
    """A custom class: not allowed by weights_only unpickling."""

    def __init__(self):
        self.weights = torch.zeros(2)


@pytest.mark.parametrize("kind", ["custom_class", "os_system", "exec", "lambda"])
def test_pickled_objects_refused_without_running(tmp_path, kind, pickled_code):
    config, state = _model()
    marker = tmp_path / "executed.txt"
    evil = {
        "custom_class": _Payload(),
        "os_system": pickled_code(marker, "system"),
        "exec": pickled_code(marker, "exec"),
        "lambda": pickled_code(marker, "lambda"),  # rebuilds and calls a lambda via eval
    }[kind]
    payload = {"config": config.to_json(), "state_dict": dict(state), "extra": evil}
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    assert not marker.exists()  # saving did not run it either
    with pytest.raises(InputError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_garbage_files(tmp_path):
    config, state = _model()
    path = save_checkpoint(tmp_path / "m.safetensors", state, config)
    data = path.read_bytes()
    for n, cut in enumerate([len(data) // 2, 5, len(data) - 1]):
        broken = tmp_path / f"cut{n}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(InputError, match="corrupt or truncated"):
            load_checkpoint(broken)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_checkpoint(garbage)
    pt = tmp_path / "m.pt"
    torch.save({"config": config.to_json(), "state_dict": state}, pt)
    cut_pt = tmp_path / "cut.pt"
    cut_pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_checkpoint(cut_pt)
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors", ".bin"])
def test_random_bytes_are_not_a_checkpoint(tmp_path, suffix, capsys):
    """A file of random bytes given as a model is "not a checkpoint", through the library
    and the CLI (one line, exit 2), never refused as "pickled objects … could run code"."""
    from emdiffuse.cli import main
    from emdiffuse.io import write_image

    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(np.random.default_rng(3).bytes(4096))
    with pytest.raises(InputError, match="is not a checkpoint") as error:
        load_checkpoint(junk)
    assert "could run code" not in str(error.value)
    volume = tmp_path / "in.zarr"
    write_image(np.zeros((2, 16, 16), np.float32), volume, voxel_size=(8.0, 8.0, 8.0))
    out = tmp_path / "out.zarr"
    assert main(["enhance", str(volume), str(out), "--model", str(junk), "--threads"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a checkpoint" in err and "could run" not in err
    assert not out.exists()


def test_missing_config(tmp_path):
    _, state = _model()
    path = tmp_path / "noconfig.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(InputError, match="has no config"):
        load_checkpoint(path)


def _write_raw(path: Path, state, config: ModelConfig) -> Path:
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(path),
        metadata={CONFIG_KEY: config.to_json()},
    )
    return path


def test_state_dict_mismatches_named(tmp_path):
    config, state = _model()
    name = sorted(state)[3]

    missing = dict(state)
    del missing[name]
    with pytest.raises(InputError, match=f"missing key.*{name}"):
        load_checkpoint(_write_raw(tmp_path / "a.safetensors", missing, config))

    extra = dict(state, **{"bogus.weight": torch.zeros(3)})
    with pytest.raises(InputError, match="unexpected key.*bogus.weight"):
        load_checkpoint(_write_raw(tmp_path / "b.safetensors", extra, config))

    weight = next(k for k, v in state.items() if v.ndim == 4)
    reshaped = dict(state)
    t = state[weight]
    reshaped[weight] = torch.zeros(t.shape[0] + 1, *t.shape[1:])
    with pytest.raises(InputError, match=f"{weight} has shape"):
        load_checkpoint(_write_raw(tmp_path / "c.safetensors", reshaped, config))

    # weights of another architecture under this config
    _, other = _model("vemdiffuse-i", scale_factor=4)
    with pytest.raises(InputError, match="do not match the config"):
        load_checkpoint(_write_raw(tmp_path / "d.safetensors", other, config))

    # save refuses too, before writing anything
    target = tmp_path / "never.safetensors"
    with pytest.raises(InputError, match="missing key"):
        save_checkpoint(target, missing, config)
    assert not target.exists() and not sidecar_path(target).exists()


def test_wrong_task_and_scale_factor(tmp_path):
    config, state = _model("vemdiffuse-i", scale_factor=4)
    path = save_checkpoint(tmp_path / "iso.safetensors", state, config)
    with pytest.raises(InputError) as info:
        load_checkpoint(path, expect_task="denoise")
    message = str(info.value)
    assert "vemdiffuse-i (isotropic, z×4)" in message and "denoise" in message
    with pytest.raises(InputError, match="scale factor 4.*scale factor 6"):
        load_checkpoint(path, expect_scale_factor=6)
    with pytest.raises(InputError, match="asks for vemdiffuse-a"):
        load_checkpoint(path, expect_variant="vemdiffuse-a")
    load_checkpoint(path, expect_task="isotropic", expect_scale_factor=4)


def test_bad_config_in_metadata(tmp_path):
    config, state = _model()
    data = config.to_dict()
    data["variant"] = "emdiffuse-q"
    path = tmp_path / "bad.safetensors"
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(path),
        metadata={CONFIG_KEY: json.dumps(data)},
    )
    with pytest.raises(InputError, match="unknown variant 'emdiffuse-q'"):
        load_checkpoint(path)


def test_save_needs_safetensors_suffix(tmp_path):
    config, state = _model()
    with pytest.raises(InputError, match=".safetensors"):
        save_checkpoint(tmp_path / "m.pt", state, config)
