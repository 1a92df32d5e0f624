"""The paper's evaluation metrics, one definition for ``python -m l2a.evaluate`` and for train.py's held-out
evaluation (spec section 8).

Every graded rollout is a (rollout, grade) *pair*; a grade is the reference's record ``{think, action_score,
format_score, content_score}`` (``grade_entry``). ``compute_metrics`` summarises all pairs of a set of graded
records as the paper's table; ``count_pairs`` says how many pairs it rests on.
"""

from __future__ import annotations

import math
from typing import Iterable

from l2a.judges import ScoredResponse
from l2a.reward import fuse, needs_grade, predicted_decision

METRICS = (  # key in metrics.json -> name in the paper's table (AgentScope README)
    ("ave_continue_content", "Avg. continue content"),
    ("win_continue_content", "Win rate (continue content)"),
    ("ave_continue_decision", "Avg. continue decision accuracy"),
    ("ave_stop_decision", "Avg. stop decision accuracy"),
    ("ave_total_decision", "Total decision accuracy"),
    ("ave_total_format", "Response format quality"),
    ("ave_total_reward", "Total reward"),
)
METRIC_KEYS = tuple(key for key, _ in METRICS)
COUNTS = ("samples", "rollouts", "continue_pairs", "stop_pairs", "judge_failures", "skipped_pairs")


def grade_entry(response: str, decision_truth: str, scored: ScoredResponse) -> dict:
    """The reference's grade record ``{think, action_score, format_score, content_score}`` of one rollout.

    Only a correct "continue" asks the judge; a judge failure there gets null scores (skipped by the metrics,
    counted as a judge failure, and retried by the next run).
    """
    reward, grade = scored.reward, scored.grade
    if needs_grade(response, decision_truth):
        if grade is None:
            return {"think": "judge failed", "action_score": 1.0, "format_score": None, "content_score": None}
        think = grade.think
    elif reward.decision:
        think = "correct stop (no judge needed)"
    else:
        think = f"wrong decision: {predicted_decision(response)} instead of {decision_truth} (no judge needed)"
    return {"think": think, "action_score": reward.decision, "format_score": reward.format,
            "content_score": reward.content}


def judge_failed(grade: dict) -> bool:
    return grade.get("format_score") is None or grade.get("content_score") is None


def _scores(grade: dict) -> tuple[float, float, float] | None:
    """(action, content, format) of a grade, or None if any is missing or not a finite number (pair skipped)."""
    values = (grade.get("action_score"), grade.get("content_score"), grade.get("format_score"))
    if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return tuple(float(v) for v in values)
    return None


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def compute_metrics(records: Iterable[dict]) -> dict[str, float | None]:
    """The paper's seven metrics over all (rollout, grade) pairs of graded records (spec section 8).

    Pairs of "continue" samples form C, of "stop" samples S. Content and its win rate are averaged over C
    (a wrong stop counts as content 0), format and reward over all pairs. The total reward always uses the default
    fusion ``action * (1 + 2 content) + format``, whatever the train mode. Pairs with a missing or NaN score are
    skipped, as in the reference; a metric without any pair is None.
    """
    continues, stops = [], []
    for record in records:
        pairs = continues if record["decision_truth"] == "continue" else stops
        pairs.extend(s for s in map(_scores, record["grades"]) if s is not None)
    every = continues + stops
    return {
        "ave_continue_content": _mean(content for _, content, _ in continues),
        "win_continue_content": _mean(float(content == 1.0) for _, content, _ in continues),
        "ave_continue_decision": _mean(action for action, _, _ in continues),
        "ave_stop_decision": _mean(action for action, _, _ in stops),
        "ave_total_decision": _mean(action for action, _, _ in every),
        "ave_total_format": _mean(format for _, _, format in every),
        "ave_total_reward": _mean(fuse(action, content, format) for action, content, format in every),
    }


def count_pairs(records: Iterable[dict]) -> dict[str, int]:
    """How many samples, rollouts and usable continue/stop pairs the metrics rest on, and how many were skipped."""
    counts = dict.fromkeys(COUNTS, 0)
    for record in records:
        counts["samples"] += 1
        counts["rollouts"] += len(record["grades"])
        for grade in record["grades"]:
            if _scores(grade) is None:
                counts["skipped_pairs"] += 1
                counts["judge_failures"] += judge_failed(grade)
            else:
                counts[f"{record['decision_truth']}_pairs"] += 1
    return counts
