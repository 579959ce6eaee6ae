"""A fake Hugging Face Hub on loopback and ``qwen-mlx download`` run against it, for the
download tests and any test that downloads a tiny model (a helper module, not a test module).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

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
    assert findings and all(f.status == "ok" for f in findings), findings
