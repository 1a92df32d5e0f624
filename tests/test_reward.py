"""The reward of spec section 6 (value table, fusion modes) and the parsing of grader answers."""

import json
import math
from pathlib import Path

import pytest

from l2a.judges import parse_grade
from l2a.prompts import STOP_TOKEN
from l2a.reward import (
    Grade,
    Reward,
    compute_reward,
    fuse,
    needs_grade,
    predicted_decision,
)

SAMPLES = Path(__file__).resolve().parents[2] / "shared/data/realmedconv_samples"
QUESTION = "Where is the pain? A) Ear B) Head C) Throat"
LEVELS = (0.0, 0.5, 1.0)
ALL_MODES = [(t, f) for t in ("Ra+Rs", "Ra", "Rs") for f in ("default", "sum")]


def grader_text(format_score, content_score, think="reasoning") -> str:
    return (
        f"<think>{think}</think>\n"
        f"<format_score>{format_score}</format_score>\n<content_score>{content_score}</content_score>"
    )


# --- compute_reward: the value table ---------------------------------------------------------------------------


@pytest.mark.parametrize("content", LEVELS)
@pytest.mark.parametrize("fmt", LEVELS)
def test_correct_continue_takes_the_grade_in_every_mode(content, fmt):
    grade = Grade(format_score=fmt, content_score=content)
    expected = {
        ("Ra+Rs", "default"): 1 + 2 * content + fmt,
        ("Ra+Rs", "sum"): 1 + content + fmt,
        ("Ra", "default"): 2 * content + fmt,
        ("Rs", "default"): 3 + fmt,
    }
    for (train_mode, fusion_mode), total in expected.items():
        reward = compute_reward(QUESTION, "continue", grade, train_mode, fusion_mode)
        assert reward == Reward(decision=1.0, content=content, format=fmt, total=total)


@pytest.mark.parametrize("train_mode,fusion_mode", ALL_MODES)
def test_any_wrong_decision_gives_zero_even_with_a_perfect_grade(train_mode, fusion_mode):
    perfect = Grade(1.0, 1.0)
    for response, truth in [(STOP_TOKEN, "continue"), ("I see. " + STOP_TOKEN, "continue"), (QUESTION, "stop")]:
        assert compute_reward(response, truth, perfect, train_mode, fusion_mode) == Reward(0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "train_mode,fusion_mode,exact_total,loose_total",
    [
        ("Ra+Rs", "default", 4.0, 3.0),
        ("Ra+Rs", "sum", 3.0, 2.0),
        ("Ra", "default", 3.0, 2.0),
        ("Rs", "default", 4.0, 3.0),
    ],
)
def test_correct_stop_needs_the_exact_token_for_the_format_point(train_mode, fusion_mode, exact_total, loose_total):
    exact = compute_reward(STOP_TOKEN, "stop", None, train_mode, fusion_mode)
    assert exact == Reward(decision=1.0, content=1.0, format=1.0, total=exact_total)
    for loose in [STOP_TOKEN + "\n", " " + STOP_TOKEN, "Enough information. " + STOP_TOKEN]:
        assert compute_reward(loose, "stop", None, train_mode, fusion_mode) == Reward(1.0, 1.0, 0.0, loose_total)


def test_a_correct_stop_ignores_any_grade():
    assert compute_reward(STOP_TOKEN, "stop", Grade(0.0, 0.0)).total == 4.0


@pytest.mark.parametrize(
    "train_mode,fusion_mode,total",
    [("Ra+Rs", "default", 1.0), ("Ra+Rs", "sum", 1.0), ("Ra", "default", 0.0), ("Rs", "default", 3.0)],
)
def test_missing_grade_leaves_only_the_decision_point(train_mode, fusion_mode, total):
    assert compute_reward(QUESTION, "continue", None, train_mode, fusion_mode) == Reward(1.0, 0.0, 0.0, total)


@pytest.mark.parametrize("train_mode", ["Ra", "Rs"])
def test_fusion_mode_is_ignored_outside_ra_plus_rs(train_mode):
    grade = Grade(0.5, 0.5)
    default = compute_reward(QUESTION, "continue", grade, train_mode, "default")
    assert compute_reward(QUESTION, "continue", grade, train_mode, "sum") == default


def test_fuse_is_the_paper_formula_with_beta_2():
    assert fuse(1.0, 0.5, 0.5) == 1.0 * (1 + 2 * 0.5) + 0.5
    assert fuse(0.0, 1.0, 1.0) == 1.0  # R_s = 0 switches off the content term, not the format term
    assert fuse(1.0, 1.0, 1.0, "Ra+Rs", "sum") == 3.0


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(train_mode="Ra+Rs+X"), "train_mode"),
        (dict(fusion_mode="product"), "fusion_mode"),
        (dict(decision_truth="maybe"), "decision_truth"),
        (dict(decision_truth="Stop"), "decision_truth"),
    ],
)
def test_unknown_modes_and_labels_raise_even_when_unused(kwargs, word):
    # A wrong decision never reads the fusion mode, and Rs never reads it either: still validated.
    args = dict(response=STOP_TOKEN, decision_truth="continue", grade=None, train_mode="Rs", fusion_mode="default")
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        compute_reward(**args)


def test_predicted_decision_and_needs_grade():
    assert predicted_decision(STOP_TOKEN) == "stop"
    assert predicted_decision(f"Thanks.\n{STOP_TOKEN}\n") == "stop"
    assert predicted_decision("<stop/>") == "continue"  # only the exact token counts
    assert predicted_decision(QUESTION) == "continue"
    assert needs_grade(QUESTION, "continue")
    assert not needs_grade(STOP_TOKEN, "continue")
    assert not needs_grade(STOP_TOKEN, "stop")
    assert not needs_grade(QUESTION, "stop")
    with pytest.raises(ValueError):
        needs_grade(QUESTION, "go on")


# --- parse_grade -----------------------------------------------------------------------------------------------


def test_parse_well_formed():
    assert parse_grade(grader_text(1.0, 0.5, "one question")) == Grade(1.0, 0.5, "one question")
    assert parse_grade("<format_score>1</format_score><content_score>0</content_score>") == Grade(1.0, 0.0, "")


def test_parse_multiline_and_whitespace():
    text = (
        "  <think>\nline one\nline two\n</think>\n"
        "<format_score>\n  0.5\n</format_score>\n<content_score> 1.0 </content_score>\n"
    )
    assert parse_grade(text) == Grade(0.5, 1.0, "line one\nline two")


def test_parse_takes_the_last_score_when_the_think_quotes_a_tag():
    text = (
        "<think>I must not write <format_score>1.0</format_score> blindly</think>"
        "<format_score>0.0</format_score><content_score>0.5</content_score>"
    )
    assert parse_grade(text).format_score == 0.0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The question is fine, I give it 1.0.",
        "<think>x</think><format_score>1.0</format_score>",  # content missing
        "<think>x</think><content_score>1.0</content_score>",  # format missing
        "<format_score>one</format_score><content_score>1.0</content_score>",
        "<format_score>1.0</format_score><content_score></content_score>",
        "<format_score>1.0/1.0</format_score><content_score>0.5</content_score>",
        "<format_score>nan</format_score><content_score>0.5</content_score>",
        "<format_score>inf</format_score><content_score>0.5</content_score>",
        "<format_score>2</format_score><content_score>0.5</content_score>",
        "<format_score>1.0</format_score><content_score>-0.5</content_score>",
        "<format_score>1.0</content_score><content_score>0.5</format_score>",  # mismatched tags
    ],
)
def test_parse_rejects_bad_answers_with_none(text):
    assert parse_grade(text) is None


def test_grade_validates_its_scores():
    with pytest.raises(ValueError, match="format_score"):
        Grade(1.5, 0.0)
    with pytest.raises(ValueError, match="content_score"):
        Grade(0.0, math.nan)


# --- the graded rollouts published with the reference implementation -------------------------------------------


def test_reproduces_the_reference_evaluation_example():
    example = json.loads((SAMPLES / "eval_output_example_206_1.json").read_text())
    assert len(example["rollouts"]) == len(example["grades"]) == 3
    for response, recorded in zip(example["rollouts"], example["grades"]):
        grade = parse_grade(grader_text(recorded["format_score"], recorded["content_score"], recorded["think"]))
        assert grade is not None and grade.think == recorded["think"]
        reward = compute_reward(response, example["decision_truth"], grade)
        assert (reward.decision, reward.format, reward.content) == (
            recorded["action_score"],
            recorded["format_score"],
            recorded["content_score"],
        )
        assert reward.total == 1 + 2 * 0.5 + 1.0
