"""The trainer's forward pass: log-probabilities of sampled completions under the model being trained.

    batch = pack_completions(completions, pad_id, device)          # each distinct prompt stored once
    logprobs, entropy = completion_logprobs(model, batch, T)      # [B, C] each

Three choices keep it cheap in compute and memory, each exact (tested against the plain computation):

- **Shared prompts.** A GRPO group is G completions of one long prompt (~200 tokens here, ~1k in RealMedConv);
  completions are short. Pass 1 runs each distinct prompt once and keeps its keys/values; pass 2 runs only the
  completion tokens, each row attending to its prompt's cache. The prompt's activations and gradients are
  computed once per group.
- **Checkpointing-safe caches.** Gradient checkpointing replays every layer's forward during backward. A plain
  cache would be written twice by the replay, so transformers drops caches under checkpointing. Here pass 1 only
  *records* each layer's keys/values the first time (a replay changes nothing), and pass 2 *reads* them without
  appending (``_RecordingLayer``, ``_PrefixLayer``), so both passes keep sharing the prompt with checkpointing on.
- **No whole-batch logits.** The vocabulary projection runs on the final hidden states of completion positions
  only, a chunk of rows at a time (``logprob_chunk_tokens``). Above one chunk each is checkpointed, so its
  float32 logits ([rows, C, V]: 6 GB for 10 x 1,024 tokens of a 152k vocabulary) exist one chunk at a time, in
  forward and in backward, at the cost of one more vocabulary projection per token in backward.

Every tensor is made on the model's device (tests/test_logprobs.py runs this path under a watch for tensors made
without one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from l2a.grpo import token_entropy, token_logprobs
from l2a.rollout import Completion


@dataclass
class PackedBatch:
    """Completions and their prompts as tensors, each distinct prompt stored once."""

    prompt_ids: torch.Tensor  # [K, P] distinct prompts, left-padded
    prompt_mask: torch.Tensor  # [K, P] 1 on real prompt tokens
    prompt_of: torch.Tensor  # [B] row of prompt_ids that completion b continues
    completion_ids: torch.Tensor  # [B, C] right-padded
    completion_mask: torch.Tensor  # [B, C] 1.0 on real completion tokens

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


def pack_completions(completions: Sequence[Completion], pad_id: int, device: torch.device | str = "cpu",
                     min_width: int = 1) -> PackedBatch:
    """The completions as tensors on ``device``; completions are padded to at least ``min_width`` tokens."""
    if not completions:
        raise ValueError("cannot pack an empty list of completions")
    prompts: list[list[int]] = []
    row_of: dict[tuple[int, ...], int] = {}
    prompt_of = []
    for c in completions:
        key = tuple(c.prompt_ids)
        if key not in row_of:
            row_of[key] = len(prompts)
            prompts.append(c.prompt_ids)
        prompt_of.append(row_of[key])
    prompt_len = max(len(p) for p in prompts)
    width = max(max(len(c.token_ids) for c in completions), min_width)

    def tensor(rows: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(rows, dtype=dtype, device=device)

    return PackedBatch(
        prompt_ids=tensor([[pad_id] * (prompt_len - len(p)) + p for p in prompts], torch.long),
        prompt_mask=tensor([[0] * (prompt_len - len(p)) + [1] * len(p) for p in prompts], torch.long),
        prompt_of=tensor(prompt_of, torch.long),
        completion_ids=tensor([c.token_ids + [pad_id] * (width - len(c.token_ids)) for c in completions], torch.long),
        completion_mask=tensor([[1.0] * len(c.token_ids) + [0.0] * (width - len(c.token_ids)) for c in completions],
                               torch.float32),
    )


class _RecordingLayer(DynamicLayer):
    """Pass 1 (prompts): remember this layer's keys/values the first time; always return the call's own.

    A checkpoint replay calls again with the same values: nothing changes, unlike a cache that appends."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.is_initialized, self.dtype, self.device = True, key_states.dtype, key_states.device
            self.keys, self.values = key_states, value_states
        return key_states, value_states


class _PrefixLayer(DynamicLayer):
    """Pass 2 (completions): attend to the prompt's keys/values followed by the new ones; store nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.is_initialized, self.dtype, self.device = True, keys.dtype, keys.device
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def _cache(layers: list | None = None, replicate: type | None = None) -> DynamicCache:
    cache = DynamicCache()
    cache.layers, cache.layer_class_to_replicate = layers or [], replicate
    return cache


def allow_checkpointing_with_prompt_cache(model: PreTrainedModel) -> None:
    """Let transformers' checkpointed decoder layers keep the caches above (it drops caches by default, because a
    plain cache would be written twice by the replay; these are replay-safe)."""
    for module in model.modules():
        if hasattr(module, "_can_checkpoint_with_cache"):
            module._can_checkpoint_with_cache = True


def logprobs_and_entropy(head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                         chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` and ``token_entropy`` of ``head(hidden)`` ([B, C] each), ``chunk_tokens`` rows x C at a
    time; the entropy is detached. One chunk: computed directly. Several: each chunk is checkpointed, so its
    logits are freed after forward and recomputed in backward, never all at once."""
    rows = max(1, chunk_tokens // max(tokens.shape[1], 1))

    def chunk(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h)
        return token_logprobs(logits, t, temperature), token_entropy(logits, temperature)

    if rows >= tokens.shape[0]:
        return chunk(hidden, tokens)
    parts = [checkpoint(chunk, hidden[i : i + rows], tokens[i : i + rows], use_reentrant=False)
             for i in range(0, tokens.shape[0], rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class _LogprobHead(torch.nn.Module):
    """Stands in for the model's output layer during the trainer's forward pass: from the final hidden states it
    returns each position's log-probability of its target token and the entropy, [rows, positions, 2], instead
    of [rows, positions, V] logits.

    Computing this *inside* the model's forward matters under FSDP2: the output layer's weights are whole only
    during the forward and backward of the model, and gradients reach them through its output.
    ``rows`` picks (and repeats) rows of the hidden states first (pass 1: a prompt's row for each completion)."""

    def __init__(self, head: torch.nn.Module, targets: torch.Tensor, temperature: float, chunk_tokens: int,
                 rows: torch.Tensor | None = None):
        super().__init__()
        self.head, self.targets, self.temperature, self.chunk_tokens, self.rows = (
            head, targets, temperature, chunk_tokens, rows)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            hidden = hidden[self.rows]
        logprobs, entropy = logprobs_and_entropy(self.head, hidden, self.targets, self.temperature, self.chunk_tokens)
        return torch.stack([logprobs, entropy], dim=-1)


def completion_logprobs(model: PreTrainedModel, batch: PackedBatch, temperature: float = 1.0,
                        chunk_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token) at the sampling temperature, and the entropy of each position's distribution (detached), for
    every completion token: [B, C] each (padding positions hold numbers too: mask them).

    Pass 1 runs the distinct prompts; the last prompt position predicts every completion's first token.
    Pass 2 runs each completion but its last token on its prompt's cache. Positions count real tokens only,
    so a left-padded prompt sees the positions of an unpadded one. No [B, C, V] logits are returned: the output
    layer is replaced by ``_LogprobHead`` for the call.
    """
    module = _unwrapped(model)
    head = module.get_output_embeddings()
    targets = batch.completion_ids
    try:
        prompts = _cache(replicate=_RecordingLayer)
        module.set_output_embeddings(_LogprobHead(head, targets[:, :1], temperature, chunk_tokens, batch.prompt_of))
        first = model(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                      position_ids=(batch.prompt_mask.cumsum(-1) - 1).clamp(min=0), past_key_values=prompts,
                      use_cache=True, logits_to_keep=1).logits  # [B, 1, 2]
        rest = targets[:, :-1]
        if rest.shape[1] == 0:
            return first[..., 0], first[..., 1]
        # index_select per layer: differentiable, so the completions' gradients reach pass 1
        cache = _cache([_PrefixLayer(layer.keys.index_select(0, batch.prompt_of),
                                     layer.values.index_select(0, batch.prompt_of)) for layer in prompts.layers])
        prompt_lengths = batch.prompt_mask.sum(-1)[batch.prompt_of]  # [B]
        positions = torch.arange(rest.shape[1], device=rest.device)
        module.set_output_embeddings(_LogprobHead(head, targets[:, 1:], temperature, chunk_tokens))
        following = model(input_ids=rest,
                          # right padding only: a pad comes after every real token, so causal attention never sees it
                          attention_mask=torch.cat([batch.prompt_mask[batch.prompt_of], torch.ones_like(rest)], dim=1),
                          position_ids=prompt_lengths[:, None] + positions, past_key_values=cache, use_cache=True,
                          logits_to_keep=0).logits  # [B, C - 1, 2]
        both = torch.cat([first, following], dim=1)
        return both[..., 0], both[..., 1]
    finally:
        module.set_output_embeddings(head)


def _unwrapped(model: torch.nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside a DistributedDataParallel wrapper (FSDP2 shards the model in place)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def sampler_logprobs(completions: list[Completion], width: int, device: torch.device) -> torch.Tensor | None:
    """The engine's log-probabilities of the sampled tokens, [B, width] (0 on padding); None if it reports none."""
    if any(c.logprobs is None for c in completions):
        return None
    return torch.tensor([c.logprobs + [0.0] * (width - len(c.logprobs)) for c in completions], device=device)


def padded(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """1-D tensors (per-token values of completions) as the rows of one [len(rows), width] tensor, 0 after each
    row's end, like the padding of ``pack_completions``."""
    out = rows[0].new_zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
