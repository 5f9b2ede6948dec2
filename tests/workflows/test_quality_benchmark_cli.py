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


def test_mean_recipe_refuses_missing_data_and_one_sample(repo_root, tmp_path):
    """mean_recipe.py: FlyEM missing in --flyem-dir, or --samples 1, is one line and exit 2,
    before anything is trained or written."""
    empty = tmp_path / "no_flyem"
    empty.mkdir()
    base = [sys.executable, "benchmarks/quality/mean_recipe.py", "--level", "denoise-dose8",
            "--variants", "{}", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "lines.jsonl")]  # fmt: skip
    for extra, said in (
        (["--flyem-dir", str(empty)], "missing in"),
        (["--flyem-dir", str(empty), "--samples", "1"], "--samples must be 0"),
    ):
        done = subprocess.run(base + extra, capture_output=True, text=True, timeout=300,
                              cwd=repo_root)  # fmt: skip
        assert done.returncode == 2, done.stderr[-2000:]
        assert said in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "lines.jsonl").exists()


def test_flyem_levels_read_the_folder_given(repo_root, tmp_path, monkeypatch):
    """flyem_levels(..., flyem_dir=D) takes both volumes from D: the test truth is D's
    sample2 (centre crop, the scored slices, grey / 255) and the training volume D's sample1."""
    import numpy as np
    import tifffile

    monkeypatch.syspath_prepend(str(repo_root / "benchmarks" / "quality"))
    from quality_data import flyem_levels

    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (40, 72, 72), dtype=np.uint8)
    test = rng.integers(0, 256, (30, 70, 70), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "training_sample1.tif", train)
    tifffile.imwrite(tmp_path / "training_sample2.tif", test)
    source, (level,), sizes = flyem_levels(["denoise-dose8"], quick=True, flyem_dir=tmp_path)
    clean = source.train_volume(sizes)
    np.testing.assert_array_equal(clean, train / np.float32(255))
    data = source.task_data(level, sizes, clean)
    zs = source.test_slices_z(sizes, test.shape[0])
    y0 = (70 - sizes.test_yx) // 2
    crop = test[zs, y0 : y0 + sizes.test_yx, y0 : y0 + sizes.test_yx]
    np.testing.assert_array_equal(data.truth, crop / np.float32(255))


def test_mean_recipe_enhances_a_z_context_variant_on_the_scored_slices_neighbours(
    repo_root, tmp_path, monkeypatch
):
    """mean_recipe.py's input for a variant reading z (z_context c) is each scored slice with
    its c noisy neighbours (the same keyed noise as the test input at the scored slices, the
    neighbours the noisy truth of the adjacent slices), not the scored slices alone, which lie
    apart in z; with no context it is the test input itself. A z_context variant on a level
    other than denoising is refused (one line, exit 2, nothing written)."""
    import numpy as np
    import tifffile

    from emdiffuse import io

    monkeypatch.syspath_prepend(str(repo_root / "benchmarks" / "quality"))
    from mean_recipe import scored_input
    from quality_data import flyem_levels

    rng = np.random.default_rng(0)
    tifffile.imwrite(
        tmp_path / "training_sample1.tif", rng.integers(0, 256, (40, 72, 72), dtype=np.uint8)
    )
    test = rng.integers(0, 256, (30, 70, 70), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "training_sample2.tif", test)
    source, (level,), sizes = flyem_levels(["denoise-dose8"], quick=True, flyem_dir=tmp_path)
    data = source.task_data(level, sizes, source.train_volume(sizes))
    plain = scored_input(source, data, sizes, 0, tmp_path)
    assert plain.scored is None
    np.testing.assert_array_equal(io.open_volume(plain.path).data.compute(), data.test_inputs[0])
    inp = scored_input(source, data, sizes, 1, tmp_path)
    volume = np.asarray(io.open_volume(inp.path).data.compute())
    n = len(data.test_inputs[0])
    assert volume.shape[0] == 3 * n and list(inp.scored) == [3 * i + 1 for i in range(n)]
    np.testing.assert_array_equal(volume[inp.scored], data.test_inputs[0])
    # the neighbours follow the truth of the adjacent slices, not of the next scored slice
    zs = source.test_slices_z(sizes, test.shape[0])
    y0 = (70 - sizes.test_yx) // 2
    box = (slice(y0, y0 + sizes.test_yx),) * 2
    for i, z in enumerate(zs):
        above = volume[3 * i].ravel()
        assert np.corrcoef(above, test[(z - 1, *box)].ravel())[0, 1] > 0.5
        assert np.corrcoef(above, test[(zs[(i + 1) % n], *box)].ravel())[0, 1] < 0.3

    out = tmp_path / "lines.jsonl"
    done = subprocess.run(
        [sys.executable, "benchmarks/quality/mean_recipe.py", "--level", "super-resolve-k4",
         "--variants", '{"z_context": 1}', "--flyem-dir", str(tmp_path), "--cache",
         str(tmp_path / "cache"), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=repo_root,
    )  # fmt: skip
    assert done.returncode == 2 and "denoise levels only" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists() and not out.exists()
