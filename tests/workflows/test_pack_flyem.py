"""benchmarks/quality/pack_flyem.py: the FlyEM volumes packed to travel to a GPU machine.

Random uint8 volumes of FlyEM's shape stand in for the two real ones (tests never need the
shared data). The packed copy must give every level the same training and test arrays, and
the check must notice when it does not.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import tifffile


def _load(repo_root, name):
    folder = repo_root / "benchmarks" / "quality"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # pack_flyem imports quality_data as its folder's own
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def packed(repo_root, tmp_path_factory):
    pack = _load(repo_root, "pack_flyem")
    src, dst = tmp_path_factory.mktemp("flyem"), tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(0)
    for name in ("training_sample1.tif", "training_sample2.tif"):
        tifffile.imwrite(src / name, rng.integers(0, 256, (250, 250, 250), dtype=np.uint8))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert pack.main(["--src", str(src), "--dst", str(dst)]) == 0
    return pack, src, dst, before


def test_packed_copy_keeps_every_level_and_only_the_scored_voxels(packed):
    pack, src, dst, before = packed
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # originals untouched
    original = pack.FlyEM(src)
    assert pack.same_task_data(original, pack.FlyEM(dst)) == []
    train = tifffile.imread(dst / "training_sample1.tif")
    assert np.array_equal(train, tifffile.imread(src / "training_sample1.tif"))
    sparse = tifffile.imread(dst / "training_sample2.tif")
    kept = pack.scored_slices(original, 250)
    dropped = sorted(set(range(250)) - set(kept))
    assert dropped and not sparse[dropped].any()  # the unscored slices are zero
    assert sparse.shape == (250, 250, 250) and sparse[kept].any()


def test_the_check_names_the_levels_a_bad_copy_changes(packed, tmp_path):
    pack, src, dst, _ = packed
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "training_sample1.tif").write_bytes((dst / "training_sample1.tif").read_bytes())
    sparse = tifffile.imread(dst / "training_sample2.tif")
    original = pack.FlyEM(src)
    kept = pack.scored_slices(original, 250)
    sparse[kept[len(kept) // 2]] = 0  # one slice of the isotropic intervals lost
    tifffile.imwrite(bad / "training_sample2.tif", sparse)
    differ = pack.same_task_data(original, pack.FlyEM(bad))
    assert "isotropic-k8" in differ and not any(k.startswith("denoise") for k in differ)


def test_packing_onto_the_originals_is_refused(repo_root, tmp_path, capsys):
    pack = _load(repo_root, "pack_flyem")
    with pytest.raises(SystemExit) as stop:
        pack.main(["--src", str(tmp_path), "--dst", str(tmp_path)])
    assert stop.value.code == 2
    assert "--dst must differ from --src" in capsys.readouterr().err
