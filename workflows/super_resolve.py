"""Super-resolve an EM volume k-fold in y and x (EMDiffuse-r).

Runs on any Dask cluster given its scheduler address, or on a LocalCluster without one::

    python workflows/super_resolve.py INPUT.ome.zarr OUTPUT.ome.zarr --model MODEL.safetensors \
        [--scheduler-address tcp://HOST:8786] [--samples 2]

``--samples 0`` writes the posterior mean only (one network evaluation per tile, the
fastest); ``1`` one sample; ``N >= 2`` the mean of N samples and the uncertainty image.
"""

from _common import parser, run

if __name__ == "__main__":
    run(parser(__doc__.splitlines()[0]).parse_args())
