"""Read throughput of every input format against OME-Zarr, read the way the pipeline reads.

Writes one synthetic EM volume (64×1024×1024 uint8, ``emdiffuse.training.synthetic``) in each
format with the format's own library — OME-Zarr (emdiffuse's writer: zarr v3, zstd), HDF5
(h5py, gzip), N5 (tensorstore, gzip), neuroglancer precomputed (tensorstore; raw and jpeg
encodings) and MRC (mrcfile, uncompressed) — all chunked 16×256×256 where the format has
chunks. Then, for each format, in alternating order over ``--repeats`` rounds:

* **regions**: the reads of one enhancement run's tasks — every 4×512×512 output region with
  32 voxels of xy context on each side (clipped at the borders), read one after the other
  through the array the pipeline's tasks slice (``io.regions.backing_array``: the zarr
  array, or the format's region reader), as one worker does;
* **dask**: the whole volume through its lazy dask array on the threaded scheduler (what
  ``convert`` reads), 2 threads.

Throughput is MB/s of voxels delivered (context included for regions; 1 MB = 10^6 bytes); the
median over the rounds is reported, with the ratio to OME-Zarr of the same round. The files
are read from the page cache (they were just written): this measures decoding and the
readers' overhead, not the disk. ``--http`` also reads the N5 and precomputed copies through
a local HTTP server on 127.0.0.1 (tensorstore's http key-value store).

    python benchmarks/read_throughput.py [--shape 64,1024,1024] [--repeats 3] [--http]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import dask
import numpy as np
from provenance import load_average, provenance

RESULTS = Path(__file__).parent / "results" / "read_throughput.json"
CHUNKS = (16, 256, 256)
REGION = (4, 512, 512)
CONTEXT = 32


def _volume(shape) -> np.ndarray:
    from emdiffuse.training.synthetic import synthetic_volume

    data = synthetic_volume(shape, seed=0, chunks=(16, 512, 512))
    return (data.clip(0, 1) * 255).astype(np.uint8).compute(scheduler="threads")


def _folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_all(root: Path, data: np.ndarray) -> dict[str, dict]:
    """Each format's copy of ``data``: {name: {"path", "codec", "chunks", "file"}}."""
    import h5py
    import mrcfile
    import tensorstore as ts

    from emdiffuse.io import write_image

    voxel = (8.0, 8.0, 8.0)
    out = {}
    path = root / "volume.ome.zarr"
    write_image(data, path, voxel_size=voxel, chunks=CHUNKS, levels=0)
    out["OME-Zarr"] = {"path": str(path), "codec": "zstd (zarr v3 default)", "file": path}

    path = root / "volume.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("raw", data=data, chunks=CHUNKS, compression="gzip", compression_opts=4)
        d.attrs["resolution"] = voxel
    out["HDF5"] = {"path": f"{path}:/raw", "codec": "gzip 4", "file": path}

    path = root / "volume.n5"
    store = ts.open({
        "driver": "n5", "kvstore": {"driver": "file", "path": str(path / "s0")},
        "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": list(CHUNKS[::-1]),
                     "dataType": "uint8", "compression": {"type": "gzip", "level": 4}},
        "create": True, "delete_existing": True,
    }).result()  # fmt: skip
    store.write(data.T).result()
    (path / "attributes.json").write_text(json.dumps({
        "n5": "2.5.0", "pixelResolution": {"dimensions": voxel, "unit": "nm"}}))  # fmt: skip
    out["N5"] = {"path": str(path), "codec": "gzip 4", "file": path}

    for encoding in ("raw", "jpeg"):
        path = root / f"precomputed-{encoding}"
        store = ts.open({
            "driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(path)},
            "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1},
            "scale_metadata": {"size": list(data.shape[::-1]), "resolution": list(voxel),
                               "voxel_offset": [0, 0, 0], "chunk_size": list(CHUNKS[::-1]),
                               "encoding": encoding},
            "create": True,
        }).result()  # fmt: skip
        store[..., 0].write(data.T).result()
        codec = "raw (uncompressed)" if encoding == "raw" else "jpeg (lossy, quality 75)"
        out[f"precomputed {encoding}"] = {"path": str(path), "codec": codec, "file": path}

    path = root / "volume.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data.view(np.int8))  # mode 0; the bytes of data
        mrc.voxel_size = tuple(v * 10 for v in voxel)
    out["MRC"] = {"path": str(path), "codec": "none (memory-mapped)", "file": path}
    for entry in out.values():
        entry["bytes_on_disk"] = _folder_size(entry.pop("file"))
    return out


def regions(shape) -> list[tuple[slice, ...]]:
    """The input regions of one enhancement run: 4×512×512 outputs plus 32 voxels of xy
    context, clipped at the borders."""
    boxes = []
    for z in range(0, shape[0], REGION[0]):
        for y in range(0, shape[1], REGION[1]):
            for x in range(0, shape[2], REGION[2]):
                boxes.append((
                    slice(z, min(z + REGION[0], shape[0])),
                    slice(max(0, y - CONTEXT), min(y + REGION[1] + CONTEXT, shape[1])),
                    slice(max(0, x - CONTEXT), min(x + REGION[2] + CONTEXT, shape[2])),
                ))  # fmt: skip
    return boxes


def time_regions(path: str, boxes) -> tuple[float, int]:
    """Seconds to read every box through what a pipeline task slices, and bytes read."""
    from emdiffuse.io import open_volume
    from emdiffuse.io.regions import backing_array

    volume = open_volume(path)
    array = backing_array(volume.data)
    assert array is not None, path
    start = time.perf_counter()
    total = 0
    for box in boxes:
        total += np.asarray(array[box]).nbytes
    return time.perf_counter() - start, total


def time_dask(path: str) -> tuple[float, int]:
    from emdiffuse.io import open_volume

    volume = open_volume(path)
    start = time.perf_counter()
    with dask.config.set(num_workers=2):
        out = volume.data.compute(scheduler="threads")
    return time.perf_counter() - start, out.nbytes


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _serve(root: Path):
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def markdown(result: dict) -> str:
    """The committed table (``read_throughput.md``) of a result."""
    z, y, x = result["shape"]
    lines = [
        "# Read throughput per format (issue 17)",
        "",
        f"One {z}×{y}×{x} uint8 synthetic volume, chunks {tuple(result['chunks'])}, written by each "
        "format's own library. *regions*: the pipeline's reads (each task's region with "
        f"{result['context_xy']} voxels of context, {result['regions_per_pass']} regions); "
        "*dask*: the whole volume through `open_volume(...).data`. Medians of "
        f"{result['repeats']} alternating passes; × is the ratio to OME-Zarr measured in the "
        f"same pass. Load average after the run: {result.get('load_average_after')} (a shared "
        "machine: compare the ratios, not the absolute MB/s).",
        "",
        "| format | codec | MB on disk | reads back exactly | regions MB/s | × OME-Zarr | dask MB/s "
        "| × OME-Zarr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['format']} | {r['codec']} | {r['bytes_on_disk'] / 1e6:.1f} | "
            f"{'yes' if r['reads_back_exactly'] else 'no (lossy)'} | {r['regions_MB_per_s']:.1f} | "
            f"{r['regions_vs_ome_zarr']:.2f} | {r['dask_MB_per_s']:.1f} | {r['dask_vs_ome_zarr']:.2f} |"
        )
    lines += ["", f"Command: `{result['provenance'].get('command', 'python benchmarks/read_throughput.py')}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,1024,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--http", action="store_true", help="also read N5 and precomputed over HTTP")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table-only", action="store_true",
                        help="only rewrite the markdown table from the JSON at --out")
    args = parser.parse_args()
    if args.table_only:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.read_text())))
        print(f"wrote {args.out.with_suffix('.md')}")
        return
    record = provenance()
    shape = tuple(int(v) for v in args.shape.split(","))
    boxes = regions(shape)
    with tempfile.TemporaryDirectory(prefix="emdiffuse-read-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        data = _volume(shape)
        formats = write_all(root, data)
        write_seconds = time.perf_counter() - t0
        server = None
        if args.http:
            server = _serve(root)
            base = f"http://127.0.0.1:{server.server_address[1]}"
            for name in ("N5", "precomputed raw"):
                entry = dict(formats[name])
                entry["path"] = base + "/" + Path(entry["path"]).relative_to(root).as_posix()
                if name.startswith("precomputed"):
                    entry["path"] = "precomputed://" + entry["path"]
                formats[f"{name} over HTTP"] = entry
        from emdiffuse.io import open_volume

        for entry in formats.values():  # every copy reads back what was written (jpeg: nearly)
            got = open_volume(entry["path"]).data[:, :256, :256].compute()
            if got.dtype == np.int8:  # MRC mode 0 holds the bytes as signed
                got = got.view(np.uint8)
            error = np.abs(got.astype(np.int16) - data[:, :256, :256])
            entry["exact"] = bool(error.max() == 0)
            entry["mean_abs_error"] = float(error.mean())
        times: dict[str, dict[str, list[float]]] = {n: {"regions": [], "dask": []} for n in formats}
        nbytes: dict[str, int] = {}
        for round_ in range(args.repeats):
            order = list(formats) if round_ % 2 == 0 else list(reversed(formats))
            for name in order:
                seconds, nbytes["regions"] = time_regions(formats[name]["path"], boxes)
                times[name]["regions"].append(seconds)
                seconds, nbytes["dask"] = time_dask(formats[name]["path"])
                times[name]["dask"].append(seconds)
        if server is not None:
            server.shutdown()
    rows = []
    for name, entry in formats.items():
        row = {"format": name, "codec": entry["codec"], "bytes_on_disk": entry["bytes_on_disk"],
               "reads_back_exactly": entry["exact"], "mean_abs_error": entry["mean_abs_error"]}  # fmt: skip
        for kind in ("regions", "dask"):
            seconds = times[name][kind]
            base = times["OME-Zarr"][kind]
            row[f"{kind}_seconds"] = seconds
            row[f"{kind}_MB_per_s"] = nbytes[kind] / statistics.median(seconds) / 1e6
            row[f"{kind}_vs_ome_zarr"] = statistics.median(b / s for b, s in zip(base, seconds, strict=True))
        rows.append(row)
    header = f"{'format':26s} {'codec':26s} {'MB on disk':>10s} {'regions MB/s':>12s} {'x OME-Zarr':>10s} {'dask MB/s':>10s} {'x OME-Zarr':>10s}"
    print(header)
    for r in rows:
        print(f"{r['format']:26s} {r['codec']:26s} {r['bytes_on_disk'] / 1e6:10.1f} "
              f"{r['regions_MB_per_s']:12.1f} {r['regions_vs_ome_zarr']:10.2f} "
              f"{r['dask_MB_per_s']:10.1f} {r['dask_vs_ome_zarr']:10.2f}")  # fmt: skip
    result = {
        "benchmark": "read_throughput",
        "shape": shape,
        "dtype": "uint8",
        "chunks": CHUNKS,
        "region": REGION,
        "context_xy": CONTEXT,
        "regions_per_pass": len(boxes),
        "bytes_per_pass": nbytes,
        "repeats": args.repeats,
        "write_seconds": write_seconds,
        "load_average_after": load_average(),
        "rows": rows,
        "provenance": record,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
