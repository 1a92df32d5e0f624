"""l2a's GRPO loss and advantages against Hugging Face TRL's GRPOTrainer formulas (TRL 1.16.0), and its dual clip
against verl's, without TRL or verl.

Pins ``l2a.grpo.grpo_loss`` to TRL 1.16.0's ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py),
with token-level importance sampling (TRL's default), and ``l2a.grpo.group_advantages`` to TRL's advantage
computation (same file, ``_generate_and_score_completions``), through the mapping below. TRL is not
installed in CI, so its side is re-written here from the formulas: plain Python loops over floats, one
token at a time, with the gradient derived by hand. No reference value is computed with l2a code.
``bench/vs_trl.py`` checks the same thing against the real TRL on a real model.

TRL 1.16.0, per token (A = advantage of the completion, broadcast over its tokens):

    coef_1 = exp(logp - old_logp)
    coef_2 = clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
    l      = -min(coef_1 * A, coef_2 * A)    + beta * (exp(ref - logp) - (ref - logp) - 1)   if beta != 0

per micro-batch of B sequences (m = completion mask, gas = gradient accumulation steps):

    "dapo"     sum(l * m) / (num_items_in_batch / num_processes * gas / steps_per_generation)
    "grpo"     mean_i[ sum_t(l * m) / max(sum_t m, 1) ] / gas
    "dr_grpo"  sum(l * m) / (B * max_completion_length) / gas

where num_items_in_batch counts the completion tokens of the whole generation batch on all processes
(steps_per_generation defaults to gas, so one micro-batch gets sum / num_items_in_batch), and

    advantages  A = r - mean_group(r), then divided by (std + 1e-4) with the unbiased std of the group
                (scale_rewards="group") or of the whole batch ("batch"); "none" stops at r - mean_group.

Mapping to l2a:

    loss_type "dapo"      <-> loss_agg="token-mean",              num_tokens = num_items_in_batch
    loss_type "grpo"      <-> loss_agg="seq-mean-token-mean",     num_seqs = sequences in the whole batch
    loss_type "dr_grpo"   <-> loss_agg="seq-mean-token-sum-norm", max_len = max_completion_length (the cap)
    beta                  <-> kl_coef, with kl_estimator="k3" and TRL's use_bias_correction_kl=False
                              (its default, True, multiplies the KL term by the ratio: same value
                              on-policy, a different gradient; l2a follows the GRPO paper)
    epsilon, epsilon_high <-> clip_low, clip_high
    scale_rewards         <-> group_advantages(rewards, G, scale, eps=1e-4)   (l2a's default eps is 1e-6)
    num_iterations > 1    <-> ppo_epochs > 1: from the second pass on, TRL's old_per_token_logps (computed when
                              the batch was generated) differ from logp; the "off-policy" batches below are that
    steps_per_generation  <-> mini_batches: one optimizer step per slice of the generation batch (see
                              test_mini_batches_are_trl_steps_per_generation for the one difference)
    delta                 <-> clip_ratio_c, when delta > 1 + epsilon_high (test_trl_delta_is_the_dual_clip...)

verl's dual clip (``compute_policy_loss_vanilla`` in verl/trainer/ppo/core_algos.py; Trinity-RFT's ppo loss is the
same, ``clip_ratio_c`` 3.0 by default), per token:

    pg1 = -A * ratio;  pg2 = -A * clamp(ratio, 1 - epsilon_low, 1 + epsilon_high);  c1 = max(pg1, pg2)
    l   = min(-A * clip_ratio_c, c1)  if A < 0  else  c1

aggregated like every other per-token loss (verl's token-mean is TRL's dapo).
"""

import math
from dataclasses import dataclass

import pytest
import torch

from l2a.grpo import group_advantages, grpo_loss

EPSILON_LOW = 0.2  # TRL `epsilon`
EPSILON_HIGH = 0.28  # TRL `epsilon_high`; asymmetric so that swapping low and high would show
MAX_COMPLETION_LENGTH = 10  # the configured cap
# Ragged completions, all shorter than the cap (so dividing dr_grpo by the longest completion or by the
# padded width instead of the cap gives a different number); row 2 is empty (all-zero mask).
LENGTHS = (7, 3, 0, 5, 1, 6, 2, 4)
NUM_SEQS, WIDTH = len(LENGTHS), max(LENGTHS)
NUM_ITEMS = sum(LENGTHS)  # TRL's num_items_in_batch for the whole batch (one process)
ALL_ROWS = list(range(NUM_SEQS))
HALVES = (ALL_ROWS[:4], ALL_ROWS[4:])  # two micro-batches of 4 sequences

MODES = {"dapo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm"}
DUAL_CLIP = 1.3  # verl's and Trinity's default is 3; 1.3 (> 1 + EPSILON_HIGH) binds on the test data's ratios
LOW_DELTA = 1.1  # a TRL delta below 1 + EPSILON_HIGH, where it is no longer the dual clip
BETAS = (0.0, 0.04)
POLICIES = ("on-policy", "off-policy")

# Seed of the test data; test_data_tells_the_modes_apart checks that it gives clipping on both sides.
SEED = 4
# float64 throughout: the only differences left are rounding, ~1e-16 relative.
RTOL, ATOL = 1e-10, 1e-13


# --- test data ------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One generation batch, TRL's tensors: [B, T] per-token log-probabilities, [B] advantages."""

    logp: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor  # int64, like TRL's completion_mask
    on_policy: bool


def make_batch(policy: str, seed: int = SEED) -> Batch:
    """Seeded ragged batch. Off-policy, ``old = logp + 0.3 * noise``: |log ratio| exceeds the clip range on
    many tokens, for advantages of both signs. On-policy, ``old`` equals ``logp`` (TRL's ``logp.detach()``).
    Padded positions hold ordinary random values, so only the mask keeps them out of the loss."""
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_SEQS, WIDTH)
    mask = (torch.arange(WIDTH)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    logp = -2.0 * torch.rand(shape, generator=g, dtype=torch.float64) - 0.05
    ref = logp + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    noise = 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    old = logp.clone() if policy == "on-policy" else logp + noise
    adv = torch.tensor([1.3, -0.7, 0.9, -1.6, 0.4, 1.1, -0.2, -0.8], dtype=torch.float64)
    return Batch(logp, old, ref, adv, mask, on_policy=policy == "on-policy")


# --- TRL 1.16.0, re-written as loops over floats ---------------------------------------------------


def trl_token(logp: float, old: float, ref: float, adv: float, beta: float,
              delta: float | None = None) -> tuple[float, float]:
    """One token of TRL's ``per_token_loss`` and, by hand, its derivative with respect to ``logp``.

    ``-min(coef_1 * A, coef_2 * A)``: the derivative is that of the smaller term. ``coef_1 * A`` has derivative
    ``coef_1 * A`` (d coef_1 / d logp = coef_1), or 0 where ``delta`` (TRL's two-sided clip) has capped coef_1
    at the constant delta; ``coef_2 * A`` has derivative ``coef_1 * A`` inside the clip range and 0 outside.
    So where the clip binds on the side the advantage pushes towards (TRL's ``is_low_clipped`` /
    ``is_high_clipped``) the derivative is 0, elsewhere ``-coef_1 * A``. The k3 KL term
    ``exp(ref - logp) - (ref - logp) - 1`` has derivative ``1 - exp(ref - logp)``.
    """
    coef_1 = math.exp(logp - old)
    coef_2 = min(max(coef_1, 1.0 - EPSILON_LOW), 1.0 + EPSILON_HIGH)
    capped = delta is not None and coef_1 > delta
    term_1, slope_1 = (delta * adv, 0.0) if capped else (coef_1 * adv, coef_1 * adv)
    term_2, slope_2 = coef_2 * adv, (coef_1 * adv if coef_2 == coef_1 else 0.0)
    loss = -min(term_1, term_2)
    grad = -(slope_1 if term_1 <= term_2 else slope_2)
    if beta != 0.0:
        d = ref - logp
        loss += beta * (math.exp(d) - d - 1.0)
        grad += beta * (1.0 - math.exp(d))
    return loss, grad


def verl_dual_clip_token(logp: float, old: float, adv: float, clip_ratio_c: float) -> tuple[float, float]:
    """One token of verl's ``compute_policy_loss_vanilla`` (the module docstring) and, by hand, its derivative:
    ``c1 = max(pg1, pg2)`` has the derivative of the larger term (``-A * ratio`` for pg1; for pg2 the same inside
    the clip range, 0 outside); where A < 0 and the cap ``-A * c`` is smaller, the constant cap (derivative 0)."""
    ratio = math.exp(logp - old)
    clipped_ratio = min(max(ratio, 1.0 - EPSILON_LOW), 1.0 + EPSILON_HIGH)
    pg1, pg2 = -adv * ratio, -adv * clipped_ratio
    c1 = max(pg1, pg2)
    slope = -adv * ratio if (pg1 >= pg2 or clipped_ratio == ratio) else 0.0
    if adv < 0 and -adv * clip_ratio_c < c1:
        return -adv * clip_ratio_c, 0.0
    return c1, slope


def trl_loss_and_grad(
    batch: Batch,
    rows: list[int],
    loss_type: str,
    beta: float,
    num_items_in_batch: int = NUM_ITEMS,
    gas: int = 1,
    steps_per_generation: int = 1,
    num_processes: int = 1,
    delta: float | None = None,
    token=None,
) -> tuple[float, list[list[float]]]:
    """TRL's loss for the micro-batch ``rows`` and its gradient d loss / d logp ([len(rows)][T] floats).

    The loss is aggregated as TRL writes it; the gradient is each token's derivative times the weight the
    aggregation gives that token (masked tokens: 0). ``token(logp, old, ref, adv) -> (loss, derivative)``
    replaces TRL's per-token loss (``trl_token``), e.g. by verl's."""
    token = token or (lambda lp, o, r, a: trl_token(lp, o, r, a, beta, delta))
    logp, old, ref = batch.logp.tolist(), batch.old.tolist(), batch.ref.tolist()
    adv, mask = batch.adv.tolist(), batch.mask.tolist()
    sums, counts, token_grads = [], [], []
    for i in rows:
        total, count, row_grads = 0.0, 0, []
        for t in range(WIDTH):
            if mask[i][t]:
                loss_t, grad_t = token(logp[i][t], old[i][t], ref[i][t], adv[i])
                total, count = total + loss_t, count + 1
                row_grads.append(grad_t)
            else:
                row_grads.append(0.0)
        sums.append(total)
        counts.append(count)
        token_grads.append(row_grads)

    b = len(rows)
    if loss_type == "grpo":  # per-sequence token mean (denominator clamped to 1), mean over sequences
        loss = sum(s / max(n, 1) for s, n in zip(sums, counts)) / b / gas
        weights = [1.0 / (max(n, 1) * b * gas) for n in counts]
    elif loss_type == "dr_grpo":  # token sum over B times the configured cap
        loss = sum(sums) / (b * MAX_COMPLETION_LENGTH) / gas
        weights = [1.0 / (b * MAX_COMPLETION_LENGTH * gas)] * b
    elif loss_type == "dapo":  # token sum over the generation batch's token count
        normalizer = num_items_in_batch / num_processes * gas / steps_per_generation
        loss = sum(sums) / normalizer
        weights = [1.0 / normalizer] * b
    else:
        raise ValueError(loss_type)
    return loss, [[w * g for g in row] for w, row in zip(weights, token_grads)]


def trl_advantages(rewards: list[float], group_size: int, scale: str) -> list[float]:
    """TRL's advantages: centre on the group mean, divide by (unbiased std + 1e-4) unless scale is "none"."""

    def mean(xs):
        return sum(xs) / len(xs)

    def std(xs):  # with Bessel's correction, as TRL's nanstd
        m = mean(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    out = []
    for k in range(0, len(rewards), group_size):
        group = rewards[k : k + group_size]
        m = mean(group)
        s = std(group) if scale == "group" else std(rewards)
        for r in group:
            out.append(r - m if scale == "none" else (r - m) / (s + 1e-4))
    return out


# --- l2a ------------------------------------------------------------------------------------------


def l2a_loss_and_grad(
    batch: Batch, rows: list[int], loss_type: str, beta: float, num_seqs: int = NUM_SEQS,
    num_tokens: int = NUM_ITEMS, clip_ratio_c: float | None = None,
) -> tuple[float, torch.Tensor]:
    """l2a's grpo_loss on ``rows`` under the mapping, given the whole batch's counts; (loss, d loss / d logp)."""
    logp = batch.logp[rows].clone().requires_grad_(True)
    old = logp.detach() if batch.on_policy else batch.old[rows]  # on-policy exactly as TRL does it
    loss, _ = grpo_loss(
        logp,
        old,
        batch.adv[rows],
        batch.mask[rows],
        ref_logprobs=batch.ref[rows] if beta != 0.0 else None,  # TRL only computes ref logps when beta != 0
        clip_low=EPSILON_LOW,
        clip_high=EPSILON_HIGH,
        kl_coef=beta,
        kl_estimator="k3",
        loss_agg=MODES[loss_type],
        num_tokens=num_tokens,
        max_len=MAX_COMPLETION_LENGTH,
        num_seqs=num_seqs,
        clip_ratio_c=clip_ratio_c,
    )
    loss.backward()
    return loss.item(), logp.grad


def assert_grads_equal(got: torch.Tensor, expected: list[list[float]]) -> None:
    """Gradients agree token by token, padding included (where both must be 0)."""
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=RTOL, atol=ATOL), (got - expected).abs().max()


# --- the loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("loss_type", MODES)
def test_loss_and_gradient_match_trl(loss_type, beta, policy):
    batch = make_batch(policy)
    expected_loss, expected_grad = trl_loss_and_grad(batch, ALL_ROWS, loss_type, beta)
    got_loss, got_grad = l2a_loss_and_grad(batch, ALL_ROWS, loss_type, beta)
    assert got_loss == pytest.approx(expected_loss, rel=RTOL, abs=ATOL)
    assert_grads_equal(got_grad, expected_grad)


REFERENCES = {  # the hand-written losses whose hand-derived gradients are checked by central differences
    "TRL": {},
    "TRL delta": {"delta": DUAL_CLIP},
    "TRL low delta": {"delta": LOW_DELTA},
    "verl dual clip": {"token": lambda lp, o, r, a: verl_dual_clip_token(lp, o, a, DUAL_CLIP)},
}


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("loss_type", MODES)
def test_reference_gradient_is_the_derivative_of_the_reference_loss(loss_type, policy, reference):
    """Central differences on the reference loss confirm the hand-derived reference gradient (old and ref
    fixed, as ``logp.detach()`` makes them), so the gradient comparison above rests on no l2a code."""
    batch, beta, h, options = make_batch(policy), 0.04, 1e-6, REFERENCES[reference]
    _, analytic = trl_loss_and_grad(batch, ALL_ROWS, loss_type, beta, **options)
    for i in ALL_ROWS:
        for t in range(WIDTH):
            plus, minus = make_batch(policy), make_batch(policy)
            plus.logp[i, t] += h
            minus.logp[i, t] -= h
            numeric = (
                trl_loss_and_grad(plus, ALL_ROWS, loss_type, beta, **options)[0]
                - trl_loss_and_grad(minus, ALL_ROWS, loss_type, beta, **options)[0]
            ) / (2 * h)
            assert numeric == pytest.approx(analytic[i][t], abs=1e-8), (i, t)


@pytest.mark.parametrize("loss_type", MODES)
def test_empty_completion_counts_like_trl(loss_type):
    """An all-zero mask row adds nothing to the sums but, in TRL, still counts in B: grpo's per-sequence mean
    divides by clamp(0, min=1) and then averages over all 8 rows, dr_grpo divides by 8 * cap. So dropping
    the row scales grpo and dr_grpo by 8/7 and leaves dapo unchanged; l2a must do the same, without NaN."""
    batch, beta = make_batch("off-policy"), 0.04
    empty = LENGTHS.index(0)
    rest = [i for i in ALL_ROWS if i != empty]
    with_empty, grad = l2a_loss_and_grad(batch, ALL_ROWS, loss_type, beta)
    without_empty, _ = l2a_loss_and_grad(batch, rest, loss_type, beta, num_seqs=len(rest))
    assert with_empty == pytest.approx(trl_loss_and_grad(batch, ALL_ROWS, loss_type, beta)[0], rel=RTOL)
    factor = 1.0 if loss_type == "dapo" else len(rest) / NUM_SEQS
    assert with_empty == pytest.approx(factor * without_empty, rel=RTOL)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[empty], torch.zeros(WIDTH, dtype=torch.float64))


def test_data_tells_the_modes_apart():
    """Guards the test data: each formula difference the tests claim to catch changes the numbers."""
    assert max(LENGTHS) < MAX_COMPLETION_LENGTH and WIDTH < MAX_COMPLETION_LENGTH and 0 in LENGTHS
    batch = make_batch("off-policy")
    losses = {m: trl_loss_and_grad(batch, ALL_ROWS, m, 0.04)[0] for m in MODES}
    # dr_grpo over the batch's longest completion instead of the cap would be off by 10/7
    assert losses["dr_grpo"] * MAX_COMPLETION_LENGTH / max(LENGTHS) != pytest.approx(losses["dr_grpo"], rel=1e-3)
    assert len({round(v, 6) for v in losses.values()}) == 3
    # Off-policy, the clip binds for both signs of A, and some out-of-range ratios are not clipped
    # (there the min picks the unclipped term and the gradient flows).
    ratio = torch.exp(batch.logp - batch.old)
    adv, real = batch.adv[:, None], batch.mask.bool()
    binds_high = (ratio > 1 + EPSILON_HIGH) & (adv > 0) & real
    binds_low = (ratio < 1 - EPSILON_LOW) & (adv < 0) & real
    outside = ((ratio > 1 + EPSILON_HIGH) | (ratio < 1 - EPSILON_LOW)) & real
    assert binds_high.sum() >= 2 and binds_low.sum() >= 2
    assert (outside & ~binds_high & ~binds_low).sum() >= 2
    # The dual clip binds (A < 0, ratio > c) on some tokens; a delta below 1 + epsilon_high also caps some A > 0
    # tokens inside the clip range, where the dual clip does nothing.
    assert ((ratio > DUAL_CLIP) & (adv < 0) & real).sum() >= 2
    assert ((ratio > LOW_DELTA) & (ratio < 1 + EPSILON_HIGH) & (adv > 0) & real).sum() >= 2


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("loss_type", MODES)
def test_micro_batches_match_trl_gradient_accumulation(loss_type, policy):
    """8 sequences as 2 micro-batches of 4 (gradient_accumulation_steps = steps_per_generation = 2).

    TRL: grpo / dr_grpo take each micro-batch's own mean over its 4 sequences and divide by gas = 2; dapo
    divides by num_items_in_batch / 1 process * 2 / 2. l2a: every piece gets the whole batch's counts
    (num_tokens = all tokens, num_seqs = 8). With equal micro-batches both equal sum / 8 per sequence term,
    so the pieces agree one by one, and their sum is TRL's whole-batch loss."""
    batch, beta = make_batch(policy), 0.04
    whole, whole_grad = trl_loss_and_grad(batch, ALL_ROWS, loss_type, beta)
    total = 0.0
    for rows in HALVES:
        expected, expected_grad = trl_loss_and_grad(batch, rows, loss_type, beta, gas=2, steps_per_generation=2)
        got, got_grad = l2a_loss_and_grad(batch, rows, loss_type, beta, num_seqs=NUM_SEQS)
        assert got == pytest.approx(expected, rel=RTOL, abs=ATOL)
        assert_grads_equal(got_grad, expected_grad)
        assert_grads_equal(got_grad, [whole_grad[i] for i in rows])  # accumulated gradient = whole-batch one
        total += got
    assert total == pytest.approx(whole, rel=RTOL, abs=ATOL)


# --- advantages -----------------------------------------------------------------------------------

GROUP_SIZE = 4
# four groups: random, binary (the usual verifier reward), constant (no signal), wide
REWARDS = [0.3, 1.7, -0.4, 0.9, 0.0, 1.0, 1.0, 0.0, 0.7, 0.7, 0.7, 0.7, 2.5, -1.2, 0.1, 0.6]
CONSTANT_GROUP = slice(8, 12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl(scale):
    got = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), GROUP_SIZE, scale, eps=1e-4)
    expected = torch.tensor(trl_advantages(REWARDS, GROUP_SIZE, scale), dtype=torch.float64)
    # atol: in the constant group TRL's r - mean is an ulp-sized residue (see the next test)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-9), (got - expected).abs().max()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_group_gets_zero_advantage(scale):
    """TRL's (r - mean) / (0 + 1e-4) is 0 up to the rounding of the mean (here ~1e-12 in float64; in TRL's
    float32 rewards it can reach ~1e-4 for non-dyadic rewards such as 0.7); l2a forces exact zeros."""
    got = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), GROUP_SIZE, scale, eps=1e-4)
    assert torch.equal(got[CONSTANT_GROUP], torch.zeros(GROUP_SIZE, dtype=torch.float64))
    expected = trl_advantages(REWARDS, GROUP_SIZE, scale)[CONSTANT_GROUP]
    assert max(abs(a) for a in expected) < 1e-9


@pytest.mark.parametrize("group_std", [1.0, 1.5, 3.0])
def test_default_eps_is_within_1e_4_relative_of_trl(group_std):
    """l2a's default eps (1e-6) vs TRL's 1e-4: A_l2a / A_trl = (std + 1e-4) / (std + 1e-6), i.e. < 1e-4
    relative once the group std is about 1 or more."""
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(3, GROUP_SIZE, generator=g, dtype=torch.float64)
    # rescale every group to the given unbiased std, so the expected ratio is known exactly
    rewards = raw - raw.mean(dim=1, keepdim=True)
    rewards = (rewards / rewards.std(dim=1, keepdim=True) * group_std + 0.5).flatten()
    got = group_advantages(rewards, GROUP_SIZE, "group")  # default eps
    expected = torch.tensor(trl_advantages(rewards.tolist(), GROUP_SIZE, "group"), dtype=torch.float64)
    relative = ((got - expected) / expected).abs()
    assert relative.max().item() < 1e-4
    predicted = (group_std + 1e-4) / (group_std + 1e-6) - 1.0
    assert torch.allclose(relative, torch.full_like(relative, predicted), rtol=1e-6)


# --- the dual clip: verl's, and TRL's delta -------------------------------------------------------


@pytest.mark.parametrize("loss_type", MODES)
def test_dual_clip_matches_verl(loss_type):
    """l2a's clip_ratio_c is verl's per-token dual clip (the module docstring), token for token."""
    batch = make_batch("off-policy")
    verl = lambda lp, o, r, a: verl_dual_clip_token(lp, o, a, DUAL_CLIP)  # noqa: E731
    expected_loss, expected_grad = trl_loss_and_grad(batch, ALL_ROWS, loss_type, 0.0, token=verl)
    got_loss, got_grad = l2a_loss_and_grad(batch, ALL_ROWS, loss_type, 0.0, clip_ratio_c=DUAL_CLIP)
    assert got_loss == pytest.approx(expected_loss, rel=RTOL, abs=ATOL)
    assert_grads_equal(got_grad, expected_grad)
    without, _ = l2a_loss_and_grad(batch, ALL_ROWS, loss_type, 0.0)
    assert without > got_loss + 1e-3  # the cap binds here and lowers the loss


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("loss_type", MODES)
def test_trl_delta_is_the_dual_clip_above_the_clip_range(loss_type, beta):
    """TRL's ``delta`` (the INTELLECT-2 report's two-sided clip) caps coef_1 at delta for every token, whatever
    the sign of A. For A < 0 that is the dual clip with c = delta. For A > 0, a ratio above delta is also above
    1 + epsilon_high if delta is, and the ordinary clip already holds that token at 1 + epsilon_high: the cap
    changes nothing. So with delta > 1 + epsilon_high (TRL's own recommendation) TRL's delta and l2a's
    clip_ratio_c are the same loss and gradient. With a smaller delta they differ: TRL then also caps A > 0
    tokens with delta < ratio < 1 + epsilon_high, which neither the dual clip nor the PPO clip touches."""
    batch = make_batch("off-policy")
    expected_loss, expected_grad = trl_loss_and_grad(batch, ALL_ROWS, loss_type, beta, delta=DUAL_CLIP)
    got_loss, got_grad = l2a_loss_and_grad(batch, ALL_ROWS, loss_type, beta, clip_ratio_c=DUAL_CLIP)
    assert got_loss == pytest.approx(expected_loss, rel=RTOL, abs=ATOL)
    assert_grads_equal(got_grad, expected_grad)

    trl_low, _ = trl_loss_and_grad(batch, ALL_ROWS, loss_type, beta, delta=LOW_DELTA)
    l2a_low, _ = l2a_loss_and_grad(batch, ALL_ROWS, loss_type, beta, clip_ratio_c=LOW_DELTA)
    assert abs(trl_low - l2a_low) > 1e-3


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("loss_type", MODES)
def test_mini_batches_are_trl_steps_per_generation(loss_type, policy):
    """Two optimizer steps on one generation batch: TRL's steps_per_generation = 2 (gradient_accumulation_steps
    1), l2a's mini_batches = 2; each step's loss covers one half. grpo and dr_grpo: TRL's mean runs over the
    half's own sequences, as l2a's does (num_seqs = the half's count, what l2a's update counts). dapo: TRL divides by
    num_items_in_batch / steps_per_generation, the tokens of an *average* half (14 here); l2a by the half's own
    tokens (15 and 13), so that every token of a step weighs the same. The two differ by that factor only.
    (TRL also shuffles the generation batch before splitting it; l2a's halves are whole groups, in order.)"""
    batch, beta = make_batch(policy), 0.04
    for rows in HALVES:
        tokens = sum(LENGTHS[i] for i in rows)
        expected, expected_grad = trl_loss_and_grad(batch, rows, loss_type, beta, steps_per_generation=2)
        got, got_grad = l2a_loss_and_grad(batch, rows, loss_type, beta, num_seqs=len(rows), num_tokens=tokens)
        factor = (NUM_ITEMS / 2) / tokens if loss_type == "dapo" else 1.0
        assert factor != 1.0 or loss_type != "dapo"
        assert got == pytest.approx(factor * expected, rel=RTOL, abs=ATOL)
        assert_grads_equal(got_grad, [[factor * g for g in row] for row in expected_grad])
