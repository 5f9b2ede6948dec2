"""Headless Chromium really loads `emdiffuse view` layers (client JS, zarr.json, chunks) and draws EM.

Drives Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``; stdlib only).
Skipped when ``chromium`` is not installed (``scripts/install_browser.sh`` installs it on Debian).
Set ``EMDIFFUSE_SCREENSHOT=path.png`` to keep the screenshot (docs/neuroglancer.png is made so).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse

import numpy as np
import pytest

from emdiffuse.io import write_image
from emdiffuse.training.synthetic import synthetic_block
from emdiffuse.viewer.server import serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (scripts/install_browser.sh)"
)

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1200,800",
    "--remote-debugging-pipe",
]


class DevTools:
    """Minimal DevTools-protocol client over Chromium's fd 3 (commands in) / fd 4 (messages out)."""

    def __init__(self, user_data_dir: str):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire() -> None:  # runs in the child: move the pipe ends onto fds 3 and 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire,
            pass_fds=(3, 4),  # kept open across exec; set up by wire()
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            data = os.read(self._from_chrome, 1 << 20)
            if not data:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += data
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


# Each layer's name and the load state of its data source, read from the live viewer.
LAYER_STATES = """
window.viewer.layerManager.managedLayers.map((l) => {
  const state = l.layer.dataSources[0].loadState;
  const text = state === undefined ? "loading" : state.error ? "error: " + state.error.message : "loaded";
  return [l.name, text];
})
"""


# True once the viewer has every visible chunk on the GPU (what neuroglancer's own
# screenshots wait for), or once a layer's data source failed (the asserts below report it).
READY = """
(() => {
  const viewer = window.viewer;
  if (viewer === undefined) return false;
  const failed = viewer.layerManager.managedLayers.some(
    (l) => l.layer !== null && l.layer.dataSources.some((d) => d.loadState && d.loadState.error));
  return failed || viewer.isReady();
})()
"""
TWO_FRAMES = "new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))"


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser") / "synthetic_em.zarr"
    em = (synthetic_block((0, 0, 0), (16, 128, 128), seed=0) * 255).astype(np.uint8)
    write_image(em, root, voxel_size=(8, 8, 8), chunks=(16, 64, 64))
    # A smooth child image (stands in for the enhancer's uncertainty map).
    yy, xx = np.meshgrid(np.linspace(0, 1, 128), np.linspace(0, 1, 128), indexing="ij")
    unc = np.broadcast_to((0.2 * yy * xx).astype(np.float32), em.shape).copy()
    write_image(unc, root / "uncertainty", voxel_size=(8, 8, 8), chunks=(16, 64, 64))
    return root


def _chunk(path: str, layer: str) -> bool:
    return re.fullmatch(rf"/{re.escape(layer)}\d+/c/\d+/\d+/\d+", path) is not None


def test_browser_loads_layers_and_draws_em(volume, tmp_path):
    server, url = serve([volume])
    browser = DevTools(str(tmp_path / "profile"))
    png = tmp_path / "neuroglancer.png"
    try:
        target = browser.call("Target.getTargets")["targetInfos"]
        page = next(t for t in target if t["type"] == "page")
        session = browser.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)[
            "sessionId"
        ]
        browser.call("Runtime.enable", session)
        browser.call("Page.enable", session)
        browser.call("Page.navigate", session, url=url)

        layers = ["synthetic_em.zarr/", "synthetic_em.zarr/uncertainty/"]
        # Wait (no wall-clock bound: the suite's timeout is the guard) until the viewer says
        # every visible chunk is on the GPU, or it has stopped with an error; then let two
        # frames draw them.
        while not browser.call("Runtime.evaluate", session, expression=READY, returnByValue=True)[
            "result"
        ].get("value"):
            time.sleep(0.5)
        browser.call("Runtime.evaluate", session, expression=TWO_FRAMES, awaitPromise=True)
        shot = browser.call("Page.captureScreenshot", session, format="png")
        png.write_bytes(base64.b64decode(shot["data"]))
        layer_states = browser.call(
            "Runtime.evaluate", session, expression=LAYER_STATES, returnByValue=True
        )["result"].get("value")
    finally:
        browser.close()
        server.stop()

    if os.environ.get("EMDIFFUSE_SCREENSHOT"):
        shutil.copyfile(png, os.environ["EMDIFFUSE_SCREENSHOT"])
    log = list(server.requests)
    errors = [e["params"] for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
    detail = f"requests={log[:60]} exceptions={errors[:3]}"
    ok = [urllib.parse.urlsplit(p).path for _, p, s in log if s == 200]
    assert all(s < 500 for _, _, s in log), detail
    assert any(p.startswith("/v/view/main.") and p.endswith(".js") for p in ok), detail
    for layer in layers:
        assert f"/{layer}zarr.json" in ok, detail
        assert f"/{layer}0/zarr.json" in ok, detail
        assert any(_chunk(p, layer) for p in ok), f"no chunk of {layer}: {detail}"
    # Only the client's own state POSTs (refused, read-only server) may be non-GET.
    writes = [(m, p, s) for m, p, s in log if m not in ("GET", "HEAD", "OPTIONS")]
    assert all(p.startswith("/state/") and s == 405 for _, p, s in writes), writes
    assert layer_states == [
        ["synthetic_em.zarr", "loaded"],
        ["synthetic_em.zarr/uncertainty", "loaded"],
    ], detail
    assert errors == [], detail
    console_errors = [
        e["params"]["args"]
        for e in browser.events
        if e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error"
    ]
    assert console_errors == []

    # The picture shows EM texture, not a blank or error page: the top-left (xy) panel has
    # many grey levels and real contrast.
    from skimage.io import imread

    image = imread(png)[..., :3].astype(np.float32)
    panel = image[60:380, 20:580]
    grey = panel.mean(axis=-1)
    assert grey.std() > 20, f"xy panel looks flat (std {grey.std():.1f}); {detail}"
    assert len(np.unique(grey.astype(np.uint8))) > 64
