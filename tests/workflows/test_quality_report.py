"""The quality report assembled from run folders (``results/quality/runs.json``): one section
per listed run, its figures linked into that run's folder, READING.md's guide before the
results and its session notes after; a broken list is one line and exit 2, nothing written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

RUNS = ("error_head/flyem", "error_head_isotropic/flyem")  # two committed FlyEM runs


def _report(repo_root, out):
    argv = [sys.executable, "benchmarks/quality/run.py", "--report-only", "--out", str(out)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=repo_root)


def _copy_runs(repo_root, out):
    committed = repo_root / "benchmarks" / "results" / "quality"
    for run in RUNS:
        (out / run).mkdir(parents=True)
        shutil.copy(committed / run / "quality.json", out / run / "quality.json")


def test_listed_runs_make_one_section_each_with_their_own_figures(repo_root, tmp_path):
    out = tmp_path / "report"
    _copy_runs(repo_root, out)
    (out / "runs.json").write_text(json.dumps({"runs": list(RUNS)}))
    done = _report(repo_root, out)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (out / "quality.md").read_text()
    titles = [line for line in text.splitlines() if line.startswith("## Real EM: FlyEM")]
    assert len(titles) == 2
    assert titles[0].endswith("denoise-dose8, denoise-dose2, super-resolve-k4")
    assert titles[1].endswith("isotropic-k4, isotropic-k8")
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert "error_head/flyem/denoise-dose8_panel.png" in figures
    assert "error_head_isotropic/flyem/isotropic-k4_panel.png" in figures
    assert all(f.startswith(RUNS) for f in figures)
    # the guide first, then the targets and results, then the session notes
    guide = text.index("## How to read this report")
    targets = text.index("## Targets (issue 14)")
    notes = text.index("# What each session measured")
    assert guide < targets < text.index(titles[0]) < text.index(titles[1]) < notes
    # the ranking target reads per voxel and per 16² block
    assert "✗ 16² block 0.47" in text and "✓ 16² block 0.55" in text


def test_a_listed_folder_without_results_is_one_line_and_exit_2(repo_root, tmp_path):
    out = tmp_path / "report"
    _copy_runs(repo_root, out)
    (out / "runs.json").write_text(json.dumps({"runs": [*RUNS, "gone/flyem"]}))
    done = _report(repo_root, out)
    assert done.returncode == 2
    assert "no quality.json in gone/flyem" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "quality.md").exists()
