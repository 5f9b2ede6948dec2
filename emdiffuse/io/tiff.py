"""Read TIFF stacks by tifffile's own reading: its series (ImageJ, OME, shaped, generic)
with axes, read lazily page by page through tifffile's zarr store.

A truncated or corrupt file is an InputError (tifffile only logs a warning and reads on);
colour and real channel / time axes are reported as the OME-Zarr reader reports them.
Voxel sizes come from OME-XML, ImageJ metadata or resolution tags.
"""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ET

import dask.array as da
import tifffile
import zarr

from emdiffuse.errors import InputError
from emdiffuse.io.damaged import CheckedArray
from emdiffuse.io.image import RawImage, nm_per_unit
from emdiffuse.io.paths import local_path

# A pixel coarser than this from bare TIFF resolution tags is a writer's print default
# (72, 100, 300 dpi), not a microscope's: treated as unknown.
_PRINT_RESOLUTION_NM = 10_000.0


@contextlib.contextmanager
def _tifffile_log():
    """Collect what tifffile logs while parsing: it reports a damaged file as a warning and
    reads on (a truncated stack becomes fewer pages), so a warning here is a damaged file."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(" ".join(record.getMessage().split()))

    logger = logging.getLogger("tifffile")
    handler, propagate = Collect(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def open_tiff(path: str) -> RawImage:
    """A TIFF by tifffile's own reading: its series (ImageJ, OME, shaped, generic) with axes,
    read lazily page by page (tifffile's zarr store); a damaged file is an InputError."""
    damaged = f"{path} is a truncated or corrupt TIFF"
    with _tifffile_log() as log:
        try:
            tif = tifffile.TiffFile(str(local_path(path)))
        except Exception as error:
            raise InputError(f"{damaged} ({' '.join(str(error).split())})") from None
        with tif:
            try:
                series = _tiff_series(tif, path)
                _check_tiff_extent(tif, series, damaged)
                store = series.aszarr(level=0)
                voxel = _tiff_voxel_size(tif, series)
            except Exception as error:
                if log or not isinstance(error, InputError):
                    reason = log[0] if log else " ".join(f"{type(error).__name__}: {error}".split())
                    raise InputError(f"{damaged} ({reason})") from None
                raise
            if log:
                raise InputError(f"{damaged} (tifffile: {log[0]})")
            photometric = int(series.keyframe.photometric)
    array = CheckedArray.wrap(zarr.open(store, mode="r"), path, show_keys=False)
    return _tiff_image(path, da.from_zarr(array), series.axes, photometric, voxel)


def _tiff_series(tif, path: str):
    """The file's one image series; a stack written page by page (one series per page, as
    tifffile's ``contiguous=False`` writes) becomes one series of those pages."""
    series = tif.series
    if not series:
        raise InputError(f"{path} is a truncated or corrupt TIFF (it holds no image)")
    if len(series) == 1:
        return series[0]
    first = series[0]
    if all(
        s.kind in ("shaped", "generic", "uniform")
        and len(s.pages) == 1
        and (s.shape, s.dtype, s.axes) == (first.shape, first.dtype, first.axes)
        for s in series
    ):
        pages = [s.pages[0] for s in series]
        shape = (len(series), *first.shape)
        return tifffile.TiffPageSeries(pages, shape, first.dtype, "I" + first.axes, parent=tif, kind="generic")
    kinds = ", ".join(sorted({f"{s.shape} {s.dtype}" for s in series}))
    raise InputError(
        f"{path} holds {len(series)} images ({kinds}), not one stack of equal pages; "
        "save one stack (or one image) per file"
    )


def _check_tiff_extent(tif, series, damaged: str) -> None:
    """Refuse pages that are missing or whose data run past the end of the file."""
    size = tif.filehandle.size
    pages = list(series.pages)
    if series.dataoffset is not None:  # contiguous: one block of known length
        end = series.dataoffset + series.nbytes
    else:
        end = max(
            (o + n for p in pages if p is not None for o, n in zip(p.dataoffsets, p.databytecounts, strict=False)),
            default=0,
        )
    if any(p is None for p in pages):
        raise InputError(f"{damaged} (pages are missing)")
    if end > size:
        raise InputError(f"{damaged} (its image data need {end} bytes, the file has {size})")


_TIFF_AXIS_NAMES = {"C": "channel", "T": "time", "S": "sample", "E": "lambda", "R": "tile", "H": "lifetime"}
_COLOUR = {2: "an RGB colour", 3: "a palette (indexed colour)", 5: "a CMYK colour", 6: "a YCbCr (RGB) colour"}


def _tiff_image(path: str, data: da.Array, axes: str, photometric: int, voxel: dict) -> RawImage:
    """Keep y, x and z (Z; or I, Q: a sequence of pages) of a tifffile series; refuse colour
    and real channel/time axes as the OME-Zarr path does; drop other singleton axes."""
    sizes = dict(zip(axes, data.shape, strict=True))
    problem = None
    if photometric in _COLOUR or sizes.get("S", 1) > 1:
        what = _COLOUR.get(photometric, "a multi-sample")
        planar = " (tifffile.imwrite writes 3 or 4 planes as RGB unless given photometric='minisblack')"
        problem = (
            f"{path} is {what} image ({sizes.get('S', 1)} samples per pixel, TIFF axes {axes}); "
            "EM input is one grey value per voxel: convert it to grey (8 or 16 bit) first"
            + (planar if axes.startswith("S") else "")
        )
    keep = [i for i, a in enumerate(axes) if a in "ZYX" or (a in "IQ" and data.shape[i] > 1)]
    for i, a in enumerate(axes):
        if i not in keep and data.shape[i] > 1 and problem is None:
            problem = (
                f"{path} has a {_TIFF_AXIS_NAMES.get(a, 'non-spatial')} axis ({a}) of size "
                f"{data.shape[i]} (TIFF axes {axes}); split it into one image per channel/time "
                "point first (z-slices are ImageJ axes ZYX: tifffile metadata={'axes': 'ZYX'})"
            )
    if problem is not None:
        spatial = [a.lower() for a in axes if a in "ZYX"]
        return RawImage(data, axes.lower(), [voxel.get(a) for a in spatial], [0.0] * len(spatial), problem)
    stacking = sum(axes[i] in "ZIQ" for i in keep)
    names = "".join("z" if axes[i] in "ZIQ" and stacking == 1 else axes[i].lower() for i in keep)
    data = data[tuple(slice(None) if i in keep else 0 for i in range(data.ndim))]
    known = [a for a in "zyx" if a in voxel]
    why = f"it records a pixel size for {', '.join(known)} only" if known else "it records no pixel size"
    return RawImage(data, names, [voxel.get(a) for a in names], [0.0] * len(keep), None, why)


def _tiff_voxel_size(tif, series) -> dict[str, float]:
    """nm per voxel by axis (z, y, x) from OME-XML ``PhysicalSize*``, ImageJ ``unit`` and
    ``spacing``, or resolution tags in cm / inch; absent axes are unknown."""
    if tif.is_ome and tif.ome_metadata:
        return _ome_tiff_sizes(tif.ome_metadata)
    page = series.keyframe
    tags = page.tags
    ij = tif.imagej_metadata or {}
    if ij and nm_per_unit(ij.get("unit")):
        factor = nm_per_unit(ij.get("unit"))
        sizes = _per_pixel(tags, factor)
        if float(ij.get("spacing", 0) or 0) > 0:
            sizes["z"] = float(ij["spacing"]) * factor
        return sizes
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    factor = {2: 2.54e7, 3: 1e7}.get(unit)  # inch, centimetre (1: none)
    sizes = _per_pixel(tags, factor) if factor else {}
    return {a: v for a, v in sizes.items() if v <= _PRINT_RESOLUTION_NM}


def _per_pixel(tags, factor: float) -> dict[str, float]:
    """nm per pixel along y and x from the X/YResolution tags (pixels per unit)."""
    sizes = {}
    for axis, name in (("x", "XResolution"), ("y", "YResolution")):
        if name in tags:
            numerator, denominator = tags[name].value
            if numerator > 0 and denominator > 0:
                sizes[axis] = factor * denominator / numerator
    return sizes


def _ome_tiff_sizes(xml: str) -> dict[str, float]:
    """``PhysicalSizeX/Y/Z`` of the first OME image (the one read), in nm (default unit µm)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    pixels = [e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return {}
    element = pixels[0]
    sizes = {}
    for axis in "zyx":
        value = element.get(f"PhysicalSize{axis.upper()}")
        factor = nm_per_unit(element.get(f"PhysicalSize{axis.upper()}Unit", "µm"))
        try:
            if value is not None and factor is not None and float(value) > 0:
                sizes[axis] = float(value) * factor
        except ValueError:
            continue
    return sizes
