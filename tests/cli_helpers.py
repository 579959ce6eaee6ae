"""Helpers for tests that drive the command line (a helper module, not a test module)."""

from __future__ import annotations


def one_error_line(result) -> str:
    """Exit non-zero with exactly one ``Error:`` line; an escaping exception is a traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def settings(model_dir, train_file, tmp_path, *more):
    """``--set`` arguments for a one-step run of ``model_dir`` on ``train_file`` (into
    tmp_path/run)."""
    pairs = [
        f"model.path={model_dir}",
        f"data.train_file={train_file}",
        f"output.dir={tmp_path / 'run'}",
        "training.max_steps=1",
        *more,
    ]
    return [arg for pair in pairs for arg in ("--set", pair)]
