"""`qwen-mlx download` against a fake Hugging Face Hub on 127.0.0.1.

The command runs the way a user runs it: its own process, ``HF_ENDPOINT`` pointing at the
hub (exactly how a mirror is chosen), ``HF_HOME`` in a temp folder, nothing else touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from qwen_mlx.model_files import check_model_dir

REPO = "Qwen/Tiny-Qwen2"
SHA = "0123456789abcdef0123456789abcdef01234567"
WEIGHTS = "model.safetensors"
MiB = 1 << 20
TRICKLE_FOR = 40  # seconds a trickling response lasts before the server hangs up
# In the repo, but not files the command should fetch: the same weights in other formats.
EXCLUDED = {
    "pytorch_model.bin": b"pickle" * 100,
    "onnx/model.onnx": b"onnx" * 100,
    "model.gguf": b"GGUF" * 100,
    ".gitattributes": b"*.safetensors filter=lfs\n",
}


class FakeHub:
    """Just enough of the Hub's HTTP API for ``huggingface_hub.snapshot_download``.

    Why it exists: what ``download`` promises (only the model's files, byte for byte, an
    interrupted download finished by a re-run, one-line errors) can only be seen end to end
    against a server, and tests run without internet. It serves ``files`` as repo ``REPO``
    at commit ``SHA`` (revisions ``main`` and ``SHA``):

    - ``GET /api/models/{repo}/revision/{rev}``  repo info: ``sha`` and ``siblings``
    - ``GET /api/models/{repo}/tree/{rev}``      the recursive file listing, one page
    - ``HEAD|GET /{repo}/resolve/{rev}/{path}``  a file, with ``X-Repo-Commit``, ``ETag``,
      ``Content-Length``; ``Range: bytes=N-`` answered with 206

    Unknown repos, revisions and files get 404 with the Hub's ``X-Error-Code``. A test makes
    the next GET of a file misbehave: ``drop[path] = n`` sends ``n`` bytes and closes the
    connection; ``stall[path] = n`` sends ``n`` bytes, then waits for ``release``;
    ``pace[path] = s`` sends 1 MiB every ``s`` seconds; ``trickle[path] = s`` sends one byte
    every ``s`` seconds (for at most ``TRICKLE_FOR`` seconds). ``started`` is set when such a
    GET has sent its first bytes. A request whose path contains one of ``silent`` is
    never answered (until ``release``). ``log`` holds ``(method, path, Range)`` per request;
    ``completed`` the paths whose body was sent to the end.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.log: list[tuple[str, str, str | None]] = []
        self.completed: list[str] = []
        self.drop: dict[str, int] = {}
        self.stall: dict[str, int] = {}
        self.pace: dict[str, float] = {}
        self.trickle: dict[str, float] = {}
        self.silent: tuple[str, ...] = ()
        self.started = threading.Event()
        self.release = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._handle(self, send_body=False)

            def do_GET(self):
                hub._handle(self, send_body=True)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def ranges(self, name: str) -> list[str | None]:
        """The Range header of each GET of file ``name`` (None: from the start)."""
        return [r for method, path, r in self.log if method == "GET" and path.endswith("/" + name)]

    def _handle(self, req: BaseHTTPRequestHandler, send_body: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        self.log.append((req.command, path, req.headers.get("Range")))
        if any(part in path for part in self.silent):
            self.release.wait(timeout=60)
            return None
        if m := re.fullmatch(r"/api/models/(\w[\w.-]*/[\w.-]+)/revision/([^/]+)", path):
            siblings = [{"rfilename": name} for name in self.files]
            return self._json(req, *m.groups(), {"id": m[1], "sha": SHA, "siblings": siblings})
        if m := re.fullmatch(r"/api/models/(\w[\w.-]*/[\w.-]+)/tree/([^/]+)", path):
            listing = [
                {
                    "type": "file",
                    "path": name,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                }
                for name, data in self.files.items()
            ]
            return self._json(req, *m.groups(), listing)
        if m := re.fullmatch(r"/(\w[\w.-]*/[\w.-]+)/resolve/([^/]+)/(.+)", path):
            repo, rev, name = m.groups()
            if self._missing(req, repo, rev):
                return None
            if name not in self.files:
                return self._error(req, "EntryNotFound")
            return self._file(req, name, send_body)
        return self._error(req, None)

    def _missing(self, req, repo: str, rev: str) -> bool:
        """Answer 404 the way the Hub does for an unknown repo or revision."""
        if repo != REPO:
            self._error(req, "RepoNotFound")
        elif rev not in ("main", SHA):
            self._error(req, "RevisionNotFound")
        else:
            return False
        return True

    def _json(self, req, repo: str, rev: str, payload) -> None:
        if self._missing(req, repo, rev):
            return
        body = json.dumps(payload).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def _file(self, req, name: str, send_body: bool) -> None:
        data = self.files[name]
        m = re.fullmatch(r"bytes=(\d+)-", req.headers.get("Range") or "")
        start = int(m[1]) if m else 0
        req.send_response(206 if start else 200)
        req.send_header("X-Repo-Commit", SHA)
        req.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        req.send_header("Accept-Ranges", "bytes")
        req.send_header("Content-Length", str(len(data) - start))
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        req.end_headers()
        req.close_connection = True
        if not send_body:
            return
        body = data[start:]
        try:
            if name in self.drop:
                req.wfile.write(body[: self.drop.pop(name)])
                return  # the connection closes mid-body
            if name in self.stall:
                req.wfile.write(body[: self.stall.pop(name)])
                req.wfile.flush()
                self.started.set()
                self.release.wait(timeout=30)
                return
            if name in self.trickle:
                self._trickle(req, body, self.trickle.pop(name))
                return
            delay = self.pace.pop(name, 0)
            for i in range(0, len(body), MiB):
                time.sleep(delay if i else 0)
                req.wfile.write(body[i : i + MiB])
                req.wfile.flush()
                self.started.set()
            self.completed.append(name)
        except OSError:  # the client hung up
            pass

    def _trickle(self, req, body: bytes, interval: float) -> None:
        """A byte every ``interval`` seconds: never a read timeout, next to no progress."""
        ends = time.monotonic() + TRICKLE_FOR
        for i in range(len(body)):
            if time.monotonic() > ends or self.release.is_set():
                return  # the connection closes mid-body
            req.wfile.write(body[i : i + 1])
            req.wfile.flush()
            self.started.set()
            time.sleep(interval)

    def _error(self, req, code: str | None) -> None:
        req.send_response(404)
        if code:
            req.send_header("X-Error-Code", code)
        req.send_header("Content-Length", "0")
        req.end_headers()


def padded_safetensors(weights: bytes, extra: int) -> bytes:
    """``weights`` plus an ``extra``-byte random tensor: a valid safetensors file of any size.

    huggingface_hub reads the body in 10 MiB chunks; resuming and stopping happen at chunk
    boundaries, so those tests need a file bigger than one chunk.
    """
    (size,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + size])
    data = weights[8 + size :]
    header["pad"] = {
        "dtype": "U8",
        "shape": [extra],
        "data_offsets": [len(data), len(data) + extra],
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data + random.Random(0).randbytes(extra)


@pytest.fixture
def model_files(tiny_model_dir) -> dict[str, bytes]:
    """The tiny model's files, by repo path: what a download must produce (a hub repo has
    no tiny-model output marker)."""
    from qwen_mlx.outputs import OUTPUT_MARK

    files = sorted(p for p in tiny_model_dir.iterdir() if p.is_file() and p.name != OUTPUT_MARK)
    return {p.name: p.read_bytes() for p in files}


@pytest.fixture
def hub(model_files):
    """A running fake hub serving the tiny model plus files the command must skip."""
    server = FakeHub({**model_files, **EXCLUDED})
    yield server
    server.close()


def start_download(cwd: Path, endpoint: str, *args: str, **hf_env: str) -> subprocess.Popen:
    """``qwen-mlx download ARGS`` as a user with ``HF_ENDPOINT`` (and ``hf_env``) set runs it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("HF_", "HUGGING")) and "PROXY" not in k.upper()
    }
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(cwd / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_ENABLE_HF_TRANSFER="0",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DOWNLOAD_TIMEOUT="5",
        NO_PROXY="*",
    )
    env.update(hf_env)
    return subprocess.Popen(
        [sys.executable, "-m", "qwen_mlx", "download", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_download(cwd: Path, endpoint: str, *args: str, **hf_env) -> subprocess.CompletedProcess:
    return finish(start_download(cwd, endpoint, *args, **hf_env))


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The CLI's error: exit 1, exactly one ``Error:`` line, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def repo_files_in(folder: Path) -> set[str]:
    """Repo paths present in a download folder (huggingface_hub's .cache/ bookkeeping aside)."""
    paths = {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}
    return {p.as_posix() for p in paths if p.parts[0] != ".cache"}


def assert_complete(folder: Path, files: dict[str, bytes]) -> None:
    """``folder`` holds exactly ``files``, byte for byte, and passes ``qwen-mlx check``."""
    assert repo_files_in(folder) == set(files)
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, f"{name} differs from the hub's"
    findings = check_model_dir(folder)
    assert all(f.status == "ok" for f in findings), findings


def test_download_fetches_exactly_the_model_files(hub, model_files, tmp_path):
    result = run_download(tmp_path, hub.url, REPO)

    assert result.returncode == 0, result.stderr
    assert f"{REPO} is complete" in result.stdout
    assert_complete(tmp_path / "models" / REPO, model_files)  # the default --local-dir
    assert not [path for _, path, _ in hub.log if path.endswith(tuple(EXCLUDED))]


def test_dropped_connection_resumes_where_it_stopped(hub, model_files, tmp_path):
    files = {**model_files, WEIGHTS: padded_safetensors(model_files[WEIGHTS], 12 * MiB)}
    hub.files.update(files)
    hub.drop[WEIGHTS] = 11 * MiB

    result = run_download(tmp_path, hub.url, REPO, "--local-dir", "out")

    assert result.returncode == 0, result.stderr
    first, retry = hub.ranges(WEIGHTS)
    assert first is None
    assert 0 < int(re.fullmatch(r"bytes=(\d+)-", retry)[1]) <= 11 * MiB  # not from byte 0
    assert_complete(tmp_path / "out", files)


def test_rerun_after_a_killed_download_completes_it(hub, model_files, tmp_path):
    hub.stall[WEIGHTS] = len(model_files[WEIGHTS]) // 3
    first = start_download(tmp_path, hub.url, REPO, "--local-dir", "out")
    assert hub.started.wait(timeout=30), "the download never reached the weights"
    first.kill()  # the terminal is closed mid-file
    finish(first)
    hub.release.set()
    finished = repo_files_in(tmp_path / "out")
    assert WEIGHTS not in finished
    before = len(hub.log)

    second = run_download(tmp_path, hub.url, REPO, "--local-dir", "out")

    assert second.returncode == 0, second.stderr
    assert_complete(tmp_path / "out", model_files)
    fetched_again = {path.rsplit("/", 1)[-1] for m, path, _ in hub.log[before:] if m == "GET"}
    assert WEIGHTS in fetched_again
    assert not fetched_again & finished, "files finished by the first run were fetched again"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT cannot be sent to a child there")
def test_ctrl_c_stops_mid_file_and_a_rerun_completes(
    hub, model_files, tmp_path, sigint_as_in_a_terminal
):
    files = {**model_files, WEIGHTS: padded_safetensors(model_files[WEIGHTS], 30 * MiB)}
    hub.files.update(files)
    hub.pace[WEIGHTS] = 0.15  # ~5 s for the whole file
    first = start_download(tmp_path, hub.url, REPO, "--local-dir", "out")
    assert hub.started.wait(timeout=30), "the download never reached the weights"
    first.send_signal(signal.SIGINT)

    error = one_line_error(finish(first, timeout=30))

    assert "interrupted" in error and "run the same command again" in error
    assert WEIGHTS not in repo_files_in(tmp_path / "out")
    assert WEIGHTS not in hub.completed, "Ctrl-C waited for the whole file"
    assert run_download(tmp_path, hub.url, REPO, "--local-dir", "out").returncode == 0
    assert_complete(tmp_path / "out", files)


def test_truncated_shard_is_reported_and_refetched_by_a_rerun(hub, model_files, tmp_path):
    # Shorter than its header says, with a matching Content-Length: only the header knows.
    hub.files[WEIGHTS] = model_files[WEIGHTS][:-100]

    error = one_line_error(run_download(tmp_path, hub.url, REPO, "--local-dir", "out"))

    assert f"{WEIGHTS} has the wrong size" in error and "run the same command again" in error
    hub.files[WEIGHTS] = model_files[WEIGHTS]  # the mirror is fixed; the advice must work
    assert run_download(tmp_path, hub.url, REPO, "--local-dir", "out").returncode == 0
    assert_complete(tmp_path / "out", model_files)


def test_repo_without_safetensors_is_not_usable(hub, model_files, tmp_path):
    hub.files = {k: v for k, v in hub.files.items() if k != WEIGHTS}  # e.g. a -GGUF repo

    error = one_line_error(run_download(tmp_path, hub.url, REPO, "--local-dir", "out"))

    assert "not a usable model" in error and ".safetensors" in error


def test_unreachable_endpoint_mentions_hf_endpoint(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"

    error = one_line_error(run_download(tmp_path, endpoint, REPO))

    assert endpoint in error and "HF_ENDPOINT" in error


def test_unknown_repo_says_check_the_id(hub, tmp_path):
    error = one_line_error(run_download(tmp_path, hub.url, "Qwen/No-Such-Model"))

    assert "Qwen/No-Such-Model not found" in error and "check the id" in error


def test_unknown_revision_names_it(hub, tmp_path):
    error = one_line_error(run_download(tmp_path, hub.url, REPO, "--revision", "v9"))

    assert "revision 'v9' not found" in error


def test_bad_repo_id_fails_before_any_request(hub, tmp_path):
    error = one_line_error(run_download(tmp_path, hub.url, "justaname"))

    assert "OWNER/NAME" in error
    assert hub.log == []


@pytest.mark.parametrize("silent", ["/revision/", "/tree/"], ids=["repo-info", "file-listing"])
def test_server_that_never_answers_is_given_up_on(hub, tmp_path, silent):
    hub.silent = (silent,)  # the connection is accepted; no answer ever comes
    started = time.monotonic()

    result = run_download(tmp_path, hub.url, REPO, "--local-dir", "out", HF_HUB_ETAG_TIMEOUT="1")

    error = one_line_error(result)
    # The hub itself retries a file listing with backoff: about 30 s at a 1 s timeout.
    assert time.monotonic() - started < 50
    assert "no answer in time" in error and "HF_HUB_ETAG_TIMEOUT=1s" in error
    lookups = [path for method, path, _ in hub.log if silent in path]
    assert len(lookups) >= 2, "a timed-out request was not tried again"


def test_a_trickling_server_is_dropped_after_the_stall_timeout_and_resumed(
    hub, model_files, tmp_path
):
    # Headers, then a byte every 0.2 s: each read is answered well inside the read timeout.
    hub.trickle[WEIGHTS] = 0.2
    started = time.monotonic()

    result = run_download(
        tmp_path, hub.url, REPO, "--local-dir", "out", QWEN_MLX_DOWNLOAD_STALL_TIMEOUT="2"
    )

    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 20  # the trickle alone lasts TRICKLE_FOR (40 s)
    stalls = [line for line in result.stderr.splitlines() if "less than 64 KiB in 2 s" in line]
    assert len(stalls) == 1 and stalls[0].startswith(WEIGHTS) and hub.url in stalls[0]
    assert len(hub.ranges(WEIGHTS)) == 2  # dropped once, then fetched again
    assert_complete(tmp_path / "out", model_files)


def test_a_bad_stall_timeout_is_refused_before_any_request(hub, tmp_path):
    error = one_line_error(
        run_download(tmp_path, hub.url, REPO, QWEN_MLX_DOWNLOAD_STALL_TIMEOUT="soon")
    )

    assert "QWEN_MLX_DOWNLOAD_STALL_TIMEOUT='soon'" in error
    assert hub.log == []


class Always(dict):
    """A misbehaviour table whose entries stay for every request (``pop`` keeps them)."""

    def pop(self, key, *default):
        return self[key] if key in self else default[0]


def test_a_server_that_only_trickles_is_given_up_on_in_one_line(hub, tmp_path):
    hub.trickle = Always({WEIGHTS: 0.2})
    started = time.monotonic()

    result = run_download(
        tmp_path, hub.url, REPO, "--local-dir", "out", QWEN_MLX_DOWNLOAD_STALL_TIMEOUT="1"
    )

    error = one_line_error(result)
    assert time.monotonic() - started < 40  # the hub's retries: 6 stalls and a second each
    assert hub.url in error and "less than 64 KiB in 1 s, even when asked again" in error
    assert "QWEN_MLX_DOWNLOAD_STALL_TIMEOUT" in error
    assert len(hub.ranges(WEIGHTS)) == 6
