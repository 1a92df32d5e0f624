"""The HF rollout engine and the packed forward pass on a tiny random model."""

import pytest
import torch

from l2a.logprobs import pack_completions
from l2a.model import load_model, load_tokenizer
from l2a.rollout import HFEngine, SamplingConfig, encode_chat
from tiny_model import CHATS



@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))



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


def test_pack_rejects_nothing():
    with pytest.raises(ValueError):
        pack_completions([], 0)
