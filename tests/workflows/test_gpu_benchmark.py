"""benchmarks/gpu.py runs unchanged on a CPU at its smoke size, as a user runs it: a
subprocess from the repository root, writing its JSON and table to ``--out``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def smoke(repo_root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-smoke")
    argv = [sys.executable, "benchmarks/gpu.py", "--smoke", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=repo_root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "gpu_smoke.md").read_text().startswith("# GPU benchmark (smoke)")
    return json.loads((out / "gpu_smoke.json").read_text())


def test_records_what_ran_where(smoke):
    assert smoke["smoke"] is True and smoke["device"] == "cpu"
    assert {"command", "machine", "versions", "git", "utc"} <= set(smoke["provenance"])
    model = smoke["model"]
    assert model["size"] == "tiny" and model["parameters"] > 0
    assert model["flops_per_evaluation"] > 0  # FlopCounterMode counted the convolutions
    # no device FLOP limit on a CPU: the fraction is null, not a made-up number
    assert smoke["peak"]["tflops"] is None
    assert all(r.get("flop_fraction") is None for r in smoke["network"])


def test_every_combination_is_timed_or_skipped_with_a_reason(smoke):
    rows = smoke["network"]
    combos = {(r["precision"], r["compile"], r["channels_last"]) for r in rows}
    assert combos == {(p, c, cl) for p in ("fp32", "bf16") for c in (False, True)
                      for cl in (False, True)}  # fmt: skip
    for row in rows:
        if row["status"] == "ok":
            assert row["batch_size"] in (1, 2)
            assert row["evaluations_per_s"] > 0 and row["batches_timed"] >= 1
            assert row["mvoxel_per_s_at_8_nfe"] == pytest.approx(
                row["evaluations_per_s"] * 32 * 32 / 8 / 1e6
            )
            assert row["peak_memory_bytes"] is None  # CPU: no device memory
        else:
            assert row["status"] == "skipped" and row["reason"]
    # on a CPU compile is skipped by default; the eager combinations all ran at both sizes
    eager = [r for r in rows if not r["compile"]]
    assert {(r["precision"], r["channels_last"], r["batch_size"]) for r in eager} == {
        (p, cl, b) for p in ("fp32", "bf16") for cl in (False, True) for b in (1, 2)
    }
    assert all(r["status"] == "ok" for r in eager)


def test_speed_options_are_checked_against_fp32(smoke):
    checks = {(c["precision"], c["compile"], c["channels_last"]): c for c in smoke["checks"]}
    assert checks[("fp32", False, False)]["max_abs_diff"] == 0.0  # the reference itself
    for key, check in checks.items():
        assert check["tolerance"] == smoke["tolerance"][key[0]]
        assert check["passed"] == (check["max_abs_diff"] <= check["tolerance"])
    # bf16 really changes the arithmetic (the network's output is not all zeros) and stays
    # within its stated tolerance
    assert 0.0 < checks[("bf16", False, False)]["max_abs_diff"] <= smoke["tolerance"]["bf16"]
    assert checks[("fp32", False, True)]["passed"]


def test_the_full_pipeline_ran_at_8_nfe(smoke):
    rows = smoke["pipeline"]
    assert [p["chunks_per_task"] for p in rows] == [1, [2, 2, 2]]
    assert not any(p["compile"] for p in rows)  # compile is timed on CUDA or with --compile on
    # the larger task changes nothing: the output is the first row's
    assert rows[0]["max_abs_diff_to_first"] is None and rows[1]["max_abs_diff_to_first"] == 0.0
    for p in rows:
        assert p["steps"] == smoke["nfe"] == 8 and p["sampler"] == "dpmpp_2m"
        assert p["output_voxels"] == 64 * 64 and p["mvoxel_per_s"] > 0
        assert p["worker_peak_memory_bytes"] is None
        stages = p["worker_stage_seconds"]
        assert stages["network"] > 0 and stages["tile_task"] >= stages["network"]
