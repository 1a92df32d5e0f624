"""The trainer's forward pass (``l2a/logprobs.py``) on the tiny model: exact, checkpointed for real, chunked,
and with every tensor made on its inputs' device.

Claims of exactness ("the same numbers, computed another way") are checked in float64 (see
``tiny_model.keep_float64_in_rmsnorm``), where a different order of summation changes results by ~1e-15.
"""

from __future__ import annotations

import json

import pytest
import torch
from device_watch import StrayFactoryWatch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from l2a.grpo import token_logprobs
from l2a.logprobs import allow_checkpointing_with_prompt_cache, completion_logprobs, pack_completions
from l2a.model import load_model, load_tokenizer
from l2a.rollout import Completion, HFEngine, SamplingConfig
from tiny_model import CHATS



@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def model64(tiny_model_dir):
    return load_model(str(tiny_model_dir), torch.float64).train()


@pytest.fixture(scope="module")
def completions(tiny_model_dir, tokenizer) -> list[Completion]:
    """Two samples for each chat, and one 1-token completion (pass 2 is empty for it)."""
    sampled = HFEngine(load_model(str(tiny_model_dir)), tokenizer).generate(CHATS, 2, SamplingConfig(max_new_tokens=7))
    return sampled + [Completion(1, sampled[2].prompt_ids, [5], "x", "length")]


def weighted_sum_and_grads(model, logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Backward of a fixed random weighting of the token log-probabilities; the gradients it leaves."""
    weights = torch.randn(logprobs.shape, dtype=logprobs.dtype, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    (logprobs * mask * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_gradients(got: dict, want: dict) -> None:
    for name, grad in want.items():  # relative L2 error of each gradient (seen: ~3e-15)
        assert (got[name] - grad).norm() <= 1e-12 * grad.norm(), name


def test_shared_prompt_logprobs_and_gradients_equal_full_rows(tiny_model_dir, tokenizer, completions):
    """The two-pass forward is the plain per-row computation, reordered."""
    model = model64(tiny_model_dir)
    batch = pack_completions(completions, tokenizer.pad_token_id)
    assert batch.prompt_ids.shape[0] == 3 and batch.prompt_of.tolist() == [0, 0, 1, 1, 2, 2, 1]
    packed, _ = completion_logprobs(model, batch)
    packed_grads = weighted_sum_and_grads(model, packed, batch.completion_mask)

    rows = []
    for c in completions:  # the plain way: every prompt+completion row on its own, all logits
        logits = model(torch.tensor([c.prompt_ids + c.token_ids])).logits[:, len(c.prompt_ids) - 1 : -1]
        rows.append(token_logprobs(logits, torch.tensor([c.token_ids]))[0])
    plain = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    torch.testing.assert_close(packed * batch.completion_mask, plain, rtol=0, atol=1e-12)  # seen: 8e-15
    assert_same_gradients(packed_grads, weighted_sum_and_grads(model, plain, batch.completion_mask))


def saved_activation_bytes(model, run) -> int:
    """Bytes that autograd keeps for backward while ``run()`` executes, weights excluded (they exist anyway)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if tensor.untyped_storage().data_ptr() not in weights:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return total


def test_gradient_checkpointing_recomputes_every_layer_shares_prompts_and_changes_nothing(
        tiny_model_dir, tokenizer, completions):
    """With checkpointing each decoder layer runs twice per pass (forward, and again in backward), the activations
    kept for backward shrink, and the log-probabilities and gradients stay exactly the same."""
    batch = pack_completions(completions, tokenizer.pad_token_id)
    runs = {}
    for checkpointing in (False, True):
        model = model64(tiny_model_dir)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            allow_checkpointing_with_prompt_cache(model)
        calls = [0]
        for layer in model.model.layers:
            # a pre-hook: a replay stops early, once it has recomputed what backward needs, so no post-hook runs
            layer.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
        result = {}

        def forward_backward():
            logprobs, _ = completion_logprobs(model, batch)
            result["logprobs"] = logprobs.detach()
            result["grads"] = weighted_sum_and_grads(model, logprobs, batch.completion_mask)

        result["saved"] = saved_activation_bytes(model, forward_backward)
        result["calls"] = calls[0]
        runs[checkpointing] = result
    layers = len(model.model.layers)
    assert runs[False]["calls"] == 2 * layers  # pass 1 (prompts) and pass 2 (completions), once each
    assert runs[True]["calls"] == 4 * layers  # ... and each replayed in backward
    assert runs[True]["saved"] < 0.5 * runs[False]["saved"], (runs[True]["saved"], runs[False]["saved"])
    torch.testing.assert_close(runs[True]["logprobs"], runs[False]["logprobs"], rtol=0, atol=1e-12)
    assert_same_gradients(runs[True]["grads"], runs[False]["grads"])


class LargestLogits(TorchDispatchMode):
    """Records the largest [rows, positions, vocabulary] tensor made in forward or backward (2-D ones are the
    head's weight and its gradient)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 3 and tensor.shape[-1] == self.vocab:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_chunked_logprobs_equal_whole_batch_logprobs_with_a_fraction_of_the_logits(tiny_model_dir, tokenizer,
                                                                                 completions):
    model = model64(tiny_model_dir)
    batch = pack_completions(completions, tokenizer.pad_token_id)
    vocab, (rows, width) = model.config.vocab_size, batch.completion_ids.shape
    results = {}
    for chunk_tokens in (rows * width, 2 * width):  # everything at once; two completions at a time
        with LargestLogits(vocab) as watch:
            logprobs, entropy = completion_logprobs(model, batch, 1.0, chunk_tokens)
            grads = weighted_sum_and_grads(model, logprobs, batch.completion_mask)
        results[chunk_tokens] = (logprobs.detach(), entropy, grads, watch.largest)
    whole, chunked = results[rows * width], results[2 * width]
    # in forward and in backward (pass 2 projects the C - 1 positions after the first)
    assert whole[3] == rows * (width - 1) * vocab and chunked[3] == 2 * (width - 1) * vocab
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=1e-12)
    assert_same_gradients(chunked[2], whole[2])


class Stop(Exception):
    pass


class ElsewhereModel(torch.nn.Module):
    """A stand-in for a model on another device (a GPU): it records the devices of the tensors it is given."""

    device = torch.device("meta")

    def __init__(self, generation_config):
        super().__init__()
        self.generation_config, self.seen = generation_config, []

    def forward(self, **inputs):
        self.seen = [(name, t.device) for name, t in inputs.items() if isinstance(t, torch.Tensor)]
        raise Stop


def test_hf_engine_feeds_the_model_on_the_models_device(tiny_model_dir, tokenizer):
    model = ElsewhereModel(load_model(str(tiny_model_dir)).generation_config)
    with pytest.raises(Stop):
        HFEngine(model, tokenizer).generate(CHATS, 2, SamplingConfig(max_new_tokens=4))
    assert model.seen and all(device == model.device for _, device in model.seen), model.seen


def test_a_training_step_makes_every_tensor_on_its_inputs_device(tiny_model_dir, tmp_path):
    """One whole step of train.py (rollouts, rewards, advantages, loss with a KL reference, backward, optimizer,
    logging, held-out evaluation, checkpoint), watched for tensor factories called without a device."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"cid": f"{i}", "session_id": i, "diagn": "cold", "decision_truth": decision,
                                        "messages": [{"role": "user", "content": "I have a cold."}],
                                        "info_truth": "symptom: cough"}) + "\n"
                            for i, decision in enumerate(["continue", "stop"] * 2)))
    with StrayFactoryWatch() as watch:
        train.main(["--model", str(tiny_model_dir), "--train_file", str(data), "--eval_file", str(data),
                    "--output_dir", str(tmp_path / "run"), "--steps", "1", "--prompts_per_step", "2",
                    "--group_size", "2", "--max_new_tokens", "4", "--kl_coef", "0.1", "--eval_every", "1",
                    "--logprob_chunk_tokens", "4", "--dtype", "bfloat16", "--sft_steps", "0"])  # mixed precision: bf16 sampling copy too
    assert watch.strays == [], watch.strays


def test_bfloat16_mixed_precision_stays_within_bf16_precision_of_float32(tiny_model_dir, tokenizer, completions):
    """bf16 compute (autocast) on float32 weights: log-probabilities within bf16's resolution of float32's, and the
    gradient (into float32 master weights) pointing the same way. The parity stated in the README."""
    batch = pack_completions(completions, tokenizer.pad_token_id)
    results = {}
    for bf16 in (False, True):
        model = load_model(str(tiny_model_dir)).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logprobs, _ = completion_logprobs(model, batch)
        grads = weighted_sum_and_grads(model, logprobs.float(), batch.completion_mask)
        assert all(g.dtype == torch.float32 for g in grads.values())  # master weights and gradients stay float32
        results[bf16] = (logprobs.detach().float() * batch.completion_mask,
                         torch.cat([g.double().flatten() for g in grads.values()]))
    (lp32, g32), (lp16, g16) = results[False], results[True]
    # bf16 keeps 8 significant bits: relative error ~2^-8 per operation, log-probs ~|10|, a few layers deep
    assert (lp16 - lp32).abs().max() < 0.1 and (lp16 - lp32).abs().mean() < 0.02
    assert g16 @ g32 / (g16.norm() * g32.norm()) > 0.99  # in float64 (seen on SmolLM2-135M: 0.9994)
