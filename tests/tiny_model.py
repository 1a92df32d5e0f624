"""A tiny random chat model for tests: trained-in-a-second BPE tokenizer + 2-layer Llama.

Shaped like the embedded default (Llama, tied embeddings, ChatML template, eos = pad = <|im_end|>)
but with ~0.1M parameters, so a training step takes milliseconds. head_dim is 32, the smallest
the vLLM CPU attention kernels accept.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from l2a.prompts import policy_messages

# Policy chats of different lengths, for the tests that sample from or score the tiny model.
CHATS = [
    policy_messages([{"role": "user", "content": "I have a headache."}]),
    policy_messages([{"role": "user", "content": "My stomach hurts since yesterday, and I feel sick."}]),
    policy_messages([{"role": "user", "content": "Sore throat."}, {"role": "assistant", "content": "Any fever?"},
                     {"role": "user", "content": "A little."}]),
]

from l2a.prompts import GRADER_PROMPT, POLICY_PROMPT

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 512, hidden: int = 64, layers: int = 2,
                    kv_heads: int = 1, intermediate: int | None = None) -> Path:
    """A random chat model with a trained-in-a-second tokenizer, saved to ``out_dir``; the defaults make the tiny
    test model (bench/gpu_smoke.py builds a larger one with the same code)."""
    out_dir = Path(out_dir)
    corpus = [POLICY_PROMPT, GRADER_PROMPT, "<stop /> How severe is the pain: mild, moderate or severe?"] * 4
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so the logits are not flat
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir


def keep_float64_in_rmsnorm() -> None:
    """Let Llama's RMSNorm compute in float64 when its input is float64 (tests only; idempotent).

    transformers' ``LlamaRMSNorm`` normalises in float32 whatever the input dtype (an upcast meant for fp16),
    which puts float32 rounding (~1e-7 relative) into a float64 model. Tests that check that two computations
    are the *same* (packing, micro-batches, processes) run in float64 so that reordering noise is ~1e-15 on any
    CPU, and for that every operation must be float64. For float32 and half-precision inputs the patched
    forward is the original one, op for op.
    """
    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states if input_dtype == torch.float64 else hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

    modeling_llama.LlamaRMSNorm.forward = forward
