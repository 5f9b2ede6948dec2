"""Pack the FlyEM volumes small enough to travel to a GPU machine (64 MiB working tree).

The training volume is recompressed losslessly (zlib with a horizontal predictor); the test
volume keeps only the voxels some level scores (the centre crop of the denoising and
super-resolution slices and of the isotropic intervals), the rest zero, at its full shape so
every crop lands where it did. The packed copy is then checked: for every FlyEM level the
training and test arrays equal those of the original, or the script fails.

    python benchmarks/quality/pack_flyem.py --dst .flyem [--src ../shared/data/flyem_fibsem]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile
from quality_data import FLYEM_DIR, FlyEM

COMPRESSION = {"compression": "zlib", "compressionargs": {"level": 9}, "predictor": True}


def scored_slices(source: FlyEM, n_z: int) -> list[int]:
    """The z of ``training_sample2`` that some level reads (zyx order, full sizes)."""
    sizes = source.full
    keep = set(source.test_slices_z(sizes, n_z).tolist())
    for level in source.levels:
        if level.task == "isotropic":
            n = sizes.test_intervals * level.factor + 1
            z0 = (n_z - n) // 2
            keep.update(range(z0, z0 + n))
    return sorted(keep)


def sparse_test_volume(source: FlyEM, test: np.ndarray) -> np.ndarray:
    """``test`` with only the scored voxels kept, zero elsewhere."""
    sizes = source.full
    y0, x0 = source._test_box(sizes, test.shape)
    s = sizes.test_yx
    zs = scored_slices(source, test.shape[0])
    sparse = np.zeros_like(test)
    sparse[zs, y0 : y0 + s, x0 : x0 + s] = test[zs, y0 : y0 + s, x0 : x0 + s]
    return sparse


def same_task_data(original: FlyEM, packed: FlyEM) -> list[str]:
    """The levels whose training or test arrays differ between the two copies."""
    sizes = original.full
    clean = original.train_volume(sizes)
    differ = [] if np.array_equal(clean, packed.train_volume(sizes)) else ["training volume"]
    for level in original.levels:
        a, b = original.task_data(level, sizes, clean), packed.task_data(level, sizes, clean)
        arrays = [(a.truth, b.truth), *zip(a.test_inputs, b.test_inputs, strict=True)]
        arrays += [(a.train[k], b.train[k]) for k in a.train]
        if not all(np.array_equal(x, y) for x, y in arrays):
            differ.append(level.key)
    return differ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=FLYEM_DIR, help="the original volumes' folder")
    p.add_argument("--dst", type=Path, required=True, help="where the packed copy goes")
    args = p.parse_args(argv)
    if args.dst.resolve() == args.src.resolve():
        p.error("--dst must differ from --src: the originals are never rewritten")
    original = FlyEM(args.src)
    if (missing := original.available()) is not None:
        p.error(missing)
    args.dst.mkdir(parents=True, exist_ok=True)
    train = tifffile.imread(args.src / original.train_file)
    test = tifffile.imread(args.src / original.test_file)
    tifffile.imwrite(args.dst / original.train_file, train, **COMPRESSION)
    tifffile.imwrite(args.dst / original.test_file, sparse_test_volume(original, test),
                     **COMPRESSION)  # fmt: skip
    differ = same_task_data(original, FlyEM(args.dst))
    if differ:
        raise SystemExit(f"the packed copy differs at: {', '.join(differ)}")
    for name in (original.train_file, original.test_file):
        before, after = (args.src / name).stat().st_size, (args.dst / name).stat().st_size
        print(f"{name}: {before / 1e6:.1f} -> {after / 1e6:.1f} MB")
    print("every level's training and test arrays are identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
