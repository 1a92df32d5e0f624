"""The paper's evaluation metrics, one definition for ``python -m l2a.evaluate`` and for train.py's held-out
evaluation (spec section 8).

Every graded rollout is a (rollout, grade) *pair*; a grade is the reference's record ``{think, action_score,
format_score, content_score}`` (``grade_entry``). ``compute_metrics`` summarises all pairs of a set of graded
records as the paper's table, the same arithmetic as the reference's ``compute_score``; ``count_pairs`` says how
many pairs it rests on.
"""

from __future__ import annotations

import math
from typing import Iterable

from l2a.judges import ScoredResponse
from l2a.reward import fuse, needs_grade, predicted_decision

METRICS = (  # key in metrics.json (the reference's own keys) -> name in the table
    ("ave_continue_content", "Avg. continue content"),
    ("win_continue_content", "Win rate (continue content)"),
    ("ave_continue_content if correct", "Avg. continue content (correct continues)"),
    ("win_continue_content if correct", "Win rate (correct continues)"),
    ("ave_continue_decision", "Avg. continue decision accuracy"),
    ("ave_stop_decision", "Avg. stop decision accuracy"),
    ("ave_total_decision", "Total decision accuracy"),
    ("ave_total_format", "Response format quality"),
    ("ave_total_reward", "Total reward"),
)
"""The seven metrics of the paper's table (AgentScope README) and the two "if correct" ones that the reference's
``compute_score`` computes but the README does not show."""
METRIC_KEYS = tuple(key for key, _ in METRICS)
COUNTS = ("samples", "rollouts", "continue_pairs", "stop_pairs", "judge_failures", "skipped_pairs")


def grade_entry(response: str, decision_truth: str, scored: ScoredResponse) -> dict:
    """The reference's grade record ``{think, action_score, format_score, content_score}`` of one rollout.

    Only a correct "continue" asks the judge; a judge failure there gets null content and format scores: the
    metrics count it as content 0 and format 0 (``pair_scores``), and the next evaluation run asks the judge again.
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


def graded_record(sample: dict, rollouts: list[str], scored: list[ScoredResponse]) -> dict:
    """A sample with its rollouts and their grades: a line of ``graded.jsonl``, what ``compute_metrics`` reads."""
    grades = [grade_entry(rollout, sample["decision_truth"], s) for rollout, s in zip(rollouts, scored, strict=True)]
    return {**sample, "rollouts": rollouts, "grades": grades}


def judge_failed(grade: dict) -> bool:
    """An unreadable grade: the judge was asked (the decision is set) but gave no content or format score."""
    return grade.get("format_score") is None or grade.get("content_score") is None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def pair_scores(grade: dict) -> tuple[float, float, float] | None:
    """(action, content, format) of a pair as the metrics count it, or None for a pair they leave out.

    As in the reference's evaluation, whose grader parse leaves both scores at 0 when it reads nothing, an
    unreadable grade (content and format null, ``judge_failed``) counts as content 0 and format 0 with its
    decision kept. A pair with a NaN or infinite score, or without a decision, is left out (the reference skips NaN).
    """
    action = grade.get("action_score")
    content, format = (0.0 if grade.get(key) is None else grade[key] for key in ("content_score", "format_score"))
    if all(_number(v) and math.isfinite(v) for v in (action, content, format)):
        return float(action), float(content), float(format)
    return None


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def compute_metrics(records: Iterable[dict]) -> dict[str, float | None]:
    """The paper's metrics over all (rollout, grade) pairs of graded records (spec section 8).

    Pairs of "continue" samples form C, of "stop" samples S; C_ok is the part of C whose rollout holds no
    ``<stop />`` (a correct continue decision). Content and its win rate (share of content 1) are averaged over C,
    where a wrong stop counts as content 0, and again over C_ok ("if correct"); format and reward over C and S. The
    total reward always uses the default fusion ``action * (1 + 2 content) + format``, whatever the train mode.
    An unreadable grade counts as content 0, format 0 (``pair_scores``). A metric without any pair is None (the
    reference prints 0.0 there).

    Worked example: a continue sample with rollouts graded (action, content, format) = (1, 1, 1), (1, unreadable),
    (0, 0, 0) [a wrong stop] and a stop sample with (1, 1, 1) [exactly ``<stop />``]:
    continue content (1 + 0 + 0) / 3, if correct (1 + 0) / 2; decision 3/4 overall; format (1 + 0 + 0 + 1) / 4;
    reward (4 + 1 + 0 + 4) / 4.
    """
    continues, correct_continues, stops = [], [], []
    for record in records:
        for rollout, grade in zip(record["rollouts"], record["grades"], strict=True):
            scores = pair_scores(grade)
            if scores is None:
                continue
            if record["decision_truth"] == "stop":
                stops.append(scores)
                continue
            continues.append(scores)
            if predicted_decision(rollout) == "continue":
                correct_continues.append(scores)
    every = continues + stops
    return {
        "ave_continue_content": _mean(content for _, content, _ in continues),
        "win_continue_content": _mean(float(content == 1.0) for _, content, _ in continues),
        "ave_continue_content if correct": _mean(content for _, content, _ in correct_continues),
        "win_continue_content if correct": _mean(float(content == 1.0) for _, content, _ in correct_continues),
        "ave_continue_decision": _mean(action for action, _, _ in continues),
        "ave_stop_decision": _mean(action for action, _, _ in stops),
        "ave_total_decision": _mean(action for action, _, _ in every),
        "ave_total_format": _mean(format for _, _, format in every),
        "ave_total_reward": _mean(fuse(action, content, format) for action, content, format in every),
    }


def count_pairs(records: Iterable[dict]) -> dict[str, int]:
    """How many samples, rollouts and counted continue/stop pairs the metrics rest on; of the counted pairs, how
    many had an unreadable grade (``judge_failures``, scored content 0, format 0); how many were left out."""
    counts = dict.fromkeys(COUNTS, 0)
    for record in records:
        counts["samples"] += 1
        counts["rollouts"] += len(record["grades"])
        for grade in record["grades"]:
            if pair_scores(grade) is None:
                counts["skipped_pairs"] += 1
                continue
            counts[f"{record['decision_truth']}_pairs"] += 1
            counts["judge_failures"] += judge_failed(grade)
    return counts
