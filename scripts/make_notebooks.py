"""Writes the four task notebooks in workflows/ (run after editing the cells below).

Each notebook runs top to bottom on a CPU in a few minutes with tiny settings
(EMDIFFUSE_SMALL=1, the default): synthetic data, a short training run, enhancement on a
LocalCluster (the dashboard link is printed and the run's plan logged), pictures inline and
PSNR/SSIM against the truth.
Set EMDIFFUSE_SMALL=0 for bigger volumes and longer training.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SETUP = """\
import logging
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from distributed import Client, LocalCluster

import emdiffuse
from emdiffuse import io, metrics
from emdiffuse.training import {modules}
from emdiffuse.training.trainer import train

# emdiffuse logs what a run does (its plan, warnings): show it here as plain lines
logging.basicConfig(format="%(message)s")
logging.getLogger("emdiffuse").setLevel(logging.INFO)

SMALL = os.environ.get("EMDIFFUSE_SMALL", "1") == "1"
WORK = Path(os.environ.get("EMDIFFUSE_WORKDIR") or tempfile.mkdtemp(prefix="emdiffuse-nb-"))
TRAIN_SECONDS = 12 if SMALL else 300
CALIBRATION_PATCHES = 8 if SMALL else 32  # held-out patches the sample spread is calibrated on
print("working in", WORK)"""

CLUSTER = """\
cluster = LocalCluster(n_workers=2, threads_per_worker=1)
client = Client(cluster)
print("Dask dashboard:", client.dashboard_link)"""

SHOW = """\
def show(images, titles, cmap="gray"):
    fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.4))
    for ax, image, title in zip(axes, images, titles, strict=True):
        ax.imshow(image, cmap=cmap)
        ax.set_title(title)
        ax.axis("off")
    plt.tight_layout()
    plt.show()"""

# How both isotropic notebooks enhance, look (xz views) and measure.
ISOTROPIC_RESULT = {
    "input": "anisotropic.ome.zarr",
    "compare": "out.shape[0] == (degraded.shape[0] - 1) * k + 1",
    "slice": "y = truth.shape[1] // 2\nshow([truth[:, y], np.repeat(degraded[:, y], k, axis=0), "
    "out[:, y], std[:, y]], ['truth (xz)', 'input, slices repeated', 'enhanced (xz)', "
    "'uncertainty'])",
    "metric": "n = min(len(out), len(truth))\nprint(f'PSNR enhanced vs truth: "
    "{metrics.psnr(out[:n], truth[:n]):.2f} dB')",
}

TASKS = {
    "denoise": {
        "title": "Denoising (EMDiffuse-n)",
        "intro": "A noisy volume at a low electron dose is denoised slice by slice. The model "
        "learns from aligned noisy/clean pairs.",
        "data": """\
shape = (8, 128, 128) if SMALL else (32, 512, 512)
clean = synthetic.synthetic_volume(shape, seed=0)
noisy = degrade.noise_volume(clean, dose=10, seed=1)
io.write_image(clean, WORK / "clean.ome.zarr", voxel_size=(8, 8, 8), overwrite=True)
io.write_image(noisy, WORK / "noisy.ome.zarr", voxel_size=(8, 8, 8), overwrite=True)
truth = io.open_volume(WORK / "clean.ome.zarr").data.compute()
degraded = io.open_volume(WORK / "noisy.ome.zarr").data.compute()""",
        "train": """\
model = train("denoise", [str(WORK / "noisy.ome.zarr"), str(WORK / "clean.ome.zarr")], WORK / "model",
              steps=10_000, time_limit=TRAIN_SECONDS, calibration_patches=CALIBRATION_PATCHES,
              patch=48, region=64, batch_size=4, val_every=10_000,
              ckpt_every=10_000, overwrite=True, progress=False)
print("model:", model)""",
        "input": "noisy.ome.zarr",
        "compare": "truth.shape == out.shape",
        "slice": "z = truth.shape[0] // 2\nprint('noise removed:', float(np.std(degraded[z] - out[z])))\n"
        "show([truth[z], degraded[z], out[z], std[z]], "
        "['clean (truth)', 'noisy input', 'enhanced', 'uncertainty'])",
        "metric": "print(f'PSNR noisy {metrics.psnr(degraded, truth):.2f} dB -> enhanced "
        "{metrics.psnr(out, truth):.2f} dB')\nprint(f'SSIM noisy {metrics.ssim(degraded, truth):.3f}"
        " -> enhanced {metrics.ssim(out, truth):.3f}')",
    },
    "super_resolution": {
        "title": "Super-resolution (EMDiffuse-r)",
        "intro": "A volume imaged at 2x coarser pixels in y and x is brought back to the fine "
        "grid. The model learns from high-resolution data (the low-resolution input is made by "
        "blur and downsampling).",
        "data": """\
k = 2
shape = (8, 128, 128) if SMALL else (32, 512, 512)
clean = synthetic.synthetic_volume(shape, seed=0)
low = degrade.blur_downsample_volume(clean, k)
io.write_image(clean, WORK / "clean.ome.zarr", voxel_size=(8, 8, 8), overwrite=True)
io.write_image(low, WORK / "lowres.ome.zarr", voxel_size=(8, 8 * k, 8 * k), overwrite=True)
truth = io.open_volume(WORK / "clean.ome.zarr").data.compute()
degraded = io.open_volume(WORK / "lowres.ome.zarr").data.compute()""",
        "train": """\
model = train("super-resolve", [str(WORK / "clean.ome.zarr")], WORK / "model", factor=k,
              steps=10_000, time_limit=TRAIN_SECONDS, calibration_patches=CALIBRATION_PATCHES,
              patch=32, region=64, batch_size=4, val_every=10_000,
              ckpt_every=10_000, overwrite=True, progress=False)
print("model:", model)""",
        "input": "lowres.ome.zarr",
        "compare": "truth.shape == out.shape",
        "slice": "z = truth.shape[0] // 2\nshow([truth[z], np.kron(degraded[z], np.ones((k, k))), "
        "out[z], std[z]], ['truth', 'low-res input (nearest)', 'enhanced', 'uncertainty'])",
        "metric": "from skimage.transform import resize\n\nbicubic = resize(degraded, truth.shape, "
        "order=3)\nprint(f'PSNR bicubic {metrics.psnr(bicubic, truth):.2f} dB -> enhanced "
        "{metrics.psnr(out, truth):.2f} dB')",
    },
    "isotropic_with_isotropic_data": {
        "title": "Isotropic reconstruction, trained on isotropic data (vEMDiffuse-i)",
        "modules": "synthetic",
        "intro": "An anisotropic volume (z step 4x the xy pixel) gets 4x more z-slices. The "
        "model learns from an isotropic volume (e.g. FIB-SEM of similar tissue): two slices k "
        "apart condition the k-1 slices between.",
        "data": """\
k = 4
shape = (33, 96, 96) if SMALL else (129, 384, 384)
iso = synthetic.synthetic_volume(shape, seed=0)
io.write_image(iso, WORK / "isotropic_training.ome.zarr", voxel_size=(8, 8, 8), overwrite=True)
# held out: another region of the same kind of tissue
truth_full = synthetic.synthetic_volume(shape, seed=0, origin=(0, 5000, 5000)).compute()
aniso = truth_full[::k]   # the slices an anisotropic acquisition keeps
io.write_image(aniso, WORK / "anisotropic.ome.zarr", voxel_size=(8 * k, 8, 8), overwrite=True)
truth = truth_full[: (aniso.shape[0] - 1) * k + 1]
degraded = aniso""",
        "train": """\
model = train("isotropic", [str(WORK / "isotropic_training.ome.zarr")], WORK / "model", factor=k,
              steps=10_000, time_limit=TRAIN_SECONDS, calibration_patches=CALIBRATION_PATCHES,
              patch=32, region=64, batch_size=4, val_every=10_000,
              ckpt_every=10_000, overwrite=True, progress=False)
print("model:", model)""",
        **ISOTROPIC_RESULT,
    },
    "isotropic_without_isotropic_data": {
        "title": "Isotropic reconstruction without isotropic data (vEMDiffuse-a)",
        "modules": "synthetic",
        "intro": "No isotropic volume is needed: inside each xy plane, rows k pixels apart play "
        "the two bounding slices and the rows between are the targets (xy is isotropic, so y "
        "stands in for z). The model is trained on the anisotropic volume itself.",
        "data": """\
k = 4
shape = (33, 96, 96) if SMALL else (129, 384, 384)
shape = (129, 96, 96) if SMALL else (257, 384, 384)  # the xz plane must hold a training patch
truth_full = synthetic.synthetic_volume(shape, seed=0).compute()
aniso = truth_full[::k]
io.write_image(aniso, WORK / "anisotropic.ome.zarr", voxel_size=(8 * k, 8, 8), overwrite=True)
truth = truth_full[: (aniso.shape[0] - 1) * k + 1]
degraded = aniso""",
        "train": """\
model = train("anisotropic", [str(WORK / "anisotropic.ome.zarr")], WORK / "model", factor=k,
              steps=10_000, time_limit=TRAIN_SECONDS, calibration_patches=CALIBRATION_PATCHES,
              patch=32, region=48, batch_size=4,
              val_every=10_000, ckpt_every=10_000, overwrite=True, progress=False)
print("model:", model)""",
        **ISOTROPIC_RESULT,
    },
}


def notebook(task: dict) -> nbformat.NotebookNode:
    enhance = (
        f"result = emdiffuse.enhance(str(WORK / {task['input']!r}), str(model), "
        "str(WORK / 'enhanced.ome.zarr'),\n"
        "                           steps=4, samples=2, client=client, overwrite=True, "
        "dtype='float32')\n"
        "out = result.values\n"
        "std = io.open_volume(WORK / 'enhanced.ome.zarr' / 'uncertainty').data.compute()\n"
        f"assert {task['compare']}, (out.shape, truth.shape)\n"
        "print(result)"
    )
    cells = [
        new_markdown_cell(f"# {task['title']}\n\n{task['intro']}\n\nTiny settings by default "
                          "(`EMDIFFUSE_SMALL=1`) so the notebook runs on a laptop CPU in minutes."),
        new_code_cell(SETUP.format(modules=task.get("modules", "degrade, synthetic"))),
        new_markdown_cell("## Data\nSynthetic EM-like volumes with known ground truth."),
        new_code_cell(task["data"]),
        new_markdown_cell("## Train a tiny model\nA real training run, cut short by a time limit."),
        new_code_cell(task["train"]),
        new_markdown_cell("## Enhance on a Dask cluster\nOpen the dashboard link to watch the tasks. "
                          "`samples=2` writes the mean of two samples and the `uncertainty` "
                          "image; `samples=0` gives the posterior mean only (one network "
                          "evaluation per tile, the fastest), `samples=1` one sample."),
        new_code_cell(CLUSTER),
        new_code_cell(enhance),
        new_markdown_cell("## Look and measure"),
        new_code_cell(SHOW),
        new_code_cell(task["slice"]),
        new_code_cell(task["metric"]),
        new_code_cell("client.close()\ncluster.close()\nprint('view in neuroglancer: emdiffuse "
                      "view', WORK / 'enhanced.ome.zarr')"),
    ]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def main() -> None:
    folder = Path(__file__).resolve().parent.parent / "workflows"
    for name, task in TASKS.items():
        nbformat.write(notebook(task), folder / f"{name}.ipynb")
        print("wrote", folder / f"{name}.ipynb")


if __name__ == "__main__":
    main()
