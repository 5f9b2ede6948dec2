"""Security: checkpoints never unpickle code; `emdiffuse view` listens on 127.0.0.1 only,
serves nothing outside the given roots and never writes.

tests/models/test_checkpoints.py and tests/viewer/test_view.py cover the basics (a pickled .pt refused,
traversal to /etc/passwd, PUT/POST/DELETE/PATCH refused); this file adds every loader and
file type a checkpoint can reach, a scan of the code for unsafe loading, the listening
socket of the real command, and traversal to a real file right beside the root.
"""

from __future__ import annotations

import ast
import functools
import http.client
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emdiffuse.errors import InputError
from emdiffuse.io import write_image
from emdiffuse.models.checkpoints import load_checkpoint, save_checkpoint
from emdiffuse.models.enhancer import Enhancer
from emdiffuse.viewer.server import serve


# ---- checkpoints --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(denoise_checkpoint):
    """(config, weights) of a tiny denoiser."""
    return load_checkpoint(denoise_checkpoint)


def _evil_file(folder: Path, name: str, model, code, *, legacy: bool) -> tuple[Path, Path]:
    """A checkpoint-looking file whose unpickling would create ``marker`` (``code(marker)``:
    the payload)."""
    config, state = model
    marker = folder / f"{name}.ran"
    payload = {"config": config.to_json(), "state_dict": dict(state), "x": code(marker)}
    path = folder / name
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    return path, marker


LOADERS = {
    "load_checkpoint": lambda p: load_checkpoint(p),
    "Enhancer.load": lambda p: Enhancer.load(p),
    "reference weights": lambda p: __import__(
        "emdiffuse.models.reference", fromlist=["x"]
    ).read_reference_weights(p),
    "training state": lambda p: __import__(
        "emdiffuse.training.state", fromlist=["x"]
    ).load_state(Path(p)),
}


@pytest.fixture(scope="module")
def evil_files(tmp_path_factory, model, pickled_code) -> list[tuple[Path, Path]]:
    """(file, marker) for every suffix a checkpoint may carry, both torch file formats
    (zip and the legacy pickle stream) and two payloads (os.system, eval)."""
    folder = tmp_path_factory.mktemp("evil")
    files = []
    for suffix in (".pth", ".pt", ".ckpt", ".bin", ".safetensors"):
        for legacy in (False, True):
            for how in ("system", "eval"):
                name = f"{how}-{'legacy' if legacy else 'zip'}{suffix}"
                code = functools.partial(pickled_code, how=how)
                files.append(_evil_file(folder, name, model, code, legacy=legacy))
    return files


@pytest.mark.parametrize("loader", list(LOADERS))
def test_pickled_code_never_runs(evil_files, loader):
    """Every loader of the package, every suffix, both torch file formats, two payloads:
    refused with a one-line InputError, and the payload's code never ran."""
    for path, marker in evil_files:
        with pytest.raises(InputError) as error:
            LOADERS[loader](path)
        assert not marker.exists(), (loader, path.name)
        assert "\n" not in str(error.value)


def test_cli_refuses_pickled_code_for_every_command(tmp_path, model, capsys, pickled_code):
    """`enhance --model` and `train --init` with a pickled-code checkpoint: exit 2, the
    code never ran, nothing written."""
    from emdiffuse.cli import main

    path, marker = _evil_file(tmp_path, "evil.pth", model, pickled_code, legacy=False)
    data = tmp_path / "in.ome.zarr"
    write_image(np.random.default_rng(0).random((2, 32, 32), dtype=np.float32), data,
                voxel_size=(8.0, 8.0, 8.0))
    out = tmp_path / "out.zarr"
    assert main(["enhance", str(data), str(out), "--model", str(path), "--threads",
                 "--quiet"]) == 2
    assert "refusing to load" in capsys.readouterr().err
    run = tmp_path / "run"
    code = main(["train", "--task", "denoise", "--data", f"{data},{data}", "--out", str(run),
                 "--init", str(path), "--steps", "1", "--no-progress"])
    assert code == 2, capsys.readouterr().err
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()
    assert not (run / "checkpoints").exists()


def test_safetensors_round_trip_still_loads(tmp_path, model):
    """The refusals above are not refusing everything: a real checkpoint loads."""
    config, state = model
    path = save_checkpoint(tmp_path / "ok.safetensors", state, config)
    assert load_checkpoint(path)[0] == config


UNSAFE = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
    ("cloudpickle", "load"), ("cloudpickle", "loads"), ("dill", "load"), ("dill", "loads"),
    ("joblib", "load"), ("marshal", "loads"), ("shelve", "open"),
    ("jit", "load"), ("package", "PackageImporter"),
}


def _unsafe_calls(path: Path, root: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = func.value if isinstance(func, ast.Attribute) else None
        owner_name = getattr(owner, "attr", None) or getattr(owner, "id", "")
        keywords = {k.arg: k.value for k in node.keywords}
        where = f"{path.relative_to(root)}:{node.lineno}"
        if name == "load" and owner_name == "torch":
            safe = keywords.get("weights_only")
            if not (isinstance(safe, ast.Constant) and safe.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        elif name == "load" and owner_name in ("np", "numpy"):
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{where}: numpy.load with allow_pickle")
        elif (owner_name, name) in UNSAFE:
            found.append(f"{where}: {owner_name}.{name}")
        elif name == "load" and owner_name == "yaml" and "Loader" not in keywords:
            found.append(f"{where}: yaml.load without a safe Loader")
    return found


def test_no_code_path_can_unpickle(repo_root):
    """Static check over the package, workflows, benchmarks and scripts: every torch.load
    passes weights_only=True, and nothing calls pickle/dill/joblib/marshal loaders,
    torch.jit.load or numpy.load(allow_pickle=True)."""
    files = [p for folder in ("emdiffuse", "workflows", "benchmarks", "scripts")
             for p in (repo_root / folder).rglob("*.py")]
    assert len(files) > 20
    problems = [problem for path in files for problem in _unsafe_calls(path, repo_root)]
    assert problems == []
    # and the check does find what it looks for
    probe = repo_root / "tests" / "_unsafe_probe_for_scan.py"
    try:
        probe.write_text("import torch, pickle\ntorch.load('x')\npickle.loads(b'')\n"
                         "torch.load('y', weights_only=False)\n")
        assert len(_unsafe_calls(probe, repo_root)) == 3
    finally:
        probe.unlink()


# ---- the view server ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A root `em.zarr` with, right beside it, a secret file and a folder whose name starts
    like the root's; inside, a symlink to the secret."""
    base = tmp_path_factory.mktemp("served")
    root = base / "em.zarr"
    write_image(np.arange(8 * 32 * 32, dtype=np.uint16).reshape(8, 32, 32) % 251, root,
                voxel_size=(8.0, 8.0, 8.0), chunks=(8, 32, 32))
    (base / "secret.txt").write_text("SECRET-BESIDE-THE-ROOT")
    (base / "em.zarr-private").mkdir()
    (base / "em.zarr-private" / "secret.txt").write_text("SECRET-IN-A-PREFIX-TWIN")
    os.symlink(base / "secret.txt", root / "link-out.txt")
    os.symlink(base / "em.zarr-private", root / "dir-out")
    return base, root


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.is_dir(), p.stat(follow_symlinks=False).st_size,
                                     p.stat(follow_symlinks=False).st_mtime_ns)
        for p in [folder, *folder.rglob("*")]
    }


def _raw_request(port: int, request_line: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send a request line exactly as given (no client-side normalisation)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        head = f"{request_line}\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        conn.sendall(head.encode("latin-1") + b"Connection: close\r\n\r\n" + body)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


def _traversals(base: Path) -> list[str]:
    secret = str(base / "secret.txt")
    return [
        "/em.zarr/../secret.txt",
        "/em.zarr/%2e%2e/secret.txt",
        "/em.zarr/%2E%2E%2Fsecret.txt",
        "/em.zarr/..%2fsecret.txt",
        "/em.zarr/.%2e/secret.txt",
        "/em.zarr/%252e%252e/secret.txt",
        "/em.zarr/..%5csecret.txt",
        "/em.zarr/..\\secret.txt",
        "/em.zarr/%c0%ae%c0%ae/secret.txt",
        "/em.zarr/%2e%2e%00/secret.txt",
        "/em.zarr/0/../../secret.txt",
        "/em.zarr/./../secret.txt",
        "/em.zarr;/../secret.txt",
        "/em.zarr/x/..%2F..%2Fsecret.txt",
        f"/em.zarr/{secret}",
        f"/em.zarr/{secret.replace('/', '%2F')}",
        f"/{secret}",
        f"/%2F{secret.lstrip('/').replace('/', '%2F')}",
        f"/{secret.replace('/', '%2F')}",
        f"http://127.0.0.1{secret}",
        "http://127.0.0.1/em.zarr/../secret.txt",
        "/em.zarr-private/secret.txt",
        "/em.zarr%2D/../em.zarr-private/secret.txt",
        "/em.zarr/link-out.txt",
        "/em.zarr/dir-out/secret.txt",
        "/v/view/../../em.zarr/../secret.txt",
        "/v/view/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e" + secret,
        "/em.zarr/?../../secret.txt",
        "/em.zarr/#/../secret.txt",
        "*",
    ]


def test_view_serves_nothing_outside_its_roots(served):
    """Traversal in every spelling, absolute paths, absolute-URI request targets, a folder
    whose name extends the root's, symlinks out: 404 (or 400), never the secret."""
    base, root = served
    server, _ = serve([root])
    try:
        port = server.server_address[1]
        assert _raw_request(port, "GET /em.zarr/zarr.json HTTP/1.1")[0] == 200
        for target in _traversals(base):
            for method in ("GET", "HEAD"):
                status, data = _raw_request(port, f"{method} {target} HTTP/1.1")
                assert status in (400, 404), (method, target, status)
                assert b"SECRET" not in data, (method, target)
    finally:
        server.stop()


WRITE_METHODS = ["PUT", "POST", "DELETE", "PATCH", "MKCOL", "COPY", "MOVE", "PROPPATCH", "LOCK"]


def test_view_never_writes(served):
    """Write methods (HTTP and WebDAV) on existing files, new files, folders, the client
    and traversal targets are refused, and nothing under the served folder or beside it
    changes (names, sizes, modification times)."""
    base, root = served
    before = _snapshot(base)
    server, _ = serve([root])
    try:
        port = server.server_address[1]
        for method in WRITE_METHODS:
            for target in ["/em.zarr/0/c/0/0/0", "/em.zarr/zarr.json", "/em.zarr/new.bin",
                           "/em.zarr/newdir/", "/em.zarr/../secret.txt",
                           "/em.zarr/../planted.txt", "/v/view/index.html",
                           "/em.zarr/link-out.txt"]:
                body = b"\x00PWNED" * 50
                status, _ = _raw_request(port, f"{method} {target} HTTP/1.1", body=body)
                assert status in (400, 404, 405, 501), (method, target, status)
        assert _raw_request(port, "GET /em.zarr/zarr.json HTTP/1.1")[0] == 200
    finally:
        server.stop()
    assert _snapshot(base) == before
    assert b"PWNED" not in (base / "secret.txt").read_bytes()


def _non_loopback_addresses() -> list[str]:
    import psutil

    return [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]


def test_view_command_listens_on_loopback_only(served, source_env):
    """The real `emdiffuse view` process: every listening socket it holds is bound to
    127.0.0.1, and the port cannot be reached on the machine's other addresses."""
    import psutil

    _, root = served
    proc = subprocess.Popen(
        [sys.executable, "-m", "emdiffuse.cli", "view", str(root), "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=source_env,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        port = int(url.split(":")[2].split("/")[0])
        process = psutil.Process(proc.pid)
        connections = getattr(process, "net_connections", process.connections)(kind="inet")
        listening = [c for c in connections if c.status == psutil.CONN_LISTEN]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening
        assert port in {c.laddr.port for c in listening}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/em.zarr/zarr.json")
        assert conn.getresponse().status == 200
        conn.close()
        for address in _non_loopback_addresses():
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=2).close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
