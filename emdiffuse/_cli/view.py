"""`emdiffuse view`: serve OME-Zarr outputs to the bundled neuroglancer client."""

from __future__ import annotations

import argparse
import sys
import threading
import webbrowser

HELP = "view OME-Zarr outputs in neuroglancer (served read-only from this machine)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="OME-Zarr folders (child images such as uncertainty/ are added too)",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (default 0: any free port)")
    parser.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    parser.add_argument(
        "--no-browser", action="store_true", help="print the URL without opening a browser"
    )


def run(args: argparse.Namespace) -> int:
    # imported when the command runs: the server loads zarr, the client neuroglancer
    from emdiffuse.viewer.server import serve

    server, url = serve(args.paths, port=args.port, bind=args.bind)
    # before the URL is printed: reading the children imports zarr and the io readers, and a
    # Ctrl-C that lands inside such an import (right after the URL) could leave the process
    # hanging at exit
    notes = _child_notes(args.paths)
    try:  # from here on a Ctrl-C, wherever it lands, stops the server cleanly
        if args.bind not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"warning: listening on {args.bind}; anyone who can reach it can read these files"
            )
        print(url, flush=True)
        for line in notes:
            print(line, file=sys.stderr, flush=True)
        print("serving read-only; press Ctrl-C to stop", file=sys.stderr, flush=True)
        if not args.no_browser:
            webbrowser.open(url)
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.stop()
    return 0


def _child_notes(paths) -> list[str]:
    """One line per child image that says what it holds (an uncertainty map: calibrated
    interval half-widths, or the standard deviation over samples)."""
    import zarr

    from emdiffuse.io.describe import image_note
    from emdiffuse.io.paths import local_path

    lines = []
    for path in paths:
        root = local_path(str(path))
        for child in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
            try:
                attributes = zarr.open_group(str(child), mode="r").attrs
            except Exception:  # noqa: BLE001 - not a Zarr group (a level array, the run record)
                continue
            note = image_note(attributes)
            if note:
                lines.append(f"  {root.name}/{child.name}: {note}")
    return lines
