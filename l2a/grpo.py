"""GRPO as pure tensor functions: advantages, log-probabilities, KL estimators and the clipped loss.

Nothing here knows about models, tokenizers or data; every function takes tensors and returns tensors,
so each equation can be checked by hand in ``tests/test_grpo.py``. Shapes: ``B`` completions (a batch
is ``B / G`` prompts times ``G`` completions each, groups contiguous), ``T`` completion tokens
(right-padded; ``mask`` is 1 on real tokens), ``V`` vocabulary size.

One GRPO step, in the notation of the functions below:

    A_i      = (r_i - mean(r_group)) / (std(r_group) + eps)              group_advantages
    ratio_it = exp(logp_it - logp_old_it)                                grpo_loss
    l_it     = -min(ratio_it * A_i, clip(ratio_it, 1 - e_low, 1 + e_high) * A_i) + beta * KL_it
               (where A_i < 0, optionally capped at -c * A_i: the dual clip)
    loss     = aggregate(l, mask)                                        token-mean | seq-mean-token-mean | ...

``logp_old`` are the log-probabilities of the weights the batch's update starts from. With one optimizer
step per batch (train.py's default) they are the trained pass's own, ``logp.detach()``: the ratio is
exactly 1 in value, no clip binds, the loss value is ``-mean(A)`` (about 0, because advantages are
centred), and the gradient is the policy gradient ``-A * grad(logp)``. A zero loss is expected; a zero
gradient is a bug. With several optimizer steps per batch (``ppo_epochs`` passes over ``mini_batches``
slices) every step after the first starts from moved weights: the ratio leaves 1, and the clips bound how far
one batch can push the policy.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

AdvantageScale = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k2", "k3"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
ADVANTAGE_SCALES: tuple[str, ...] = get_args(AdvantageScale)
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
LOSS_AGGREGATIONS: tuple[str, ...] = get_args(LossAggregation)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages, one per completion.

        A_i = r_i - mean_{j in group(i)} r_j                      then, by ``scale``:
        "group":  A_i / (std_{j in group(i)} r_j + eps)           (GRPO; unbiased std)
        "batch":  A_i / (std_{all j} r_j + eps)                   (less noisy for near-constant groups)
        "none":   A_i                                             (Dr. GRPO)

    ``rewards`` is 1-D with groups of ``group_size`` contiguous entries. A group whose rewards are all
    equal carries no signal about which completion is better: its advantages are exactly 0, never NaN.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)  # [B/G, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    # Force exact zeros for constant groups (the mean of equal floats may be off by one ulp).
    constant = (grouped.max(dim=1, keepdim=True).values == grouped.min(dim=1, keepdim=True).values)
    centred = centred.masked_fill(constant, 0.0)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    return centred.view(-1)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits in float32 (a log-softmax over ~50k entries needs the precision); float64 stays."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token | prefix) at the sampling temperature: ``log_softmax(logits / T)[token]``.

        logp_t = z_t[y_t] - logsumexp_v z_t[v],    z_t = logits_t / T

    logits [B, T, V], tokens [B, T] -> [B, T]. Written as gather minus logsumexp rather than
    ``log_softmax(...).gather(...)``: log_softmax would keep a second [B, T, V] tensor alive for the
    backward pass, logsumexp keeps only its [B, T] result. Half-precision logits are computed in float32. The trainer must use the same T as the
    sampler, otherwise ratios against sampler log-probabilities are wrong.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define log-probabilities, got {temperature}")
    logits = _at_least_float32(logits)
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the next-token distribution, for logging: ``H_t = logsumexp(z_t) - sum_v p_t[v] z_t[v]``.

    logits [B, T, V] -> [B, T]. Computed row by row so at most one [T, V] temporary exists at a time.
    """
    rows = []
    for row in logits:
        z = _at_least_float32(row) / temperature
        rows.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1))
    return torch.stack(rows)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's estimators).

        k1 = logp - ref                               unbiased, high variance, can be negative
        k2 = 0.5 * (logp - ref)^2                     biased, low variance, >= 0
        k3 = exp(ref - logp) - (ref - logp) - 1       unbiased, low variance, >= 0  (GRPO paper)

    The log-ratio is clamped to [-20, 20] first so one wild token cannot produce inf.
    """
    delta = (logprobs - ref_logprobs).clamp(-20.0, 20.0)
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta**2
    if estimator == "k3":
        return torch.exp(-delta) + delta - 1.0
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg: str = "token-mean",
    num_tokens: int | float | None = None,
    max_len: int | None = None,
    num_seqs: int | None = None,
    *,
    token_weights: torch.Tensor | None = None,
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO surrogate with an optional KL term, aggregated over tokens.

    Per token (``A_i`` broadcast over the tokens of completion i):

        ratio_it = exp(logp_it - logp_old_it)
        pg_it    = -min(ratio_it * A_i, clamp(ratio_it, 1 - clip_low, 1 + clip_high) * A_i)
        pg_it    = min(pg_it, -c * A_i)   where A_i < 0        (dual clip, if clip_ratio_c = c is given)
        l_it     = w_it * pg_it + kl_coef * KL_it

    The dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games"; verl's and Trinity-RFT's
    ``clip_ratio_c``, default 3 there, off here) bounds what the PPO clip leaves open: for A < 0 the clip
    only stops the ratio from *falling* (below 1 - clip_low), while a ratio far *above* 1 keeps a loss
    ``-ratio * A`` that grows without bound with a gradient to match. With the cap, such a token's loss is the
    constant ``-c * A`` (no gradient) once ``ratio > c``. For A >= 0 nothing changes. Worked example, A = -1,
    c = 3: ratio 5 gives pg = min(5, 3) = 3 (capped, gradient 0); ratio 2 gives 2 (gradient flows); ratio 0.5
    gives 0.8 (the ordinary clip at 1 - 0.2). verl's ``compute_policy_loss_vanilla`` writes the same thing as

        pg_losses3 = -A * clip_ratio_c;  pg = where(A < 0, min(pg_losses3, max(pg_losses1, pg_losses2)), ...)

    and, like here, multiplies the result by its rollout importance weights afterwards.

    ``w_it`` is ``token_weights`` (1 when None, detached if given): e.g. the truncated importance weight
    ``min(exp(logp_old_it - logp_sampler_it), C)`` that corrects for tokens sampled by an engine (vLLM)
    whose probabilities differ slightly from the trainer's (TRL's ``vllm_importance_sampling_correction``),
    or by a sampler whose weights lag behind the trainer's (train.py's ``sync_interval``).
    It weights the policy-gradient term only, not the KL term.

    Aggregation over the masked tokens (m_it = mask), side by side:

        "token-mean"               sum_it m*l / N_tokens                  (DAPO; TRL "dapo", verl default)
        "seq-mean-token-mean"      1/N_seqs sum_i [sum_t m*l / sum_t m]   (GRPO paper; TRL "grpo")
        "seq-mean-token-sum-norm"  sum_it m*l / (N_seqs * max_len)        (Dr. GRPO; TRL "dr_grpo")

    ``N_tokens`` / ``N_seqs`` default to the counts in this call. When a batch is split over gradient
    accumulation steps or processes, pass the counts of the *whole* batch so that the summed pieces
    equal the loss of the whole batch (and multiply by the number of processes if the gradients are
    averaged across them). ``max_len`` defaults to this call's padded length T; pass the configured
    maximum completion length for Dr. GRPO.

    Shapes: logprobs, old_logprobs, ref_logprobs, mask, token_weights [B, T]; advantages [B].
    Returns (loss, stats) where stats are detached scalars: ``clip_low_frac``, ``clip_high_frac``
    (fraction of tokens where the clip removed the gradient), ``ratio_mean``, ``kl_mean``, and with the dual clip
    ``clip_dual_frac`` (fraction of tokens where its cap binds: A < 0 and ratio > c).
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs (log-probabilities of the frozen reference model)")
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (a cap on the ratio above the clip range), got {clip_ratio_c}")
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)  # [B, 1]

    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if clip_ratio_c is not None:
        capped = (adv < 0) & (per_token > -clip_ratio_c * adv)  # where the dual clip binds
        per_token = torch.where(capped, -clip_ratio_c * adv, per_token)
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)

    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl

    masked = per_token * mask
    n_seqs = num_seqs if num_seqs is not None else logprobs.shape[0]
    if loss_agg == "token-mean":
        denominator = num_tokens if num_tokens is not None else mask.sum().clamp(min=1.0)
        loss = masked.sum() / denominator
    elif loss_agg == "seq-mean-token-mean":
        per_seq = masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
        loss = per_seq.sum() / n_seqs
    else:  # seq-mean-token-sum-norm
        loss = masked.sum() / (n_seqs * (max_len if max_len is not None else logprobs.shape[-1]))

    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        # The clip removes the gradient only where it binds on the side the advantage pushes towards.
        low = (ratio < 1.0 - clip_low) & (adv < 0)
        high = (ratio > 1.0 + clip_high) & (adv > 0)
        stats = {
            "clip_low_frac": (low * mask).sum() / n,
            "clip_high_frac": (high * mask).sum() / n,
            "ratio_mean": (ratio * mask).sum() / n,
            "kl_mean": (kl * mask).sum() / n,
        }
        if clip_ratio_c is not None:
            stats["clip_dual_frac"] = (capped * mask).sum() / n
    return loss, stats
