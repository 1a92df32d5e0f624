"""Rollouts: turning chats into sampled completions. Every engine has one method:

    engine.generate(prompts, n, sampling) -> list[Completion]

``prompts`` are chats (lists of ``{"role", "content"}``; the caller prepends the system prompt);
the result holds ``n`` completions per prompt, those of one prompt contiguous (the GRPO group).
Engines: ``HFEngine`` (transformers ``generate``, runs anywhere) here; ``l2a.vllm_engine.VLLMEngine``
and ``l2a.tinker_backend.TinkerEngine`` have the same method. This module knows models and
tokenizers, not rewards; the trainer's forward pass over completions is in ``l2a.logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from l2a.sampling import SamplingConfig  # defined without torch, for the commands that need no model


@dataclass
class Completion:
    prompt_index: int
    """Which prompt of the ``generate`` call this completes."""
    prompt_ids: list[int]
    token_ids: list[int]
    """Sampled tokens, including the end-of-sequence token when the model stopped by itself."""
    text: str
    """The completion decoded without special tokens."""
    finish_reason: str
    """"stop" (the model ended its turn) or "length" (cut at max_new_tokens)."""
    logprobs: list[float] | None = field(default=None, repr=False)
    """Sampler's log-probabilities of ``token_ids`` (engines that report them), else None."""


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of a chat rendered by the tokenizer's chat template, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> set[int]:
    ids = {tokenizer.eos_token_id}
    if model is not None and model.generation_config.eos_token_id is not None:
        eos = model.generation_config.eos_token_id
        ids |= set(eos) if isinstance(eos, list) else {eos}
    return {i for i in ids if i is not None}


class HFEngine:
    """Sampling with transformers' ``generate``: batched, left-padded, KV-cached, seeded.

    The n completions of a prompt share its prefill: each distinct prompt runs through the model once,
    its key/value cache is copied n times, and ``generate`` continues from there. The prompt (~200
    tokens) is much longer than a completion, so this removes most of the prefill cost of a GRPO group.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(tokenizer, model)

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[dict]], n: int, sampling: SamplingConfig) -> list[Completion]:
        encoded = [encode_chat(self.tokenizer, chat) for chat in prompts]
        prompts_per_batch = max(1, self.batch_size // n)
        torch.manual_seed(sampling.seed)
        was_training = self.model.training
        self.model.eval()
        completions = []
        for start in range(0, len(encoded), prompts_per_batch):
            chunk = encoded[start : start + prompts_per_batch]
            new_tokens = self._sample(chunk, n, sampling)
            for row, tokens in enumerate(new_tokens):
                prompt_index = start + row // n
                completions.append(self._finish(prompt_index, encoded[prompt_index], tokens))
        self.model.train(was_training)
        return completions

    def _sample(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[int]]:
        batch = self.tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")  # left padding
        input_ids, attention_mask = batch["input_ids"].to(self.model.device), batch["attention_mask"].to(self.model.device)
        # Prefill all but the last prompt token once per prompt; generate() runs the last one itself.
        prefill = self.model(
            input_ids=input_ids[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=(attention_mask[:, :-1].cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=1,
            use_cache=True,
        )
        cache = prefill.past_key_values
        cache.batch_repeat_interleave(n)  # rows: prompt 0 x n, prompt 1 x n, ...
        greedy = sampling.temperature == 0
        output = self.model.generate(
            input_ids=input_ids.repeat_interleave(n, dim=0),
            attention_mask=attention_mask.repeat_interleave(n, dim=0),
            past_key_values=cache,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,  # the checkpoint's generation_config may set top_k=50; we want pure top_p
            max_new_tokens=sampling.max_new_tokens,
            repetition_penalty=sampling.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.stop_ids),
            use_cache=True,
        )
        return output[:, input_ids.shape[1] :].tolist()

    def _finish(self, prompt_index: int, prompt_ids: list[int], tokens: list[int]) -> Completion:
        """Cut at the first stop token (kept: training on it teaches the model to end its turn)."""
        for position, token in enumerate(tokens):
            if token in self.stop_ids:
                tokens, reason = tokens[: position + 1], "stop"
                break
        else:
            reason = "length"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(prompt_index, prompt_ids, tokens, text, reason)
