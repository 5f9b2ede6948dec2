"""emdiffuse: diffusion models that enhance electron microscopy, chunked over OME-Zarr volumes.

The library logs on the ``emdiffuse`` loggers (``logging.getLogger(__name__)`` in each
module) and adds only a ``NullHandler``: the application decides what is shown. The
``emdiffuse`` command shows them on stderr (``--log-level``); :func:`enhance` shows its own
notes and warnings on stderr while the ``emdiffuse`` logger is left unconfigured.
"""

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("emdiffuse")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__", "enhance"]


def __getattr__(name: str):
    # Lazy: `import emdiffuse` (and the CLI's start) must not load torch or Dask, which
    # the pipeline imports; `emdiffuse.enhance` loads them on first use.
    if name == "enhance":
        from emdiffuse.pipeline.enhance import enhance

        return enhance
    raise AttributeError(name)
