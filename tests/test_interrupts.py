"""Ctrl-C (SIGINT) and SIGTERM stop every long-running command within seconds, keeping what it finished.

Each command runs as a real process (``tests/subprocesses.py``: its own process group, killed on the way out).
It is stopped in the middle of its work, while a request to an endpoint hangs: the endpoints are ``ChatStub``,
a local test double for the remote LLM services (policy, grader) these commands talk to in production. SIGINT is
also sent to processes that inherited it as ignored, as a background job of a script does.
(``l2a.data prepare`` has the same test in ``tests/test_data.py``.)

Checked every time: the exit status is 128 + the signal, within STOP_SECONDS; stderr has the resume message and
no traceback; what was finished is on disk, and running the same command again completes the work.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from openai_stub import ChatStub, Reply
from subprocesses import command_env, python, spawned, stop_and_wait, wait_until
from test_evaluate import GOOD_GRADE, SAMPLES, policy_reply
from test_train import _grade, _sample

from l2a.evaluate import main as evaluate_main

STOP_SECONDS = 10
"""Stopping takes 1 to 1.5 s of CPU with torch loaded, 0.4 s without (most of it the interpreter's own exit); the
rest is margin for a loaded machine. A failure says how much CPU the stop got: far less than the seconds it took
means the process was kept waiting (for a CPU, or on something it should not wait for)."""
SIGNALS = [pytest.param(signal.SIGINT, False, id="SIGINT"),
           pytest.param(signal.SIGINT, True, id="SIGINT-in-background-job"),
           pytest.param(signal.SIGTERM, False, id="SIGTERM")]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def stop(process, signum: int) -> str:
    stopped = stop_and_wait(process, signum, within=60)
    stderr = stopped.stderr
    assert process.returncode == 128 + signum, (process.returncode, stderr[-3000:])
    assert stopped.seconds < STOP_SECONDS, stopped.timing()
    assert f"interrupted ({signal.Signals(signum).name}):" in stderr and "Traceback" not in stderr, stderr[-3000:]
    return stderr


def hanging_after(count: int, answer):
    """A stub handler that answers ``count`` requests, then holds every further one for a minute."""
    def handler(request: dict):
        handler.seen += 1
        return answer(request) if handler.seen <= count else Reply(answer(request), delay=60)

    handler.seen = 0
    return handler


@pytest.fixture
def many_samples(tmp_path) -> Path:
    """40 test samples (the four of test_evaluate, ten times over, with their own cids)."""
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({**s, "cid": f"{s['cid']}_{k}"}) + "\n" for k in range(10) for s in SAMPLES))
    return path


# --- l2a.evaluate, each stage -------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, ignore_sigint", SIGNALS)
def test_evaluate_stops_during_local_rollouts(signum, ignore_sigint, tiny_model_dir, many_samples, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--test-file", str(many_samples), "--out", str(out), "-n", "3",
            "--batch-size", "1", "--max-new-tokens", "200"]
    with spawned(python("-m", "l2a.evaluate", *args), ignore_sigint=ignore_sigint) as process:
        wait_until(lambda: len(lines(out / "rollouts.jsonl")) >= 2, 120, process, "two samples' rollouts")
        assert "finished samples are saved; rerun the same command to resume" in stop(process, signum)
    kept = lines(out / "rollouts.jsonl")
    assert 2 <= len(kept) < 40 and all(len(r["rollouts"]) == 3 for r in kept)
    assert evaluate_main(args) == 0
    assert sorted(r["cid"] for r in lines(out / "rollouts.jsonl")) == sorted(r["cid"] for r in lines(many_samples))


@pytest.mark.parametrize("signum, ignore_sigint", SIGNALS)
def test_evaluate_stops_during_endpoint_rollouts(signum, ignore_sigint, many_samples, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with ChatStub(hanging_after(6, policy_reply)) as policy:
        args = ["--policy-url", policy.base_url, "--policy-model", "served", "--test-file", str(many_samples),
                "--out", str(out), "--policy-concurrency", "2"]
        with spawned(python("-m", "l2a.evaluate", *args), ignore_sigint=ignore_sigint,
                     env=command_env(OPENAI_API_KEY="k")) as process:
            wait_until(lambda: len(lines(out / "rollouts.jsonl")) >= 1, 120, process, "a sample's rollouts")
            wait_until(lambda: policy.handler.seen > 6, 60, process, "a hanging request")
            stop(process, signum)
        kept = lines(out / "rollouts.jsonl")
        assert 1 <= len(kept) <= 2
        policy.handler = policy_reply
        monkeypatch.setenv("OPENAI_API_KEY", "k")
        assert evaluate_main(args) == 0
    assert len(lines(out / "rollouts.jsonl")) == 40


@pytest.mark.parametrize("signum, ignore_sigint", SIGNALS)
def test_evaluate_stops_during_grading(signum, ignore_sigint, many_samples, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    with ChatStub(policy_reply) as policy, ChatStub(hanging_after(0, lambda request: GOOD_GRADE)) as judge:
        args = ["--policy-url", policy.base_url, "--policy-model", "served", "--test-file", str(many_samples),
                "--out", str(out), "--judge", "openai", "--judge-url", judge.base_url, "--judge-concurrency", "4"]
        with spawned(python("-m", "l2a.evaluate", *args), ignore_sigint=ignore_sigint,
                     env=command_env(OPENAI_API_KEY="k")) as process:
            wait_until(lambda: judge.handler.seen >= 1, 120, process, "the first grading request")
            stop(process, signum)
        assert len(lines(out / "rollouts.jsonl")) == 40  # stage 1 was finished and stays
        assert lines(out / "graded.jsonl") == []  # the hanging grades were not written
        judge.handler = lambda request: GOOD_GRADE
        assert evaluate_main(args) == 0
    assert len(lines(out / "graded.jsonl")) == 40 and len(policy.requests) == 40 * 3  # no rollout redone


# --- train.py -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, ignore_sigint", SIGNALS)
def test_training_stops_mid_step_and_resumes(signum, ignore_sigint, tiny_model_dir, tmp_path):
    """Stopped while the grader hangs in step 3, after checkpoint 2: the message names that checkpoint, and
    ``--resume true`` trains on to the end. (Exactness of resuming: tests/test_train.py.)"""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(_sample(i, "continue")) + "\n" for i in range(12)))
    per_step = 2 * 3  # every answer of the tiny model is a "continue": one grade per completion
    out = tmp_path / "run"
    with ChatStub(hanging_after(1 + 2 * per_step, _grade)) as judge:  # 1: the judge's preflight request
        args = ["--model", str(tiny_model_dir), "--train_file", str(data), "--eval_file", str(data),
                "--output_dir", str(out), "--prompts_per_step", "2", "--group_size", "3", "--max_new_tokens", "6",
                "--steps", "4", "--eval_every", "0", "--save_every", "1", "--sft_steps", "0", "--judge", "openai",
                "--judge_url", judge.base_url]
        with spawned(python("train.py", *args), ignore_sigint=ignore_sigint,
                     env=command_env(OPENAI_API_KEY="k")) as process:
            wait_until(lambda: judge.handler.seen > 1 + 2 * per_step, 180, process, "step 3's grading")
            stderr = stop(process, signum)
        assert f"the newest checkpoint is {out / 'checkpoints' / 'step-000002'}" in stderr
        assert "--resume true" in stderr
        assert [row["step"] for row in lines(out / "metrics.jsonl")] == [1, 2]
        judge.handler = _grade
        with spawned(python("train.py", *args, "--resume", "true"), env=command_env(OPENAI_API_KEY="k")) as process:
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr[-3000:]
    assert [row["step"] for row in lines(out / "metrics.jsonl")] == [1, 2, 3, 4]
