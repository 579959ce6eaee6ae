"""`qwen-mlx download` against a fake Hugging Face Hub on 127.0.0.1.

The command runs the way a user runs it: its own process, ``HF_ENDPOINT`` pointing at the
hub (exactly how a mirror is chosen), ``HF_HOME`` in a temp folder, nothing else touched.
"""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from download_helpers import (
    EXCLUDED,
    REPO,
    WEIGHTS,
    FakeHub,
    MiB,
    assert_complete,
    finish,
    repo_files_in,
    run_download,
    start_download,
)


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


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The CLI's error: exit 1, exactly one ``Error:`` line, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


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
