"""emdiffuse: diffusion models that enhance electron microscopy, chunked over OME-Zarr volumes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("emdiffuse")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__", "enhance"]


def __getattr__(name: str):
    # Lazy so `import emdiffuse` stays cheap and `emdiffuse.models` never pulls in Dask.
    if name == "enhance":
        from emdiffuse.pipeline.enhance import enhance

        return enhance
    raise AttributeError(name)
