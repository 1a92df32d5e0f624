"""train.py with ``rollout_engine: vllm``: the colocated engine samples with the weights just trained.

Runs of ``train.main`` on the tiny model, with the in-process vLLM engine (~4 s to start). A spy
wraps ``LocalPolicy.sync_sampler`` (a test-only seam: it calls the real method and looks at the policy
afterwards; train.py knows nothing of it). At every sync it checks that afterwards the engine's greedy
tokens equal the trainer's and its log-probabilities match the trainer's within ATOL, and that without
the sync they would not: the completions the engine gave just before are far from what the trained model
now says. With ``sync_interval: 2`` the engine lags: step 2 is sampled with the weights before step 1's
update. The grader is ChatStub, a test double for a remote LLM judge, with hash-based grades so the
advantages are not zero.
"""

import contextlib
import json
import os

import pytest
import torch
from openai_stub import ChatStub
from test_train import _grade, _sample
from test_vllm_engine import ATOL, max_logprob_gap, needs_vllm, trainer_logprobs

import train
from l2a.local_policy import LocalPolicy, engine_environment
from l2a.prompts import policy_messages
from l2a.rollout import HFEngine, SamplingConfig

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


@pytest.fixture
def one_thread():
    """The tiny model trains faster on one thread on a busy 2-core machine (two mostly wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_vllm
@pytest.mark.parametrize("sync_interval", [1, 2])
def test_engine_is_synced_every_sync_interval_steps(sync_interval, tiny_model_dir, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    samples = [_sample(i, "stop" if i % 3 == 0 else "continue") for i in range(8)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    chats = [policy_messages(s["messages"], "Ra+Rs") for s in samples[:3]]

    checked_syncs, engines = [], []
    real_sync, real_make_engine = LocalPolicy.sync_sampler, LocalPolicy.make_engine

    def make_engine(self, path):
        engines.append(real_make_engine(self, path))
        return engines[-1]

    def sync_sampler(self):
        self.engine.wake_up()  # policy.generate puts it to sleep after the rollouts (a no-op on CPU)
        before = self.engine.generate(chats, 1, GREEDY)
        seconds = real_sync(self)
        model, pad = self.accelerator.unwrap_model(self.model), self.tokenizer.pad_token_id
        after = self.engine.generate(chats, 1, GREEDY)
        hf = HFEngine(model, self.tokenizer).generate(chats, 1, GREEDY)
        assert [c.token_ids for c in after] == [c.token_ids for c in hf]
        assert max_logprob_gap(after, trainer_logprobs(model, after, 1.0, pad)) < ATOL
        assert max_logprob_gap(before, trainer_logprobs(model, before, 1.0, pad)) > 1e-2  # stale without the sync
        checked_syncs.append(seconds)
        return seconds

    monkeypatch.setattr(LocalPolicy, "make_engine", make_engine)
    monkeypatch.setattr(LocalPolicy, "sync_sampler", sync_sampler)
    out = tmp_path / "run"
    with ChatStub(_grade) as stub:
        try:  # train.main closes the engine at the end; after a failure, close it here
            train.main([
                "--model", str(tiny_model_dir), "--train_file", str(data), "--eval_file", str(data),
                "--output_dir", str(out), "--steps", "3", "--eval_every", "0", "--prompts_per_step", "2",
                "--group_size", "3", "--max_new_tokens", "6", "--micro_batch_size", "3", "--learning_rate", "1e-2",
                "--judge", "openai", "--judge_url", stub.base_url, "--rollout_engine", "vllm",
                "--vllm_kv_cache_gb", "0.03125", "--vllm_is_correction", "true", "--dtype", "float32",
                "--sft_steps", "0", "--sync_interval", str(sync_interval),
                "--seed", "1",  # seed 0 draws a batch whose groups all have equal rewards: no gradient to check
            ])
        except BaseException:
            for engine in engines:  # in-process: frees the torch.distributed group vLLM made in this process
                with contextlib.suppress(Exception):
                    engine.close()
            raise

    # Synced after steps 1, 2, 3 (sync_interval 1), or after 2 and the last, 3 (sync_interval 2).
    assert len(checked_syncs) == (3 if sync_interval == 1 else 2) and all(seconds > 0 for seconds in checked_syncs)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    fresh = [True, True, True] if sync_interval == 1 else [True, False, True]
    assert [r["time/sync"] > 0 for r in rows] == ([True] * 3 if sync_interval == 1 else [False, True, True])
    for r, right_after_a_sync in zip(rows, fresh):
        assert r["grad_norm"] > 0
        if right_after_a_sync:  # the rollouts agree with the trainer token by token: importance weights 1
            assert r["sampler_logprob_diff_max"] < ATOL and r["sampler_logprob_diff"] < ATOL
            assert r["is_weight_mean"] == pytest.approx(1.0, abs=ATOL) and r["kl_to_sampler"] < ATOL
        else:  # sampled with the weights before step 1's update: the importance weights correct for it
            assert r["sampler_logprob_diff"] > 1e-2 and r["kl_to_sampler"] > 1e-4
            assert abs(r["is_weight_mean"] - 1) > 1e-3


def test_each_process_starts_its_engine_on_its_own_gpu(monkeypatch):
    """The environment a rank's vLLM engine starts in: only that rank's GPU is visible to its children
    (a stand-in accelerator: no GPU here); the variable is restored afterwards."""
    from types import SimpleNamespace

    from l2a.vllm_engine import environment

    rank1_of_2 = SimpleNamespace(device=torch.device("cuda", 1), num_processes=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert engine_environment(rank1_of_2) == {"CUDA_VISIBLE_DEVICES": "5"}
    with environment(engine_environment(rank1_of_2)):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert engine_environment(SimpleNamespace(device=torch.device("cpu"), num_processes=2)) == {}
    assert engine_environment(SimpleNamespace(device=torch.device("cuda", 0), num_processes=1)) == {}
