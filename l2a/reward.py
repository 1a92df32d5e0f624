"""The Learn-to-Ask reward: decision correctness, question content and format, fused into one number.

For a policy response r to a sample with labels (``decision_truth``, ``info_truth``), spec section 6:

    R = R_s * (1 + beta * R_a) + P,     beta = 2

- ``decision`` = R_s, the *macro* reward: 1 if the stop/continue decision is right, else 0. The predicted
  decision is "stop" iff ``<stop />`` occurs anywhere in r. (The reference code calls it ``action_score``;
  it is the paper's state assessment s_t, not its action a_t, the question.)
- ``content`` = R_a, the *micro* reward: how useful the question is for eliciting the target facts I*
  (``info_truth``), graded 1 / 0.5 / 0 by a judge (``l2a.judges``).
- ``format``  = P, the format term: 1 / 0.5 / 0 for one / two / three-or-more questions, graded by the judge.

A wrong decision zeroes all three terms. A correct stop needs no judge: content 1, and format 1 only if
r is exactly ``<stop />`` (no stripping, so a trailing newline costs the format point). Only a correct
"continue" asks the judge (``needs_grade``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from l2a.prompts import STOP_TOKEN

TrainMode = Literal["Ra+Rs", "Ra", "Rs"]
FusionMode = Literal["default", "sum"]
TRAIN_MODES: tuple[str, ...] = get_args(TrainMode)
FUSION_MODES: tuple[str, ...] = get_args(FusionMode)
DECISIONS = ("continue", "stop")
BETA = 2.0  # weight of the content term in the multiplicative fusion (the same in every reference implementation)


@dataclass(frozen=True)
class Grade:
    """A judge's verdict on one response: format (P) and content (R_a) scores in [0, 1], plus its reasoning."""

    format_score: float
    content_score: float
    think: str = ""

    def __post_init__(self) -> None:
        for name in ("format_score", "content_score"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"Grade.{name} must be a number in [0, 1], got {value!r}")



@dataclass(frozen=True)
class Reward:
    """The three reward terms and their fusion: ``decision`` = R_s, ``content`` = R_a, ``format`` = P."""

    decision: float
    content: float
    format: float
    total: float


def check_modes(train_mode: str, fusion_mode: str) -> None:
    """Raise ValueError for an unknown train or fusion mode."""
    if train_mode not in TRAIN_MODES:
        raise ValueError(f"unknown train_mode {train_mode!r}; expected one of {TRAIN_MODES}")
    if fusion_mode not in FUSION_MODES:
        raise ValueError(f"unknown fusion_mode {fusion_mode!r}; expected one of {FUSION_MODES}")


def _check_decision(decision_truth: str) -> None:
    if decision_truth not in DECISIONS:
        raise ValueError(f"unknown decision_truth {decision_truth!r}; expected one of {DECISIONS}")


def predicted_decision(response: str) -> str:
    """ "stop" if the stop token occurs anywhere in the response, else "continue" (spec section 4)."""
    return "stop" if STOP_TOKEN in response else "continue"


def needs_grade(response: str, decision_truth: str) -> bool:
    """True only for a correct "continue": the one case whose reward depends on the judge."""
    _check_decision(decision_truth)
    return decision_truth == "continue" and predicted_decision(response) == "continue"


def fuse(
    decision: float, content: float, format: float, train_mode: str = "Ra+Rs", fusion_mode: str = "default"
) -> float:
    """Combine the terms into the scalar reward (spec table 6.1); fusion_mode only matters for "Ra+Rs".

    - "Ra+Rs"/"default": R_s * (1 + 2 R_a) + P   (the paper's hierarchical fusion, range [0, 4])
    - "Ra+Rs"/"sum":     R_s + R_a + P           (the additive ablation, [0, 3])
    - "Ra":              2 R_a + P               (ablation without R_s, [0, 3]; a wrong decision still zeroes R_a)
    - "Rs":              3 R_s + P               (ablation without R_a, [0, 4])
    """
    check_modes(train_mode, fusion_mode)
    if train_mode == "Ra":
        return BETA * content + format
    if train_mode == "Rs":
        return (1 + BETA) * decision + format
    if fusion_mode == "sum":
        return decision + content + format
    return decision * (1 + BETA * content) + format


def compute_reward(
    response: str,
    decision_truth: str,
    grade: Grade | None,
    train_mode: str = "Ra+Rs",
    fusion_mode: str = "default",
) -> Reward:
    """The reward of one response, exactly as in spec section 6.

    ``grade`` is the judge's verdict, used only for a correct "continue"; None there (judge not asked or failed)
    scores content = format = 0, leaving the decision point. Unknown modes or labels raise ValueError even when
    this response would not need them, so a misconfigured run fails on its first sample.
    """
    check_modes(train_mode, fusion_mode)
    _check_decision(decision_truth)
    if predicted_decision(response) != decision_truth:
        decision = content = format = 0.0
    elif decision_truth == "stop":
        decision, content = 1.0, 1.0
        format = 1.0 if response == STOP_TOKEN else 0.0  # exact match: no strip(), as in the reference code
    else:
        decision = 1.0
        content, format = (grade.content_score, grade.format_score) if grade is not None else (0.0, 0.0)
    return Reward(decision, content, format, fuse(decision, content, format, train_mode, fusion_mode))

