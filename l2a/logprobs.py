"""The trainer's forward pass: the log-probabilities of sampled completions under the model being trained.

``pack_completions`` turns completions into tensors with every distinct prompt stored once; then one of two
forward passes gives the logits that predict each completion token, [B, C, V] (the same numbers, tested):

- ``completion_logits``: each prompt runs once per group and its key/value cache serves all the group's
  completions (the default: a ~200-token prompt and ~30-token completions make this 3-4x cheaper);
- ``full_sequence_logits``: every completion runs with its own copy of its prompt, in one pass, for gradient
  checkpointing (a checkpointed layer replays its forward pass in backward, and a cache cannot be replayed).

``sampler_logprobs`` collects the rollout engine's own log-probabilities of the same tokens, for the
importance-sampling correction.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from transformers import PreTrainedModel

from l2a.rollout import Completion


@dataclass
class PackedBatch:
    """Completions and their prompts as tensors, each distinct prompt stored once.

    GRPO samples a group of completions per prompt, and the prompt (system prompt plus dialogue,
    ~200 tokens here) is usually much longer than a completion (~30 tokens). So the forward pass runs
    each distinct prompt once, then expands its key/value cache to the completions that continue it
    (``prompt_of``) and runs only the completion tokens. The computation graph is the same as running
    every prompt+completion row in full, so log-probabilities and gradients are too (tested), for a
    fraction of the cost.
    """

    prompt_ids: torch.Tensor  # [K, P] distinct prompts, left-padded
    prompt_mask: torch.Tensor  # [K, P] 1 on real prompt tokens
    prompt_of: torch.Tensor  # [B] row of prompt_ids that completion b continues
    completion_ids: torch.Tensor  # [B, C] right-padded
    completion_mask: torch.Tensor  # [B, C] 1.0 on real completion tokens

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


def pack_completions(completions: Sequence[Completion], pad_id: int) -> PackedBatch:
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
    completion_len = max(max(len(c.token_ids) for c in completions), 1)
    return PackedBatch(
        prompt_ids=torch.tensor([[pad_id] * (prompt_len - len(p)) + p for p in prompts]),
        prompt_mask=torch.tensor([[0] * (prompt_len - len(p)) + [1] * len(p) for p in prompts]),
        prompt_of=torch.tensor(prompt_of),
        completion_ids=torch.tensor([c.token_ids + [pad_id] * (completion_len - len(c.token_ids)) for c in completions]),
        completion_mask=torch.tensor(
            [[1.0] * len(c.token_ids) + [0.0] * (completion_len - len(c.token_ids)) for c in completions]
        ),
    )


def completion_logits(model: PreTrainedModel, batch: PackedBatch) -> torch.Tensor:
    """Logits that predict each completion token: [B, C, V].

    Two passes: (1) the distinct prompts, keeping their key/value cache and only the last position's
    logits, which predict every completion's first token; (2) the completion tokens but the last,
    attending to the cache copied to each completion's row. Positions count real tokens only, so a
    left-padded prompt sees the same positions as an unpadded one. No logits are computed for prompt
    tokens: with a ~50k vocabulary they would dominate memory.
    """
    prompt_positions = (batch.prompt_mask.cumsum(-1) - 1).clamp(min=0)
    first = model(
        input_ids=batch.prompt_ids,
        attention_mask=batch.prompt_mask,
        position_ids=prompt_positions,
        logits_to_keep=1,
        use_cache=True,
    )
    first_logits = first.logits[batch.prompt_of]  # [B, 1, V]
    if batch.completion_ids.shape[1] == 1:
        return first_logits
    cache = first.past_key_values
    cache.reorder_cache(batch.prompt_of)  # index_select per layer: differentiable, gradients reach pass 1
    rest = batch.completion_ids[:, :-1]
    prompt_lengths = batch.prompt_mask.sum(-1)[batch.prompt_of]  # [B]
    second = model(
        input_ids=rest,
        # right padding only: a pad comes after every real token, so causal attention never sees it
        attention_mask=torch.cat([batch.prompt_mask[batch.prompt_of], torch.ones_like(rest)], dim=1),
        position_ids=prompt_lengths[:, None] + torch.arange(rest.shape[1]),
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([first_logits, second.logits], dim=1)


def full_sequence_logits(model: PreTrainedModel, batch: PackedBatch) -> torch.Tensor:
    """``completion_logits`` without the shared key/value cache, for gradient checkpointing: [B, C, V].

    A checkpointed layer runs its forward pass again during backward, so transformers drops the cache
    under checkpointing (a replay would append to it twice). Each completion then runs with its own
    copy of its prompt, in one pass; the logits are the same (tested), the prompt compute is not shared.
    """
    prompt_mask = batch.prompt_mask[batch.prompt_of]
    attention_mask = torch.cat([prompt_mask, torch.ones_like(batch.completion_ids)], dim=1)
    completion_len = batch.completion_ids.shape[1]
    logits = model(
        input_ids=torch.cat([batch.prompt_ids[batch.prompt_of], batch.completion_ids], dim=1),
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        logits_to_keep=completion_len + 1,  # the last prompt position predicts the first completion token
    ).logits
    return logits[:, :-1]


def sampler_logprobs(completions: list[Completion], width: int) -> torch.Tensor | None:
    """The engine's log-probabilities of the sampled tokens, [B, width] (0 on padding); None if it reports none."""
    if any(c.logprobs is None for c in completions):
        return None
    return torch.tensor([c.logprobs + [0.0] * (width - len(c.logprobs)) for c in completions])


def to_device(batch: PackedBatch, device: torch.device) -> PackedBatch:
    return PackedBatch(**{f.name: getattr(batch, f.name).to(device) for f in fields(batch)})
