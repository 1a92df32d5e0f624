"""N processes train like one: ``accelerate launch`` with two CPU processes against a single process.

What runs (torch 2.13 CPU, accelerate 1.15, gloo):

* **DDP**: ``configs/accelerate/cpu_2proc.yaml``; on a machine without GPUs accelerate wraps the model in
  ``DistributedDataParallel`` (its MULTI_CPU mode).
* **FSDP2**: the same launch, switched to FSDP2 by the worker below. accelerate 1.15 turns FSDP on only
  for GPU process groups (``AcceleratorState`` checks for MULTI_GPU and friends), but torch's FSDP2
  (``fully_shard``) itself runs on CPU over gloo. So the worker sets the accelerator's state to FSDP2
  right after it is built, and train.py's FSDP2 paths run for real: policy and reference sharded as
  DTensors, sharded optimizer state saved and resumed, weights gathered for checkpoints and for the
  rollout engine. This run also turns on gradient checkpointing. FSDP1 is refused by train.py.

Same batch: each process samples its own prompts with its own seed, so to compare updates the worker
(and the single-process reference) replaces ``LocalPolicy.generate`` by ``seeded_by_prompt``, which
samples each prompt with a seed from the prompt and the step, not from the process: the same step then
has the same completions whether one process or two sample it. The grader is ChatStub (a test double
for a remote LLM judge) with hash-based grades, so the advantages are not zero.

Tolerance: the processes sum the same numbers in a different order, so the logged loss, gradient norm
and statistics agree to RTOL, and the weights after two AdamW steps (lr 1e-2) to ATOL, in float64 (in
float32 that order noise, amplified by Adam, reached 1e-4 on some CPUs). (Adam ignores a constant factor
on the loss, so a wrong gradient scale shows in the loss and gradient norm, not in the weights.) A resumed run equals an uninterrupted one exactly. The rollout engine (the trained module
under DDP, a full replica under FSDP2) is checked against the gathered weights after every step.

vLLM engines under ``accelerate launch`` run as their own processes and take ~60 s each to start on a
2-core CPU, so most tests here use the HF engine; one test runs the two processes with vLLM engines
(~2 min), and tests/test_train_vllm.py covers the vLLM weight sync with one process.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from openai_stub import ChatStub
from safetensors.torch import load_file
from subprocesses import command_env, run_to_end
from test_train import _grade, _sample
from test_vllm_engine import needs_vllm

import train
from l2a.local_policy import LocalPolicy
from l2a.vllm_engine import full_state_dict_items

REPO = Path(__file__).resolve().parents[1]
# The runs are in float64 (--dtype float64, and tiny_model.keep_float64_in_rmsnorm), so summing the same numbers
# in another order (micro-batches, processes, another CPU's kernels) changes them by ~1e-15 relative:
RTOL = 1e-10  # logged numbers, 1 vs 2 processes (seen: 2e-15)
ATOL = 1e-9  # weights after two AdamW steps of ~1e-2 each (seen: 1.6e-12); a wrong batch moves them by ~1e-2
COMPARED = ("reward", "reward_std", "frac_zero_std_groups", "loss", "grad_norm", "entropy", "kl_mean", "ratio_mean",
            "completion_length", "stop_rate")


def seeded_by_prompt(self, chats, n, sampling):
    """Stands in for ``LocalPolicy.generate``: the completions of a prompt depend on the prompt and the
    step only. (The loop's seed is ``base(step) + rank``; the rank is taken off again.)"""
    step_seed = sampling.seed - self.accelerator.process_index
    completions = []
    for i, chat in enumerate(chats):
        prompt_seed = int(hashlib.sha256(json.dumps(chat).encode()).hexdigest()[:8], 16)
        for c in self.engine.generate([chat], n, replace(sampling, seed=step_seed + prompt_seed)):
            completions.append(replace(c, prompt_index=i))
    return completions


def train_args(model_dir, data: Path, judge_url: str) -> list[str]:
    return ["--model", str(model_dir), "--train_file", str(data), "--eval_file", str(data), "--eval_every", "0",
            "--prompts_per_step", "4", "--group_size", "3", "--max_new_tokens", "6", "--learning_rate", "1e-2",
            "--kl_coef", "0.05", "--judge", "openai", "--judge_url", judge_url, "--dtype", "float64",
            "--sft_steps", "0"]


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory):
    """Training data, a grader for the whole module, and the single-process reference run (4 micro-batches of 3)."""
    folder = tmp_path_factory.mktemp("distributed")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(_sample(i, "stop" if i % 3 == 0 else "continue")) + "\n" for i in range(12)))
    with ChatStub(_grade) as stub, pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENAI_API_KEY", "test")
        args = train_args(tiny_model_dir, data, stub.base_url)
        reference = folder / "one-process"
        run_single(args + ["--output_dir", str(reference), "--steps", "2", "--micro_batch_size", "3"])
        yield args, reference, folder


def run_single(argv: list[str]) -> None:
    """train.main in this process, sampling like the workers; one thread, like each worker process
    (faster on a busy 2-core machine, where two threads mostly wait for each other)."""
    original, threads = LocalPolicy.generate, torch.get_num_threads()
    LocalPolicy.generate = seeded_by_prompt
    torch.set_num_threads(1)
    try:
        train.main(argv)
    finally:
        LocalPolicy.generate = original
        torch.set_num_threads(threads)


def launch(mode: str, out: Path, args: list[str], resume: bool) -> None:
    """Two processes running ``worker`` below."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               __file__, mode, str(out), "resume" if resume else "once", *args]
    result = run_to_end(command, timeout=300, env=command_env(OPENAI_API_KEY="test"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert (out / f"ran-{mode}").exists()  # the worker checked it really ran this mode (see below)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors")


def assert_same_run(run: Path, reference: Path, rtol: float = RTOL, atol: float = ATOL) -> None:
    rows, expected = metrics(run), metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [1, 2]
    for row, want in zip(rows, expected):
        for key in COMPARED:
            assert row[key] == pytest.approx(want[key], rel=rtol, abs=1e-12), (row["step"], key)
    got, want = weights(run, 2), weights(reference, 2)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)


def assert_same_optimizer_state(run: Path, reference: Path) -> None:
    """trainer_state.pt holds ``optimizer.state_dict()`` as one process writes it, whatever the sharding."""
    got, want = (torch.load(r / "checkpoints" / "step-000002" / "trainer_state.pt") for r in (run, reference))
    assert (got["step"], got["skipped_steps"]) == (want["step"], want["skipped_steps"]) == (2, 0)
    got, want = got["optimizer"], want["optimizer"]
    assert got["param_groups"] == want["param_groups"] and got["state"].keys() == want["state"].keys()
    for position, state in want["state"].items():
        assert got["state"][position]["step"] == state["step"]
        # Adam's moments: the second is ~g^2, tiny, hence the small absolute tolerance.
        torch.testing.assert_close(got["state"][position]["exp_avg"], state["exp_avg"], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(got["state"][position]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-9, atol=1e-18)


def test_micro_batches_and_gradient_checkpointing_do_not_change_the_update(reference_run):
    args, reference, folder = reference_run
    run_single(args + ["--output_dir", str(folder / "one-micro-batch"), "--steps", "2", "--micro_batch_size", "12"])
    assert_same_run(folder / "one-micro-batch", reference)
    run_single(args + ["--output_dir", str(folder / "checkpointing"), "--steps", "2", "--micro_batch_size", "3",
                       "--gradient_checkpointing", "true"])
    assert_same_run(folder / "checkpointing", reference)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_update_like_one_and_resume_exactly(mode, reference_run):
    args, reference, folder = reference_run
    out = folder / mode
    extra = ["--gradient_checkpointing", "true"] if mode == "fsdp2" else []
    launch(mode, out, [*args, "--micro_batch_size", "3", *extra], resume=True)

    assert_same_run(out / "full", reference)
    assert_same_optimizer_state(out / "full", reference)
    # Stopped after step 1 and resumed: the same weights and numbers as the uninterrupted run, exactly.
    strip = lambda row: {k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_second"}  # noqa: E731
    assert [strip(r) for r in metrics(out / "cut")] == [strip(r) for r in metrics(out / "full")]
    for name, tensor in weights(out / "full", 2).items():
        assert torch.equal(weights(out / "cut", 2)[name], tensor), name


def test_two_processes_with_ppo_epochs_and_mini_batches_update_like_one(reference_run):
    """Two passes over two mini-batches (4 optimizer steps a batch; pi_old from one extra forward pass): each
    process trains on its slice of each mini-batch, with the counts of the whole mini-batch, so two processes
    (DDP) give the update of one."""
    args, _, folder = reference_run
    # 8 prompts: each process's mini-batch is 2 groups, 2 micro-batches (DDP accumulates without syncing)
    several = [*args, "--prompts_per_step", "8", "--micro_batch_size", "3", "--ppo_epochs", "2", "--mini_batches", "2"]
    run_single([*several, "--output_dir", str(folder / "one-process-mini-batches"), "--steps", "2"])
    launch("ddp", folder / "ddp-mini-batches", several, resume=False)
    assert_same_run(folder / "ddp-mini-batches" / "full", folder / "one-process-mini-batches")
    rows = metrics(folder / "ddp-mini-batches" / "full")
    assert [r["optimizer_steps"] for r in rows] == [4, 8] and all(abs(r["ratio_mean"] - 1) > 1e-6 for r in rows)


@needs_vllm
@pytest.mark.slow
def test_two_processes_with_vllm_engines_update_like_one(reference_run):
    """Each process samples with its own (multi-process) vLLM engine, synced through /dev/shm after every
    step: the same run as one process with one in-process engine."""
    args, _, folder = reference_run
    vllm = ["--micro_batch_size", "3", "--rollout_engine", "vllm", "--vllm_kv_cache_gb", "0.03125"]
    run_single([*args, *vllm, "--output_dir", str(folder / "one-process-vllm"), "--steps", "2"])
    launch("ddp", folder / "ddp-vllm", [*args, *vllm], resume=False)
    assert_same_run(folder / "ddp-vllm" / "full", folder / "one-process-vllm")
    for row in metrics(folder / "ddp-vllm" / "full"):  # step 2 sampled right after a sync
        assert row["sampler_logprob_diff_max"] < 1e-4 and row["time/sync"] > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# The worker: `accelerate launch tests/test_distributed.py MODE OUT_DIR resume|once TRAIN_ARGS...` trains
# OUT/full (2 steps); with "resume" then also OUT/cut (1 step) and OUT/cut resumed to 2 steps, in the
# same processes.
# --------------------------------------------------------------------------------------------------


def worker(mode: str, out: Path, resume: bool, args: list[str]) -> None:
    from accelerate import Accelerator
    from fsdp_on_cpu import shard_with_fsdp2
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    def make_accelerator(*a, **kw) -> Accelerator:
        accelerator = Accelerator(*a, **kw)
        if mode == "fsdp2":  # see tests/fsdp_on_cpu.py: accelerate enables FSDP on GPU groups only
            shard_with_fsdp2(accelerator)
        # end_training destroys the process group, and this launch trains three times in a row.
        accelerator.end_training = lambda: None
        accelerator.no_sync = counting(accelerator.no_sync)
        return accelerator

    no_sync_entered = [0]

    def counting(no_sync):
        def wrapper(model):
            no_sync_entered[0] += 1
            return no_sync(model)
        return wrapper


    real_update, real_sync = LocalPolicy.update, LocalPolicy.sync_sampler

    def update(self, *args):
        import datetime

        backend = torch.distributed.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        # the configured wait (train.py's default 60 min; gloo's own default is 30, NCCL's 10)
        assert backend.options._timeout == datetime.timedelta(minutes=self.cfg.dist_timeout_minutes) == \
            datetime.timedelta(minutes=60)
        if mode == "ddp":
            assert isinstance(self.model, DistributedDataParallel) and self.replica is None
        else:
            assert all(isinstance(t, DTensor) for t in self.model.state_dict().values())
            # sharded like the policy, not a full copy (state_dict(): parameters can be unsharded between passes)
            assert all(isinstance(t, DTensor) for t in self.reference.state_dict().values())
        return real_update(self, *args)

    def sync_sampler(self):
        seconds = real_sync(self)
        if self.cfg.rollout_engine == "hf":
            # The engine samples the next step with exactly the trained weights (gathering is a collective).
            engine_state = self.engine.model.state_dict()
            for name, tensor in full_state_dict_items(self.model):
                assert torch.equal(engine_state[name], tensor), name
        return seconds

    train.Accelerator = make_accelerator
    LocalPolicy.generate = seeded_by_prompt
    LocalPolicy.update = update
    LocalPolicy.sync_sampler = sync_sampler
    train.main([*args, "--output_dir", str(out / "full"), "--steps", "2", "--save_every", "1"])
    if resume:
        train.main([*args, "--output_dir", str(out / "cut"), "--steps", "1"])
        train.main([*args, "--output_dir", str(out / "cut"), "--steps", "2", "--resume", "true"])
    # Gradient accumulation without syncing: DDP skips the all-reduce of all micro-batches but the last; FSDP2 must
    # reduce-scatter every one (no_sync would keep a whole, unsharded copy of every gradient in between).
    assert (no_sync_entered[0] > 0) if mode == "ddp" else (no_sync_entered[0] == 0), no_sync_entered
    (out / f"ran-{mode}").touch()


if __name__ == "__main__":
    from tiny_model import keep_float64_in_rmsnorm

    keep_float64_in_rmsnorm()
    worker(sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "resume", sys.argv[4:])
