"""The command's entry points and start-up: `python -m emdiffuse`, what `import emdiffuse` and
`emdiffuse --help` load (no torch, no Dask: both start in a fraction of a second), and the
one declaration of the enhance options shared with the workflow scripts."""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch

from emdiffuse import __version__
from emdiffuse._cli import enhance as enhance_cli
from emdiffuse.cli import build_parser
from emdiffuse.models.device import autocast_dtype
from emdiffuse.pipeline.settings import PRECISIONS, RunSettings

HEAVY = ("torch", "dask", "distributed", "zarr", "xarray")


def _loaded_after(code: str) -> set[str]:
    """The heavy libraries loaded by ``code`` in a fresh interpreter."""
    probe = f"import sys\n{code}\nprint('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.splitlines()[-1].split()[1:])


def test_python_dash_m_is_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "emdiffuse", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"emdiffuse {__version__}"
    done = subprocess.run(
        [sys.executable, "-m", "emdiffuse", "enhance", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "usage: emdiffuse enhance" in done.stdout, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "emdiffuse", "info", "/nonexistent/in.zarr"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("emdiffuse info: error:"), done.stderr


def test_import_and_help_load_neither_torch_nor_dask():
    assert _loaded_after("import emdiffuse") == set()
    help_all = (
        "from emdiffuse.cli import main\n"
        "for argv in (['--help'], ['enhance', '--help'], ['train', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass"
    )
    assert _loaded_after(help_all) == set()


def test_log_level_is_a_global_option():
    parser = build_parser()
    assert parser.parse_args(["info", "x"]).log_level == "info"
    assert parser.parse_args(["--log-level", "WARNING", "info", "x"]).log_level == "warning"
    assert build_parser().parse_args(["--log-level", "debug", "info", "x"]).command == "info"


def test_enhance_options_are_the_settings_with_their_defaults():
    parser = argparse.ArgumentParser()
    enhance_cli.add_arguments(parser)
    args = parser.parse_args(["in.zarr", "out.zarr", "--model", "m.safetensors"])
    assert enhance_cli.run_settings(args) == RunSettings()  # the same defaults, one record
    actions = {a.dest: a for a in parser._actions}
    assert list(actions["precision"].choices) == list(PRECISIONS)
    for name in PRECISIONS:  # each is one the Enhancer resolves (an unknown name raises)
        autocast_dtype(name, torch.device("cpu"))
    args = parser.parse_args(
        ["in.zarr", "out.zarr", "--model", "m", "--steps", "3", "--sampler", "ddim", "--tile", "32",
         "--chunks", "1,16,16", "--batch-size", "2", "--dtype", "float32"]
    )  # fmt: skip
    assert enhance_cli.run_settings(args) == RunSettings(
        steps=3, sampler="ddim", tile=32, chunks=(1, 16, 16), batch_size=2, dtype="float32"
    )


def test_workflow_scripts_take_the_enhance_options(repo_root):
    workflows = repo_root / "workflows"
    done = subprocess.run(
        [sys.executable, str(workflows / "denoise.py"), "--help"],
        capture_output=True, text=True, timeout=120, cwd=workflows,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    parser = argparse.ArgumentParser()
    enhance_cli.add_arguments(parser)
    for action in parser._actions:
        for option in action.option_strings:
            assert option in done.stdout, option
    assert "--log-level" in done.stdout
