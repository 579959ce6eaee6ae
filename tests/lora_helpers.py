"""Helpers for the fuse / export / adapter tests (imported by them; not a test module).

An adapter here is made the way our trainers' output looks: PEFT's own
``get_peft_model`` + ``save_pretrained`` on the tiny model. PEFT starts B at zero, so B is
set to random values to give every layer a real update. A run folder is that adapter plus
the resolved ``config.yaml``, as ``qwen-mlx train`` leaves it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from qwen_mlx.config import ALL_LINEAR

# A prompt mixing what Qwen users type: Chinese, English, digits, punctuation, specials.
from qwen_mlx.config_file import load_config, save_config

# A prompt mixing what Qwen users type: Chinese, English, digits, punctuation, specials.
MIXED_TEXT = (
    "<|im_start|>system\n你是报销助手。<|im_end|>\n<|im_start|>user\n"
    "报销细则第3条：住宿费每晚不超过500元吗？Is it 1,234.50 CNY (约￥1234.5)? 🚀 42%<|im_end|>\n"
    "<|im_start|>assistant\n"
)
_CACHE: dict[tuple, Path] = {}


def make_peft_adapter(
    base: Path,
    out: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    seed: int = 0,
    targets: list[str] = ALL_LINEAR,
    b_std: float = 0.01,
    **lora_kwargs,
) -> Path:
    """A PEFT LoRA adapter for ``base`` with random non-zero A and B, saved to ``out``.

    B's scale (0.01) moves the tiny model's logits by about 1, like a real fine-tune.
    """
    key = (
        str(base),
        str(out),
        rank,
        alpha,
        seed,
        tuple(targets),
        b_std,
        repr(sorted(lora_kwargs.items())),
    )
    if key in _CACHE:
        return _CACHE[key]
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # PEFT draws A from torch's global generator
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
        lora_dropout=0.05,
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(b_std * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out)
    _CACHE[key] = Path(out)
    return Path(out)


def make_run(run_dir: Path, model_dir: Path, adapter_dir: Path, *overrides: str) -> Path:
    """A run folder: ``adapter/`` plus the resolved ``config.yaml`` naming ``model_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(adapter_dir, run_dir / "adapter", dirs_exist_ok=True)
    sets = [f"model.path={model_dir}", f"output.dir={run_dir}", *overrides]
    save_config(load_config(None, None, sets), run_dir / "config.yaml")
    return run_dir


def hf_logits(model_dir: Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    """float32 logits of transformers (+ PEFT when ``adapter``), one row per position."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


def llama_logits(gguf: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    """llama.cpp's logits for ``ids`` (all positions), optionally with a LoRA GGUF applied."""
    import llama_cpp

    extra = {"lora_path": str(lora)} if lora else {}
    # A float32 KV cache (llama.cpp's default is f16) so that what differs is the file.
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        str(gguf), n_ctx=256, logits_all=True, verbose=False, type_k=f32, type_v=f32, **extra
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def fine_tune_answer(
    model_dir: Path, tokenizer, question: str, answer: str, out: Path, **template_options
) -> Path:
    """``model_dir`` fine-tuned (all weights, a few seconds) to answer ``question`` with
    ``answer`` and then close its turn with ``<|im_end|>``, as a trained model does; saved to
    ``out`` by transformers. ``template_options`` go to the chat template (enable_thinking).

    On a random model the logits are near-ties (top-2 gaps under 0.02 at ~6% of positions),
    where greedy agreement would measure noise, not an export."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    turn = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(
        turn, tokenize=False, add_generation_prompt=True, **template_options
    )
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + answer + "<|im_end|>")["input_ids"]
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = model(input_ids=torch.tensor([full_ids]), labels=torch.tensor([labels])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.02:
            break
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def gguf_fields(path: Path) -> dict:
    """A GGUF's metadata as plain Python values."""
    import gguf

    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


def gguf_types(path: Path) -> dict[str, str]:
    """Each tensor's GGML type name."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def check_llama_tokenizes_like(path: Path, tokenizer, texts: tuple[str, ...], token: str) -> None:
    """llama.cpp splits and joins each text exactly as the Hugging Face tokenizer does, and
    ``token`` (an added token) is one id in a prompt but plain text when specials are off."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in texts:
            expected = tokenizer(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected, text
            assert llm.detokenize(expected, special=True).decode() == text
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert llm.tokenize(token.encode(), add_bos=False, special=True) == [token_id]
        assert len(llm.tokenize(token.encode(), add_bos=False, special=False)) > 1
    finally:
        llm.close()
