"""``qwen-mlx check``: is everything ready to train? (the seed's test_training_setup.py)

Runs every check even after a failure, so one run lists everything to fix: the config, the
model folder, the data files, the backend and its packages, what the backend's plan for the
run is here (``Backend.plan``: the notes training prints), the row layout it will use, and
whether the estimated peak memory fits this machine (``memory.fit``, as training fits it).
Each line is ✓ (fine), ⚠ (will work, but read this) or ✗ (training cannot start), with the
fix beside it.
Training can start when there is no ✗.
"""

from __future__ import annotations

import copy
from pathlib import Path

from qwen_mlx import memory
from qwen_mlx.backends import detect, get_backend, probe
from qwen_mlx.backends.base import DevicePlan
from qwen_mlx.backends.probes import PROBES
from qwen_mlx.chat_template import think_normalized
from qwen_mlx.config import Config, row_layout
from qwen_mlx.config_file import load_config
from qwen_mlx.data import load_records
from qwen_mlx.errors import UserError
from qwen_mlx.families import find_family
from qwen_mlx.memory import GiB
from qwen_mlx.model_files import Finding, check_model_dir, read_model_config
from qwen_mlx.run_data import layout_place

SYMBOLS = {"ok": "[green]✓[/]", "warn": "[yellow]⚠[/]", "fail": "[red]✗[/]"}
# Peak learning rates LoRA fine-tuning works with; far outside, a run diverges or learns nothing.
LORA_LEARNING_RATES = (1e-6, 1e-2)


def check_config(
    path: str | Path | None, preset: str | None, overrides: tuple[str, ...]
) -> tuple[Config | None, Finding]:
    try:
        cfg = load_config(path, preset, overrides)
    except UserError as err:
        return None, Finding("fail", "config", str(err), "fix the key named above")
    where = str(path) if path else "built-in defaults"
    return cfg, Finding("ok", "config", f"{where} is valid")


def check_learning_rate(cfg: Config) -> Finding:
    """A warning when training.learning_rate is outside the range LoRA runs use."""
    low, high = LORA_LEARNING_RATES
    rate = cfg.training.learning_rate
    if low <= rate <= high:
        return Finding("ok", "learning rate", f"{rate:g}")
    detail = f"training.learning_rate {rate:g} is outside the usual LoRA range {low:g} … {high:g}"
    fix = "LoRA runs typically use 1e-5 … 2e-4, as the --preset choices do"
    return Finding("warn", "learning rate", detail, fix)


def check_data(cfg: Config, train_records: list | None = None) -> list[Finding]:
    """A finding per data file; the training file's records are added to ``train_records``."""
    findings = []
    files = {
        "train": cfg.data.train_file,
        "valid": cfg.data.valid_file,
        "test": cfg.data.test_file,
        "replay": cfg.data.replay_file if cfg.data.replay_ratio > 0 else None,
    }
    for role, path in files.items():
        if path is None:
            continue
        # Only the training file is needed to start; a missing test file is a warning.
        missing = "fail" if role != "test" else "warn"
        try:
            records, report = load_records([path], system_prompt=cfg.data.system_prompt)
        except UserError as err:
            fix = f"repair what it names, or point data.{role}_file at another data file"
            findings.append(Finding(missing, f"{role} data", str(err), fix))
            continue
        if role == "train" and train_records is not None:
            train_records += records
        title = f"{role} data: {path}"
        if report.kept == 0:
            findings.append(
                Finding("fail", title, "no usable records", "see `qwen-mlx data stats`")
            )
        elif report.problems:
            first = "; ".join(map(str, report.problems[:3]))
            findings.append(Finding("warn", title, report.summary(), f"bad records: {first}"))
        else:
            findings.append(Finding("ok", title, report.summary()))
    return findings


def check_thinking(cfg: Config, records: list) -> Finding | None:
    """For a thinking model (Qwen3): whether ``chat.enable_thinking``, which decides how eval,
    chat and serve prompt the tuned model, fits the training data."""
    try:
        family = find_family(read_model_config(Path(cfg.model.path)))
    except (OSError, ValueError):  # the model finding already says what is wrong
        return None
    if family is None or not family.thinks or not records:
        return None
    # think_normalized: a think block opening the content is reasoning too.
    turns = (
        m for r in records for m in think_normalized(r.data.get("messages", []), family.think_tags)
    )
    reasoned = sum(bool(m.get("reasoning_content")) for m in turns)
    if reasoned and not cfg.chat.enable_thinking:
        detail = f"{reasoned} training turns carry reasoning, but prompts will ask for none"
        return Finding("warn", "chat.enable_thinking", detail, "--set chat.enable_thinking=true")
    if not reasoned and cfg.chat.enable_thinking:
        detail = "no training turn carries reasoning, but prompts will ask the model to think"
        return Finding("warn", "chat.enable_thinking", detail, "--set chat.enable_thinking=false")
    mode = "on: trained and prompted to think" if reasoned else "off: trained to answer directly"
    return Finding("ok", "chat.enable_thinking", mode)


def check_backend(cfg: Config) -> tuple[str | None, list[Finding]]:
    """The backend training would use here, and a finding per backend."""
    chosen, findings = None, []
    try:
        if cfg.training.backend == "auto":
            chosen, why = detect()
            findings.append(Finding("ok", f"backend auto picks {chosen}", why))
        else:
            chosen = cfg.training.backend
    except UserError as err:
        fix = "pip install 'qwen-mlx[mlx]' (Mac) or 'qwen-mlx[torch]'"
        findings.append(Finding("fail", "backend", str(err), fix))
        return None, findings
    for name in PROBES:
        found = probe(name)
        versions = ", ".join(f"{k} {v}" for k, v in found.packages.items())
        picked = name == chosen
        label = f"backend {name}" + (" (selected)" if picked else "")
        why = f"{found.reason}" + (f" — {versions}" if versions else "")
        status = "ok" if found.ok else "fail" if picked else "warn"
        findings.append(Finding(status, label, why, "" if found.ok else found.reason))
    return (chosen if probe(chosen).ok else None), findings


def check_plan(plan: DevicePlan) -> list[Finding]:
    """What the backend will really do here (training's own plan): its facts, and a
    warning for each way the run differs from the config."""
    findings = [Finding("ok", title, detail) for title, detail in plan.facts]
    # Each note names the config key it is about and what happens instead.
    return findings + [Finding("warn", "backend plan", note) for note in plan.notes]


LAYOUTS = {
    "packed": "samples packed into rows of training.max_seq_length",
    "unpacked": "one sample a row, padded to the batch's longest",
    "bucketed": "one sample a row, in batches of similar lengths",
}


def check_layout(cfg: Config, backend: str, plan: DevicePlan) -> Finding:
    """How the run will lay samples out into rows here (``training.packing``; ``auto``
    picks per place from the benchmarks, :data:`qwen_mlx.config.AUTO_LAYOUT`)."""
    where = layout_place(backend, plan)
    layout = row_layout(cfg.training, where)
    why = f" (training.packing: auto picks it on {where})" if cfg.training.packing == "auto" else ""
    return Finding("ok", "row layout", f"{layout}: {LAYOUTS[layout]}{why}")


def check_memory(cfg: Config, plan: DevicePlan) -> Finding:
    """Whether the run fits, decided as training decides it (:func:`qwen_mlx.memory.fit`)."""
    try:
        fit = memory.fit(copy.deepcopy(cfg), plan)  # a copy: check changes no setting
    except (OSError, ValueError, KeyError, UserError):
        return Finding("warn", "memory", "no estimate without a readable model config.json")
    est = fit.estimate
    if fit.available is None:
        return Finding("ok", "memory", f"needs {est.describe()}")
    detail = f"needs {est.describe()}; this machine has {fit.available / GiB:.0f} GiB"
    if fit.recompute_added:
        detail += f" (training will recompute {fit.recomputed} of {est.layers} layers to fit)"
    advice = "lower training.max_seq_length, use model.quantization: 4bit, or a smaller model"
    if est.total > fit.available:
        return Finding("fail", "memory", detail, advice)
    if est.total > 0.75 * fit.available:
        return Finding("warn", "memory", detail + " (tight)", advice)
    return Finding("ok", "memory", detail)


def run_checks(
    path: str | Path | None, preset: str | None = None, overrides: tuple[str, ...] = ()
) -> list[Finding]:
    """Every finding, in the order shown to the user."""
    cfg, finding = check_config(path, preset, overrides)
    if cfg is None:
        return [finding]
    findings = [finding, check_learning_rate(cfg)]
    model = check_model_dir(cfg.model.path, cfg.lora.target_modules)
    findings += [Finding(f.status, f"model: {f.title}", f.detail, f.fix) for f in model]
    model_ok = not any(f.status == "fail" for f in model)
    train_records: list = []
    findings += check_data(cfg, train_records)
    thinking = check_thinking(cfg, train_records)
    findings += [thinking] if thinking else []
    chosen, backend_findings = check_backend(cfg)
    findings += backend_findings
    if chosen is not None:
        plan = get_backend(chosen).plan(cfg)
        findings += check_plan(plan)
        findings.append(check_layout(cfg, chosen, plan))
        # The estimate reads the model's numbers; a ✗ above says what is wrong with them.
        no_estimate = Finding("warn", "memory", "no estimate until the model folder is fixed")
        findings.append(check_memory(cfg, plan) if model_ok else no_estimate)
    return findings


def render(findings: list[Finding], console) -> bool:
    """Print the findings; return True when training can start (no ✗)."""
    for f in findings:
        line = f"{SYMBOLS[f.status]} {f.title}"
        if f.detail:
            line += f" [dim]—[/] {f.detail}"
        console.print(line, highlight=False, soft_wrap=True)
        if f.fix and f.status != "ok":
            console.print(f"    [bold]fix:[/] {f.fix}", highlight=False, soft_wrap=True)
    ready = not any(f.status == "fail" for f in findings)
    verdict = "[green]ready to train[/]" if ready else "[red]not ready: fix the ✗ items above[/]"
    console.print(verdict)
    return ready
