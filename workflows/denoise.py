"""Denoise an EM volume slice by slice (EMDiffuse-n).

Runs on any Dask cluster given its scheduler address, or on a LocalCluster without one::

    python workflows/denoise.py INPUT.ome.zarr OUTPUT.ome.zarr --model MODEL.safetensors \
        [--scheduler-address tcp://HOST:8786] [--samples 2]

``--samples 0`` writes the posterior mean only (one network evaluation per tile, the
fastest); ``1`` one sample; ``N >= 2`` the mean of N samples and the uncertainty image.
A model trained with ``--z-context C`` also reads the C noisy slices on each side of every
slice it denoises: give it the whole stack.
"""

from _common import parser, run

if __name__ == "__main__":
    run(parser(__doc__.splitlines()[0]).parse_args())
