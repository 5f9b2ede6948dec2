"""Write docs/synthetic.png: the synthetic EM volume and each task's degraded input.

python scripts/make_synthetic_figure.py [--out docs/synthetic.png] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from emdiffuse.training.degrade import (  # noqa: E402
    add_poisson_gaussian_noise,
    blur_downsample_xy,
    subsample_z,
)
from emdiffuse.training.synthetic import synthetic_block  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "synthetic.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dose", type=float, default=20.0)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--voxel-size", type=float, default=8.0)
    args = parser.parse_args()

    nz, n = 128, 384
    v, k = args.voxel_size, args.factor
    clean = synthetic_block((0, 0, 0), (nz, n, n), seed=args.seed, voxel_size=v)
    z = nz // 2
    noisy = add_poisson_gaussian_noise(
        clean[z : z + 1], dose=args.dose, seed=args.seed, origin=(z, 0, 0)
    )[0]
    low = blur_downsample_xy(clean[z], k)
    aniso = subsample_z(clean, k)
    y = n // 2
    zoom = (slice(n // 2 - 64, n // 2 + 64), slice(n // 2 - 64, n // 2 + 64))

    extent_xy = (0, n * v / 1000, n * v / 1000, 0)
    extent_xz = (0, n * v / 1000, nz * v / 1000, 0)
    panels = [
        (clean[z], f"clean (xy, {v:g} nm isotropic)", extent_xy),
        (noisy, f"noisy: Poisson-Gaussian, dose {args.dose:g} e-/voxel", extent_xy),
        (low, f"low-res: blur + {k}x downsampling in xy", extent_xy),
        (clean[:, y, :], "clean (xz)", extent_xz),
        (aniso[:, y, :], f"z-subsampled by {k} (xz, slab mean)", extent_xz),
        (clean[z][zoom], "clean, detail (xy, 128 x 128 voxels)", None),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13.5, 8.6), gridspec_kw={"height_ratios": [1.0, 0.62]})
    for ax, (image, title, extent) in zip(axes.ravel(), panels, strict=True):
        ax.imshow(
            image,
            cmap="gray",
            vmin=0,
            vmax=1,
            interpolation="nearest",
            extent=extent,
            aspect="equal",
        )
        ax.set_title(title, fontsize=10)
        if extent is None:
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.set_xlabel("x (um)", fontsize=8)
            ax.set_ylabel("z (um)" if "xz" in title else "y (um)", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"emdiffuse synthetic EM volume (seed {args.seed}) and task inputs", fontsize=12)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(
        f"wrote {args.out}  (clean stats: mean {np.mean(clean):.3f}, "
        f"dark fraction {np.mean(clean < 0.3):.3f})"
    )


if __name__ == "__main__":
    main()
