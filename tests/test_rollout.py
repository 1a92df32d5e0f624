"""The HF rollout engine and the packed forward pass on a tiny random model."""

import pytest
import torch

from l2a.grpo import token_logprobs
from l2a.logprobs import completion_logits, pack_completions
from l2a.model import load_model, load_tokenizer
from l2a.prompts import policy_messages
from l2a.rollout import Completion, HFEngine, SamplingConfig, encode_chat

CHATS = [
    policy_messages([{"role": "user", "content": "I have a headache."}]),
    policy_messages([{"role": "user", "content": "My stomach hurts since yesterday, and I feel sick."}]),
    policy_messages([{"role": "user", "content": "Sore throat."}, {"role": "assistant", "content": "Any fever?"},
                     {"role": "user", "content": "A little."}]),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tiny64(tiny_model_dir):
    """The tiny model in float64: two computations claimed equal then agree to ~1e-15 on any CPU."""
    return load_model(str(tiny_model_dir), torch.float64), load_tokenizer(str(tiny_model_dir))


def test_generate_groups_seeding_and_finish(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer, batch_size=4)  # 9 sequences -> 3 batches, with left padding
    sampling = SamplingConfig(max_new_tokens=10, seed=3)
    out = engine.generate(CHATS, 3, sampling)
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for c in out:
        assert c.prompt_ids == encode_chat(tokenizer, CHATS[c.prompt_index])
        assert 1 <= len(c.token_ids) <= 10
        assert c.finish_reason == ("stop" if c.token_ids[-1] == tokenizer.eos_token_id else "length")
        assert tokenizer.eos_token_id not in c.token_ids[:-1]  # cut at the first end-of-turn
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    again = engine.generate(CHATS, 3, sampling)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]
    other = engine.generate(CHATS, 3, SamplingConfig(max_new_tokens=10, seed=4))
    assert [c.token_ids for c in other] != [c.token_ids for c in out]


def test_greedy_equals_argmax_of_an_unpadded_forward(tiny):
    model, tokenizer = tiny
    out = HFEngine(model, tokenizer, batch_size=8).generate(CHATS, 1, SamplingConfig(temperature=0.0, max_new_tokens=6))
    for c in out:  # batched + left-padded + KV-cached generation == one row at a time, no cache
        ids = list(c.prompt_ids)
        for token in c.token_ids:
            with torch.no_grad():
                assert model(torch.tensor([ids])).logits[0, -1].argmax().item() == token
            ids.append(token)


def test_packed_shared_prompt_logprobs_and_gradients_equal_full_rows(tiny64):
    """The shared-prompt forward is the plain per-row computation, reordered: in float64 both agree to ~1e-15."""
    model, tokenizer = tiny64
    completions = HFEngine(model, tokenizer).generate(CHATS, 2, SamplingConfig(max_new_tokens=7, seed=0))
    completions.append(Completion(1, completions[2].prompt_ids, [5], "x", "length"))  # a 1-token completion
    batch = pack_completions(completions, tokenizer.pad_token_id)
    assert batch.prompt_ids.shape[0] == 3 and batch.prompt_of.tolist() == [0, 0, 1, 1, 2, 2, 1]

    weights = torch.randn(batch.completion_ids.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    packed = token_logprobs(completion_logits(model, batch), batch.completion_ids)
    (packed * batch.completion_mask * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    total = 0.0
    for row, c in enumerate(completions):  # the plain way: every prompt+completion row on its own
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        logits = model(ids).logits[:, len(c.prompt_ids) - 1 : -1]
        reference = token_logprobs(logits, torch.tensor([c.token_ids]))[0]
        torch.testing.assert_close(packed[row, : len(c.token_ids)], reference, rtol=0, atol=1e-12)  # seen: 8e-15
        total = total + (reference * weights[row, : len(c.token_ids)]).sum()
    total.backward()
    for name, p in model.named_parameters():  # relative L2 error of each gradient (seen: 3e-15)
        assert (packed_grads[name] - p.grad).norm() <= 1e-12 * p.grad.norm(), name


def test_pack_rejects_nothing():
    with pytest.raises(ValueError):
        pack_completions([], 0)
