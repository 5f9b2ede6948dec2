"""Import of reference EMDiffuse checkpoints: numerics against the reference, and errors.

The fixture in ``tests/data/reference/`` was written by the reference's own code (see its
README): its ``Network.state_dict()`` as its trainer saves it, its JSON config, a fixed input
and the reference network's output. Our importer must reproduce that output to 1e-5.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emdiffuse.cli import main
from emdiffuse.errors import InputError
from emdiffuse.models.checkpoints import load_checkpoint
from emdiffuse.models.diffusion import Schedule, make_denoiser
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.models.reference import (
    convert_reference_checkpoint,
    describe_reference_weights,
    load_reference_checkpoint,
    read_reference_config,
    reference_weights_kind,
    strip_json_comments,
)
from emdiffuse.models.samplers import ddpm_posterior, sample_ddpm
from emdiffuse.models.unet import UNet
from emdiffuse.models.variants import ModelConfig

# tests/models/test_reference_import.py -> tests/data/reference (read when tests are collected)
DATA = Path(__file__).resolve().parents[1] / "data" / "reference"
N_PTH, N_JSON = DATA / "emdiffuse_n_Network.pth", DATA / "emdiffuse_n.json"
V_PTH, V_JSON = DATA / "vemdiffuse_i_Network_ema.pth", DATA / "vemdiffuse_i.json"
TOLERANCE = 1e-5
TEST_SCHEDULE = {"kind": "linear", "steps": 1000, "beta_start": 1e-4, "beta_end": 0.09}
TRAJECTORY_TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _io(stem: str) -> dict[str, torch.Tensor]:
    with np.load(DATA / f"{stem}_io.npz", allow_pickle=False) as data:
        return {key: torch.from_numpy(data[key]) for key in data.files}


def _forward(config, state_dict, x, gammas, index=None) -> torch.Tensor:
    net = UNet(config.unet).eval()
    net.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        return net(x, gammas.reshape(-1), index)


def _max_diff(config, state_dict, stem: str) -> float:
    """Our output against the reference's on the fixture input (vEMDiffuse: our slice order)."""
    io = _io(stem)
    x, index = io["x"], None
    if config.use_index_embedding:
        x = x[:, [1, 0, 2]]  # reference (below, above, noisy) -> ours (above, below, noisy)
        index = io["index"]
    return float((_forward(config, state_dict, x, io["gammas"], index) - io["out"]).abs().max())


def _edit_config(tmp_path: Path, source: Path, edit) -> Path:
    opt = read_reference_config(source)
    edit(opt)
    path = tmp_path / f"edited_{source.name}"
    path.write_text(json.dumps(opt))
    return path


# --------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------
def test_2d_network_matches_reference():
    config, state_dict = load_reference_checkpoint(N_PTH, N_JSON)
    assert (config.variant, config.task, config.scale_factor) == ("emdiffuse-n", "denoise", 1)
    u = config.unet
    assert (u.dims, u.in_channels, u.out_channels, u.base_channels) == (2, 2, 1, 16)
    assert (u.channel_mults, u.num_res_blocks, u.attention_resolutions) == ((1, 1), 0, (1,))
    assert (u.num_head_channels, u.legacy_attention_order, u.use_index_embedding) == (8, True, False)
    assert config.schedule == {"kind": "linear", "steps": 2000, "beta_start": 1e-6, "beta_end": 0.01}
    assert (config.prediction, config.loss) == ("eps", "mse")
    assert config.normalization == {"low": 0.0, "high": 255.0}
    assert "EMDiffuse-n" in config.training_data
    assert not any(k.startswith("denoise_fn.") or k == "gammas" for k in state_dict)
    assert _max_diff(config, state_dict, "emdiffuse_n") < TOLERANCE


def test_vemdiffuse_network_matches_reference():
    config, state_dict = load_reference_checkpoint(V_PTH, V_JSON)
    assert (config.variant, config.task, config.scale_factor) == ("vemdiffuse-i", "isotropic", 4)
    assert config.use_index_embedding and config.unet.num_indices == 3
    assert (config.unet.in_channels, config.unet.out_channels) == (3, 1)
    assert (config.in_slices, config.out_slices, config.passes) == (2, 3, 3)
    assert "channel_embed.0.weight" in state_dict
    assert _max_diff(config, state_dict, "vemdiffuse_i") < TOLERANCE


def test_vemdiffuse_slice_order_matters():
    """Feeding the reference's own order to the imported network must not match: the import
    really reorders the conditioning (and this test would catch it if it stopped)."""
    config, state_dict = load_reference_checkpoint(V_PTH, V_JSON)
    io = _io("vemdiffuse_i")
    out = _forward(config, state_dict, io["x"], io["gammas"], io["index"])
    assert float((out - io["out"]).abs().max()) > 1e-2
    # and the index matters: all indices 0 differ from the recorded (0, 1, 2)
    x = io["x"][:, [1, 0, 2]]
    zeros = torch.zeros_like(io["index"])
    out = _forward(config, state_dict, x, io["gammas"], zeros)
    assert float((out[1:] - io["out"][1:]).abs().max()) > 1e-2
    assert float((out[:1] - io["out"][:1]).abs().max()) < TOLERANCE


def test_prefixes_stripped(tmp_path):
    """DataParallel's ``module.`` and a bare UNet state dict (no ``denoise_fn.``) load too."""
    raw = torch.load(N_PTH, weights_only=True)
    wrapped = tmp_path / "wrapped_Network.pth"
    torch.save({f"module.{k}": v for k, v in raw.items()}, wrapped)
    bare = tmp_path / "bare_Network.pth"
    torch.save({k[len("denoise_fn.") :]: v for k, v in raw.items() if k.startswith("denoise_fn.")},
               bare)  # fmt: skip
    _, expected = load_reference_checkpoint(N_PTH, N_JSON)
    for path in (wrapped, bare):
        config, state_dict = load_reference_checkpoint(path, N_JSON)
        assert state_dict.keys() == expected.keys()
        assert all(torch.equal(state_dict[k], expected[k]) for k in expected)
        assert _max_diff(config, state_dict, "emdiffuse_n") < TOLERANCE


def test_convert_to_safetensors_and_enhance(tmp_path):
    out = convert_reference_checkpoint(V_PTH, V_JSON, tmp_path / "vem.safetensors")
    assert out.is_file() and out.with_suffix(".json").is_file()
    config, state_dict = load_checkpoint(out, expect_task="isotropic", expect_scale_factor=4)
    assert _max_diff(config, state_dict, "vemdiffuse_i") < TOLERANCE
    enhancer = Enhancer.load(out)
    assert (enhancer.in_slices, enhancer.out_slices, enhancer.z_scale) == (2, 3, 4)
    cond = np.zeros((1, 2, 16, 16), np.float32)
    noise = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    result = enhancer.enhance(cond, noise, sampler="ddim", steps=2)
    assert result.shape == (1, 3, 16, 16) and np.isfinite(result).all()
    with pytest.raises(InputError, match="exists"):
        convert_reference_checkpoint(V_PTH, V_JSON, out)
    convert_reference_checkpoint(V_PTH, V_JSON, out, overwrite=True)


def test_cli(tmp_path, capsys):
    out = tmp_path / "n.safetensors"
    assert main(["import-reference", str(N_PTH), str(N_JSON), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "emdiffuse-n (denoise)" in printed
    assert "is the reference's netG, the weights its test phase samples with" in printed
    assert "sampling schedule: linear, 1000 steps, beta 0.0001..0.09 (the model's inference" in printed
    config, state_dict = load_checkpoint(out)
    assert _max_diff(config, state_dict, "emdiffuse_n") < TOLERANCE
    assert main(["import-reference", str(N_PTH), str(N_JSON), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    # the same weights as a 4x super-resolution model, with an intensity range
    args = ["--variant", "emdiffuse-r", "--scale-factor", "4", "--low", "10", "--high", "4000"]
    assert main(["import-reference", str(N_PTH), str(N_JSON), str(out), "--overwrite", *args]) == 0
    config = load_checkpoint(out)[0]
    assert (config.variant, config.scale_factor, config.xy_scale) == ("emdiffuse-r", 4, 4)
    assert config.normalization == {"low": 10.0, "high": 4000.0}
    assert main(["import-reference", str(N_PTH), str(N_JSON), str(out), "--overwrite",
                 "--variant", "emdiffuse-r"]) == 2  # fmt: skip
    assert "super-resolution factor" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# the reference's sampler: its test schedule and its p_sample_loop, replayed
# --------------------------------------------------------------------------------------
def _trajectory() -> dict[str, np.ndarray]:
    with np.load(DATA / "emdiffuse_n_trajectory.npz", allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _draw(pool: np.ndarray, k: int) -> np.ndarray:
    """The fixture's k-th noise draw (scripts/make_reference_fixture.trajectory_noise)."""
    if k == 0:
        return pool[0]
    return np.roll(pool[1 + (k - 1) % 64], (k - 1) // 64, axis=-1)


def test_import_stores_the_inference_schedule():
    """The config's beta_schedule.test is stored and sampled on: at its full length, time
    spacing walks exactly the reference's gammas (its test buffer), reversed, then 1.0."""
    config, _ = load_reference_checkpoint(N_PTH, N_JSON)
    assert config.inference_schedule == TEST_SCHEDULE
    assert config.sampling_schedule == TEST_SCHEDULE
    assert "inference schedule" in config.describe_sampling()
    assert ModelConfig.from_json(config.to_json()) == config
    gammas = _trajectory()["gammas"]  # the reference's own float32 buffer
    alphas = Schedule.from_dict(config.sampling_schedule).timesteps(1000, "time")
    assert alphas.shape == (1001,) and float(alphas[-1]) == 1.0
    assert np.array_equal(alphas[:-1].flip(0).numpy().astype(np.float32), gammas)
    assert float(alphas[0]) < 1e-20  # far below the lowest training level (4.4e-5)
    # a checkpoint without the field samples on its training schedule, as before
    old = config.to_dict()
    del old["inference_schedule"]
    old = ModelConfig.from_dict(old)
    assert old.inference_schedule is None and old.sampling_schedule == config.schedule
    assert "training schedule" in old.describe_sampling()
    bad = dict(config.to_dict(), inference_schedule={"kind": "linear", "steps": 1})
    with pytest.raises(InputError, match="inference_schedule.steps"):
        ModelConfig.from_dict(bad)


def test_few_step_spacings_start_at_the_training_range():
    """On the reference's test schedule logsnr/karras spacing would put 6-10 of 8-10 steps
    below the lowest training level (4.4e-5), where the input has no signal left; they start
    there instead. Time spacing (ddpm's) keeps the schedule's own noisiest point."""
    config, state_dict = load_reference_checkpoint(N_PTH, N_JSON)
    enhancer = Enhancer.from_config(config, state_dict)
    lowest = float(Schedule.from_dict(config.schedule).alpha_bars[-1])
    cond = np.zeros((1, 1, 16, 16), np.float32)
    noise = np.random.default_rng(0).standard_normal((1, 1, 16, 16)).astype(np.float32)
    for sampler, spacing, first in (("dpmpp_2m", None, lowest), ("ddim", "karras", lowest),
                                    ("ddpm", None, float(enhancer.schedule.alpha_bars[-1]))):
        levels: list[float] = []
        enhancer.enhance(cond, noise, sampler=sampler, steps=4, spacing=spacing,
                         step_noise=lambda i: noise, callback=lambda d, kept=levels: kept.append(
                             d["alpha_bar"]))  # fmt: skip
        assert levels[0] == pytest.approx(first, rel=1e-9), sampler
    assert float(enhancer.schedule.alpha_bars[-1]) < 1e-20


def test_single_posterior_steps_match_reference():
    """One step of the reference's p_mean_variance (x0 from its ε, clipped; the posterior
    mean; its clipped log variance) at chosen t, from the fixture's inputs."""
    config, state_dict = load_reference_checkpoint(N_PTH, N_JSON)
    enhancer = Enhancer.from_config(config, state_dict)
    tr = _trajectory()
    gammas = enhancer.schedule.alpha_bars
    denoise = make_denoiser(enhancer.net, torch.from_numpy(tr["cond"]), prediction="eps")
    for row, t in enumerate(tr["single_t"]):
        at, ap = float(gammas[t]), (float(gammas[t - 1]) if t > 0 else 1.0)
        y_t = torch.from_numpy(tr["single_y_t"][row : row + 1])
        mean = sample_ddpm(denoise, y_t, torch.tensor([at, ap], dtype=torch.float64))
        assert float((mean - torch.from_numpy(tr["single_mean"][row : row + 1])).abs().max()) < TOLERANCE
        if t >= 10:  # x0 itself only where its 1/sqrt(alpha_bar) amplification is small
            continue
        x0 = denoise(y_t, at)
        assert float((x0 - torch.from_numpy(tr["single_x0"][row : row + 1])).abs().max()) < TOLERANCE
    for row, t in enumerate(tr["single_t"]):
        at, ap = float(gammas[t]), (float(gammas[t - 1]) if t > 0 else 1.0)
        var = ddpm_posterior(at, ap)[2]
        expected = float(tr["single_log_variance"][row])
        assert abs(np.log(max(var, 1e-20)) - expected) < 1e-4 * abs(expected)


@pytest.mark.slow
def test_ddpm_replays_reference_loop():
    """Imported weights + ddpm at the inference schedule's full length (1000 steps) + the
    same start and step noise = the reference's own p_sample_loop output, and its states
    along the way."""
    config, state_dict = load_reference_checkpoint(N_PTH, N_JSON)
    enhancer = Enhancer.from_config(config, state_dict, precision="fp32")  # exact replay
    tr = _trajectory()
    states: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def keep(info: dict) -> None:
        if info["i"] in set(tr["steps"].tolist()):
            states[info["i"]] = (info["x"].numpy().copy(), info["denoised"].numpy().copy())

    out = enhancer.enhance(
        tr["cond"], _draw(tr["pool"], 0), sampler="ddpm", steps=1000,
        step_noise=lambda i: _draw(tr["pool"], i + 1), callback=keep,
    )  # fmt: skip
    assert np.abs(out - tr["final"]).max() <= TRAJECTORY_TOLERANCE
    for row, k in enumerate(tr["steps"]):
        x, x0 = states[int(k)]
        assert np.abs(x - tr["x"][row]).max() <= TRAJECTORY_TOLERANCE, k
        if k >= 900:  # x0 at the noisiest levels is 1/sqrt(alpha_bar) times rounding
            assert np.abs(x0 - tr["x0"][row]).max() <= TRAJECTORY_TOLERANCE, k


def test_weights_kind_reported_and_ema_imports(tmp_path, capsys):
    """netG (*_Network.pth) is what the reference samples with; the EMA copy imports too,
    and the import says which it got."""
    assert reference_weights_kind(N_PTH) == "netG"
    assert reference_weights_kind(V_PTH) == "ema"
    assert reference_weights_kind(tmp_path / "weights.pth") == "unknown"
    assert "netG" in load_reference_checkpoint(N_PTH, N_JSON)[0].training_data
    config, _ = load_reference_checkpoint(V_PTH, V_JSON)
    assert "EMA copy" in config.training_data
    out = tmp_path / "v.safetensors"
    assert main(["import-reference", str(V_PTH), str(V_JSON), str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("vemdiffuse_i_Network_ema.pth is the reference's EMA copy, which its test phase "
            "never samples with; for the reference's own result import "
            "vemdiffuse_i_Network.pth") in printed  # fmt: skip
    renamed = tmp_path / "weights.pth"
    renamed.write_bytes(N_PTH.read_bytes())
    assert "unknown" in describe_reference_weights(renamed)


# --------------------------------------------------------------------------------------
# config reading
# --------------------------------------------------------------------------------------
def test_strip_json_comments():
    text = '{"a": "x // y", // gone\n "b": "q\\" // r", /* block\n */ "c": 1} // end'
    assert json.loads(strip_json_comments(text)) == {"a": "x // y", "b": 'q" // r', "c": 1}


def test_fixture_config_has_comments():
    assert "//" in N_JSON.read_text()
    opt = read_reference_config(N_JSON)
    assert opt["model"]["which_networks"][0]["name"] == ["models.EMDiffuse_network", "Network"]


def test_saved_config_name_prefix_and_variant_guess(tmp_path):
    # the reference writes its parsed config with the phase prefixed to the name
    path = _edit_config(tmp_path, N_JSON, lambda o: o.update(name="train_EMDiffuse-r_big"))
    config, _ = load_reference_checkpoint(N_PTH, path, scale_factor=2)
    assert (config.variant, config.scale_factor) == ("emdiffuse-r", 2)
    assert config.cond_upsample == "bilinear"  # the reference enlarges its input bilinearly
    path = _edit_config(tmp_path, N_JSON, lambda o: o.update(name="my-experiment"))
    with pytest.raises(InputError, match=r"denoises or super-resolves.*--variant"):
        load_reference_checkpoint(N_PTH, path)
    assert load_reference_checkpoint(N_PTH, path, variant="emdiffuse-n")[0].variant == "emdiffuse-n"

    def anonymous(opt):
        opt["name"] = "liver"
        del opt["datasets"]["train"]["which_dataset"]["args"]["method"]

    path = _edit_config(tmp_path, V_JSON, anonymous)
    with pytest.raises(InputError, match="vEMDiffuse-i from vEMDiffuse-a"):
        load_reference_checkpoint(V_PTH, path)
    config, _ = load_reference_checkpoint(V_PTH, path, variant="vemdiffuse-a")
    assert config.variant == "vemdiffuse-a"


def test_variant_name_disagreeing_with_the_file_is_named(tmp_path):
    """The published EMDiffuse-n-big.json is a denoiser whose experiment name is
    'EMDiffuse-r'; the 2D network's shapes cannot tell (denoiser and super-resolver are both
    2 -> 1 channels), so the import names the disagreement on one line and asks."""
    opt = read_reference_config(N_JSON)
    opt["name"] = "EMDiffuse-r"
    big = tmp_path / "EMDiffuse-n-big.json"
    big.write_text(json.dumps(opt))
    with pytest.raises(InputError, match=r"name 'EMDiffuse-r' says emdiffuse-r but the file name "
                       r"says emdiffuse-n.*in_channel 2, out_channel 1.*--variant emdiffuse-n") as info:
        load_reference_checkpoint(N_PTH, big)
    assert "\n" not in str(info.value)
    config, _ = load_reference_checkpoint(N_PTH, big, variant="emdiffuse-n")
    assert (config.variant, config.scale_factor) == ("emdiffuse-n", 1)
    assert load_reference_checkpoint(N_PTH, big, variant="emdiffuse-r", scale_factor=2)[0].xy_scale == 2
    # a name and a file that agree need nothing more
    agree = tmp_path / "EMDiffuse-r-big.json"
    agree.write_text(json.dumps(opt))
    with pytest.raises(InputError, match="super-resolution factor"):
        load_reference_checkpoint(N_PTH, agree)
    # a vEMDiffuse name on the 2D network: the network decides it is not isotropic
    opt["name"] = "vEMDiffuse-i"
    agree.write_text(json.dumps(opt))
    with pytest.raises(InputError, match="says vEMDiffuse but the network is the 2D EMDiffuse one"):
        load_reference_checkpoint(N_PTH, agree)
    # and the CLI prints it as one line, exit 2
    assert main(["import-reference", str(N_PTH), str(big), str(tmp_path / "x.safetensors")]) == 2


def test_z_factor_from_config_and_mismatch(tmp_path):
    with pytest.raises(InputError, match="z_times 4"):
        load_reference_checkpoint(V_PTH, V_JSON, scale_factor=6)
    assert load_reference_checkpoint(V_PTH, V_JSON, scale_factor=4)[0].scale_factor == 4
    path = _edit_config(
        tmp_path, V_JSON, lambda o: o["datasets"]["train"]["which_dataset"]["args"].pop("z_times")
    )
    with pytest.raises(InputError, match="no z_times"):
        load_reference_checkpoint(V_PTH, path)
    config, _ = load_reference_checkpoint(V_PTH, path, scale_factor=8)
    assert (config.scale_factor, config.unet.num_indices, config.out_slices) == (8, 7, 7)


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
def test_pickled_objects_refused_without_running(tmp_path, pickled_code):
    marker = tmp_path / "executed.txt"
    raw = torch.load(N_PTH, weights_only=True)
    evil = tmp_path / "evil_Network.pth"
    torch.save({**raw, "payload": pickled_code(marker)}, evil)
    with pytest.raises(InputError, match="refusing to load"):
        load_reference_checkpoint(evil, N_JSON)
    assert not marker.exists()


def test_unreadable_and_non_tensor_files(tmp_path):
    truncated = tmp_path / "cut_Network.pth"
    truncated.write_bytes(N_PTH.read_bytes()[:1000])
    with pytest.raises(InputError, match="not a readable torch file"):
        load_reference_checkpoint(truncated, N_JSON)
    numbers = tmp_path / "numbers_Network.pth"
    torch.save({"denoise_fn.x": 3}, numbers)
    with pytest.raises(InputError, match="not tensors"):
        load_reference_checkpoint(numbers, N_JSON)
    with pytest.raises(InputError, match="does not exist"):
        load_reference_checkpoint(tmp_path / "missing.pth", N_JSON)
    bad = tmp_path / "bad.json"
    bad.write_text("{ this is not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_reference_checkpoint(N_PTH, bad)


def test_weights_for_another_config_named():
    # vEMDiffuse weights with the 2D config: the index embedding is unexpected
    with pytest.raises(InputError, match=r"unexpected key\(s\) denoise_fn\.channel_embed"):
        load_reference_checkpoint(V_PTH, N_JSON)
    # 2D weights with the vEMDiffuse config: its keys are missing
    with pytest.raises(InputError, match=r"(unexpected|missing) key"):
        load_reference_checkpoint(N_PTH, V_JSON)


def test_shape_mismatch_named(tmp_path):
    path = _edit_config(
        tmp_path, N_JSON,
        lambda o: o["model"]["which_networks"][0]["args"]["unet"].update(inner_channel=32),
    )  # fmt: skip
    with pytest.raises(InputError, match=r"denoise_fn\.\S+ has shape \[\d+(, \d+)*\], the config"):
        load_reference_checkpoint(N_PTH, path)


def test_schedule_mismatch_named(tmp_path):
    def edit(opt):
        opt["model"]["which_networks"][0]["args"]["beta_schedule"]["train"]["n_timestep"] = 1500

    path = _edit_config(tmp_path, N_JSON, edit)
    with pytest.raises(InputError, match=r"2000 steps.*not the config's training schedule.*1500"):
        load_reference_checkpoint(N_PTH, path)
    # the EMA weights carry no schedule: nothing to compare, the config's schedule is taken
    path = _edit_config(tmp_path, V_JSON, edit)
    assert load_reference_checkpoint(V_PTH, path)[0].schedule["steps"] == 1500


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda n, u: u.update(use_spatial_transformer=True), "unsupported UNet option.*use_spatial_transformer"),
        (lambda n, u: n["args"]["beta_schedule"]["train"].update(schedule="quad"), "unsupported noise schedule 'quad'"),
        (lambda n, u: n["args"].update(norm=False), "unsupported option norm false"),
        (lambda n, u: n.update(name=["models.sr3_network", "Network"]), "unsupported network"),
        (lambda n, u: u.update(resblock_updown=False, conv_resample=False), "conv_resample false"),
        (lambda n, u: u.pop("inner_channel"), "no 'inner_channel'"),
        (lambda n, u: u.update(in_channel=4), "in_channel 4 and out_channel 1"),
    ],
)  # fmt: skip
def test_unsupported_config_named(tmp_path, edit, match):
    def apply(opt):
        network = opt["model"]["which_networks"][0]
        edit(network, network["args"]["unet"])

    path = _edit_config(tmp_path, N_JSON, apply)
    with pytest.raises(InputError, match=match):
        load_reference_checkpoint(N_PTH, path)


def test_variant_must_fit_network():
    with pytest.raises(InputError, match="does not fit the config's vEMDiffuse"):
        load_reference_checkpoint(V_PTH, V_JSON, variant="emdiffuse-n")
    with pytest.raises(InputError, match="does not fit the config's EMDiffuse"):
        load_reference_checkpoint(N_PTH, N_JSON, variant="vemdiffuse-i")
    with pytest.raises(InputError, match="unknown variant"):
        load_reference_checkpoint(N_PTH, N_JSON, variant="emdiffuse-x")
    with pytest.raises(InputError, match="for a denoiser"):
        load_reference_checkpoint(N_PTH, N_JSON, scale_factor=2)


def test_messages_are_one_line(tmp_path):
    path = _edit_config(tmp_path, N_JSON, lambda o: o.update(name="x"))
    for call in (
        lambda: load_reference_checkpoint(V_PTH, N_JSON),
        lambda: load_reference_checkpoint(N_PTH, path),
        lambda: load_reference_checkpoint(V_PTH, V_JSON, scale_factor=5),
    ):
        with pytest.raises(InputError) as info:
            call()
        assert "\n" not in str(info.value) and re.search(r"[;(]", str(info.value))


def test_reference_module_imports_no_pipeline():
    code = (
        "import sys, emdiffuse.models.reference, emdiffuse.models.checkpoints\n"
        "bad = [m for m in ('dask', 'zarr', 'xarray', 'emdiffuse.pipeline') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
