"""Tests of ``python -m l2a.evaluate``: the metrics, the three stages end to end, resuming, and bad input.

Endpoints are played by ``ChatStub``, a local HTTP test double for a remote, paid service (an LLM policy or grader
behind the chat-completions API); the policy model is the tiny random Llama of ``tests/tiny_model.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from openai_stub import ChatStub
from subprocesses import python, run_to_end

from l2a.evaluate import METRIC_KEYS, compute_metrics, count_pairs, format_table, main
from l2a.prompts import STOP_TOKEN
from l2a.reward import compute_reward

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO.parent / "shared/data/realmedconv_samples/eval_output_example_206_1.json"

SAMPLES = [
    {"cid": "1_1", "session_id": 1, "diagn": "Common cold", "decision_truth": "continue",
     "messages": [{"role": "user", "content": "I have a headache and a runny nose."}],
     "info_truth": "symptom location: forehead, symptom severity: moderate"},
    {"cid": "1_2", "session_id": 1, "diagn": "Common cold", "decision_truth": "stop",
     "messages": [{"role": "user", "content": "I have a headache and a runny nose."},
                  {"role": "assistant", "content": "Where is the headache?"},
                  {"role": "user", "content": "On the forehead, moderate."}],
     "info_truth": ""},
    {"cid": "2_1", "session_id": 2, "diagn": "Diarrhea", "decision_truth": "continue",
     "messages": [{"role": "user", "content": "I have had diarrhea since yesterday."}],
     "info_truth": "symptom nature: watery stool, symptom severity: 5 times a day"},
    {"cid": "2_2", "session_id": 2, "diagn": "Diarrhea", "decision_truth": "stop",
     "messages": [{"role": "user", "content": "I have had diarrhea since yesterday."},
                  {"role": "assistant", "content": "How often?"},
                  {"role": "user", "content": "Five times a day, watery."}],
     "info_truth": ""},
]
QUESTION = "How severe is it? A) Mild B) Moderate C) Severe"
# ChatStub's HTTP server queues only 5 pending connections; more at once stall for a TCP retry (~1 s).
FEW_CONNECTIONS = ("--policy-concurrency", "4", "--judge-concurrency", "4")
GOOD_GRADE = "<think>one direct question</think><format_score>1.0</format_score><content_score>0.5</content_score>"


@pytest.fixture
def test_file(tmp_path) -> Path:
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    return path


def graded(decision_truth: str, *scores: tuple) -> dict:
    """A graded record; each score tuple is (action, format, content), None for an unreadable grade.

    Each rollout agrees with its action score: a right decision is the truth's answer (a question, or exactly
    ``<stop />``), a wrong one the other.
    """
    def rollout(action, format) -> str:
        if (decision_truth == "stop") != bool(action):
            return QUESTION
        return STOP_TOKEN if format else STOP_TOKEN + "\n"  # a stop with a trailing newline loses the format point

    grades = [{"think": "", "action_score": a, "format_score": f, "content_score": c} for a, f, c in scores]
    return {"cid": "x", "decision_truth": decision_truth, "rollouts": [rollout(a, f) for a, f, _ in scores],
            "grades": grades}


def policy_reply(request: dict) -> str | list[str]:
    """A stub policy that is always right: stop once the doctor has asked something, else ask about severity."""
    asked = sum(m["role"] == "assistant" for m in request["messages"])
    text = STOP_TOKEN if asked else QUESTION
    return [text] * request.get("n", 1)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- compute_metrics ---------------------------------------------------------------------------------------------


def test_metrics_of_the_reference_example():
    """The AgentScope README's graded sample 206_1: three correct continues, content 0.5, format 1."""
    record = json.loads(EXAMPLE.read_text())
    metrics = compute_metrics([record])
    assert metrics == {
        "ave_continue_content": 0.5,
        "win_continue_content": 0.0,
        "ave_continue_content if correct": 0.5,
        "win_continue_content if correct": 0.0,
        "ave_continue_decision": 1.0,
        "ave_stop_decision": None,  # no stop sample
        "ave_total_decision": 1.0,
        "ave_total_format": 1.0,
        "ave_total_reward": 3.0,  # 1 * (1 + 2 * 0.5) + 1
    }
    assert count_pairs([record]) == {"samples": 1, "rollouts": 3, "continue_pairs": 3, "stop_pairs": 0,
                                     "judge_failures": 0, "skipped_pairs": 0}


def test_metrics_keep_the_seven_and_add_the_two_if_correct_keys():
    assert METRIC_KEYS == ("ave_continue_content", "win_continue_content", "ave_continue_content if correct",
                           "win_continue_content if correct", "ave_continue_decision", "ave_stop_decision",
                           "ave_total_decision", "ave_total_format", "ave_total_reward")


def test_metrics_continue_only():
    metrics = compute_metrics([graded("continue", (1, 1.0, 1.0), (1, 0.5, 0.5), (0, 0.0, 0.0))])
    assert metrics["ave_continue_content"] == pytest.approx(0.5)
    assert metrics["win_continue_content"] == pytest.approx(1 / 3)
    # "if correct": only the two rollouts without <stop /> (the third is a wrong stop)
    assert metrics["ave_continue_content if correct"] == pytest.approx(0.75)
    assert metrics["win_continue_content if correct"] == pytest.approx(0.5)
    assert metrics["ave_continue_decision"] == pytest.approx(2 / 3)
    assert metrics["ave_stop_decision"] is None
    assert metrics["ave_total_format"] == pytest.approx(0.5)
    assert metrics["ave_total_reward"] == pytest.approx((4 + 2.5 + 0) / 3)


def test_metrics_stop_only():
    metrics = compute_metrics([graded("stop", (1, 1.0, 1.0), (1, 0.0, 1.0), (0, 0.0, 0.0), (0, 0.0, 0.0))])
    assert metrics["ave_continue_content"] is None and metrics["win_continue_content"] is None
    assert metrics["ave_continue_content if correct"] is None and metrics["win_continue_content if correct"] is None
    assert metrics["ave_continue_decision"] is None
    assert metrics["ave_stop_decision"] == 0.5
    assert metrics["ave_total_decision"] == 0.5
    assert metrics["ave_total_format"] == 0.25
    assert metrics["ave_total_reward"] == pytest.approx((4 + 3 + 0 + 0) / 4)


def test_failed_grades_count_as_content_and_format_zero_like_the_reference():
    """The issue's run: 8 samples x 2 rollouts, 12 unreadable grades on correct continues, 4 wrong stops.

    The reference's grader parse leaves content and format at 0 when it reads nothing, and counts the pair.
    Skipping those pairs printed a total decision accuracy of 0.000 (the 4 stop pairs alone).
    """
    records = [graded("continue", (1, None, None), (1, None, None)) for _ in range(6)]
    records += [graded("stop", (0, 0.0, 0.0), (0, 0.0, 0.0)) for _ in range(2)]
    assert compute_metrics(records) == {
        "ave_continue_content": 0.0,  # 0 / 12
        "win_continue_content": 0.0,
        "ave_continue_content if correct": 0.0,  # the 12 correct continues, content 0 each
        "win_continue_content if correct": 0.0,
        "ave_continue_decision": 1.0,  # 12 / 12
        "ave_stop_decision": 0.0,  # 0 / 4
        "ave_total_decision": 0.75,  # 12 / 16
        "ave_total_format": 0.0,
        "ave_total_reward": 0.75,  # 12 pairs of 1 * (1 + 0) + 0, 4 pairs of 0, over 16
    }
    assert count_pairs(records) == {"samples": 8, "rollouts": 16, "continue_pairs": 12, "stop_pairs": 4,
                                    "judge_failures": 12, "skipped_pairs": 0}


def test_metrics_mixed_failed_and_skipped_pairs():
    """Hand-computed with the reference's arithmetic: an unreadable grade counts 0/0, a NaN score is skipped."""
    records = [
        graded("continue", (1, 1.0, 1.0), (1, None, None), (1, 0.5, float("nan")), (0, 0.0, 0.0)),
        graded("continue", (1, 0.5, 0.5), (1, 1.0, 0.5)),
        graded("stop", (1, 1.0, 1.0), (0, 0.0, 0.0), (1, 0.0, 1.0)),
    ]
    metrics = compute_metrics(records)
    # Counted, as (action, format, content). C: (1, 1, 1), (1, 0, 0) unreadable, (0, 0, 0) wrong stop, (1, .5, .5),
    # (1, 1, .5); the NaN pair is skipped. S: (1, 1, 1) exact stop, (0, 0, 0), (1, 0, 1) a stop with a trailing newline.
    assert metrics["ave_continue_content"] == pytest.approx((1 + 0 + 0 + 0.5 + 0.5) / 5)
    assert metrics["win_continue_content"] == pytest.approx(1 / 5)
    assert metrics["ave_continue_content if correct"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert metrics["win_continue_content if correct"] == pytest.approx(1 / 4)
    assert metrics["ave_continue_decision"] == pytest.approx(4 / 5)
    assert metrics["ave_stop_decision"] == pytest.approx(2 / 3)
    assert metrics["ave_total_decision"] == pytest.approx(6 / 8)
    assert metrics["ave_total_format"] == pytest.approx((1 + 0 + 0 + 0.5 + 1 + 1 + 0 + 0) / 8)
    assert metrics["ave_total_reward"] == pytest.approx((4 + 1 + 0 + 2.5 + 3 + 4 + 0 + 3) / 8)
    assert count_pairs(records) == {"samples": 3, "rollouts": 9, "continue_pairs": 5, "stop_pairs": 3,
                                    "judge_failures": 1, "skipped_pairs": 1}


def test_metrics_without_usable_pairs_are_none():
    assert compute_metrics([]) == dict.fromkeys(METRIC_KEYS)
    assert compute_metrics([graded("continue", (1, 0.5, float("nan")))]) == dict.fromkeys(METRIC_KEYS)
    table = format_table([{"name": "empty", "metrics": dict.fromkeys(METRIC_KEYS), "counts": None}])
    assert "| Total reward | – |" in table and "nan" not in table.lower()


# --- end to end --------------------------------------------------------------------------------------------------


def tiny_args(model: Path, test_file: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--test-file", str(test_file), "--out", str(out), "-n", "2",
            "--max-new-tokens", "6", *extra]


def served_args(policy: ChatStub, test_file: Path, out: Path, *extra: str) -> list[str]:
    """Arguments to evaluate the stub policy served at ``policy``; the key variable is set by each test."""
    return ["--policy-url", policy.base_url, "--policy-model", "served", "--policy-api-key-env", "L2A_TEST_KEY",
            *FEW_CONNECTIONS, "--test-file", str(test_file), "--out", str(out), *extra]


def check_grades_follow_the_reward(records: list[dict]) -> None:
    """Every stored action score is the decision rule of spec section 6, for every rollout."""
    for record in records:
        assert len(record["grades"]) == len(record["rollouts"])
        for response, grade in zip(record["rollouts"], record["grades"]):
            assert grade["action_score"] == compute_reward(response, record["decision_truth"], None).decision


def test_tiny_model_with_rubric_judge_is_deterministic(tiny_model_dir, test_file, tmp_path, capsys):
    assert main(tiny_args(tiny_model_dir, test_file, tmp_path / "a")) == 0
    printed = capsys.readouterr().out
    assert "| Avg. continue content |" in printed and "Counts: a: 4 samples, 8 rollouts" in printed
    assert "tok/s" in printed
    for name in ("rollouts.jsonl", "graded.jsonl", "metrics.json", "metrics.md", "metrics.png", "settings.json"):
        assert (tmp_path / "a" / name).exists(), name
    records = read_jsonl(tmp_path / "a" / "graded.jsonl")
    assert [r["cid"] for r in records] == [s["cid"] for s in SAMPLES]
    assert all(len(r["rollouts"]) == 2 for r in records)
    check_grades_follow_the_reward(records)
    result = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert result["metrics"] == compute_metrics(records)
    assert result["timing"]["rollout_tokens"] > 0

    assert main(tiny_args(tiny_model_dir, test_file, tmp_path / "b")) == 0  # same seed, same rollouts
    again = read_jsonl(tmp_path / "b" / "rollouts.jsonl")
    assert [r["rollouts"] for r in again] == [r["rollouts"] for r in records]


def test_tiny_model_with_llm_judge_stub(tiny_model_dir, test_file, tmp_path, monkeypatch):
    monkeypatch.setenv("L2A_TEST_KEY", "secret")
    with ChatStub(lambda request: GOOD_GRADE) as judge:
        args = tiny_args(tiny_model_dir, test_file, tmp_path / "out", "--judge", "openai", "--judge-url",
                         judge.base_url, "--judge-model", "grader", "--judge-api-key-env", "L2A_TEST_KEY",
                         *FEW_CONNECTIONS)
        assert main(args) == 0
    records = read_jsonl(tmp_path / "out" / "graded.jsonl")
    check_grades_follow_the_reward(records)
    asked = [(r, g) for r in records for g in r["grades"] if g["think"] == "one direct question"]
    assert len(judge.requests) == len(asked)  # the judge sees exactly the correct continues
    # The reference evaluation grades with the policy's own sampling settings (EVALUATION_GRADER).
    for request in judge.requests:
        assert request["model"] == "grader"
        assert (request["temperature"], request["top_p"], request["max_tokens"]) == (1.0, 0.95, 512)
        assert request["repetition_penalty"] == 1.2  # vLLM's extension field, at the top level of the body
    assert all(r["decision_truth"] == "continue" and (g["format_score"], g["content_score"]) == (1.0, 0.5)
               for r, g in asked)


def test_judge_sampling_flags_reach_the_grader(test_file, tmp_path, monkeypatch):
    """--judge-* flags change what the grader is sent; 1.0 leaves top_p and the vLLM-only field out entirely."""
    monkeypatch.setenv("L2A_TEST_KEY", "secret")
    with ChatStub(policy_reply) as policy, ChatStub(lambda request: GOOD_GRADE) as judge:
        args = served_args(policy, test_file, tmp_path / "out", "-n", "1", "--judge", "openai", "--judge-url",
                           judge.base_url, "--judge-api-key-env", "L2A_TEST_KEY", "--judge-temperature", "0.7",
                           "--judge-max-tokens", "1024", "--judge-top-p", "1.0", "--judge-repetition-penalty", "1.0")
        assert main(args) == 0
    assert len(judge.requests) == 2  # the two continue samples
    for request in judge.requests:
        assert (request["temperature"], request["max_tokens"]) == (0.7, 1024)
        assert "top_p" not in request and "repetition_penalty" not in request


def test_policy_endpoint_stub(test_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("L2A_TEST_KEY", "secret")
    with ChatStub(policy_reply) as policy:
        args = served_args(policy, test_file, tmp_path / "out", "--name", "served-policy")
        assert main(args) == 0
    assert len(policy.requests) == 4 * 3  # one request per rollout by default
    request = policy.requests[0]
    assert (request["temperature"], request["top_p"], request["max_tokens"]) == (1.0, 0.95, 512)
    assert request["repetition_penalty"] == 1.2  # sent as a vLLM extension field
    assert request["messages"][0]["role"] == "system" and STOP_TOKEN in request["messages"][0]["content"]
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # Stops are exact: 4 points. Both continue samples list a severity, so the rubric grades the question 1 / 1.
    assert result["metrics"] == {
        "ave_continue_content": 1.0, "win_continue_content": 1.0, "ave_continue_content if correct": 1.0,
        "win_continue_content if correct": 1.0, "ave_continue_decision": 1.0,
        "ave_stop_decision": 1.0, "ave_total_decision": 1.0, "ave_total_format": 1.0, "ave_total_reward": 4.0,
    }
    assert "| served-policy |" in capsys.readouterr().out


def test_policy_endpoint_with_n_choices(test_file, tmp_path, monkeypatch):
    monkeypatch.setenv("L2A_TEST_KEY", "secret")
    with ChatStub(policy_reply) as policy:
        args = served_args(policy, test_file, tmp_path / "out", "--policy-n-choices", "--limit", "2")
        assert main(args) == 0
    assert len(policy.requests) == 2 and all(r["n"] == 3 for r in policy.requests)
    assert [len(r["rollouts"]) for r in read_jsonl(tmp_path / "out" / "rollouts.jsonl")] == [3, 3]


def test_resume_redoes_nothing_finished(test_file, tmp_path, monkeypatch):
    monkeypatch.setenv("L2A_TEST_KEY", "secret")
    out = tmp_path / "out"
    with ChatStub(policy_reply) as policy:
        args = served_args(policy, test_file, out, "-n", "2")
        assert main(args + ["--limit", "2"]) == 0
        assert len(policy.requests) == 2 * 2
        first = (out / "rollouts.jsonl").read_text()
        assert main(args) == 0
        assert len(policy.requests) == 4 * 2  # only samples 3 and 4 were generated
        assert (out / "rollouts.jsonl").read_text().startswith(first)
        assert json.loads((out / "metrics.json").read_text())["counts"]["samples"] == 4

        # An interrupted write leaves half a line: it is dropped and only that sample is redone.
        text = (out / "rollouts.jsonl").read_text()
        (out / "rollouts.jsonl").write_text(text[: len(text) - 30])
        assert main(args) == 0
        assert len(policy.requests) == 4 * 2 + 2
    # Each sample exactly once. Samples are requested concurrently and appended as they finish, so the
    # file order is the order of completion, which the server decides: compare sorted.
    assert sorted(r["cid"] for r in read_jsonl(out / "rollouts.jsonl")) == sorted(s["cid"] for s in SAMPLES)
    assert sorted(r["cid"] for r in read_jsonl(out / "graded.jsonl")) == sorted(s["cid"] for s in SAMPLES)


def test_judge_failures_are_stored_counted_and_retried(test_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("L2A_TEST_KEY", "secret")
    out = tmp_path / "out"
    answers = {"grade": "I cannot grade this."}
    with ChatStub(policy_reply) as policy, ChatStub(lambda request: answers["grade"]) as judge:
        args = served_args(policy, test_file, out, "-n", "2", "--judge", "openai", "--judge-url", judge.base_url,
                           "--judge-api-key-env", "L2A_TEST_KEY", "--judge-retries", "0")
        assert main(args) == 0
        failed = [g for r in read_jsonl(out / "graded.jsonl") for g in r["grades"] if g["content_score"] is None]
        assert len(failed) == 4 and all(g["format_score"] is None for g in failed)  # the 2 x 2 continue rollouts
        result = json.loads((out / "metrics.json").read_text())
        assert result["counts"] == {"samples": 4, "rollouts": 8, "continue_pairs": 4, "stop_pairs": 4,
                                    "judge_failures": 4, "skipped_pairs": 0}
        # Counted as the reference counts them: decision kept, content 0, format 0 (reward 1 each; stops 4 each).
        metrics = result["metrics"]
        assert (metrics["ave_continue_content"], metrics["ave_continue_decision"]) == (0.0, 1.0)
        assert (metrics["ave_total_decision"], metrics["ave_total_format"]) == (1.0, 0.5)
        assert metrics["ave_total_reward"] == (4 * 1 + 4 * 4) / 8
        printed = capsys.readouterr().out
        assert "| Total decision accuracy | 1.000 |" in printed
        assert "4 judge failures (counted as content 0, format 0)" in printed and "rerun the same command" in printed

        answers["grade"] = GOOD_GRADE  # the judge recovers: the next run regrades only the failed samples
        assert main(args) == 0
        assert len(judge.requests) == 4 + 4 and len(policy.requests) == 4 * 2
    result = json.loads((out / "metrics.json").read_text())
    assert result["counts"]["judge_failures"] == 0 and result["metrics"]["ave_continue_content"] == 0.5


def test_compare_saved_results(tmp_path, capsys):
    ours = tmp_path / "trained" / "metrics.json"
    ours.parent.mkdir()
    ours.write_text(json.dumps({"metrics": compute_metrics([json.loads(EXAMPLE.read_text())]),
                                "counts": count_pairs([json.loads(EXAMPLE.read_text())])}))
    flat = tmp_path / "base-readme.json"  # a flat {key: value} file, e.g. typed in from the paper's table
    flat.write_text(json.dumps({"ave_continue_content": 0.436, "ave_total_reward": 1.281}))
    assert main(["compare", str(ours), str(flat), "--out", str(tmp_path / "table.md")]) == 0
    printed = capsys.readouterr().out
    assert "| Metric | trained | base-readme |" in printed
    assert "| Total reward | 3.000 | 1.281 |" in printed and "| Avg. stop decision accuracy | – | – |" in printed
    # the "if correct" rows: ours computed, the flat file (like a results file saved before them) without them
    assert "| Avg. continue content (correct continues) | 0.500 | – |" in printed
    assert "| Win rate (correct continues) | 0.000 | – |" in printed
    assert "Counts: trained: 1 samples, 3 rollouts" in printed
    assert (tmp_path / "table.md").read_text().count("| Total reward |") == 1
    assert (tmp_path / "table.png").stat().st_size > 0


# --- bad input ---------------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(tiny_model_dir, test_file, tmp_path, monkeypatch, capsys):
    def error(args: list[str]) -> str:
        assert main(args) == 2
        return capsys.readouterr().err

    out = ["--out", str(tmp_path / "out")]
    assert "cannot read file" in error(["--test-file", str(tmp_path / "missing.jsonl"), *out])

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SAMPLES[0]) + "\n{not json\n")
    assert f"{bad}:2:" in error(["--test-file", str(bad), *out])

    message = error(["--model", str(tmp_path), "--test-file", str(test_file), *out])
    assert f"--model {tmp_path}: cannot load" in message and "Traceback" not in message

    monkeypatch.delenv("L2A_UNSET_KEY", raising=False)
    message = error(["--policy-url", "http://127.0.0.1:9/v1", "--policy-model", "m", "--policy-api-key-env",
                     "L2A_UNSET_KEY", "--test-file", str(test_file), "--out", str(tmp_path / "other")])
    assert "L2A_UNSET_KEY" in message

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "rollouts.jsonl").write_text('{"cid": "1_1"}\n{"cid": "1_2"}\n')
    assert f"{broken / 'rollouts.jsonl'}:1:" in error(["--model", str(tiny_model_dir), "--test-file", str(test_file),
                                                        "--out", str(broken)])
    (tmp_path / "other.json").write_text('{"accuracy": 0.9}')
    assert "no Learn-to-Ask metrics" in error(["compare", str(tmp_path / "other.json")])


def test_changed_settings_refuse_to_mix_results(tiny_model_dir, test_file, tmp_path, capsys):
    args = tiny_args(tiny_model_dir, test_file, tmp_path / "out", "--limit", "1")
    assert main(args) == 0
    assert main(args + ["--temperature", "0.5"]) == 2
    assert "max_new_tokens" not in (err := capsys.readouterr().err) and "temperature: 1.0 -> 0.5" in err


def test_cli_subprocess(tiny_model_dir, test_file, tmp_path):
    out = tmp_path / "cli"
    done = run_to_end(python("-m", "l2a.evaluate", *tiny_args(tiny_model_dir, test_file, out, "--limit", "2")),
                      timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| Total reward |" in done.stdout and "Counts: cli: 2 samples, 4 rollouts" in done.stdout
    assert len(read_jsonl(out / "graded.jsonl")) == 2
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == set(METRIC_KEYS)
    assert all(v is None or math.isfinite(v) for v in metrics.values())


def test_policy_endpoint_failures_are_retried_then_left_for_the_next_run(tmp_path):
    """A request that fails once is retried; a sample whose requests keep failing is not written, and is redone."""
    from openai_stub import Reply

    from l2a.evaluate import EndpointPolicy, EvalError, run_rollouts
    from l2a.rollout import SamplingConfig

    seen: set[str] = set()

    def flaky(request: dict) -> str | Reply:
        first_user, last = request["messages"][1]["content"], request["messages"][-1]["content"]
        if first_user.startswith("I have had diarrhea"):
            return Reply(status=503)  # samples 2_1 and 2_2: always down
        if last not in seen:  # samples 1_1 and 1_2: the first call of each fails, the retry succeeds
            seen.add(last)
            return Reply(status=500)
        return policy_reply(request)

    path = tmp_path / "rollouts.jsonl"
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=32, repetition_penalty=1.2)
    with ChatStub(flaky) as stub:
        policy = EndpointPolicy(stub.base_url, "served", "key", sampling, concurrency=4, max_retries=1, backoff=0.0)
        with pytest.raises(EvalError, match="2 samples got no rollouts"):
            run_rollouts(SAMPLES, lambda: policy, 1, path)
        # saved despite the others failing (in the order the requests finished: concurrent, so any order)
        assert sorted(r["cid"] for r in read_jsonl(path)) == ["1_1", "1_2"]
        stub.handler = policy_reply
        records, stats = run_rollouts(SAMPLES, lambda: policy, 1, path)
    assert stats.done == 2 and [r["cid"] for r in records] == [s["cid"] for s in SAMPLES]
