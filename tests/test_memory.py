"""The memory budget (``l2a/memory.py``) against what small models really hold, measured on CPU.

Parameter and optimizer sizes must be exact; the activations kept for backward are measured with autograd's
saved-tensor hooks (weights excluded), for two model shapes, with and without gradient checkpointing.
"""

from __future__ import annotations

import pytest
import torch
from subprocesses import python, run_to_end
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from l2a.logprobs import allow_checkpointing_with_prompt_cache, completion_logprobs, pack_completions
from l2a.memory import Architecture, checkpointed_activation_elements, layer_activation_elements
from l2a.rollout import Completion

SHAPES = [dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2),
          dict(hidden_size=512, intermediate_size=512, num_attention_heads=8, num_key_value_heads=8)]
K, P, B, C, V = 2, 64, 8, 16, 1000  # prompts, prompt length, completions, completion length, vocabulary


def model(shape: dict, layers: int, qwen: bool = False, checkpointing: bool = False):
    torch.manual_seed(0)
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if qwen else (LlamaConfig, LlamaForCausalLM)
    config = config_class(vocab_size=V, num_hidden_layers=layers, tie_word_embeddings=not qwen, **shape)
    config._attn_implementation = "sdpa"
    built = model_class(config).train()
    if checkpointing:
        built.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        allow_checkpointing_with_prompt_cache(built)
    return built


@pytest.mark.parametrize("qwen", [False, True], ids=["llama-tied", "qwen2-biases-untied"])
def test_parameter_count_is_exact(qwen):
    built = model(SHAPES[0], layers=3, qwen=qwen)
    arch = Architecture.from_config(built.config.to_dict())
    assert arch.parameters() == sum(p.numel() for p in built.parameters())


def test_adamw_keeps_two_float32_moments_per_parameter():
    built = model(SHAPES[0], layers=2)
    optimizer = torch.optim.AdamW(built.parameters(), fused=True)
    built(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert state == 2 * 4 * Architecture.from_config(built.config.to_dict()).parameters()


def saved_elements(built) -> int:
    """float32 elements autograd keeps for backward during one forward pass over the batch."""
    completions = []
    for k in range(K):
        prompt = torch.randint(5, V, (P,), generator=torch.Generator().manual_seed(k)).tolist()
        for b in range(B // K):
            tokens = torch.randint(5, V, (C,), generator=torch.Generator().manual_seed(100 + 10 * k + b)).tolist()
            completions.append(Completion(k, prompt, tokens, "", "length"))
    batch = pack_completions(completions, 0)
    weights = {p.untyped_storage().data_ptr() for p in built.parameters()}
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if tensor.untyped_storage().data_ptr() not in weights:
            total += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        completion_logprobs(built, batch, 1.0, chunk_tokens=10**9)
    return total


@pytest.mark.parametrize("shape", SHAPES, ids=["gqa", "mha"])
def test_activations_per_layer_match_the_budget(shape):
    """One more layer adds what ``layer_activation_elements`` says (plus the attention scores CPU's math
    kernel keeps, which GPU kernels do not); with checkpointing it adds only its input."""
    tokens = K * P + B * (C - 1)  # pass 1: the distinct prompts; pass 2: the completions but their last token
    scores = shape["num_attention_heads"] * (K * P * P + B * (C - 1) * (P + C - 1))
    arch = Architecture.from_config(model(shape, layers=1).config.to_dict())
    per_layer = saved_elements(model(shape, layers=2)) - saved_elements(model(shape, layers=1))
    assert per_layer == pytest.approx(layer_activation_elements(arch, tokens) + scores, rel=0.05)
    checkpointed = saved_elements(model(shape, 2, checkpointing=True)) - saved_elements(model(shape, 1, checkpointing=True))
    kept = checkpointed_activation_elements(arch, tokens) - layer_activation_elements(arch, tokens)  # all layers' inputs
    assert checkpointed == pytest.approx(kept / arch.layers, rel=0.02)


def test_the_8_gpu_preset_fits_80_gb_with_a_margin():
    done = run_to_end(python("-m", "l2a.memory", "--config", "configs/qwen2.5-7b_8gpu.yaml", "--accelerate",
                             "configs/accelerate/fsdp_8gpu.yaml", "--gpu-gb", "80"), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = float(done.stdout.split("\npeak ")[1].split(" GiB")[0])
    assert peak < 0.8 * 80, done.stdout  # at least 20% of the GPU to spare
