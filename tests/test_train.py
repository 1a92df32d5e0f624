"""End-to-end runs of train.py on a tiny random model (seconds each)."""

from __future__ import annotations

import hashlib
import math
import json
import signal
from pathlib import Path

import pytest
import torch
from openai_stub import ChatStub, Reply
from safetensors.torch import load_file
from subprocesses import command_env, python, run_to_end, spawned, wait_until
from transformers import AutoModelForCausalLM

import train
from l2a.cli import UserError
from l2a.sft import main as sft_main

REPO = Path(__file__).resolve().parents[1]


def _sample(i: int, decision: str) -> dict:
    messages = [
        {"role": "user", "content": f"I have had a headache for {i + 1} days."},
        {"role": "assistant", "content": "Where exactly is the pain: forehead, temples or the back of the head?"},
        {"role": "user", "content": "Mostly the temples."},
    ]
    info = "" if decision == "stop" else "symptom severity: moderate, symptom trigger: screen work"
    target = "<stop />" if decision == "stop" else "How severe is the headache: mild, moderate or severe?"
    return {"cid": f"s{i}_1", "session_id": f"s{i}", "diagn": "tension headache", "messages": messages,
            "decision_truth": decision, "info_truth": info, "target": target}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    files = {}
    for name, samples in {
        "mixed": [_sample(i, "stop" if i % 3 == 0 else "continue") for i in range(12)],
        "continue": [_sample(i, "continue") for i in range(12)],
    }.items():
        files[name] = d / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(s) + "\n" for s in samples))
    return files


def _args(model_dir, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--train_file", str(data), "--eval_file", str(data), "--output_dir", str(out),
            "--prompts_per_step", "2", "--group_size", "3", "--max_new_tokens", "6", "--micro_batch_size", "4",
            "--learning_rate", "1e-2", "--eval_samples", "4", "--dtype", "float32", "--sft_steps", "0", *extra]


def _grade(request: dict) -> str:
    """A deterministic grader: scores depend on the graded response only, so runs can be compared."""
    digest = hashlib.sha256(request["messages"][-1]["content"].encode()).digest()
    return (f"<think>stub</think><format_score>{[0.0, 0.5, 1.0][digest[0] % 3]}</format_score>"
            f"<content_score>{[0.0, 0.5, 1.0][digest[1] % 3]}</content_score>")


@pytest.fixture(scope="module")
def grader():
    """An OpenAI-compatible grader stub on 127.0.0.1 (test double for a remote LLM judge).

    The offline rubric judge gives a random tiny model's gibberish the same reward every time, so the
    advantages, and with them the gradient, would be zero; this grader varies with the response.
    """
    with ChatStub(_grade) as stub:
        yield stub


@pytest.fixture(scope="module")
def judge_url(grader):
    return ["--judge", "openai", "--judge_url", grader.base_url]


def test_tiny_run_trains_logs_and_saves(tiny_model_dir, data_files, grader, judge_url, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    out = tmp_path / "run"
    already = len(grader.requests)
    train.main(_args(tiny_model_dir, data_files["mixed"], out, "--steps", "3", "--eval_every", "2", *judge_url))
    # Training grades with the reference's training grader settings (TRAINING_GRADER), not the evaluation's.
    asked = grader.requests[already:]
    assert asked and all((r["temperature"], r["max_tokens"]) == (0.7, 1024) for r in asked)
    assert not any("top_p" in r or "repetition_penalty" in r for r in asked)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0
        for key in ("reward", "reward_std", "reward_content", "reward_format", "decision_accuracy",
                    "kl_mean", "clip_low_frac", "entropy", "completion_length", "tokens_per_second",
                    "time/generate", "time/judge", "time/train", "skipped_steps"):
            assert key in r, key
    assert "eval/reward" in rows[0] and "eval/reward" in rows[2] and "eval/reward" in rows[3]
    assert (out / "curves.png").stat().st_size > 10_000

    checkpoint = out / "checkpoints" / "step-000003"
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in reloaded.named_parameters() if not torch.equal(p, dict(initial.named_parameters())[n])]
    assert len(changed) == len(list(initial.parameters())), "every parameter should have moved"
    assert (checkpoint / "trainer_state.pt").exists() and (checkpoint / "tokenizer.json").exists()


def test_heldout_evaluation_uses_the_metric_code_of_l2a_evaluate(tiny_model_dir, data_files, judge_url, tmp_path,
                                                                  monkeypatch):
    """train.py's eval/* keys are l2a.evaluate's grading and ``compute_metrics`` over the same greedy answers.

    The grader is the OpenAI-compatible stub on 127.0.0.1 (a test double for a remote LLM judge).
    """
    from accelerate import Accelerator

    from l2a.data import load_samples
    from l2a.evaluate import run_grading
    from l2a.judges import TRAINING_GRADER, make_judge
    from l2a.metrics import METRIC_KEYS, compute_metrics
    from l2a.prompts import policy_messages
    from l2a.rollout import SamplingConfig

    monkeypatch.setenv("OPENAI_API_KEY", "test")
    cfg = train.parse_config(_args(tiny_model_dir, data_files["mixed"], tmp_path / "run", *judge_url))
    judge = make_judge(cfg.judge, cfg.judge_url, sampling=TRAINING_GRADER)
    samples = load_samples(data_files["mixed"])[:6]  # 2 stop, 4 continue samples
    policy = train.make_policy(cfg, Accelerator(cpu=True), None)
    try:
        logged = train.evaluate_heldout(policy, judge, samples, cfg)
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=cfg.max_new_tokens)  # the same answers again
        answers = [c.text for c in policy.generate([policy_messages(s["messages"]) for s in samples], 1, greedy)]
    finally:
        policy.close()
    graded, _ = run_grading([{**s, "rollouts": [a]} for s, a in zip(samples, answers)], judge,
                            tmp_path / "graded.jsonl")
    expected = compute_metrics(graded)
    assert all(expected[key] is not None for key in METRIC_KEYS)  # every metric has pairs: all are logged
    assert logged == {"eval/reward": pytest.approx(expected["ave_total_reward"], rel=1e-12),  # default modes
                      "eval/decision_accuracy": expected["ave_total_decision"],
                      "eval/stop_accuracy": expected["ave_stop_decision"],
                      **{f"eval/{key}": value for key, value in expected.items()}}


def test_kl_to_reference_is_logged(tiny_model_dir, data_files, judge_url, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, data_files["mixed"], out, "--steps", "2", "--eval_every", "0",
                     "--kl_coef", "0.1", "--loss_agg", "seq-mean-token-mean", *judge_url))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is still the reference
    assert rows[1]["kl_mean"] > 1e-6  # after one update with lr 1e-2 it has moved away


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_warm_start_is_l2a_sft_then_grpo_on_one_axis(tiny_model_dir, data_files, judge_url, tmp_path, monkeypatch,
                                                     dtype):
    """sft_steps > 0: l2a.sft's steps on the policy before GRPO, logged at steps -sft_steps+1..0 after a held-out
    evaluation of the base model. With GRPO's learning rate 0, the final weights are exactly those of
    `python -m l2a.sft` with the same settings: the warm start is that command's training, nothing else (in
    bfloat16 too: the same autocast as GRPO's update, float32 weights)."""
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    sft = ["--steps", "2", "--batch_size", "8", "--learning_rate", "1e-2", "--frozen_layers", "1", "--dtype", dtype,
           "--decision_weight", "0.5"]
    sft_main(["--model", str(tiny_model_dir), "--train_file", str(data_files["mixed"]),
              "--output_dir", str(tmp_path / "sft"), *sft])
    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, data_files["mixed"], out, "--steps", "1", "--eval_every", "1",
                     "--learning_rate", "0", *judge_url, "--sft_steps", "2", "--sft_batch_size", "8",
                     "--sft_learning_rate", "1e-2", "--sft_frozen_layers", "1", "--sft_decision_weight", "0.5",
                     "--dtype", dtype,
                     "--eval_samples", "12"))  # all of them: 4 spread over 12 are the 4 stop samples

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "sft/loss" in r, "eval/reward" in r, "reward" in r) for r in rows] == [
        (-2, False, True, False), (-1, True, False, False), (0, True, False, False), (0, False, True, False),
        (1, False, True, True)]
    assert all(0 <= rows[i][f"sft/{key}"] <= 1 for i in (1, 2) for key in ("token_accuracy", "decision_accuracy"))
    # the held-out answers after the warm start come from the warm-started weights (in bf16: a refreshed replica)
    evaluations = [{k: v for k, v in rows[i].items() if k.startswith("eval/")} for i in (0, 3)]
    assert evaluations[0] != evaluations[1]
    warm = load_file(tmp_path / "sft/checkpoints/step-000002/model.safetensors")
    final = load_file(out / "checkpoints/step-000001/model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert warm.keys() == final.keys() and all(torch.equal(warm[k], final[k]) for k in warm)
    assert not all(torch.equal(warm[k], initial[k]) for k in warm)
    assert (out / "curves.png").stat().st_size > 10_000


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\ngroup_size: 5\n")
    cfg = train.parse_config(["--config", str(path), "--steps", "9"])
    assert (cfg.steps, cfg.group_size) == (9, 5)
    path.write_text("stepz: 7\n")
    with pytest.raises(UserError, match="unknown config keys: stepz"):
        train.parse_config(["--config", str(path)])


def test_epochs_compute_the_steps_from_the_train_file(tiny_model_dir, data_files, judge_url, tmp_path, monkeypatch,
                                                     capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    five = tmp_path / "five.jsonl"  # 5 samples, 2 per step: one epoch is ceil(5 / 2) = 3 steps
    five.write_text("".join(data_files["mixed"].read_text().splitlines(keepends=True)[:5]))
    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, five, out, "--epochs", "1", "--eval_every", "0", *judge_url))
    assert "1 epochs of 5 samples, 2 per step: 3 steps" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert [train.steps_for_epochs(e, n, p) for e, n, p in [(1, 5, 2), (4, 1912, 64), (4, 6909, 64), (2, 64, 64)]] == [
        3, 120, 432, 2]


def test_steps_and_epochs_together_are_refused():
    with pytest.raises(UserError, match="steps=10 and epochs=4 both set"):
        train.parse_config(["--epochs", "4", "--steps", "10"])
    with pytest.raises(UserError, match="epochs must be 0"):
        train.parse_config(["--epochs", "-1"])
    assert train.parse_config(["--epochs", "0", "--steps", "10"]).steps == 10


def test_a_negative_decision_weight_is_refused():
    with pytest.raises(UserError, match="sft_steps and sft_decision_weight must be at least 0"):
        train.parse_config(["--sft_decision_weight", "-1"])
    with pytest.raises(UserError, match="decision_weight at least 0"):
        sft_main(["--decision_weight", "-0.5"])


def test_killed_run_resumes_exactly(tiny_model_dir, data_files, tmp_path):
    """Kill a run while it waits for the grader at step 3, resume it, compare with an uninterrupted run.

    The grader is an OpenAI-compatible stub on 127.0.0.1 (a test double for a remote LLM judge); it
    hangs on the first request of step 3, so the kill lands mid-step, after checkpoint 2.
    """
    steps, per_step = 4, 2 * 3  # every tiny-model answer is a "continue" -> one grader call per completion
    hang_after = 1 + 2 * per_step  # 1: the judge's preflight request

    def handler(request: dict):
        if handler.hang and len(stub.requests) > hang_after:
            return Reply(content=_grade(request), delay=120)
        return _grade(request)

    def train_py(*args: str) -> list[str]:
        return python(str(REPO / "train.py"), *_args(tiny_model_dir, data_files["continue"], *args),
                      "--steps", str(steps), "--eval_every", "0", "--save_every", "1", "--judge", "openai",
                      "--judge_url", stub.base_url)

    env = command_env(OPENAI_API_KEY="test")
    with ChatStub(handler) as stub:
        handler.hang = False
        full = run_to_end(train_py(tmp_path / "full"), timeout=300, env=env)
        assert full.returncode == 0, full.stderr[-3000:]

    with ChatStub(handler) as stub:
        handler.hang = True
        with spawned(train_py(tmp_path / "cut"), env=env) as victim:
            wait_until(lambda: len(stub.requests) > hang_after, 300, victim, "step 3's grading")
            victim.send_signal(signal.SIGKILL)
            victim.wait()
        assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]
        handler.hang = False
        resumed = run_to_end(train_py(tmp_path / "cut", "--resume", "true"), timeout=300, env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]

    final = f"checkpoints/step-{steps:06d}/model.safetensors"
    a, b = load_file(tmp_path / "full" / final), load_file(tmp_path / "cut" / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda row: {k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_second"}  # noqa: E731
    rows = lambda run: [strip(json.loads(l)) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731, E741
    assert rows("full") == rows("cut")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_recomputes_each_layer_during_training(checkpointing, tiny_model_dir, data_files,
                                                                       tmp_path):
    """``gradient_checkpointing: true`` trains with layers that recompute (their forward runs again in backward);
    a model left in eval mode, as from_pretrained returns it, would silently checkpoint nothing."""
    from accelerate import Accelerator

    from l2a.rollout import SamplingConfig

    flags = ["--gradient_checkpointing", str(checkpointing).lower()]
    cfg = train.parse_config(_args(tiny_model_dir, data_files["mixed"], tmp_path / "run", *flags))
    policy = train.make_policy(cfg, Accelerator(cpu=True), None)
    try:
        chats = [[{"role": "user", "content": "I have a headache."}]]
        completions = policy.generate(chats, cfg.group_size, SamplingConfig(max_new_tokens=5))
        layers = policy.model.model.layers
        calls = [0]
        for layer in layers:  # a pre-hook: a replay stops once it has recomputed what backward needs
            layer.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
        policy.update(completions, torch.tensor([1.0, -1.0, 0.5])[: len(completions)])
    finally:
        policy.close()
    passes = 2 if max(len(c.token_ids) for c in completions) > 1 else 1  # prompts, then completions
    assert calls[0] == passes * len(layers) * (2 if checkpointing else 1)


def test_a_grader_that_answers_nonsense_stops_the_run_before_step_1(tiny_model_dir, data_files, tmp_path, monkeypatch):
    """The grader (a ChatStub: test double for a remote LLM judge) answers a poem to every request: the run stops
    before any training, naming the endpoint, instead of training on content and format scores of 0."""
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    with ChatStub(lambda request: "Sure! Here is a poem about clouds.") as stub:
        with pytest.raises(UserError, match=f"judge at {stub.base_url}.*no readable grade"):
            train.main(_args(tiny_model_dir, data_files["mixed"], tmp_path / "run", "--steps", "2", "--judge", "openai",
                             "--judge_url", stub.base_url))
    assert len(stub.requests) == 4  # the preflight request and its 3 retries
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_judge_failures_are_logged_and_a_step_where_most_fail_stops_the_run(tiny_model_dir, data_files, tmp_path,
                                                                          monkeypatch):
    """In steps 1 and 2 the grader (a ChatStub) fails every attempt for one question, the first it sees in the
    step: counted in ``judge_failures``, and training goes on. From step 3 on every grade fails: the run stops
    there, naming the endpoint."""
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    metrics = tmp_path / "run" / "metrics.jsonl"
    rows = lambda: [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []  # noqa: E731
    failing: dict[int, str] = {}  # step -> the graded question that fails in it

    def grader(request: dict) -> str:
        graded, step = request["messages"][-1]["content"], len(rows()) + 1
        if "headache since yesterday" in graded:  # the preflight request
            return _grade(request)
        if step >= 3 or failing.setdefault(step, graded) == graded:
            return "I am not sure."
        return _grade(request)

    with ChatStub(grader) as stub:
        with pytest.raises(UserError, match=f"step 3: 6 of the 6 grades from the judge at {stub.base_url}"):
            train.main(_args(tiny_model_dir, data_files["continue"], tmp_path / "run", "--steps", "4",
                             "--eval_every", "0", "--judge", "openai", "--judge_url", stub.base_url))
    logged = rows()  # 2 prompts x 3 completions a step, all graded (the tiny model never says <stop />)
    assert [r["step"] for r in logged] == [1, 2]
    assert all(1 <= r["judge_failures"] <= 3 for r in logged), [r["judge_failures"] for r in logged]


def test_a_colocated_engine_gets_the_memory_between_training_phases(tiny_model_dir, data_files, tmp_path, monkeypatch):
    """The order of memory hand-overs around a colocated vLLM engine, on a recording stand-in for the engine (it
    samples with the trained model itself; vLLM's sleep mode works on GPUs only): cached blocks are released
    before the engine samples and before it syncs, the engine wakes up for the rollouts and sleeps after them,
    and only ``sync_sampler`` (which the loop calls every sync_interval optimizer steps) touches its weights."""
    from accelerate import Accelerator

    from l2a import local_policy
    from l2a.rollout import HFEngine, SamplingConfig

    events = []

    class Recorder:
        def __init__(self, policy):
            self.hf = HFEngine(policy.accelerator.unwrap_model(policy.model), policy.tokenizer)

        def generate(self, chats, n, sampling):
            events.append("generate")
            return self.hf.generate(chats, n, sampling)

        def __getattr__(self, name):  # wake_up, sleep, sync_weights, close
            return lambda *args, **kwargs: events.append(name) or 0.0

    monkeypatch.setattr(local_policy.LocalPolicy, "make_engine", lambda self, path: Recorder(self))
    monkeypatch.setattr(local_policy, "release_cached_memory", lambda device: events.append("release"))
    cfg = train.parse_config(_args(tiny_model_dir, data_files["mixed"], tmp_path / "run", "--rollout_engine", "vllm"))
    policy = train.make_policy(cfg, Accelerator(cpu=True), None)
    completions = policy.generate([[{"role": "user", "content": "I have a headache."}]], 3, SamplingConfig(max_new_tokens=4))
    policy.update(completions, torch.tensor([1.0, -1.0, 0.0]))
    assert events == ["release", "wake_up", "generate", "sleep"]  # an optimizer step leaves the engine alone
    policy.sync_sampler()
    assert events[4:] == ["release", "sync_weights"]


# --------------------------------------------------------------------------------------------------
# Several optimizer steps per batch, a lagging sampler, the dual clip.
# --------------------------------------------------------------------------------------------------

STRIP = ("time/", "tokens_per_second")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ppo_epochs_mini_batches_and_a_lagging_sampler_make_the_clips_bind(tiny_model_dir, data_files, judge_url,
                                                                          tmp_path, monkeypatch):
    """mu = 2 passes over 2 mini-batches: 4 optimizer steps per batch; the HF sampler is refreshed every 8, i.e.
    after batches 2 and 4, so batches 2 and 4 are sampled with weights 4 optimizer steps old. The ratio leaves 1,
    the PPO clip and the dual clip bind, and the sampler metrics show the lag exactly where it is."""
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, data_files["mixed"], out, "--steps", "4", "--eval_every", "2",
                     "--ppo_epochs", "2", "--mini_batches", "2", "--sync_interval", "8", "--clip_ratio_c", "1.5",
                     "--vllm_is_correction", "true", "--seed", "1", *judge_url))  # seed 0 draws a batch
    # whose groups all have equal rewards (no gradient), which is not what this test is about
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and "eval/reward" in rows[2] and "eval/reward" in rows[4]
    trained = rows[1:]
    assert [r["optimizer_steps"] for r in trained] == [4, 8, 12, 16]
    for r in trained:
        for key in ("loss", "grad_norm", "entropy", "ratio_mean", "clip_low_frac", "clip_high_frac", "clip_dual_frac",
                    "sampler_logprob_diff", "kl_to_sampler", "is_weight_mean"):
            assert math.isfinite(r[key]), (r["step"], key)
        assert r["skipped_steps"] == 0 and r["grad_norm"] > 0
    # The later optimizer steps of a batch start from moved weights: ratios leave 1 and every clip binds somewhere.
    assert all(abs(r["ratio_mean"] - 1) > 1e-3 for r in trained)
    assert sum(r["clip_low_frac"] + r["clip_high_frac"] for r in trained) > 0
    assert sum(r["clip_dual_frac"] for r in trained) > 0
    # Batches 1 and 3 are sampled right after a sync (the start, optimizer step 8): the sampler's log-probabilities
    # are pi_old's. Batches 2 and 4 come from weights 4 optimizer steps older than pi_old.
    for r in trained[0::2]:
        assert r["sampler_logprob_diff_max"] < 1e-5 and r["kl_to_sampler"] < 1e-9
        assert r["is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    for r in trained[1::2]:
        assert r["sampler_logprob_diff"] > 1e-2 and r["kl_to_sampler"] > 1e-4
        assert abs(r["is_weight_mean"] - 1) > 1e-3
    assert [r["time/sync"] > 0 for r in trained] == [False, True, False, True]


def test_one_optimizer_step_per_batch_needs_no_extra_pass(tiny_model_dir, data_files, tmp_path):
    """The default (ppo_epochs = mini_batches = 1) keeps the one-pass path: no forward pass for pi_old, the
    trained pass's own log-probabilities detached (ratio 1). And the HF engine that does not lag samples from the
    trained module itself (no replica, no log-probabilities to report)."""
    from accelerate import Accelerator

    from l2a.rollout import SamplingConfig

    cfg = train.parse_config(_args(tiny_model_dir, data_files["mixed"], tmp_path / "run"))
    policy = train.make_policy(cfg, Accelerator(cpu=True), None)
    completions = policy.generate([[{"role": "user", "content": "I have a headache."}]], 3, SamplingConfig(max_new_tokens=4))
    assert policy.logprobs_before_update(completions) is None
    assert policy.replica is None and policy.engine.model is policy.accelerator.unwrap_model(policy.model)
    assert all(c.logprobs is None for c in completions)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_an_update_divides_by_the_counts_of_its_own_completions(loss_agg, tiny_model_dir, data_files, tmp_path):
    """A mini-batch's optimizer step takes the token and sequence counts of that mini-batch (all processes), not
    of the whole rollout batch. At the batch's first step the ratio is 1, so the loss is -sum_i w_i A_i with
    w_i = len_i / N_tokens (token-mean) or 1 / N_seqs (seq-mean-token-mean) over the mini-batch: half the
    completions here, so counting the whole batch would halve it. float64 weights: the ratio is exactly 1."""
    from accelerate import Accelerator

    from l2a.rollout import SamplingConfig

    cfg = train.parse_config(_args(tiny_model_dir, data_files["mixed"], tmp_path / "run", "--ppo_epochs", "2",
                                   "--mini_batches", "2", "--loss_agg", loss_agg, "--dtype", "float64"))
    policy = train.make_policy(cfg, Accelerator(cpu=True), None)
    chats = [[{"role": "user", "content": "I have a headache."}], [{"role": "user", "content": "I feel dizzy."}]]
    completions = policy.generate(chats, 3, SamplingConfig(max_new_tokens=5))
    advantages = torch.tensor([1.0, -0.5, 2.0, 0.25, -1.0, 0.5], dtype=torch.float64)
    old = policy.logprobs_before_update(completions)
    assert [len(o) for o in old] == [len(c.token_ids) for c in completions]
    first = slice(0, 3)
    metrics = policy.update(completions[first], advantages[first], old[first])
    lengths = torch.tensor([len(c.token_ids) for c in completions[first]], dtype=torch.float64)
    weights = lengths / lengths.sum() if loss_agg == "token-mean" else torch.full((3,), 1 / 3, dtype=torch.float64)
    assert metrics["loss"] == pytest.approx(-(weights * advantages[first]).sum().item(), rel=1e-12)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-12) and metrics["applied"]


def test_a_lagging_sampler_resumes_exactly(tiny_model_dir, data_files, judge_url, tmp_path, monkeypatch):
    """Checkpoints fall where the sampler was just refreshed (check_config makes save_every so), so a run stopped
    after step 2 and resumed from its checkpoint (whose weights also restart the sampler) is the uninterrupted one."""
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    lagging = ["--ppo_epochs", "2", "--sync_interval", "4", "--vllm_is_correction", "true", "--eval_every", "0",
               "--save_every", "2", *judge_url]
    train.main(_args(tiny_model_dir, data_files["mixed"], tmp_path / "full", "--steps", "4", *lagging))
    train.main(_args(tiny_model_dir, data_files["mixed"], tmp_path / "cut", "--steps", "2", *lagging))
    train.main(_args(tiny_model_dir, data_files["mixed"], tmp_path / "cut", "--steps", "4", "--resume", "true", *lagging))

    strip = lambda row: {k: v for k, v in row.items() if not k.startswith(STRIP)}  # noqa: E731
    full, cut = [strip(r) for r in _rows(tmp_path / "full")], [strip(r) for r in _rows(tmp_path / "cut")]
    assert cut == full
    assert [r["sampler_logprob_diff"] > 1e-3 for r in full] == [False, True, False, True]  # it did lag
    final = "checkpoints/step-000004/model.safetensors"
    a, b = load_file(tmp_path / "full" / final), load_file(tmp_path / "cut" / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags,problem", [
    (["--mini_batches", "3"], "prompts_per_step=4 must be a multiple of mini_batches=3"),
    (["--ppo_epochs", "0"], "ppo_epochs must be at least 1"),
    (["--sync_interval", "0"], "sync_interval must be at least 1"),
    (["--clip_ratio_c", "1.0"], "clip_ratio_c must be > 1"),
    (["--sync_interval", "5"], "eval_every=18 must be a multiple of 5"),
    (["--sync_interval", "4", "--ppo_epochs", "2", "--eval_every", "0", "--save_every", "3"],
     "save_every=3 must be a multiple of 2"),
    (["--vllm_is_correction", "true"], "vllm_is_correction needs the sampler's log-probabilities"),
    (["--vllm_is_correction", "true", "--sync_interval", "2", "--top_p", "0.9"], "and top_p 1"),
    (["--kl_coef", "0.01"], "kl_coef > 0 with a warm start would anchor GRPO to the model before it"),
])
def test_settings_that_do_not_fit_together_are_refused(flags, problem):
    with pytest.raises(UserError, match=problem):
        train.parse_config(flags)


def test_settings_that_fit_together_are_accepted():
    cfg = train.parse_config(["--sync_interval", "8", "--ppo_epochs", "2", "--mini_batches", "2", "--eval_every", "2",
                              "--save_every", "4", "--vllm_is_correction", "true", "--clip_ratio_c", "3"])
    assert (cfg.ppo_epochs, cfg.mini_batches, cfg.sync_interval, cfg.clip_ratio_c) == (2, 2, 8, 3.0)
    assert train.parse_config(["--sync_interval", "2", "--eval_every", "4"]).sync_interval == 2


def test_the_sampler_is_refreshed_when_a_multiple_of_sync_interval_is_reached():
    due = lambda per_batch, k, batches: [train.sampler_is_due(b * per_batch, per_batch, k)  # noqa: E731
                                         for b in range(1, batches + 1)]
    assert due(1, 1, 3) == [True, True, True]
    assert due(1, 10, 21) == [b % 10 == 0 for b in range(1, 22)]  # the reference: after trainer steps 10, 20, ...
    assert due(4, 8, 4) == [False, True, False, True]
    assert due(4, 2, 3) == [True, True, True]  # several multiples within one batch: once, at its end
    assert due(2, 3, 6) == [False, True, True, False, True, True]  # optimizer steps 2 4 6 8 10 12: 3, 6, 9, 12 reached


def test_mini_batches_are_whole_groups_and_the_same_on_any_number_of_processes():
    """Process r of N holds prompts r, r + N, ... of a step (train.main); slice m of every process's share
    together is slice m of the whole batch, so N processes train on the same mini-batches as one."""
    prompts, group, processes, mini_batches = 8, 3, 2, 2
    whole = [p for p in range(prompts) for _ in range(group)]  # the prompt of each completion, groups contiguous
    for m, part in enumerate(train.mini_batch_slices(len(whole), mini_batches)):
        shares = []
        for rank in range(processes):
            mine = [p for p in whole if p % processes == rank]
            shares += mine[train.mini_batch_slices(len(mine), mini_batches)[m]]
        assert sorted(shares) == sorted(whole[part]) and len(whole[part]) % group == 0


def test_the_log_of_several_updates_is_their_mean_and_one_update_is_itself():
    one = {"loss": -0.0, "grad_norm": 0.1 + 0.2, "sampler_logprob_diff_max": 0.5}
    assert train.mean_over_updates([one]) == one and str(train.mean_over_updates([one])["loss"]) == "-0.0"
    two = train.mean_over_updates([one, {"loss": 1.0, "grad_norm": 0.5, "sampler_logprob_diff_max": 0.25}])
    assert two == {"loss": 0.5, "grad_norm": pytest.approx(0.4), "sampler_logprob_diff_max": 0.5}


def test_sampler_metrics_and_importance_weights_by_hand(tiny_model_dir, data_files, tmp_path):
    """The sampler's log-probabilities set to pi_old's plus a known shift d per completion (+0.3, -2.0, 0.0):
    per token, |log ratio| = |d|, the importance weight min(exp(-d), 3) (capped at vllm_is_cap for d = -2), and
    KL(sampler || pi_old) by k3 on the sampler's tokens, exp(-d) + d - 1 (the other direction would be
    exp(d) - d - 1). float64 weights; the sampler's numbers pass through float32, as an engine's do."""
    from dataclasses import replace

    from accelerate import Accelerator

    from l2a.rollout import SamplingConfig

    cfg = train.parse_config(_args(tiny_model_dir, data_files["mixed"], tmp_path / "run", "--ppo_epochs", "2",
                                   "--sync_interval", "2", "--vllm_is_correction", "true", "--dtype", "float64"))
    policy = train.make_policy(cfg, Accelerator(cpu=True), None)
    completions = policy.generate([[{"role": "user", "content": "I have a headache."}]], 3, SamplingConfig(max_new_tokens=5))
    old = policy.logprobs_before_update(completions)
    shifts = [0.3, -2.0, 0.0]
    shifted = [replace(c, logprobs=(o + d).tolist()) for c, o, d in zip(completions, old, shifts)]
    metrics = policy.update(shifted, torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64), old)

    lengths = [len(c.token_ids) for c in completions]
    mean = lambda per_token: sum(n * per_token(d) for n, d in zip(lengths, shifts)) / sum(lengths)  # noqa: E731
    assert metrics["sampler_logprob_diff"] == pytest.approx(mean(abs), abs=1e-6)
    assert metrics["sampler_logprob_diff_max"] == pytest.approx(2.0, abs=1e-6)
    assert metrics["is_weight_mean"] == pytest.approx(mean(lambda d: min(math.exp(-d), 3.0)), abs=1e-6)
    assert metrics["kl_to_sampler"] == pytest.approx(mean(lambda d: math.exp(-d) + d - 1), abs=1e-6)


def test_bf16_rollouts_sample_from_the_trained_weights(tiny_model_dir, data_files, judge_url, tmp_path, monkeypatch):
    """dtype bfloat16 samples from a bf16 replica of the weights: before every rollout it must hold the trained
    float32 weights rounded to bf16, or GRPO would learn from samples of a policy it no longer is."""
    from l2a.local_policy import LocalPolicy

    checked, first_weights = [], {}
    real_generate = LocalPolicy.generate

    def generate(self, chats, n, sampling):
        sampler_state = self.engine.model.state_dict()
        for name, tensor in self.model.state_dict().items():
            assert tensor.dtype == torch.float32 and sampler_state[name].dtype == torch.bfloat16, name
            assert torch.equal(sampler_state[name], tensor.to(torch.bfloat16)), name
        first_weights.setdefault("embed", self.model.state_dict()["model.embed_tokens.weight"].clone())
        checked.append(sampling.seed)
        return real_generate(self, chats, n, sampling)

    monkeypatch.setattr(LocalPolicy, "generate", generate)
    train.main(_args(tiny_model_dir, data_files["mixed"], tmp_path / "run", "--steps", "3", "--eval_every", "0",
                     "--dtype", "bfloat16", *judge_url))
    assert len(checked) == 3
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-000003")
    assert not torch.equal(trained.model.embed_tokens.weight, first_weights["embed"])  # the weights did move
