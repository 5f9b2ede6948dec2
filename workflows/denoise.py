"""Denoise an EM volume slice by slice (EMDiffuse-n).

Runs on any Dask cluster given its scheduler address, or on a LocalCluster without one::

    python workflows/denoise.py INPUT.ome.zarr OUTPUT.ome.zarr --model MODEL.safetensors \
        [--scheduler-address tcp://HOST:8786] [--steps 8 --samples 2]
"""

from _common import parser, run

if __name__ == "__main__":
    run(parser(__doc__.splitlines()[0]).parse_args())
