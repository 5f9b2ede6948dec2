"""Serve OME-Zarr outputs and the bundled neuroglancer client from one local, read-only HTTP server.

The server answers GET and HEAD (OPTIONS names them; writes get 405) and serves files that
resolve (symlinks followed) inside one of the given roots or the client folder; anything else
is a 404. It grants no CORS access: the bundled client is served from the same origin, and a
page from any other origin open in the same browser must not read the volumes or the run
record (which holds the input's absolute path). Layer sources in the viewer state are
``zarr3://`` (or ``zarr://`` for Zarr v2) URLs pointing back at this server.

The bundled client is neuroglancer's Python-integration build: it must be loaded from
``/v/<token>/`` and listens for state on ``/events/<token>``. The server answers that event stream
with keep-alive comments only (the state comes from the URL fragment), and refuses the client's
POSTs of state changes with 405 like every other write.
"""

from __future__ import annotations

import json
import mimetypes
import threading
import urllib.parse
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import zarr

from emdiffuse.errors import InputError

CLIENT_PATH = "/v/view/"
_RESERVED = {"v", "events", "socket", "action", "state", "credentials", "volume_response"}
_INT_RANGES = {
    "uint8": (0, 255),
    "int8": (-128, 127),
    "uint16": (0, 65535),
    "int16": (-32768, 32767),
}
_MIME = {
    ".js": "application/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".css": "text/css",
    ".html": "text/html; charset=utf-8",
    ".map": "application/json",
}


def client_dir() -> Path:
    """Folder of the neuroglancer web client bundled in the ``neuroglancer`` wheel."""
    # imported here: neuroglancer is the optional `view` extra, needed only for its client
    import neuroglancer

    folder = Path(neuroglancer.__file__).parent / "static" / "client"
    if not (folder / "index.html").is_file():
        raise InputError(
            f"the neuroglancer web client is missing at {folder}; reinstall `neuroglancer`"
        )
    return folder


def _zarr_format(root: Path) -> int:
    if (root / "zarr.json").is_file():
        return 3
    if (root / ".zattrs").is_file() or (root / ".zgroup").is_file():
        return 2
    raise InputError(
        f"{root} is not a Zarr folder (no zarr.json or .zattrs); give an OME-Zarr written by emdiffuse"
    )


def _multiscale(group: zarr.Group) -> dict | None:
    attrs = group.attrs.asdict()
    ms = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")
    if not ms:
        return None
    return ms[0]


def _image_info(root: Path, sub: str) -> dict | None:
    """Facts neuroglancer needs for one image (``sub`` is '' or a child folder name)."""
    folder = root / sub if sub else root
    try:
        group = zarr.open_group(str(folder), mode="r")
    except Exception:  # not a group: skip (children) / report (roots, checked by caller)
        return None
    ms = _multiscale(group)
    if ms is None:
        return None
    datasets = ms["datasets"]
    axes = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])]
    units = [
        (a.get("unit") if isinstance(a, dict) else None) or "nanometer" for a in ms.get("axes", [])
    ]
    scale = [1.0] * len(axes)
    for transform in datasets[0].get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = [float(s) for s in transform["scale"]]
    factor = {"nanometer": 1.0, "micrometer": 1e3, "angstrom": 0.1, "millimeter": 1e6}
    voxel_nm = {a: s * factor.get(u, 1.0) for a, s, u in zip(axes, scale, units, strict=False)}
    coarsest = group[datasets[-1]["path"]]
    dtype = np.dtype(coarsest.dtype)
    if dtype.name in _INT_RANGES:
        value_range = _INT_RANGES[dtype.name]
    else:
        window = tuple(slice(0, min(n, 256)) for n in coarsest.shape)  # bounded read
        sample = np.asarray(coarsest[window], dtype=np.float64)
        finite = sample[np.isfinite(sample)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        value_range = (lo, hi if hi > lo else lo + 1.0)
    shape = group[datasets[0]["path"]].shape
    extent_nm = {a: n * voxel_nm[a] for a, n in zip(axes, shape, strict=False) if a in voxel_nm}
    return {"voxel_nm": voxel_nm, "extent_nm": extent_nm, "dtype": dtype.name, "range": value_range}


def _check_roots(paths: Sequence[str | Path]) -> dict[str, Path]:
    """Map a unique URL name to each resolved root folder; InputError for anything unservable."""
    if not paths:
        raise InputError("give at least one OME-Zarr folder to view")
    roots: dict[str, Path] = {}
    for path in paths:
        text = str(path)
        if "://" in text:
            raise InputError(
                f"{text} is a URL; `emdiffuse view` serves local folders (open remote data in neuroglancer directly)"
            )
        root = Path(text).expanduser().resolve()
        if not root.is_dir():
            raise InputError(
                f"{text} is not a folder; give an OME-Zarr folder written by emdiffuse"
            )
        _zarr_format(root)
        if _image_info(root, "") is None:
            raise InputError(
                f"{text} has no OME-Zarr 'multiscales' metadata; convert it with `emdiffuse convert`"
            )
        base = urllib.parse.quote(root.name, safe="") or "image"
        name, n = base, 2
        while name in roots or name in _RESERVED:
            name, n = f"{base}-{n}", n + 1
        roots[name] = root
    return roots


def _children(root: Path) -> list[str]:
    out = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        if child.name.isdigit():
            continue
        if ((child / "zarr.json").is_file() or (child / ".zattrs").is_file()) and _image_info(
            root, child.name
        ):
            out.append(child.name)
    return out


def _shader(dtype: str, value_range: tuple[float, float], overlay: bool) -> tuple[str, dict]:
    """Grayscale for images; a red overlay for child images such as uncertainty maps."""
    emit = "emitRGB(vec3(normalized(), 0.0, 0.0))" if overlay else "emitGrayscale(normalized())"
    shader = f"#uicontrol invlerp normalized\nvoid main() {{\n  {emit};\n}}\n"
    lo, hi = value_range
    if dtype.startswith("float"):
        return shader, {"normalized": {"range": [lo, hi]}}
    return shader, {"normalized": {"range": [int(lo), int(hi)]}}


def _state(roots: dict[str, Path], base_url: str) -> dict:
    layers = []
    dimensions: dict[str, list] = {}
    field_nm = 0.0
    for name, root in roots.items():
        scheme = "zarr3" if _zarr_format(root) == 3 else "zarr"
        for sub in ["", *_children(root)]:
            info = _image_info(root, sub)
            if info is None:
                continue
            field_nm = max([field_nm] + [info["extent_nm"].get(a, 0.0) for a in "yx"])
            for axis, nm in info["voxel_nm"].items():
                dimensions.setdefault(axis, [nm * 1e-9, "m"])
            shader, controls = _shader(info["dtype"], info["range"], overlay=bool(sub))
            path = f"{name}/{urllib.parse.quote(sub)}/" if sub else f"{name}/"
            layers.append(
                {
                    "type": "image",
                    "source": f"{scheme}://{base_url}/{path}",
                    "name": f"{name}/{sub}" if sub else name,
                    "shader": shader,
                    "shaderControls": controls,
                }
            )
            if sub:
                layers[-1].update({"blend": "additive", "opacity": 0.5})
    ordered = {a: dimensions[a] for a in "xyz" if a in dimensions}
    ordered.update({a: v for a, v in dimensions.items() if a not in ordered})
    # Zoom so the largest xy extent spans about 300 screen pixels of a 2D panel.
    unit_nm = min(v[0] for v in ordered.values()) * 1e9
    return {
        "dimensions": ordered,
        "crossSectionScale": max(field_nm / unit_nm / 300.0, 1e-3),
        "layers": layers,
        "layout": "4panel",
        "selectedLayer": {"layer": layers[0]["name"], "visible": False},
    }


def viewer_state(paths: Sequence[str | Path], *, base_url: str = "http://127.0.0.1:0") -> dict:
    """Neuroglancer state: one image layer per path (and per child image), dimensions in metres from nm."""
    return _state(_check_roots(paths), base_url.rstrip("/"))


def state_url(state: dict, base_url: str) -> str:
    """The client URL carrying ``state`` in its ``#!`` fragment."""
    text = json.dumps(state, separators=(",", ":"))
    return f"{base_url.rstrip('/')}{CLIENT_PATH}#!" + urllib.parse.quote(text, safe="{}[]:,\"'=/")


def _inside(root: Path, parts: list[str]) -> Path | None:
    """The file ``root/parts`` if it resolves inside ``root`` (symlinks followed), else None."""
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\\" in part or "\x00" in part:
            return None
    target = root.joinpath(*parts).resolve() if parts else root
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target


class _Handler(BaseHTTPRequestHandler):
    server: ViewServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        return

    def _record(self, status: int) -> None:
        with self.server.log_lock:
            self.server.requests.append((self.command, self.path, status))

    def _empty_reply(self, status: HTTPStatus, header: tuple[str, str], *, close=False) -> None:
        """A logged response without a body: ``status``, one ``header``, and with ``close``
        the connection closed after it."""
        self._record(status)
        self.send_response(status)
        self.send_header(*header)
        self.send_header("Content-Length", "0")
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        if close:
            self.close_connection = True

    def _refuse(self) -> None:
        self._empty_reply(HTTPStatus.METHOD_NOT_ALLOWED, ("Allow", "GET, HEAD"), close=True)

    do_PUT = do_POST = do_DELETE = do_PATCH = _refuse  # noqa: N815 - names fixed by http.server

    def do_OPTIONS(self) -> None:  # noqa: N802 - name fixed by http.server
        self._empty_reply(HTTPStatus.NO_CONTENT, ("Allow", "GET, HEAD"))

    def _parts(self) -> list[str] | None:
        raw = urllib.parse.urlsplit(self.path).path
        if not raw.startswith("/"):
            return None
        parts = [urllib.parse.unquote(p) for p in raw[1:].split("/")]
        return parts[:-1] if parts and parts[-1] == "" else parts

    def _resolve(self, parts: list[str]) -> Path | None:
        if parts and parts[0] in self.server.roots:
            return _inside(self.server.roots[parts[0]], parts[1:])
        if len(parts) >= 2 and parts[0] == "v":
            return _inside(self.server.client, parts[2:] or ["index.html"])
        return None

    def _redirect(self) -> None:
        self._empty_reply(HTTPStatus.FOUND, ("Location", CLIENT_PATH))

    def _events(self) -> None:
        """Keep the client's state event stream open with comments only (no state pushed)."""
        self._record(HTTPStatus.OK)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            while True:
                self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
                if self.server.stopping.wait(15):
                    return
        except OSError:
            return

    def _send(self, head_only: bool) -> None:
        parts = self._parts()
        if parts == []:
            return self._redirect()
        if parts is not None and len(parts) == 2 and parts[0] == "events" and not head_only:
            return self._events()
        target = None if parts is None else self._resolve(parts)
        if target is None:
            self._record(HTTPStatus.NOT_FOUND)
            self.send_response(HTTPStatus.NOT_FOUND)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = target.read_bytes()
        kind = (
            _MIME.get(target.suffix)
            or mimetypes.guess_type(target.name)[0]
            or "application/octet-stream"
        )
        self._record(HTTPStatus.OK)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - name fixed by http.server
        self._send(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802 - name fixed by http.server
        self._send(head_only=True)


class ViewServer(ThreadingHTTPServer):
    """Read-only HTTP server for the given roots plus the neuroglancer client; keeps a request log."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], roots: dict[str, Path], client: Path):
        super().__init__(address, _Handler)
        self.roots = roots
        self.client = client.resolve()
        self.requests: list[tuple[str, str, int]] = []
        self.log_lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.stopping.set()
        self.shutdown()
        self.server_close()


def serve(
    paths: Sequence[str | Path], *, port: int = 0, bind: str = "127.0.0.1"
) -> tuple[ViewServer, str]:
    """Start the server in a background thread; return it and the neuroglancer URL showing ``paths``."""
    roots = _check_roots(paths)
    client = client_dir()
    try:
        server = ViewServer((bind, port), roots, client)
    except OSError as error:
        raise InputError(
            f"cannot listen on {bind}:{port} ({error.strerror}); pick another --port"
        ) from None
    host = "127.0.0.1" if bind in ("0.0.0.0", "", "::") else bind
    if ":" in host:
        host = f"[{host}]"
    base = f"http://{host}:{server.server_address[1]}"
    server.thread = threading.Thread(
        target=server.serve_forever, name="emdiffuse-view", daemon=True
    )
    server.thread.start()
    return server, state_url(_state(roots, base), base)
