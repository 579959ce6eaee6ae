"""``qwen-mlx check``: is everything ready to train? (the seed's test_training_setup.py)

Runs every check even after a failure, so one run lists everything to fix: the config, the
model folder, the data files, the backend and its packages, and whether the estimated peak
memory fits this machine. Each line is ✓ (fine), ⚠ (will work, but read this) or ✗ (training
cannot start), with the fix beside it. Training can start when there is no ✗.
"""

from __future__ import annotations

import copy
from pathlib import Path

from qwen_mlx.backends import detect, probe
from qwen_mlx.backends.probes import PROBES
from qwen_mlx.config import Config, load_config, recomputed_layers
from qwen_mlx.data import load_records
from qwen_mlx.errors import UserError
from qwen_mlx.memory import GiB, estimate_training_memory, fit_recompute, system_memory
from qwen_mlx.model_files import Finding, check_model_dir, read_model_config

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


def check_data(cfg: Config) -> list[Finding]:
    findings = []
    files = {
        "train": cfg.data.train_file,
        "valid": cfg.data.valid_file,
        "test": cfg.data.test_file,
    }
    for role, path in files.items():
        if path is None:
            continue
        # Only the training file is needed to start; a missing test file is a warning.
        missing = "fail" if role != "test" else "warn"
        try:
            _, report = load_records([path], system_prompt=cfg.data.system_prompt)
        except UserError as err:
            fix = f"repair what it names, or point data.{role}_file at another data file"
            findings.append(Finding(missing, f"{role} data", str(err), fix))
            continue
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
        if picked and found.ok and name == "torch" and cfg.model.quantization != "none":
            findings.append(_torch_quantization(cfg, found.device, found.packages))
        if picked and found.ok and name == "torch":
            findings.append(_torch_kernels(cfg))
    return chosen, findings


def _torch_kernels(cfg: Config) -> Finding:
    """Which attention and fused kernels the torch backend will use here (training's rule)."""
    from qwen_mlx.backends.torch_model import attention_plan, kernel_plan, pick_device

    device = pick_device()
    attention, attention_note = attention_plan(cfg.training.attention, device)
    liger, kernel_note = kernel_plan(cfg.training.kernels, device)
    kernels = "Liger Kernel (fused RMSNorm, SwiGLU, RoPE, linear + CE)" if liger else "PyTorch's"
    detail = f"attention {attention}, kernels: {kernels}"
    notes = [n for n in (attention_note, kernel_note) if n]
    if notes:
        fix = "set training.attention / training.kernels to auto to silence this"
        return Finding("warn", "torch kernels", f"{detail} ({'; '.join(notes)})", fix)
    return Finding("ok", "torch kernels", detail)


def _torch_quantization(cfg: Config, device: str, packages: dict[str, str]) -> Finding:
    """What the torch backend will really do with model.quantization on this machine."""
    used, note = torch_quantization(cfg.model.quantization)
    if note:
        fix = "set model.quantization: none to silence this, or use the mlx backend on a Mac"
        return Finding("warn", "quantization", note, fix)
    where = "CUDA" if device == "cuda" else f"{device} (bitsandbytes' CPU path: slow)"
    return Finding("ok", "quantization", f"{used} via bitsandbytes on {where}")


def torch_quantization(requested: str) -> tuple[str, str | None]:
    """The torch backend's quantization here (same rule as training) and why it differs."""
    from qwen_mlx.backends.torch_model import pick_device, quantization_plan

    return quantization_plan(requested, pick_device())


def check_memory(cfg: Config, chosen: str | None) -> Finding:
    model_dir = Path(cfg.model.path)
    torch_device = probe("torch").device if chosen == "torch" else None
    quantization = cfg.model.quantization
    if torch_device is not None:
        quantization = torch_quantization(quantization)[0]
    try:
        model_config = read_model_config(model_dir)
        est = estimate_training_memory(
            model_config,
            quantization=quantization,
            rank=cfg.lora.rank,
            targets=cfg.lora.target_modules,
            max_seq_length=cfg.training.max_seq_length,
            batch_size=cfg.training.batch_size,
            fp32=torch_device == "cpu" and quantization == "none",
        )
    except (OSError, ValueError, KeyError):
        return Finding("warn", "memory", "no estimate without a readable model config.json")
    available = _device_memory(torch_device)
    if available is None:
        return Finding("ok", "memory", f"needs {est.describe()}")
    training = copy.deepcopy(cfg.training)
    fitted = fit_recompute(training, est, available)  # what training will do
    est = est.with_recompute(recomputed_layers(training, est.layers))
    detail = f"needs {est.describe()}; this machine has {available / GiB:.0f} GiB"
    if fitted:
        recomputed = recomputed_layers(training, est.layers)
        detail += f" (training will recompute {recomputed} of {est.layers} layers to fit)"
    advice = "lower training.max_seq_length, use model.quantization: 4bit, or a smaller model"
    if est.total > available:
        return Finding("fail", "memory", detail, advice)
    if est.total > 0.75 * available:
        return Finding("warn", "memory", detail + " (tight)", advice)
    return Finding("ok", "memory", detail)


def _device_memory(torch_device: str | None) -> int | None:
    """GPU memory when the torch backend trains on CUDA, else this machine's memory."""
    if torch_device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    return system_memory()


def run_checks(
    path: str | Path | None, preset: str | None = None, overrides: tuple[str, ...] = ()
) -> list[Finding]:
    """Every finding, in the order shown to the user."""
    cfg, finding = check_config(path, preset, overrides)
    if cfg is None:
        return [finding]
    findings = [finding, check_learning_rate(cfg)]
    findings += [
        Finding(f.status, f"model: {f.title}", f.detail, f.fix)
        for f in check_model_dir(cfg.model.path, cfg.lora.target_modules)
    ]
    findings += check_data(cfg)
    chosen, backend_findings = check_backend(cfg)
    findings += backend_findings
    findings.append(check_memory(cfg, chosen))
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
