"""Regenerate ``tests/data/reference/``: tiny networks built by the reference EMDiffuse code.

Usage::

    python scripts/make_reference_fixture.py --reference PATH_TO_EMDIFFUSE_CHECKOUT \
        [--out tests/data/reference] [--seed 0]

``PATH_TO_EMDIFFUSE_CHECKOUT`` is a local checkout of Luchixiang/EMDiffuse. Nothing of it is
copied: this script imports the reference's own ``Network`` classes from that checkout
(``models/EMDiffuse_network.py`` with its 2D UNet, ``models/vEMDiffuse_network.py`` with its
index-embedding UNet), fills them with seeded random weights, writes their state dicts the way
the reference trainer saves them (``Network.state_dict()`` with its ``denoise_fn.`` prefix and
the noise-schedule buffers, tensors on the CPU, ``torch.save``), writes a config in the
reference's JSON-with-comments layout, and records a fixed input, its noise levels (the
reference's ``gammas``), the in-between-slice indices and the reference network's output.

It also records the reference's sampler (``emdiffuse_n_trajectory.npz``): the 2D network, put
in its test phase (``set_new_noise_schedule(phase="test")``: 1000 steps, linear β 1e-4..0.09,
as the reference's test phase does after loading its weights), runs its own ``restoration``
loop on a 16×16 condition, with every ``torch.randn_like`` it calls answered from a stored pool
of noise images by a fixed rule (:func:`trajectory_noise`), so a test can replay the loop with
the same start and step noise. Recorded: the final output, the sample and x0 estimate after
chosen steps, and ``p_mean_variance`` (posterior mean, clipped log variance, x0 estimate) of
single steps at chosen ``t`` from fixed inputs.

Only torch, numpy and tqdm are needed (the reference package ``__init__`` files, which pull in
its data loaders and loggers, are bypassed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tiny architectures in the reference's "unet" argument names (the fixture must stay a few
# hundred KB). 16 base channels make the reference pick 16 GroupNorm groups (its smallest
# width); 8 channels per head give two heads per attention layer; attention at full resolution
# (downsampling factor 1) as well as in the middle block; one residual block per level in the
# decoder (res_blocks 0). The 2D network has two levels, so the down- and up-sampling residual
# blocks are covered; the vEMDiffuse network one level, enough for its index embedding and
# its wider embedding layers. The published size (32 channels, 1-2-4-8, 2 blocks) has the same
# layout, checked by hand with this script's approach but not committed (it is 100 MB).
UNET_2D = {
    "in_channel": 2,
    "out_channel": 1,
    "inner_channel": 16,
    "channel_mults": [1, 1],
    "attn_res": [1],
    "num_head_channels": 8,
    "res_blocks": 0,
    "dropout": 0.2,
    "image_size": 16,
}
UNET_VEM = dict(UNET_2D, in_channel=3, channel_mults=[1])
Z_TIMES = 4
TRAIN_SCHEDULE = {"schedule": "linear", "n_timestep": 2000, "linear_start": 1e-6, "linear_end": 0.01}
TEST_SCHEDULE = {"schedule": "linear", "n_timestep": 1000, "linear_start": 1e-4, "linear_end": 0.09}


def reference_config(name: str, network_file: str, model_file: str, unet: dict, **dataset) -> str:
    """A config in the reference's layout (JSON with ``//`` comments), as text."""
    vem = "vEM" in name
    dataset_class = "vEMDiffuseTrainingDatasetVolume" if vem else "EMDiffusenDataset"
    opt = {
        "name": name,
        "norm": True,
        "percent": False,
        "gpu_ids": [0],
        "task": "3d_reconstruction" if vem else "denoise",
        "datasets": {
            "train": {"which_dataset": {"name": ["data.dataset", dataset_class], "args": dict(
                {"data_root": "unused", "norm": True, "percent": False}, **dataset)}},
        },
        "model": {
            "which_model": {"name": [model_file, "DiReP"], "args": {
                "task": "3d_reconstruct" if vem else "denoise",
                "ema_scheduler": {"ema_start": 1, "ema_iter": 1, "ema_decay": 0.9999},
            }},
            "which_networks": [{"name": [network_file, "Network"], "args": {
                "init_type": "kaiming",
                "module_name": "guided_diffusion",
                "norm": True,
                "unet": unet,
                "beta_schedule": {"train": TRAIN_SCHEDULE, "test": TEST_SCHEDULE},
            }}],
            "which_losses": ["mse_loss"],
        },
    }
    text = json.dumps(opt, indent=4)
    # the reference's configs carry // comments (its parser cuts every line at "//")
    header = "// tiny test network in the reference EMDiffuse config layout (not a real model)\n"
    text = text.replace('"norm": true,\n    "percent"', '"norm": true, // [-1, 1] intensities\n    "percent"', 1)
    return header + text + "\n"


def import_reference(checkout: Path) -> tuple[type, type]:
    """The reference's two ``Network`` classes, imported from the user's checkout."""
    for name in ("models", "core"):
        if not (checkout / name).is_dir():
            raise SystemExit(f"{checkout} is not an EMDiffuse checkout (no {name}/ folder)")
    sys.path.insert(0, str(checkout))
    # an empty package object stands in for models/__init__.py (it imports the whole trainer)
    package = types.ModuleType("models")
    package.__path__ = [str(checkout / "models")]
    sys.modules["models"] = package
    from models.EMDiffuse_network import Network as Network2D  # type: ignore[import-not-found]
    from models.vEMDiffuse_network import Network as NetworkVEM  # type: ignore[import-not-found]

    return Network2D, NetworkVEM


def randomize(net: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded random weights everywhere (no zero layers, norms away from the identity)."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    / fan_in**0.5)  # fmt: skip
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


# the trajectory fixture: a pool of noise images and the loop steps whose state is recorded
POOL = 64
RECORDED_STEPS = (0, 1, 10, 100, 500, 900, 990, 998, 999)  # k-th p_sample call (t = 999 - k)
SINGLE_STEPS = (999, 700, 500, 100, 10, 1, 0)  # t of the recorded single posterior steps


def trajectory_noise(pool: np.ndarray, k: int) -> np.ndarray:
    """The noise of the ``k``-th draw of the loop (k = 0: the start noise x_T; k >= 1: the
    step noise of the (k-1)-th step): ``pool[0]``, then ``pool[1 + (k-1) % 64]`` rolled by
    ``(k-1) // 64`` pixels along x. Tests repeat this rule."""
    if k == 0:
        return pool[0]
    j = k - 1
    return np.roll(pool[1 + j % POOL], j // POOL, axis=-1)


def record_trajectory(net: torch.nn.Module, out: Path, generator: torch.Generator) -> None:
    """Run the reference's ``restoration`` loop on its test schedule with recorded noise."""
    net.set_new_noise_schedule(phase="test")
    net.eval()
    shape = (1, 1, 16, 16)
    cond = 0.6 * torch.randn(shape, generator=generator)
    pool = torch.randn((1 + POOL, *shape), generator=generator).numpy()
    draws = [0]
    real_randn_like = torch.randn_like

    def recorded_randn_like(like: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        assert tuple(like.shape) == shape, like.shape
        noise = torch.from_numpy(trajectory_noise(pool, draws[0]).copy())
        draws[0] += 1
        return noise.to(like.device, like.dtype)

    states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    real_p_sample = net.p_sample

    def p_sample(y_t, t, *args, **kwargs):
        y, y0 = real_p_sample(y_t, t, *args, **kwargs)
        k = net.num_timesteps - 1 - int(t[0])
        if k in RECORDED_STEPS:
            states[k] = (y.clone(), y0.clone())
        return y, y0

    net.p_sample = p_sample
    torch.randn_like = recorded_randn_like
    try:
        with torch.no_grad():
            final, _ = net.restoration(cond, sample_num=8)
    finally:
        torch.randn_like = real_randn_like
        del net.p_sample
    assert draws[0] == net.num_timesteps, draws  # start noise + one per step but the last

    singles = {"t": np.array(SINGLE_STEPS)}
    y_single = torch.randn((len(SINGLE_STEPS), *shape[1:]), generator=generator)
    means, logvars, x0s = [], [], []
    with torch.no_grad():
        for row, t in enumerate(SINGLE_STEPS):
            t_tensor = torch.full((1,), t, dtype=torch.long)
            mean, logvar, x0 = net.p_mean_variance(
                y_single[row : row + 1], t_tensor, clip_denoised=True, y_cond=cond)  # fmt: skip
            means.append(mean)
            logvars.append(logvar.reshape(1))
            x0s.append(x0)
    singles.update(y_t=y_single.numpy(), mean=torch.cat(means).numpy(),
                   log_variance=torch.cat(logvars).numpy(), x0=torch.cat(x0s).numpy())  # fmt: skip
    np.savez_compressed(
        out / "emdiffuse_n_trajectory.npz",
        cond=cond.numpy(),
        pool=pool,
        gammas=net.gammas.cpu().numpy(),
        final=final.numpy(),
        steps=np.array(sorted(states)),
        x=np.concatenate([states[k][0].numpy() for k in sorted(states)]),
        x0=np.concatenate([states[k][1].numpy() for k in sorted(states)]),
        **{f"single_{key}": value for key, value in singles.items()},
    )
    print(f"trajectory: {net.num_timesteps} steps, |final| max {final.abs().max():.3f}, "
          f"{(out / 'emdiffuse_n_trajectory.npz').stat().st_size / 1024:.0f} KiB")  # fmt: skip


def commit_of(checkout: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="EMDiffuse checkout")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    Network2D, NetworkVEM = import_reference(args.reference.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)

    cases = [
        # file stem, network class, unet, config, state dict as written by
        ("emdiffuse_n", Network2D, UNET_2D,
         reference_config("EMDiffuse-n", "models.EMDiffuse_network", "models.EMDiffuse_model",
                          UNET_2D),
         "Network"),
        ("vemdiffuse_i", NetworkVEM, UNET_VEM,
         reference_config("vEMDiffuse-i", "models.vEMDiffuse_network", "models.vEMDiffuse_model",
                          UNET_VEM, z_times=Z_TIMES, method="vEMDiffuse-i"),
         "Network_ema"),
    ]  # fmt: skip
    trajectories: list[torch.nn.Module] = []
    for stem, network_class, unet, config_text, label in cases:
        net = network_class(unet=dict(unet), beta_schedule={"train": TRAIN_SCHEDULE,
                            "test": TEST_SCHEDULE}, norm=True)  # fmt: skip
        randomize(net, generator)
        if label == "Network":
            # the trained network: the trainer set its schedule, so the buffers are saved too
            net.set_new_noise_schedule(phase="train")
        # the EMA copy of multi-GPU training never gets a schedule: weights only
        net.eval()
        state_dict = {key: value.cpu() for key, value in net.state_dict().items()}
        torch.save(state_dict, args.out / f"{stem}_{label}.pth")
        (args.out / f"{stem}.json").write_text(config_text)

        batch = 3
        x = torch.randn((batch, unet["in_channel"], 16, 16), generator=generator)
        gammas = torch.tensor([[0.9990], [0.5], [0.02]], dtype=torch.float32)  # (b, 1) as fed
        with torch.no_grad():
            if network_class is NetworkVEM:
                index = torch.arange(batch) % (Z_TIMES - 1)
                out = net.denoise_fn(x, gammas, index)
            else:
                index = torch.full((batch,), -1)
                out = net.denoise_fn(x, gammas)
        np.savez(
            args.out / f"{stem}_io.npz",
            x=x.numpy(),
            gammas=gammas.numpy(),
            index=index.numpy(),
            out=out.numpy(),
        )
        size = (args.out / f"{stem}_{label}.pth").stat().st_size
        print(f"{stem}: {len(state_dict)} entries, {size / 1024:.0f} KiB, "
              f"|out| max {out.abs().max():.3f}")  # fmt: skip
        if stem == "emdiffuse_n":  # after the io draws: the files above stay as they were
            trajectory_net = network_class(unet=dict(unet), beta_schedule={
                "train": TRAIN_SCHEDULE, "test": TEST_SCHEDULE}, norm=True)  # fmt: skip
            # as the reference's test phase loads netG (strict=False: the schedule buffers
            # of the file are dropped, then set_new_noise_schedule(phase="test") sets its own)
            missing, _ = trajectory_net.load_state_dict(state_dict, strict=False)
            assert not missing, missing
            trajectories.append(trajectory_net)
    # last, from the same generator: the files of the cases above do not change
    record_trajectory(trajectories[0], args.out, generator)
    print(f"reference commit {commit_of(args.reference)}, torch {torch.__version__}, "
          f"seed {args.seed}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
