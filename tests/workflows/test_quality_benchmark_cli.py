"""benchmarks/quality/run.py as a user runs it, where the real EM is missing: it says so and
exits 2 without a traceback, and writes no results folder."""

from __future__ import annotations

import subprocess
import sys


def test_no_runnable_source_exits_2_and_writes_nothing(repo_root, tmp_path):
    empty = tmp_path / "no_flyem"
    empty.mkdir()
    out = tmp_path / "results"
    argv = [sys.executable, "benchmarks/quality/run.py", "--source", "flyem", "--flyem-dir",
            str(empty), "--out", str(out), "--cache", str(tmp_path / "cache"), "--quick"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "flyem: skipped (missing in" in done.stdout
    assert "no source could run" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
