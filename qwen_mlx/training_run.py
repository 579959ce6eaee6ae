"""Start or resume a training run: resolve the config and backend, set up the run folder.

The run folder (``output.dir``) describes itself: ``config.yaml`` holds the resolved config
that produced it, so ``--resume RUN`` needs nothing but the folder. The backend does the
training proper and writes ``adapter/``, ``checkpoints/`` and ``metrics.jsonl`` there.
"""

from __future__ import annotations

from pathlib import Path

from qwen_mlx.backends import get_backend, resolve
from qwen_mlx.config import Config, changed_keys, load_config, save_config
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import disk_errors
from qwen_mlx.model_files import require_model

RUN_CONFIG = "config.yaml"
# What a resumed run may change: when and how often things happen, never what is computed.
SAFE_ON_RESUME = ("training.max_steps", "training.eval_every", "training.save_every")


def _check_inputs(cfg: Config) -> None:
    require_model(cfg.model.path, cfg.lora.target_modules)  # what `check` marks ✗, in one line
    if not Path(cfg.data.train_file).is_file():
        raise UserError(f"training data not found: {cfg.data.train_file} (data.train_file)")


def _resumed_config(
    run_dir: Path,
    config_path: Path | None,
    backend: str | None,
    preset: str | None,
    overrides: tuple[str, ...],
) -> Config:
    """The run's saved config with what this command asks for applied on top (the given
    ``-c`` file, ``--preset``, ``--set``, ``--backend``), refused if that would change
    anything but SAFE_ON_RESUME: a resumed run must compute what the straight run would."""
    saved_path = run_dir / RUN_CONFIG
    if not saved_path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no {RUN_CONFIG}); pass the run's dir")
    saved = load_config(saved_path)
    cfg = load_config(config_path or saved_path, preset, overrides)
    cfg.output.dir = saved.output.dir  # --resume names the folder, whatever -c says
    if backend is not None and resolve(backend)[0] != resolve(saved.training.backend)[0]:
        cfg.training.backend = backend  # "auto" and the trainer it picks here are the same
    unsafe = [c for c in changed_keys(saved, cfg) if c[0] not in SAFE_ON_RESUME]
    if unsafe:
        listed = ", ".join(f"{key} changed ({old} → {new})" for key, old, new in unsafe)
        raise UserError(
            f"--resume: {listed}; a resumed run keeps the settings it started with (only "
            f"{', '.join(SAFE_ON_RESUME)} may change). Start a new run (another output.dir) "
            "to change them"
        )
    return cfg


def resolve_run(
    config_path: Path | None,
    backend: str | None,
    preset: str | None,
    overrides: tuple[str, ...],
    resume: Path | None,
) -> tuple[Config, Path]:
    """The config to train with and the run folder, for a new run or a resumed one."""
    if resume is not None:
        cfg = _resumed_config(resume, config_path, backend, preset, overrides)
        run_dir = resume
    else:
        cfg = load_config(config_path, preset, overrides)
        run_dir = Path(cfg.output.dir)
        if (run_dir / "adapter").exists() or (run_dir / "checkpoints").exists():
            raise UserError(
                f"{run_dir} already holds a run: resume it with `qwen-mlx train --resume "
                f"{run_dir}`, or pick a new folder with --set output.dir=…"
            )
        if backend is not None:
            cfg.training.backend = backend
    _check_inputs(cfg)
    return cfg, run_dir


def start(config_path, backend, preset, overrides, resume, console) -> Path:
    """``qwen-mlx train``: everything is checked before the run folder is touched."""
    cfg, run_dir = resolve_run(config_path, backend, preset, overrides, resume)
    trainer = get_backend(cfg.training.backend)
    console.print(f"backend: [bold]{trainer.name}[/] — run folder {run_dir}", highlight=False)
    with disk_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / RUN_CONFIG)
    result = trainer.train(cfg, run_dir, resume=resume is not None)
    console.print(f"[green]✓[/] adapter written to {result.adapter_dir}", highlight=False)
    return run_dir
