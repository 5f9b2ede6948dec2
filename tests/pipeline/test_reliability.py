"""Reliability of an enhancement run: killed workers, Ctrl-C and crashes, half-written
chunks, a full disk. Each disturbed run is finished (by Dask's retries or by --resume) and
compared with an undisturbed run of the same settings byte for byte: every file of the
OME-Zarr (chunks, pyramid, metadata).

Real failures only: SIGKILL of a worker process of a real LocalCluster, SIGINT / SIGKILL of
a real `emdiffuse enhance` process, writes refused by the file system (a regular file where
a chunk folder must go, RLIMIT_FSIZE, a full tmpfs). The one instrumentation is enhance's
``chunk_hook`` (called at the start of each chunk task), used to time a kill or to record
which chunks a resumed run computes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

from emdiffuse.cli import EXIT_INTERRUPTED, EXIT_IO, EXIT_TERMINATED, main
from emdiffuse.errors import InputError
from emdiffuse.pipeline import run_record as record
from emdiffuse.pipeline.enhance import enhance
from emdiffuse.pipeline.lattice import iter_chunks

# hooks defined here travel to the workers by value (they cannot import this module)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHAPE = (3, 32, 32)
CHUNKS = (1, 16, 16)
N_CHUNKS = len(list(iter_chunks(SHAPE, CHUNKS)))  # 12
SETTINGS = dict(steps=2, tile=16, overlap=4, chunks=CHUNKS, dtype="float32")
CLI_SETTINGS = ["--steps", "2", "--tile", "16", "--overlap", "4", "--chunks", "1,16,16",
                "--dtype", "float32", "--quiet"]
# Runs on the threaded scheduler use 2 threads here and in the subprocesses (the same
# arithmetic in both); runs on a cluster are compared with a run on a cluster.
THREADS = dict(scheduler="threads", workers=2, progress=False)
CLI_THREADS = ["--threads", "--workers", "2"]
INTERRUPTED = "emdiffuse enhance: interrupted; finished chunks are kept, rerun with --resume"
TERMINATED = (
    "emdiffuse enhance: interrupted by SIGTERM; finished chunks are kept, rerun with --resume"
)


# ---- helpers ------------------------------------------------------------------------------
def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "emdiffuse.cli", *args]


def tree(root: Path) -> dict[str, bytes]:
    """Every file of an output (relative path -> bytes), without the run record and without
    zarr's own temporary files (``*.partial``, left only by a write killed mid-way)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and record.RECORD_DIR not in p.parts and not p.name.endswith(".partial")
    }


def digest(path: str | Path) -> str:
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path.parent)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def chunk_file(out: Path, index, image: str = "") -> Path:
    base = out / image if image else out
    return base / "0" / "c" / "/".join(str(i) for i in index)


def wait_for(
    predicate,
    what: str,
    *,
    proc: subprocess.Popen | None = None,
    thread: threading.Thread | None = None,
) -> None:
    """Wait until ``predicate()`` holds; fail if the run (``proc`` or ``thread``) ends first.
    No wall-clock bound: a loaded machine waits longer, and the suite's timeout guards."""
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.communicate()[1]}")
        if thread is not None and not thread.is_alive():
            pytest.fail(f"the run ended before {what}")
        time.sleep(0.01)


def assert_finished_chunks_complete(out: Path, reference: Path, images=("",)) -> set:
    """No false done records: every chunk marked done has all its files, equal to the
    reference's. Returns the marked chunks."""
    done = record.done_chunks(out)
    for index in done:
        for image in images:
            got = chunk_file(out, index, image)
            assert got.is_file(), f"chunk {index} marked done but {got} is missing"
            assert got.read_bytes() == chunk_file(reference, index, image).read_bytes(), index
    return done


# ---- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory, denoise_checkpoint, random_volume, source_env):
    """A tiny denoiser, a small float volume, the undisturbed (reference) output and the
    environment of an ``emdiffuse`` subprocess."""
    root = tmp_path_factory.mktemp("reliability")
    model = denoise_checkpoint
    volume = random_volume(SHAPE, chunks=(1, 32, 32))
    reference = root / "reference.zarr"
    enhance(volume, model, reference, **THREADS, **SETTINGS)
    env = dict(source_env, PYTHONUNBUFFERED="1")
    return {"root": root, "model": model, "input": volume, "reference": reference, "env": env}


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def cluster_reference(setup, client):
    """The undisturbed run on the two-worker cluster."""
    reference = setup["root"] / "cluster_reference.zarr"
    enhance(setup["input"], setup["model"], reference, client=client, progress=False, **SETTINGS)
    return reference


# ---- a worker process killed mid-run --------------------------------------------------------
def record_start_then_wait(folder: str, index) -> None:
    """chunk_hook: note which process started which chunk, then give a kill time to land."""
    name = ".".join(map(str, index))
    Path(folder, f"{name}-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(0.3)


def test_worker_killed_mid_chunk_run_completes_with_identical_bytes(
    setup, client, cluster_reference, tmp_path
):
    """SIGKILL to a worker process while it computes a chunk: Dask retries the chunk on the
    other worker, the run completes and its bytes equal the undisturbed run's."""
    started = tmp_path / "started"
    started.mkdir()
    out = tmp_path / "killed.zarr"
    hook = _partial(record_start_then_wait, str(started))
    pids = set(client.run(os.getpid).values())
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not threads
    errors: list[BaseException] = []

    def run():
        try:
            enhance(setup["input"], setup["model"], out, client=client, chunk_hook=hook,
                    progress=False, **SETTINGS)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()

    def in_progress():
        """(pid, chunk) started by a worker and not finished, once a first chunk is done."""
        done = {".".join(map(str, i)) for i in record.done_chunks(out)}
        if not done:
            return None
        for entry in started.iterdir():
            name, pid, _ = entry.name.split("-")
            if name not in done and int(pid) in pids:
                return int(pid), name
        return None

    wait_for(lambda: in_progress() is not None, "a chunk in progress", thread=thread)
    victim, chunk = in_progress()
    os.kill(victim, signal.SIGKILL)
    thread.join()  # no wall-clock bound: the suite's timeout guards
    assert not errors, errors

    assert victim not in set(client.run(os.getpid).values())  # the process really died
    runs = [e.name for e in started.iterdir() if e.name.startswith(chunk + "-")]
    assert {int(r.split("-")[1]) for r in runs} - {victim}, "the killed chunk was not retried"
    assert len(record.done_chunks(out)) == N_CHUNKS and record.is_complete(out)
    assert tree(out) == tree(cluster_reference)


class _partial:
    """functools.partial that cloudpickle ships by value along with its function."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __call__(self, *more):
        return self.func(*self.args, *more)


# ---- Ctrl-C (and a hard crash) of the `emdiffuse enhance` process ----------------------------
@pytest.mark.parametrize(
    "mode, sig",
    [("threads", signal.SIGINT), ("workers", signal.SIGINT), ("threads", signal.SIGKILL),
     ("threads", signal.SIGTERM), ("workers", signal.SIGTERM)],
    ids=["ctrl-c-threads", "ctrl-c-workers", "sigkill-threads", "sigterm-threads",
         "sigterm-workers"],
)
def test_interrupted_cli_resumes_to_identical_bytes(
    setup, client, cluster_reference, tmp_path, mode, sig
):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once some chunks
    are done: exit 130 with one line and no traceback; `--resume` computes only the
    unfinished chunks and ends with the undisturbed run's bytes. SIGTERM to the process
    group (a cancelled SLURM job) likewise, with exit 143 (128 + 15) and no warning of
    leaked semaphores; SIGKILL (a crash) too."""
    out = tmp_path / "out.zarr"
    scheduler = CLI_THREADS if mode == "threads" else ["--workers", "2"]
    reference = setup["reference"] if mode == "threads" else cluster_reference
    proc = subprocess.Popen(
        cli("enhance", str(setup["input"]), str(out), "--model", str(setup["model"]),
            *CLI_SETTINGS, *scheduler),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=setup["env"],
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(record.done_chunks(out)) >= 1, "a finished chunk", proc=proc)
        os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if sig == signal.SIGINT:
        assert proc.returncode == EXIT_INTERRUPTED, stderr
        assert stderr == INTERRUPTED + "\n"  # exactly one line, no traceback, no log chatter
        assert "Traceback" not in stdout
    elif sig == signal.SIGTERM:
        assert proc.returncode == EXIT_TERMINATED == 128 + signal.SIGTERM, stderr
        assert stderr == TERMINATED + "\n"  # one line: no traceback, no leaked semaphores
        assert "Traceback" not in stdout
    else:
        assert proc.returncode == -signal.SIGKILL
    time.sleep(0.5)  # let killed worker processes (if any) go
    finished = assert_finished_chunks_complete(out, reference)
    assert 1 <= len(finished) < N_CHUNKS, finished
    kept = {i: os.stat(chunk_file(out, i)) for i in finished}

    # resume in this process (threads, or the module's cluster for a worker run)
    where = CLI_THREADS if mode == "threads" else ["--scheduler-address",
                                                   client.scheduler.address]
    code = main(["enhance", str(setup["input"]), str(out), "--model", str(setup["model"]),
                 *CLI_SETTINGS, "--resume", *where])
    assert code == 0
    assert tree(out) == tree(reference)
    for index, stat in kept.items():  # finished chunks were skipped, not rewritten
        now = os.stat(chunk_file(out, index))
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), index
    assert record.is_complete(out) and len(record.done_chunks(out)) == N_CHUNKS


# ---- half-written chunks --------------------------------------------------------------------
def block_uncertainty_row(out: str, index) -> None:
    """chunk_hook: a regular file where the uncertainty chunks of z row 1 must go, so the
    file system refuses those writes (after the chunk's mean is already written)."""
    folder = Path(out, "uncertainty", "0", "c")
    folder.mkdir(parents=True, exist_ok=True)
    blocker = folder / "1"
    if not blocker.exists():
        blocker.write_text("not a folder")


def test_chunk_interrupted_between_writes_is_never_marked_and_is_redone(setup, tmp_path):
    """A chunk whose region write completed (the mean) but whose next write failed (the
    uncertainty) has no done marker, and --resume computes it again: the marker comes only
    after every write of the chunk. The output then equals an undisturbed run."""
    kw = dict(SETTINGS, samples=2, steps=1, chunks=(1, 16, 32), **THREADS)
    reference = tmp_path / "reference2.zarr"
    out = tmp_path / "out.zarr"
    enhance(setup["input"], setup["model"], reference, **kw)
    with pytest.raises(OSError):
        enhance(setup["input"], setup["model"], out,
                chunk_hook=_partial(block_uncertainty_row, str(out)), **kw)
    done = assert_finished_chunks_complete(out, reference, images=("", "uncertainty"))
    assert all(index[0] != 1 for index in done)
    all_chunks = set(iter_chunks(SHAPE, kw["chunks"]))
    half = {i for i in all_chunks if chunk_file(out, i).is_file()} - done
    assert half, "no chunk had its mean written before the failing write"
    for index in half:  # its first region write completed, yet it does not look finished
        assert chunk_file(out, index).read_bytes() == chunk_file(reference, index).read_bytes()
    assert not record.is_complete(out)

    (out / "uncertainty" / "0" / "c" / "1").unlink()
    resumed: list = []
    enhance(setup["input"], setup["model"], out, resume=True, chunk_hook=resumed.append, **kw)
    assert sorted(map(tuple, resumed)) == sorted(all_chunks - done)
    assert half <= set(map(tuple, resumed))
    assert tree(out) == tree(reference)


def test_run_record_is_written_atomically(setup, tmp_path):
    """The record of finished chunks and the run config: a write that fails (file too large)
    leaves the old content and no temporary file; a temporary file left by a killed writer
    never counts as a finished chunk; an unreadable record is refused with a clear message."""
    out = tmp_path / "rec.zarr"
    record.write_run_config(out, {"steps": 2})
    record.mark_done(out, (0, 0, 0))
    before = (record.record_dir(out) / "run.json").read_bytes()
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from emdiffuse.pipeline import run_record\n"
        "try:\n"
        f"    run_record.write_run_config({str(out)!r}, {{'big': 'x' * 100000}})\n"
        "except OSError as e:\n"
        "    print(e.errno)\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=setup["env"], timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "27", done.stderr  # EFBIG
    assert (record.record_dir(out) / "run.json").read_bytes() == before
    assert sorted(p.name for p in record.record_dir(out).iterdir()) == ["done", "run.json"]

    # a marker write killed before its rename leaves a hidden temporary file: not "done"
    (record.record_dir(out) / "done" / ".1.0.0.5f3a.tmp").touch()
    assert record.done_chunks(out) == {(0, 0, 0)}

    # a run record that cannot be read is refused, not trusted
    (record.record_dir(out) / "run.json").write_text('{"steps": 2, "seed"')
    with pytest.raises(InputError, match="unreadable.*--overwrite"):
        record.check_run_config(out, {"steps": 2})


# ---- a full disk ----------------------------------------------------------------------------
# Runs `emdiffuse ARGS...` with files limited to LIMIT bytes (no preexec_fn: this process
# has threads). SIGXFSZ ignored: an oversized write fails with EFBIG instead of killing.
LIMITED = (
    "import resource, runpy, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
    "sys.argv = ['emdiffuse', *sys.argv[2:]]\n"
    "runpy.run_module('emdiffuse.cli', run_name='__main__')\n"
)


def test_file_size_limit_clear_error_no_false_records_then_resume(setup, tmp_path):
    """Writes refused mid-run (RLIMIT_FSIZE: every chunk file is too large, the small
    metadata and run record fit): exit 74 with one line that says to free space and resume,
    the input untouched, no chunk recorded as done; --resume with room ends identical."""
    chunks = (1, 32, 32)
    kw = dict(SETTINGS, chunks=chunks)
    reference = tmp_path / "reference.zarr"
    enhance(setup["input"], setup["model"], reference, **THREADS, **kw)
    metadata = max(p.stat().st_size for p in [reference / "0" / "zarr.json",
                                               record.record_dir(reference) / "run.json"])
    smallest = min(chunk_file(reference, i).stat().st_size for i in iter_chunks(SHAPE, chunks))
    assert smallest > metadata + 64, "chunk files must be larger than the metadata here"
    limit = (metadata + smallest) // 2
    input_before = digest(setup["input"])
    out = tmp_path / "out.zarr"
    args = ["enhance", str(setup["input"]), str(out), "--model", str(setup["model"]),
            *CLI_SETTINGS, "--chunks", "1,32,32", *CLI_THREADS]
    done = subprocess.run([sys.executable, "-c", LIMITED, str(limit), *args],
                          capture_output=True, text=True, env=setup["env"], timeout=300)
    assert done.returncode == EXIT_IO, done.stderr
    err = done.stderr
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("emdiffuse enhance: error: I/O failed ([Errno 27] File too large)")
    assert "--resume" in err and "free disk space" in err
    assert digest(setup["input"]) == input_before
    assert record.read_run_config(out) is not None
    assert record.done_chunks(out) == set()  # no chunk file could be written: none is "done"
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))

    assert main([*args, "--resume"]) == 0
    assert tree(out) == tree(reference)
    assert digest(setup["input"]) == input_before


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d; rmdir $d"
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a private tmpfs mount")
def test_disk_full_mid_run_then_resume_with_space(setup, tmp_path):
    """A genuinely full disk (a 32 KiB tmpfs in a private mount namespace): some chunks are
    written, then ENOSPC. Exit 74 with one clear line; the finished chunks are recorded and
    intact, nothing else is; with room again (the output copied off the full disk),
    --resume ends with the reference bytes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out.zarr"
    copy = tmp_path / "out.zarr"
    args = ["enhance", str(setup["input"]), str(out), "--model", str(setup["model"]),
            *CLI_SETTINGS, *CLI_THREADS]
    quoted = " ".join(f"'{a}'" for a in cli(*args))
    script = (
        f"mount -t tmpfs -o size=32k tmpfs '{disk}' || exit 90\n"
        f"df -k '{disk}' >&2\n"
        f"{quoted} 2> '{tmp_path}/err'; echo $? > '{tmp_path}/rc'\n"
        f"cp -a '{out}' '{copy}'\n"
    )
    input_before = digest(setup["input"])
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          text=True, env=setup["env"], timeout=300)
    assert done.returncode == 0, done.stderr
    assert not any(disk.iterdir())  # the tmpfs lived in the namespace only
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == str(EXIT_IO), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "I/O failed ([Errno 28] No space left on device)" in err and "--resume" in err, err
    finished = assert_finished_chunks_complete(copy, setup["reference"])
    assert 1 <= len(finished) < N_CHUNKS, finished
    assert not record.is_complete(copy)
    assert digest(setup["input"]) == input_before

    args[2] = str(copy)
    assert main([*args, "--resume"]) == 0
    assert tree(copy) == tree(setup["reference"])
