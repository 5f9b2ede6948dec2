"""`emdiffuse view`: read-only local server for OME-Zarr plus the bundled neuroglancer client."""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse

import numpy as np
import pytest

from emdiffuse.errors import InputError
from emdiffuse.io import write_image
from emdiffuse.training.synthetic import synthetic_block
from emdiffuse.viewer.server import serve, viewer_state


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A real OME-Zarr 0.5 image (uint8 EM, 8x6x4 nm) with a float32 child image `uncertainty/`."""
    root = tmp_path_factory.mktemp("view") / "em.zarr"
    em = (synthetic_block((0, 0, 0), (16, 128, 128), seed=0) * 255).astype(np.uint8)
    write_image(em, root, voxel_size=(8, 6, 4), chunks=(16, 64, 64))
    unc = np.linspace(0, 0.5, em.size, dtype=np.float32).reshape(em.shape)
    write_image(unc, root / "uncertainty", voxel_size=(8, 6, 4), chunks=(16, 64, 64))
    return root


@pytest.fixture
def server(volume):
    srv, url = serve([volume])
    yield srv, url
    srv.stop()


def _request(srv, method: str, path: str, body: bytes | None = None, headers=()):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        conn.putheader("Content-Length", str(len(body or b"")))
        for name, value in dict(headers).items():
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


def test_binds_loopback_and_serves_metadata_and_chunk(server, volume):
    srv, url = server
    assert srv.server_address[0] == "127.0.0.1"
    assert url.startswith(f"http://127.0.0.1:{srv.server_address[1]}/v/view/#!")
    status, headers, body = _request(srv, "GET", "/em.zarr/zarr.json")
    assert status == 200
    assert not any(h.lower().startswith("access-control-") for h in headers)  # same-origin
    assert json.loads(body)["attributes"]["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"
    status, _, body = _request(srv, "GET", "/em.zarr/0/c/0/1/1")
    assert status == 200
    assert body == (volume / "0" / "c" / "0" / "1" / "1").read_bytes()
    status, headers, body = _request(srv, "HEAD", "/em.zarr/uncertainty/zarr.json")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


FOREIGN = "https://evil.example"


@pytest.mark.parametrize(
    "method, path, extra",
    [
        ("GET", "/em.zarr/zarr.json", {}),
        ("GET", "/em.zarr/0/c/0/1/1", {}),
        ("HEAD", "/em.zarr/zarr.json", {}),
        ("GET", "/em.zarr/0/c/9/9/9", {}),  # 404
        ("PUT", "/em.zarr/zarr.json", {}),  # 405
        ("OPTIONS", "/em.zarr/zarr.json", {"Access-Control-Request-Method": "GET"}),
    ],
)
def test_cross_origin_request_gets_no_cors_grant(server, method, path, extra):
    """A page from another origin open in the same browser must not read the served data
    (or the run record, which names the input's absolute path): no response carries an
    Access-Control-Allow-Origin grant, to it or to everyone. The client is same-origin."""
    srv, _ = server
    _, headers, _ = _request(srv, method, path, headers={"Origin": FOREIGN, **extra})
    granted = {k.lower(): v for k, v in headers.items() if k.lower().startswith("access-control")}
    assert granted == {}, granted


def test_missing_chunk_is_404(server):
    srv, _ = server
    assert _request(srv, "GET", "/em.zarr/0/c/9/9/9")[0] == 404
    assert _request(srv, "GET", "/nope.zarr/zarr.json")[0] == 404


@pytest.mark.parametrize(
    "path",
    [
        "/../etc/passwd",
        "/em.zarr/../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/em.zarr/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/em.zarr/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "//etc/passwd",
        "/em.zarr//etc/passwd",
        "/em.zarr/%2Fetc%2Fpasswd",
        "/%2Fetc%2Fpasswd",
        "/em.zarr/0/c/..%5c..%5c..%5cetc%5cpasswd",
        "/v/view/../../../../etc/passwd",
        "/v/view/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/v/view/%2e%2e/__init__.py",
        "/v/view/%2Fetc%2Fpasswd",
    ],
)
def test_traversal_is_404(server, path):
    srv, _ = server
    status, _, body = _request(srv, "GET", path)
    assert status == 404
    assert b"root:" not in body


def test_symlink_escaping_root_is_404(volume, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    link = volume / "leak.txt"
    os.symlink(secret, link)
    dir_link = volume / "outside"
    os.symlink(tmp_path, dir_link)
    srv, _ = serve([volume])
    try:
        assert _request(srv, "GET", "/em.zarr/leak.txt")[0] == 404
        assert _request(srv, "GET", "/em.zarr/outside/secret.txt")[0] == 404
        assert _request(srv, "GET", "/em.zarr/zarr.json")[0] == 200
    finally:
        srv.stop()
        link.unlink()
        dir_link.unlink()


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_writes_refused_and_nothing_written(server, volume, method):
    srv, _ = server
    before = _snapshot(volume)
    chunk = "/em.zarr/0/c/0/0/0"
    status, headers, _ = _request(srv, method, chunk, body=b"\x00" * 64)
    assert status == 405
    assert "PUT" not in headers.get("Allow", "")
    status, _, _ = _request(srv, method, "/em.zarr/new-file", body=b"hello")
    assert status == 405
    assert _snapshot(volume) == before
    # The server still answers normally afterwards.
    assert _request(srv, "GET", chunk)[0] == 200


def test_client_index_served(server):
    srv, _ = server
    status, headers, _ = _request(srv, "GET", "/")
    assert status == 302 and headers["Location"] == "/v/view/"
    status, headers, body = _request(srv, "GET", "/v/view/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"<title>neuroglancer</title>" in body
    script = body.split(b'src="')[1].split(b'"')[0].decode()
    status, headers, js = _request(srv, "GET", "/v/view/" + script)
    assert status == 200 and headers["Content-Type"] == "application/javascript" and len(js) > 0


def test_state_layers_sources_and_voxel_sizes(server, volume):
    srv, url = server
    port = srv.server_address[1]
    state = json.loads(urllib.parse.unquote(url.split("#!", 1)[1]))
    assert state == viewer_state([volume], base_url=f"http://127.0.0.1:{port}")
    sources = [layer["source"] for layer in state["layers"]]
    assert sources == [
        f"zarr3://http://127.0.0.1:{port}/em.zarr/",
        f"zarr3://http://127.0.0.1:{port}/em.zarr/uncertainty/",
    ]
    assert all(layer["type"] == "image" for layer in state["layers"])
    dims = state["dimensions"]
    assert dims["z"] == [pytest.approx(8e-9), "m"]
    assert dims["y"] == [pytest.approx(6e-9), "m"]
    assert dims["x"] == [pytest.approx(4e-9), "m"]
    em, unc = state["layers"]
    assert em["shaderControls"]["normalized"]["range"] == [0, 255]
    lo, hi = unc["shaderControls"]["normalized"]["range"]
    assert 0 <= lo < hi <= 0.5 + 1e-6


def test_two_paths_with_same_name_get_distinct_sources(volume, tmp_path):
    other = tmp_path / "em.zarr"
    write_image(np.zeros((8, 32, 32), np.uint16), other, voxel_size=(8, 6, 4))
    state = viewer_state([volume, other], base_url="http://127.0.0.1:1")
    sources = [layer["source"] for layer in state["layers"]]
    assert "zarr3://http://127.0.0.1:1/em.zarr-2/" in sources
    assert len(set(sources)) == len(sources) == 3
    assert state["layers"][-1]["shaderControls"]["normalized"]["range"] == [0, 65535]


def test_bad_input_raises_before_serving(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        serve([tmp_path / "missing.zarr"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a Zarr folder"):
        viewer_state([tmp_path / "plain"])
    with pytest.raises(InputError, match="URL"):
        viewer_state(["s3://bucket/em.zarr"])


def test_cli_registered_and_help(capsys):
    from emdiffuse.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["view", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--no-browser" in out and "--bind" in out


def test_cli_bad_path_exits_2(tmp_path, capsys):
    from emdiffuse.cli import main

    assert main(["view", str(tmp_path / "missing.zarr"), "--no-browser"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cli_serves_until_interrupted(volume):
    import signal
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "emdiffuse.cli", "view", str(volume), "--no-browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and "#!" in url
        origin = url.split("/v/view/")[0]
        with urllib.request.urlopen(origin + "/em.zarr/zarr.json", timeout=10) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait() == 0  # no wall-clock bound: the suite's timeout guards
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_interrupted_right_after_printing_the_url_stops_cleanly(volume):
    """Ctrl-C that lands just after the URL is printed still stops the server cleanly
    (exit 0), wherever the command then is. Made deterministic, not timed: the command's
    stderr is a pipe filled to the brim, so its next line waits there until the signal."""
    import signal
    import subprocess
    import sys
    import threading

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    with pytest.raises(BlockingIOError):
        while True:
            os.write(write_end, b"#" * 65536)
    os.set_blocking(write_end, True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "emdiffuse.cli", "view", str(volume), "--no-browser"],
        stdout=subprocess.PIPE,
        stderr=write_end,
        text=True,
    )
    os.close(write_end)
    drained: list[bytes] = []

    def drain() -> None:  # the filler, then what the command writes, until it exits
        while chunk := os.read(read_end, 1 << 16):
            drained.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and "#!" in url
        proc.send_signal(signal.SIGINT)
        reader.start()
        code = proc.wait()  # no wall-clock bound: the suite's timeout guards
        reader.join()
        assert code == 0, b"".join(drained).lstrip(b"#").decode()
        assert proc.stdout.read().strip() == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if reader.ident is not None:
            reader.join()
        os.close(read_end)


def test_client_event_stream_is_comments_only(server):
    srv, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    try:
        conn.request("GET", "/events/view?c=1")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/event-stream"
        assert resp.fp.readline() == b": keep-alive\n"
    finally:
        conn.close()
    # The client's state POSTs are refused like any write.
    assert _request(srv, "POST", "/state/view", body=b"{}")[0] == 405


def test_reserved_names_are_renamed(tmp_path):
    root = tmp_path / "v"
    write_image(np.zeros((8, 32, 32), np.uint8), root, voxel_size=(8, 8, 8))
    state = viewer_state([root], base_url="http://127.0.0.1:1")
    assert state["layers"][0]["source"] == "zarr3://http://127.0.0.1:1/v-2/"


def test_zarr_v2_ome_zarr_uses_zarr_scheme(tmp_path):
    import zarr

    root = tmp_path / "old.zarr"
    group = zarr.open_group(str(root), mode="w", zarr_format=2)
    group.create_array("0", data=np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16))
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    scale = [{"type": "scale", "scale": [30.0, 4.0, 4.0]}]
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": axes,
            "datasets": [{"path": "0", "coordinateTransformations": scale}],
        }
    ]
    srv, url = serve([root])
    try:
        port = srv.server_address[1]
        state = json.loads(urllib.parse.unquote(url.split("#!", 1)[1]))
        assert [layer["source"] for layer in state["layers"]] == [
            f"zarr://http://127.0.0.1:{port}/old.zarr/"
        ]
        assert state["dimensions"]["z"] == [pytest.approx(30e-9), "m"]
        assert state["layers"][0]["shaderControls"]["normalized"]["range"] == [0, 65535]
        assert _request(srv, "GET", "/old.zarr/.zattrs")[0] == 200
        assert _request(srv, "GET", "/old.zarr/0/.zarray")[0] == 200
    finally:
        srv.stop()
