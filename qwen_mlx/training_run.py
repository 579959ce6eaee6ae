"""Start or resume a training run: the one place a run is orchestrated, for every backend.

:func:`train` asks the backend for its plan (device, ranks, what the config really gets
here) and prints its notes, builds the run's data (rank 0 writes it into the run folder),
fits the run into memory once (:func:`qwen_mlx.memory.fit`), gets the loop's hooks from the
backend's ``trainer``, runs :func:`qwen_mlx.loop.train_loop`, writes the adapter and closes
the trainer. The run folder (:class:`~qwen_mlx.run_dir.RunDir`) describes itself: its
``config.yaml`` holds the resolved config, so ``--resume RUN`` needs nothing but the folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console

from qwen_mlx import memory
from qwen_mlx.backends import get_backend, resolve
from qwen_mlx.backends.base import Backend, TrainResult
from qwen_mlx.config import Config
from qwen_mlx.config_file import changed_keys, load_config, save_config
from qwen_mlx.errors import UserError
from qwen_mlx.fsutil import disk_errors
from qwen_mlx.model_files import require_model
from qwen_mlx.run_dir import RUN_CONFIG, RunDir

# What a resumed run may change: when and how often things happen, never what is computed,
# and whole sections that training never reads (the distill step's, and how eval, chat and
# serve prompt the tuned model).
SAFE_ON_RESUME = ("training.max_steps", "training.eval_every", "training.save_every")
UNUSED_BY_TRAINING = ("distill", "chat")


def _safe_on_resume(key: str) -> bool:
    return key in SAFE_ON_RESUME or key.split(".", 1)[0] in UNUSED_BY_TRAINING


def adopt_adapter(cfg: Config) -> str | None:
    """``training.from_adapter`` (a run folder or an adapter folder) resolved to the adapter
    folder, and the run's LoRA shape (rank, alpha, targets) taken from it, since its weights
    are the starting point; returns a note when that changed the config, else None."""
    from qwen_mlx.adapters import load_adapter

    given = Path(cfg.training.from_adapter)
    folder = given / "adapter" if (given / "adapter").is_dir() else given
    if not folder.is_dir():
        raise UserError(f"training.from_adapter {given}: not a run or adapter folder")
    adapter = load_adapter(folder)
    rank, scale = adapter.common_scale()
    targets = sorted({name.rsplit(".", 1)[-1] for name in adapter.pairs})
    lora = cfg.lora
    shape = (rank, float(scale * rank), targets)
    before = (lora.rank, float(lora.alpha), sorted(lora.target_modules))
    cfg.training.from_adapter = str(folder)
    if shape == before:
        return None
    lora.rank, lora.alpha, lora.target_modules = rank, scale * rank, targets
    return (
        f"lora.rank {rank}, alpha {scale * rank:g} and target_modules {targets} come from "
        f"{folder} (the adapter the run starts from)"
    )


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
    if cfg.training.packing == "auto":  # e.g. -c the config the run started from
        cfg.training.packing = saved.training.packing  # the layout auto picked then
    unsafe = [c for c in changed_keys(saved, cfg) if not _safe_on_resume(c[0])]
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
        if RunDir(run_dir).has_run():
            raise UserError(
                f"{run_dir} already holds a run: resume it with `qwen-mlx train --resume "
                f"{run_dir}`, or pick a new folder with --set output.dir=…"
            )
        if backend is not None:
            cfg.training.backend = backend
        if cfg.training.from_adapter:
            note = adopt_adapter(cfg)
            if note:
                _warn(Console(stderr=True), note)
    _check_inputs(cfg)
    return cfg, run_dir


def _warn(console: Console, line: str) -> None:
    console.print(f"[yellow]⚠[/] {line}", highlight=False)


def _prepare(backend: Backend, cfg: Config, run: RunDir, console: Console):
    """The plan (its notes shown), the run's data and the memory fit, before any loading."""
    from qwen_mlx.run_data import build_run_data, layout_place, pin_layout
    from qwen_mlx.tokens import load_tokenizer

    plan = backend.plan(cfg)
    out = console if plan.main else Console(quiet=True)  # rank 0 speaks for the run
    out.print(f"device: {plan.device}", highlight=False)
    for note in plan.notes:
        _warn(out, note)
    tokenizer = load_tokenizer(cfg.model.path)
    if cfg.training.packing == "auto":
        pin_layout(cfg, layout_place(backend.name, plan))
        if plan.main and run.config.is_file():
            save_config(cfg, run.config)  # records the layout auto picked: a resume keeps it
    data = build_run_data(cfg, tokenizer, run.path if plan.main else None)
    for line in data.messages:
        out.print(line, highlight=False)
    fit = memory.fit(cfg, plan)  # before the trainer: it builds the step with recomputation
    for note in fit.notes:
        _warn(out, note)
    return dataclasses.replace(plan, tight_memory=fit.tight), data


def train(cfg: Config, run_dir: Path, resume: bool, console: Console) -> TrainResult:
    """Train per ``cfg`` into ``run_dir`` (resuming from its newest checkpoint if asked)."""
    from qwen_mlx.loop import train_loop

    backend = get_backend(cfg.training.backend)
    run = RunDir(Path(run_dir))
    plan, data = _prepare(backend, cfg, run, console)
    hooks = backend.trainer(cfg, plan)
    try:
        state = train_loop(cfg, data, hooks, run.path, console, resume)
        if plan.main:
            hooks.save_adapter(run.adapter)
        hooks.all_reduce_sum(0.0)  # every rank waits until rank 0 has written the adapter
    finally:
        hooks.close()
    return TrainResult(run.path, run.adapter, state.step)


def start(config_path, backend, preset, overrides, resume, console) -> Path:
    """``qwen-mlx train``: everything is checked before the run folder is touched."""
    cfg, run_dir = resolve_run(config_path, backend, preset, overrides, resume)
    name = get_backend(cfg.training.backend).name
    console.print(f"backend: [bold]{name}[/] — run folder {run_dir}", highlight=False)
    with disk_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, RunDir(run_dir).config)
    result = train(cfg, run_dir, resume is not None, console)
    console.print(f"[green]✓[/] adapter written to {result.adapter_dir}", highlight=False)
    return run_dir
