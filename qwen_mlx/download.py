"""``qwen-mlx download``: fetch a model from the Hugging Face Hub (or a mirror) into models/.

A thin layer over ``huggingface_hub.snapshot_download``: only the files a model needs,
resumable (re-running continues partial files), ``HF_ENDPOINT`` honoured for mirrors, and
the result verified with the same checks ``qwen-mlx check`` runs.
"""

from __future__ import annotations

import re
from pathlib import Path

from qwen_mlx.errors import UserError
from qwen_mlx.model_files import check_model_dir

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


def default_local_dir(repo_id: str) -> Path:
    return Path("models") / repo_id


def _hub_error(err: Exception, repo_id: str, endpoint: str) -> UserError:
    """Turn the hub's exceptions into one line that says what to do."""
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):
        return UserError(f"{repo_id} is gated: accept its license on the hub, then `hf auth login`")
    if isinstance(err, errors.RepositoryNotFoundError):
        return UserError(f"{repo_id} not found on {endpoint}: check the id, e.g. Qwen/Qwen2.5-3B")
    if isinstance(err, errors.RevisionNotFoundError):
        return UserError(f"revision not found in {repo_id}: check --revision")
    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return UserError(
        f"cannot download {repo_id} from {endpoint} ({reason}); check the network, or set "
        "HF_ENDPOINT to a mirror (e.g. HF_ENDPOINT=https://hf-mirror.com) and run it again"
    )


def download(
    repo_id: str, local_dir: str | Path | None = None, revision: str | None = None
) -> Path:
    """Download ``repo_id`` into ``local_dir`` (default ``models/<repo_id>``) and verify it."""
    if not REPO_ID.match(repo_id):
        raise UserError(f"'{repo_id}' is not a repository id: use OWNER/NAME, e.g. Qwen/Qwen2.5-3B")
    from huggingface_hub import constants, snapshot_download

    target = Path(local_dir) if local_dir else default_local_dir(repo_id)
    try:
        snapshot_download(
            repo_id=repo_id,
            revision=revision,
            local_dir=str(target),
            allow_patterns=MODEL_FILE_PATTERNS,
        )
    except KeyboardInterrupt:
        raise UserError("download interrupted; run the same command again to resume") from None
    except (
        Exception
    ) as err:  # the hub raises many types (HTTP, connection, OS); all are user-facing
        raise _hub_error(err, repo_id, constants.ENDPOINT) from None
    failures = [f for f in check_model_dir(target) if f.status == "fail"]
    if failures:
        raise UserError(
            f"downloaded {repo_id} but {failures[0].title}; run the same command again to resume"
        )
    return target
