"""The Modelfile beside an exported GGUF, as text: sampling defaults from the model's
generation_config.json as ollama PARAMETER lines (ollama reads none from a GGUF), and the
family's ollama template set to how the run was tuned. How ollama renders the template is
tested in test_ollama_template.py (with Go)."""

from __future__ import annotations

import json

import pytest

from qwen_mlx.errors import UserError
from qwen_mlx.export.modelfile import modelfile_text, sampling_defaults
from qwen_mlx.families import QWEN2, QWEN3


def test_sampling_defaults_become_ollama_parameters(tmp_path):
    config = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    (tmp_path / "generation_config.json").write_text(json.dumps({**config, "do_sample": True}))
    sampling = sampling_defaults(tmp_path)
    assert sampling == config
    lines = modelfile_text("m.gguf", None, QWEN2, False, sampling).splitlines()
    assert lines[-4:] == [
        "PARAMETER temperature 0.7",
        "PARAMETER top_p 0.8",
        "PARAMETER top_k 20",
        "PARAMETER repeat_penalty 1.05",
    ]


def test_do_sample_false_is_greedy_in_ollama_too(tmp_path):
    config = {"do_sample": False, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    expected = {"temperature": 0.0, "repetition_penalty": 1.1}
    assert sampling_defaults(tmp_path, as_ollama=True) == expected
    # the GGUF's metadata keeps the values as written
    assert sampling_defaults(tmp_path)["temperature"] == 0.7


def test_only_the_sampling_defaults_the_model_gives_are_written(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"top_k": 40.0, "eos_token_id": 2}')
    sampling = sampling_defaults(tmp_path)
    assert sampling == {"top_k": 40}
    text = modelfile_text("m.gguf", None, QWEN3, False, sampling)
    assert [
        line for line in text.splitlines() if line.startswith("PARAMETER") and "stop" not in line
    ] == ["PARAMETER top_k 40"]
    assert sampling_defaults(tmp_path / "no-such-folder") == {}


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "not readable JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"temperature": "hot"}', "temperature must be a number"),
        ('{"top_k": true}', "top_k must be a number"),
    ],
)
def test_a_bad_generation_config_is_one_line_naming_the_file(tmp_path, text, words):
    path = tmp_path / "generation_config.json"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        sampling_defaults(tmp_path)
    message = str(error.value)
    assert str(path) in message and words in message and "\n" not in message


def test_the_export_writes_the_models_sampling_defaults(family, family_model_dir, tmp_path):
    pytest.importorskip("gguf")
    from qwen_mlx.export.gguf import export

    modelfile = export(None, tmp_path / "m.gguf", model=family_model_dir).modelfile.read_text()
    names = {"repetition_penalty": "repeat_penalty"}
    for key, value in family.tiny.sampling.items():
        assert f"PARAMETER {names.get(key, key)} {value}\n" in modelfile


def test_a_run_tuned_to_reason_sets_the_templates_switch_and_nothing_else():
    plain, thinking = QWEN3.ollama_template(), QWEN3.ollama_template(thinking=True)
    assert "{{- $tunedToThink := false }}" in plain
    assert thinking == plain.replace("$tunedToThink := false", "$tunedToThink := true")
    assert not plain.endswith("\n")  # the TEMPLATE ends where the reply starts
    # Qwen2 has no think block: one template.
    assert QWEN2.ollama_template(thinking=True) == QWEN2.ollama_template()
