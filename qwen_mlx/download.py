"""``qwen-mlx download``: fetch a model from the Hugging Face Hub (or a mirror) into models/.

A thin layer over ``huggingface_hub.snapshot_download``: only the files a model needs,
resumable (a re-run skips finished files and fetches the rest; a dropped connection is
resumed in place), ``HF_ENDPOINT`` honoured for mirrors, and the result verified with the
same checks ``qwen-mlx check`` runs. Ctrl-C stops the transfer promptly, and a server that
stops answering is given up on after a timeout and two retries.

A server that keeps the connection alive but sends next to nothing (headers, then a byte a
second) never trips a read timeout, so every response body is also watched: less than
``STALL_BYTES`` in ``QWEN_MLX_DOWNLOAD_STALL_TIMEOUT`` seconds (default 60) aborts that file
with a line naming the endpoint, and the hub's own retry resumes it from the bytes kept.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from qwen_mlx.errors import UserError
from qwen_mlx.model_files import check_model_dir, safetensors_header

# Weights, configs, tokenizer and chat template; no .bin/.pth duplicates, no onnx/gguf.
MODEL_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "LICENSE*",
    "README.md",
]
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Seconds to wait before each retry of a repo lookup that timed out.
RETRY_DELAYS = (1.0, 3.0)
STALL_ENV = "QWEN_MLX_DOWNLOAD_STALL_TIMEOUT"
DEFAULT_STALL_SECONDS = 60.0
# Progress is at least this much in a stall window (about 1 KiB/s at the default window);
# a trickle below it is a stall even though bytes keep arriving.
STALL_BYTES = 64 * 1024


def default_local_dir(repo_id: str) -> Path:
    return Path("models") / repo_id


def _root_cause(err: BaseException) -> BaseException:
    """The innermost ``__cause__`` (the hub wraps a refused connection in two layers)."""
    while err.__cause__ is not None and err.__cause__ is not err:
        err = err.__cause__
    return err


def _timed_out(err: BaseException | None) -> bool:
    """Did a timeout cause ``err``? The hub's HTTP library differs between its versions
    (requests, httpx, httpx2), and every one names its timeout exceptions ``*Timeout*``."""
    while err is not None:
        if isinstance(err, TimeoutError) or "Timeout" in type(err).__name__:
            return True
        err = err.__cause__ or err.__context__
    return False


def _stalled(err: BaseException | None) -> bool:
    """Did the stall guard (:func:`_stall_guard`) end the transfer ``err`` ended?"""
    while err is not None:
        if "Timeout" in type(err).__name__ and str(err).startswith(STALLED):
            return True
        err = err.__cause__ or err.__context__
    return False


def _timeout_reason() -> str:
    from huggingface_hub import constants

    return (
        "no answer in time, even when asked again; the waits are HF_HUB_ETAG_TIMEOUT="
        f"{constants.HF_HUB_ETAG_TIMEOUT}s and HF_HUB_DOWNLOAD_TIMEOUT="
        f"{constants.HF_HUB_DOWNLOAD_TIMEOUT}s"
    )


def _default_timeouts(request) -> None:
    """httpx request hook: the lookup timeout wherever the hub sent a request without one."""
    from huggingface_hub import constants

    given = request.extensions.get("timeout") or {}
    limit = constants.HF_HUB_ETAG_TIMEOUT
    request.extensions["timeout"] = {
        **given,
        **{k: limit for k in ("connect", "read", "write") if given.get(k) is None},
    }


def stall_seconds() -> float:
    """The stall timeout: ``QWEN_MLX_DOWNLOAD_STALL_TIMEOUT`` seconds, default 60."""
    raw = os.environ.get(STALL_ENV, "").strip()
    if not raw:
        return DEFAULT_STALL_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise UserError(f"{STALL_ENV}={raw!r} is not a number of seconds above 0 (e.g. 60)")
    return seconds


def _http_module(session):
    """The HTTP library of the hub's session (httpx or httpx2, by hub version)."""
    import importlib

    return importlib.import_module(type(session).__module__.split(".", 1)[0])


def _stall_guard(http):
    """An httpx(2) response hook that reads every body through a stall guard, raising a
    ``ReadTimeout`` (which the hub's download retries, resuming from the bytes it wrote) when
    less than ``STALL_BYTES`` arrive in the stall timeout."""

    class StallGuard(http.SyncByteStream):
        def __init__(self, stream, url: str, seconds: float):
            self.stream, self.url, self.seconds = stream, url, seconds

        def __iter__(self):
            since, received = time.monotonic(), 0
            for chunk in self.stream:
                received += len(chunk)
                now = time.monotonic()
                if received >= STALL_BYTES:
                    since, received = now, 0
                elif now - since > self.seconds:
                    _say_stalled(self.url, self.seconds)
                    raise http.ReadTimeout(f"{STALLED} ({self.url})")
                yield chunk

        def close(self):
            self.stream.close()

    def watch(response) -> None:
        response.stream = StallGuard(response.stream, str(response.request.url), stall_seconds())

    watch.stall_guard = True
    return watch


STALLED = "stalled"  # opens the message of the timeout a stall raises


def _say_stalled(url: str, seconds: float) -> None:
    """The line a stall prints: which file, which endpoint, what happens next."""
    from huggingface_hub import constants

    name = url.rsplit("/", 1)[-1]
    print(
        f"{name}: {constants.ENDPOINT} sent less than {STALL_BYTES // 1024} KiB in {seconds:g} s "
        f"({STALL_ENV}); dropped the connection, trying again from where it stopped",
        file=sys.stderr,
        flush=True,
    )


def _bound_hub_requests() -> None:
    """Give each of the hub's requests a timeout, and each response body a stall guard. Its
    API calls (repo info, file listing) have no timeout, so a server that accepts the
    connection and never answers hangs them."""
    from huggingface_hub import get_session

    session = get_session()
    hooks = getattr(session, "event_hooks", None)  # httpx(2): huggingface_hub >= 1.0
    if hooks is None:
        return
    if _default_timeouts not in hooks["request"]:
        hooks["request"].append(_default_timeouts)
    if not any(getattr(hook, "stall_guard", False) for hook in hooks["response"]):
        hooks["response"].append(_stall_guard(_http_module(session)))


def _resolve(repo_id: str, revision: str | None) -> str:
    """The commit ``revision`` names, asked again after a timeout (``RETRY_DELAYS``)."""
    from huggingface_hub import HfApi, constants

    named = revision or constants.DEFAULT_REVISION  # what snapshot_download would ask for

    def lookup() -> str:
        timeout = constants.HF_HUB_ETAG_TIMEOUT
        return HfApi().repo_info(repo_id, revision=named, timeout=timeout).sha or named

    for delay in RETRY_DELAYS:
        try:
            return lookup()
        except Exception as err:  # the hub's error types differ between its versions
            if not _timed_out(err):
                raise
        time.sleep(delay)
    return lookup()


def _hub_error(err: Exception, repo_id: str, endpoint: str, revision: str | None) -> UserError:
    """Turn the hub's exceptions into one line that says what to do."""
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):
        return UserError(f"{repo_id} is gated: accept its license on the hub, then `hf auth login`")
    if isinstance(err, errors.RepositoryNotFoundError):
        return UserError(
            f"{repo_id} not found on {endpoint}: check the id, e.g. Qwen/Qwen2.5-3B "
            "(a private repo needs `hf auth login`)"
        )
    if isinstance(err, errors.RevisionNotFoundError):
        return UserError(f"revision '{revision}' not found in {repo_id}: check --revision")
    cause = _root_cause(err)
    lines = str(cause).strip().splitlines()
    reason = lines[0][:200] if lines else type(cause).__name__
    if _stalled(err):
        reason = (
            f"it sent less than {STALL_BYTES // 1024} KiB in {stall_seconds():g} s, even when "
            f"asked again; {STALL_ENV} sets the wait"
        )
    elif _timed_out(err):
        reason = _timeout_reason()
    return UserError(
        f"cannot download {repo_id} from {endpoint} ({reason}); check the network, or set "
        "HF_ENDPOINT to a mirror (e.g. HF_ENDPOINT=https://hf-mirror.com) and run it again"
    )


def _remove_broken_shards(folder: Path) -> list[str]:
    """Delete .safetensors files whose size disagrees with their header; return their names.

    Such a file is unusable, and huggingface_hub trusts any file it finished once, so it
    would never fetch it again: removing it is what lets a re-run repair the folder.
    """
    broken = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            _, expected = safetensors_header(path)
            ok = path.stat().st_size == expected
        except (ValueError, OSError):
            ok = False
        if not ok:
            path.unlink(missing_ok=True)
            broken.append(path.name)
    return broken


class _Cancelled(Exception):
    """Raised inside a download thread once Ctrl-C was pressed."""


@contextmanager
def _stop_on_ctrl_c():
    """A progress-bar class for ``snapshot_download`` that aborts its threads after Ctrl-C.

    Without it Ctrl-C waits for every file in flight to finish (the hub's thread pool
    joins its workers): minutes for a multi-GB shard. The download threads report each
    received chunk to the progress bar, so its ``update`` is where they can be stopped.
    """
    from huggingface_hub.utils import tqdm

    cancel = threading.Event()

    class CancellableTqdm(tqdm):
        def update(self, n=1):
            if cancel.is_set():
                raise _Cancelled
            return super().update(n)

    def on_sigint(signum, frame):
        cancel.set()
        raise KeyboardInterrupt

    # Only the main thread may set handlers; an ignored SIGINT (a background job) stays so.
    in_main = threading.current_thread() is threading.main_thread()
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main and not ignored else None
    try:
        yield CancellableTqdm
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def download(
    repo_id: str, local_dir: str | Path | None = None, revision: str | None = None
) -> Path:
    """Download ``repo_id`` into ``local_dir`` (default ``models/<repo_id>``) and verify it.

    Safetensors files already in the folder whose size disagrees with their header are
    deleted first and fetched again.
    """
    if not REPO_ID.match(repo_id):
        raise UserError(f"'{repo_id}' is not a repository id: use OWNER/NAME, e.g. Qwen/Qwen2.5-3B")
    from huggingface_hub import constants, snapshot_download

    stall_seconds()  # a bad QWEN_MLX_DOWNLOAD_STALL_TIMEOUT is refused before any request
    target = Path(local_dir) if local_dir else default_local_dir(repo_id)
    _remove_broken_shards(target)
    _bound_hub_requests()
    try:
        with _stop_on_ctrl_c() as progress_class:
            # Looked up here, where a timeout is retried: inside snapshot_download a failed
            # lookup is taken as "offline" and whatever is in the folder is returned.
            snapshot_download(
                repo_id=repo_id,
                revision=_resolve(repo_id, revision),
                local_dir=str(target),
                allow_patterns=MODEL_FILE_PATTERNS,
                tqdm_class=progress_class,
            )
    except (KeyboardInterrupt, _Cancelled):
        raise UserError("download interrupted; run the same command again to resume") from None
    # The hub raises many types (HTTP, connection, OS); all of them are user-facing here.
    except Exception as err:
        raise _hub_error(err, repo_id, constants.ENDPOINT, revision) from None
    failures = [f for f in check_model_dir(target) if f.status == "fail"]
    if not failures:
        return target
    broken = _remove_broken_shards(target)
    if broken:
        raise UserError(
            f"downloaded {repo_id} but {failures[0].title}; deleted {', '.join(broken)}: run the "
            "same command again to fetch it anew (if this repeats, the server's copy is broken: "
            "try another HF_ENDPOINT)"
        )
    raise UserError(
        f"{repo_id} is not a usable model: {failures[0].title} (qwen-mlx needs config.json, a "
        "tokenizer and .safetensors weights, e.g. Qwen/Qwen2.5-3B, not a -GGUF repo); if the "
        "download was cut short, run the same command again"
    )
