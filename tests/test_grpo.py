"""Golden values and gradient checks for every function and option of l2a.grpo."""

import math

import pytest
import torch

from l2a.grpo import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    group_advantages,
    grpo_loss,
    kl_penalty,
    token_entropy,
    token_logprobs,
)

# --- advantages -----------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    assert torch.allclose(group_advantages(rewards, 3, "group"), torch.tensor([-1.0, 0, 1, 0, 0, 0]), atol=1e-5)
    assert torch.equal(group_advantages(rewards, 3, "none"), torch.tensor([-1.0, 0, 1, 0, 0, 0]))
    batch_std = math.sqrt(8 / 5)  # deviations from the batch mean 1: 0,1,2,-1,-1,-1 (unbiased)
    expected = torch.tensor([-1.0, 0, 1, 0, 0, 0]) / (batch_std + 1e-6)
    assert torch.allclose(group_advantages(rewards, 3, "batch"), expected)


def test_group_std_is_unbiased_and_eps_is_added():
    rewards = torch.tensor([0.0, 4.0])  # mean 2, unbiased std 2*sqrt(2)
    eps = 0.5
    adv = group_advantages(rewards, 2, "group", eps=eps)
    assert torch.allclose(adv, torch.tensor([-2.0, 2.0]) / (2 * math.sqrt(2) + eps))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_groups_get_exact_zeros(scale):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.3, 0.3, 0.3])
    adv = group_advantages(rewards, 3, scale)
    assert torch.equal(adv, torch.zeros(9))


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(4), 2, "rank")


# --- log-probabilities, entropy, KL -------------------------------------------------------------


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)]]])  # probabilities 1/4, 1/4, 1/2
    tokens = torch.tensor([[2]])
    assert torch.allclose(token_logprobs(logits, tokens), torch.tensor([[math.log(0.5)]]))
    # at T=2 the logits halve: weights 1, 1, sqrt(2)
    expected = math.log(math.sqrt(2) / (2 + math.sqrt(2)))
    assert torch.allclose(token_logprobs(logits, tokens, temperature=2.0), torch.tensor([[expected]]))


def test_token_logprobs_matches_log_softmax_and_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, dtype=torch.double, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3))
    for t in (1.0, 0.7):
        reference = torch.log_softmax(logits / t, -1).gather(-1, tokens[..., None]).squeeze(-1)
        assert torch.allclose(token_logprobs(logits, tokens, t).double(), reference, atol=1e-6)
    # token_logprobs computes in float32; check the gradient formula itself in float64
    f = lambda z: (z.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(z, -1))  # noqa: E731
    assert torch.autograd.gradcheck(f, (logits,))
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens, temperature=0.0)


def test_token_entropy():
    uniform = torch.zeros(1, 2, 8)
    assert torch.allclose(token_entropy(uniform), torch.full((1, 2), math.log(8)))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert token_entropy(peaked).item() < 1e-6


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    d = math.log(2.0)
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([d]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([0.5 * d * d]))
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([0.5 + d - 1.0]))
    same = torch.tensor([-1.3, -0.2])
    for est in KL_ESTIMATORS:
        assert torch.equal(kl_penalty(same, same, est), torch.zeros(2))
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_kl_is_finite_for_wild_ratios():
    assert torch.isfinite(kl_penalty(torch.tensor([-200.0]), torch.tensor([0.0]), "k3")).all()


# --- the loss -------------------------------------------------------------------------------------

# Two completions of two tokens; the second token of completion 1 is padding.
LOGP = torch.log(torch.tensor([[1.5, 0.5], [1.1, 1.0]]))
OLD = torch.zeros(2, 2)
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
# per token: ratio 1.5, A=+1 -> clipped at 1.2 -> -1.2 | ratio 0.5, A=+1 -> -0.5 | ratio 1.1, A=-1 -> +1.1


def test_loss_aggregations_by_hand():
    loss, stats = grpo_loss(LOGP, OLD, ADV, MASK, loss_agg="token-mean")
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    loss, _ = grpo_loss(LOGP, OLD, ADV, MASK, loss_agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(((-1.2 - 0.5) / 2 + 1.1) / 2)
    loss, _ = grpo_loss(LOGP, OLD, ADV, MASK, loss_agg="seq-mean-token-sum-norm", max_len=4)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / (2 * 4))
    assert stats["clip_high_frac"].item() == pytest.approx(1 / 3)  # the 1.5 ratio with A > 0
    assert stats["clip_low_frac"].item() == 0.0  # 0.5 is below 0.8 but A > 0: the clip does not bind
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3)


def test_asymmetric_clip_and_low_clip_stat():
    logp = torch.log(torch.tensor([[0.5, 1.25]]))
    loss, stats = grpo_loss(logp, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2), clip_low=0.1, clip_high=0.3)
    # ratio 0.5, A=-1: max(0.5, clamp=0.9) -> l = 0.9 (clipped) | ratio 1.25, A=-1: l = 1.25
    assert loss.item() == pytest.approx((0.9 + 1.25) / 2)
    assert stats["clip_low_frac"].item() == pytest.approx(0.5)


def test_gradient_by_hand():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, OLD, ADV, MASK)
    loss.backward()
    # clipped token: no gradient; otherwise d(-ratio*A)/dlogp = -ratio*A, over 3 tokens; padding: 0
    expected = torch.tensor([[0.0, -0.5 / 3], [1.1 / 3, 0.0]])
    assert torch.allclose(logp.grad, expected)


def test_kl_term_by_hand():
    ref = torch.log(torch.tensor([[1.0, 1.0], [2.2, 1.0]]))
    loss, stats = grpo_loss(LOGP, OLD, ADV, MASK, ref_logprobs=ref, kl_coef=0.1, kl_estimator="k1")
    k1 = [math.log(1.5), math.log(0.5), math.log(0.5)]
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.1 * sum(k1)) / 3)
    assert stats["kl_mean"].item() == pytest.approx(sum(k1) / 3)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(LOGP, OLD, ADV, MASK, kl_coef=0.1)


def test_on_policy_loss_is_minus_mean_advantage_and_gradient_is_not_zero():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), ADV, MASK)
    assert loss.item() == pytest.approx(-(1 + 1 - 1) / 3)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [1 / 3, 0.0]]))


@pytest.mark.parametrize("clip_ratio_c", [None, 1.5])
@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_gradcheck_every_option(loss_agg, kl_estimator, clip_ratio_c):
    torch.manual_seed(1)
    old = -torch.rand(3, 4, dtype=torch.double) - 0.5
    # keep the ratios strictly inside or outside the clip range and away from the dual clip's cap (ratio 1.65 of
    # the A < 0 row is capped at 1.5): gradcheck needs smooth points
    offsets = torch.tensor([[0.05, -0.1, 0.5, -0.6]] * 3, dtype=torch.double)
    logp = (old + offsets).requires_grad_(True)
    ref = old - 0.3
    adv = torch.tensor([0.7, -1.2, 0.4], dtype=torch.double)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.double)
    f = lambda lp: grpo_loss(lp, old, adv, mask, ref, kl_coef=0.05, kl_estimator=kl_estimator, loss_agg=loss_agg,  # noqa: E731
                             max_len=6, clip_ratio_c=clip_ratio_c)[0]
    assert torch.autograd.gradcheck(f, (logp,))


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
def test_micro_batches_with_global_counts_sum_to_the_full_batch(loss_agg):
    torch.manual_seed(2)
    logp, old = -torch.rand(6, 5), -torch.rand(6, 5)
    adv = torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1.0
    full, _ = grpo_loss(logp, old, adv, mask, loss_agg=loss_agg, max_len=5)
    pieces = [
        grpo_loss(logp[s], old[s], adv[s], mask[s], loss_agg=loss_agg, num_tokens=mask.sum(), num_seqs=6, max_len=5)[0]
        for s in (slice(0, 2), slice(2, 3), slice(3, 6))
    ]
    assert torch.allclose(sum(pieces), full, atol=1e-6)


def test_unknown_aggregation_raises():
    with pytest.raises(ValueError, match="loss_agg"):
        grpo_loss(LOGP, OLD, ADV, MASK, loss_agg="sum")


def test_token_weights_scale_the_policy_gradient_term_only():
    """Per-token weights (truncated IS for vLLM rollouts) multiply -min(ratio*A, clip*A), not the KL term."""
    weights = torch.tensor([[0.5, 2.0], [3.0, 7.0]], requires_grad=True)  # 7.0 sits on padding
    ref = torch.log(torch.tensor([[1.0, 1.0], [2.2, 1.0]]))
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, OLD, ADV, MASK, ref_logprobs=ref, kl_coef=0.1, kl_estimator="k1", token_weights=weights)
    k1 = [math.log(1.5), math.log(0.5), math.log(0.5)]
    assert loss.item() == pytest.approx((0.5 * -1.2 + 2.0 * -0.5 + 3.0 * 1.1 + 0.1 * sum(k1)) / 3)
    loss.backward()
    # clipped token: only the KL gradient 0.1/3; others: (-w * ratio * A + 0.1) / 3; padding: 0
    expected = torch.tensor([[0.1 / 3, (-2.0 * 0.5 + 0.1) / 3], [(3.0 * 1.1 + 0.1) / 3, 0.0]])
    assert torch.allclose(logp.grad, expected)
    assert weights.grad is None  # the weights are constants of the loss
    ones, _ = grpo_loss(LOGP, OLD, ADV, MASK, token_weights=torch.ones(2, 2))
    assert ones.item() == pytest.approx(grpo_loss(LOGP, OLD, ADV, MASK)[0].item())


# --- the dual clip --------------------------------------------------------------------------------

# Row 0: A = -1, ratios 5, 2, 0.5. Row 1: A = +2, ratios 5, 1 and padding. float64: the sums nearly cancel.
DUAL_LOGP = torch.log(torch.tensor([[5.0, 2.0, 0.5], [5.0, 1.0, 7.0]], dtype=torch.float64))
DUAL_ADV = torch.tensor([-1.0, 2.0], dtype=torch.float64)
DUAL_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
DUAL_OLD = torch.zeros(2, 3, dtype=torch.float64)
# per token, clip 0.2, c = 3:
#   A=-1, ratio 5:   -min(-5, -1.2) = 5,  capped: min(5, 3) = 3 (no gradient)
#   A=-1, ratio 2:   2 (below the cap; the gradient of -ratio * A is 2)
#   A=-1, ratio 0.5: 0.8 (the ordinary clip at 1 - 0.2, no gradient)
#   A=+2, ratio 5:   -min(10, 2.4) = -2.4 (the ordinary clip at 1 + 0.2; A > 0: the dual clip changes nothing)
#   A=+2, ratio 1:   -2 (gradient -2)


def test_dual_clip_caps_negative_advantage_tokens_by_hand():
    logp = DUAL_LOGP.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, DUAL_OLD, DUAL_ADV, DUAL_MASK, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx((3.0 + 2.0 + 0.8 - 2.4 - 2.0) / 5)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 2.0 / 5, 0.0], [0.0, -2.0 / 5, 0.0]], dtype=torch.float64))
    assert stats["clip_dual_frac"].item() == pytest.approx(1 / 5)
    assert stats["clip_low_frac"].item() == pytest.approx(1 / 5) and stats["clip_high_frac"].item() == pytest.approx(1 / 5)
    padding = DUAL_MASK.clone()
    padding[0, 0] = 0.0  # the capped token as padding: it counts in neither the loss nor the fraction
    loss, stats = grpo_loss(DUAL_LOGP, DUAL_OLD, DUAL_ADV, padding, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx((2.0 + 0.8 - 2.4 - 2.0) / 4) and stats["clip_dual_frac"].item() == 0.0

    uncapped, stats = grpo_loss(DUAL_LOGP, DUAL_OLD, DUAL_ADV, DUAL_MASK)  # off by default: ratio 5 counts 5
    assert uncapped.item() == pytest.approx((5.0 + 2.0 + 0.8 - 2.4 - 2.0) / 5)
    assert "clip_dual_frac" not in stats
    # a cap above every ratio binds nowhere: the plain loss
    assert grpo_loss(DUAL_LOGP, DUAL_OLD, DUAL_ADV, DUAL_MASK, clip_ratio_c=6.0)[0].item() == uncapped.item()


def test_token_weights_multiply_after_the_dual_clip():
    """verl's order: cap the loss, then weight it. Capping the weighted loss instead would give the ratio-5 token
    min(0.5 * 5, 3) = 2.5, not 0.5 * 3 = 1.5."""
    weights = torch.tensor([[0.5, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    loss, _ = grpo_loss(DUAL_LOGP, DUAL_OLD, DUAL_ADV, DUAL_MASK, clip_ratio_c=3.0, token_weights=weights)
    assert loss.item() == pytest.approx((0.5 * 3.0 + 2.0 + 0.8 - 2.4 - 2.0) / 5)


@pytest.mark.parametrize("c", [1.0, 0.5, -3.0])
def test_dual_clip_must_be_above_one(c):
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        grpo_loss(DUAL_LOGP, DUAL_OLD, DUAL_ADV, DUAL_MASK, clip_ratio_c=c)
