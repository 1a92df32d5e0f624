"""l2a against Hugging Face TRL's GRPOTrainer: the same objective, then seconds and memory per phase.

    pip install -r requirements-bench.txt       # TRL, pinned; only this benchmark needs it
    python bench/vs_trl.py                      # embedded default, token-mean <-> dapo, 3 rounds x 2 steps, twice
    python bench/vs_trl.py --precision float32 --loss-agg seq-mean-token-mean --kl-coef 0.04 --rounds 2
    python bench/vs_trl.py --precision float32 --rounds 0 --num-iterations 2 --clip-ratio-c 1.5   # 2nd iteration

Two configurations, one table each (``--precision``): ``float32``, both trainers in float32 without gradient
checkpointing (the parity below holds there); ``fastest``, each trainer as it runs fastest on this machine:
TRL's defaults (``bf16=True``, ``gradient_checkpointing=True``) and l2a's ``dtype: auto`` (bf16 mixed precision
where the CPU computes bf16 natively). Apart from precision both trainers get the same settings: the embedded
default model, the same prompts in the same
order (train.py's data order), ``group_size`` completions of at most ``max_new_tokens`` tokens at
temperature 1, the same reward (``l2a.reward`` with the offline rubric judge), AdamW at a constant
learning rate, gradient clipping at 1, one optimizer step per batch, and the matching loss:

    l2a loss_agg               TRL loss_type        l2a                 TRL
    token-mean                 dapo                 kl_coef (k3)        beta
    seq-mean-token-mean        grpo                 ppo_epochs          num_iterations (parity only, see 1.)
    seq-mean-token-sum-norm    dr_grpo              clip_ratio_c        delta (the same loss when > 1 + epsilon_high)

1. Parity. On one fixed batch (completions sampled once, the same rewards), each trainer computes its
   loss and gradients from the same initial weights; the script prints the differences and fails
   if they exceed the tolerances below. Advantages use TRL's epsilon (1e-4) on both sides here. With a KL
   term, both first move the policy away from the reference by the same seeded noise (else KL = 0). With
   ``--num-iterations`` > 1 the check is at TRL's second iteration: each side takes its old log-probabilities
   from the weights that sampled the batch (TRL's ``old_per_token_logps``, l2a's ``logprobs_before_update``),
   then both move by the same seeded noise, standing in for the first iteration's optimizer step, so the
   ratio is no longer 1 and the clips (and with ``--clip-ratio-c`` the dual clip, TRL's ``delta``) bind.
2. Speed and memory. Each trainer runs in its own process; the parent alternates them (A B A B ...),
   ``--steps-per-round`` steps at a time, so a change in machine load hits both alike. Phases:
   generate (chat template, sampling, decoding), reward (judge, reward, advantages), logprobs (the
   forward passes and the loss), backward+step (backward, clipping, optimizer step), other (the rest).
   Reported: the median seconds per step, the peak resident memory of the process during the phase
   (sampled every 2 ms), and the ratio l2a/TRL. The first step of each trainer is a warm-up, not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from bench.memory import MemorySampler, rss_mb  # noqa: E402

LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
PHASES = ("generate", "reward", "logprobs", "backward+step", "other", "step")
TRL_ADVANTAGE_EPS = 1e-4  # TRL divides by (std + 1e-4); l2a's default is 1e-6
LOSS_TOLERANCE = 1e-5  # absolute, on losses of order 1
# Relative L2 error of the whole gradient vector. In float32 the two trainers agree to summation order; under bf16
# autocast each one's gradient is ~3% from its own float32 gradient (tests/test_logprobs.py measures 3.4% on SmolLM2),
# so there they can agree only to bf16's resolution, and the check guards against gross errors (a wrong aggregation
# or a missing term moves the gradient by tens of percent).
GRAD_TOLERANCE = {"float32": 1e-4, "fastest": 0.1}


@dataclass
class Settings:
    model: str
    train_file: str
    prompts: int
    group_size: int
    max_new_tokens: int
    learning_rate: float
    loss_agg: str
    kl_coef: float
    num_iterations: int
    clip_ratio_c: float | None
    seed: int
    threads: int
    total_steps: int
    precision: str = "float32"
    """"float32": both in float32, no gradient checkpointing (parity holds to 1e-5). "fastest": each in its
    fastest setting on this machine: TRL's defaults (bf16 autocast, gradient checkpointing), l2a's dtype auto."""
    l2a_checkpointing: bool = False
    """l2a with gradient checkpointing too (TRL's default): less memory for ~one more forward pass per step."""


# --------------------------------------------------------------------------------------------------
# Measuring: phase intervals on a clock, resident memory sampled in a thread.
# --------------------------------------------------------------------------------------------------


class Timeline:
    """Named time intervals of the current step, and the process's resident memory during it."""

    def __init__(self):
        self.spans: list[tuple[str, float, float]] = []
        self.memory = MemorySampler()

    def start_step(self) -> float:
        self.spans.clear()
        self.memory.start()
        return time.perf_counter()

    def end_step(self) -> None:
        self.memory.stop()

    @contextmanager
    def span(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spans.append((name, start, time.perf_counter()))

    def record(self, phases: dict[str, list[tuple[float, float]]], tokens: int) -> dict:
        """Seconds and peak MB of each phase (a list of intervals) in this step."""
        result = {"tokens": tokens}
        for name, intervals in phases.items():
            result[name] = {"seconds": sum(b - a for a, b in intervals), "peak_mb": self.memory.peak(intervals)}
        return result


def step_record(timeline: Timeline, step_start: float, step_end: float, generate, reward, logprobs, backward, tokens):
    phases = {"generate": generate, "reward": reward, "logprobs": logprobs, "backward+step": backward,
              "step": [(step_start, step_end)]}
    record = timeline.record(phases, tokens)
    measured = sum(record[p]["seconds"] for p in ("generate", "reward", "logprobs", "backward+step"))
    record["other"] = {"seconds": (step_end - step_start) - measured, "peak_mb": record["step"]["peak_mb"]}
    return record


# --------------------------------------------------------------------------------------------------
# The l2a worker: train.py's own LocalPolicy and the loop body of train.main.
# --------------------------------------------------------------------------------------------------


def l2a_worker(conn, settings: Settings) -> None:
    import torch

    import train
    from l2a.data import batch_indices, load_samples
    from l2a.grpo import group_advantages
    from l2a.judges import TRAINING_GRADER, make_judge, score_responses
    from l2a.local_policy import LocalPolicy
    from l2a.prompts import policy_messages
    from l2a.rollout import SamplingConfig

    torch.set_num_threads(settings.threads)
    cfg = train.Config(model=settings.model, train_file=settings.train_file, prompts_per_step=settings.prompts,
                       group_size=settings.group_size, max_new_tokens=settings.max_new_tokens,
                       learning_rate=settings.learning_rate, loss_agg=settings.loss_agg, kl_coef=settings.kl_coef,
                       ppo_epochs=settings.num_iterations, clip_ratio_c=settings.clip_ratio_c,
                       micro_batch_size=settings.prompts * settings.group_size, seed=settings.seed, eval_every=0,
                       dtype="float32" if settings.precision == "float32" else "auto",
                       gradient_checkpointing=settings.l2a_checkpointing)
    train.set_seed(cfg.seed)
    samples = load_samples(cfg.train_file)
    judge = make_judge(cfg.judge, sampling=TRAINING_GRADER)
    policy = LocalPolicy(cfg, train.make_accelerator(cfg), None)

    def score(batch, completions):
        answered = [batch[c.prompt_index] for c in completions]
        return [s.reward for s in score_responses(judge, answered, [c.text for c in completions])]

    timeline = Timeline()
    conn.send(("ready", rss_mb()))

    def rollouts(step: int, seed: int):
        batch = [samples[i] for i in batch_indices(len(samples), step, cfg.prompts_per_step, cfg.seed, stream="grpo")]
        sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                  seed=seed)
        return batch, policy.generate([policy_messages(s["messages"]) for s in batch], cfg.group_size, sampling)

    # ---- parity: loss and gradients on a fixed batch, from the initial weights, no optimizer step ----
    command, path = conn.recv()
    assert command == "parity"
    first_iteration = settings.num_iterations == 1
    move_away_from_reference(policy.model, first_iteration and cfg.kl_coef != 0)
    batch, completions = rollouts(0, seed=12345)
    rewards = torch.tensor([r.total for r in score(batch, completions)])
    advantages = group_advantages(rewards, cfg.group_size, eps=TRL_ADVANTAGE_EPS)
    num_tokens = sum(len(c.token_ids) for c in completions)
    old = policy.logprobs_before_update(completions)  # the sampling weights' (None with one iteration: ratio 1)
    move_away_from_reference(policy.model, not first_iteration)  # as if one optimizer step had been taken
    loss, sums, _ = policy.micro_batch_loss(completions, advantages, old, num_tokens, len(completions))
    loss.backward()
    save_gradients(policy.model, path)
    policy.optimizer.zero_grad(set_to_none=True)
    fixed = {"cids": [batch[c.prompt_index]["cid"] for c in completions],
             "prompt_ids": [c.prompt_ids for c in completions], "completion_ids": [c.token_ids for c in completions],
             "rewards": rewards.tolist()}
    clipped = {key: sums.get(key, 0.0) / num_tokens for key in ("clip_low_frac", "clip_high_frac", "clip_dual_frac")}
    conn.send(("parity", {"loss": loss.item(), "kl": sums["kl_mean"] / num_tokens, "advantages": advantages.tolist(),
                          "ratio_mean": sums["ratio_mean"] / num_tokens, **clipped, "batch": fixed}))

    # ---- timed steps, a block at a time when the parent says so -------------------------------------
    micro_batch_loss = policy.micro_batch_loss

    def timed_micro_batch_loss(*args, **kwargs):
        with timeline.span("logprobs"):
            return micro_batch_loss(*args, **kwargs)

    policy.micro_batch_loss = timed_micro_batch_loss
    step = 0
    while (message := conn.recv())[0] == "steps":
        records = []
        for _ in range(message[1]):
            start = timeline.start_step()
            with timeline.span("generate"):
                batch, completions = rollouts(step, seed=cfg.seed * 1_000_003 + step * 1_009)
            with timeline.span("reward"):
                rewards = score(batch, completions)
                advantages = group_advantages(torch.tensor([r.total for r in rewards]), cfg.group_size)
            with timeline.span("update"):
                policy.update(completions, advantages)
                policy.sync_sampler()  # the bf16 sampling replica (dtype auto) gets the new weights; else nothing
            end = time.perf_counter()
            timeline.end_step()
            spans = {name: [(a, b) for n, a, b in timeline.spans if n == name] for name, _, _ in timeline.spans}
            backward = [(spans["logprobs"][-1][1], spans["update"][0][1])]  # after the last loss: backward + step
            records.append(step_record(timeline, start, end, spans["generate"], spans["reward"], spans["logprobs"],
                                       backward, sum(len(c.token_ids) for c in completions)))
            step += 1
        conn.send(("records", records))
    conn.send(("bye", None))


def move_away_from_reference(model, needed: bool) -> None:
    """Shift the policy's weights by the same seeded noise on both sides of the parity check: with a KL term, at
    the initial weights policy = reference, the KL and its gradient are exactly 0 and prove nothing; at a second
    iteration, the noise stands in for the first iteration's optimizer step (ratio != 1)."""
    import zlib

    import torch

    if not needed:
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
            param.add_(noise * 0.05 * param.std())


def save_gradients(model, path: str) -> None:
    from safetensors.torch import save_file

    save_file({name: p.grad.detach().contiguous() for name, p in model.named_parameters() if p.grad is not None}, path)


# --------------------------------------------------------------------------------------------------
# The TRL worker: GRPOTrainer.train(), paused between blocks by a callback.
# --------------------------------------------------------------------------------------------------


def trl_worker(conn, settings: Settings) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from l2a.data import batch_indices, load_samples
    from l2a.model import load_model, load_tokenizer
    from l2a.prompts import policy_messages
    from l2a.judges import RubricJudge, score_responses

    torch.set_num_threads(settings.threads)
    samples = load_samples(settings.train_file)
    by_cid = {s["cid"]: s for s in samples}
    # The prompts of every step in train.py's order; TRL reads them in order (shuffle_dataset=False).
    order = [i for step in range(settings.total_steps)
             for i in batch_indices(len(samples), step, settings.prompts, settings.seed, stream="grpo")]
    dataset = Dataset.from_list([{"prompt": policy_messages(samples[i]["messages"]), "cid": samples[i]["cid"]}
                                 for i in order])
    judge = RubricJudge()

    def l2a_reward(prompts, completions, cid, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [s.reward.total for s in score_responses(judge, [by_cid[c] for c in cid], texts)]

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vs_trl_"), use_cpu=True, bf16=settings.precision == "fastest",
        seed=settings.seed,
        per_device_train_batch_size=settings.prompts * settings.group_size, num_generations=settings.group_size,
        gradient_accumulation_steps=1, max_completion_length=settings.max_new_tokens, temperature=1.0, top_p=1.0,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        loss_type=LOSS_TYPES[settings.loss_agg], beta=settings.kl_coef, epsilon=0.2,
        num_iterations=settings.num_iterations, delta=settings.clip_ratio_c,  # delta = the dual clip here (> 1.2)
        # TRL 1.16 multiplies the KL term by the (differentiable) ratio by default, DeepSeek-V3.2's unbiased
        # variant: the same value on-policy, another gradient. l2a's kl_coef is the GRPO paper's plain k3.
        use_bias_correction_kl=False,
        # TRL's default is True; off for parity in float32 (l2a's default is off too)
        gradient_checkpointing=settings.precision == "fastest",
        shuffle_dataset=False, max_steps=settings.total_steps, logging_steps=10**9, save_strategy="no",
        report_to=[], disable_tqdm=True,
    )
    timeline = Timeline()
    trainer = GRPOTrainer(model=load_model(settings.model), reward_funcs=[l2a_reward], args=args,
                          train_dataset=dataset, processing_class=load_tokenizer(settings.model))
    conn.send(("ready", rss_mb()))

    # ---- parity: the fixed batch through TRL's own loss --------------------------------------------
    command, (path, fixed) = conn.recv()
    assert command == "parity"
    result = trl_parity(trainer, fixed, by_cid, settings)
    save_gradients(trainer.model, path)
    trainer.model.zero_grad(set_to_none=True)
    conn.send(("parity", result))

    # ---- timed steps: wrap the methods GRPOTrainer calls, pause at the parent's pace --------------
    def wrap(name: str, span: str):
        method = getattr(trainer, name)

        def timed(*args, **kwargs):
            with timeline.span(span):
                return method(*args, **kwargs)

        setattr(trainer, name, timed)

    wrap("_generate", "generate")
    wrap("_calculate_rewards", "reward")
    wrap("compute_loss", "loss")
    wrap("_get_per_token_logps_and_entropies", "forward")

    class Pace(TrainerCallback):
        def __init__(self, first_block: int):
            self.left, self.records, self.start = first_block, [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.left == 0:
                conn.send(("records", self.records))
                message = conn.recv()
                assert message[0] == "steps", message
                self.left, self.records = message[1], []
            self.start = timeline.start_step()

        def on_step_end(self, args, state, control, **kwargs):
            end = time.perf_counter()
            timeline.end_step()
            spans = timeline.spans
            loss = [(a, b) for n, a, b in spans if n == "loss"]
            # forward passes outside compute_loss: the reference (beta > 0) and old log-probs, if any
            extra = [(a, b) for n, a, b in spans if n == "forward" and not any(x <= a <= y for x, y in loss)]
            completion_lengths = trainer._metrics["train"]["completions/mean_length"][-1:]
            tokens = round(completion_lengths[0] * settings.prompts * settings.group_size) if completion_lengths else 0
            self.records.append(step_record(
                timeline, self.start, end, [(a, b) for n, a, b in spans if n == "generate"],
                [(a, b) for n, a, b in spans if n == "reward"], loss + extra, [(loss[-1][1], end)], tokens))
            self.left -= 1

    message = conn.recv()
    if message[0] == "steps":  # else parity only: no training
        pace = Pace(first_block=message[1])
        trainer.add_callback(pace)
        trainer.train()
        conn.send(("records", pace.records))
        conn.recv()
    conn.send(("bye", None))


def trl_parity(trainer, fixed: dict, by_cid: dict, settings: Settings) -> dict:
    """TRL's loss and gradients on l2a's fixed batch, through ``GRPOTrainer._compute_loss``.

    The inputs are built like ``_generate_and_score_completions`` builds them: left-padded prompts,
    right-padded completions, TRL's group advantages from the same rewards, the token count, the old
    log-probabilities when num_iterations > 1 (from the weights before the seeded move, as at TRL's second
    iteration), and the reference log-probabilities when beta > 0.
    """
    import torch
    from trl.trainer.utils import pad

    from l2a.prompts import policy_messages

    first_iteration = settings.num_iterations == 1
    move_away_from_reference(trainer.model, first_iteration and trainer.beta != 0.0)
    # The same prompt tokens from TRL's own chat templating as from l2a's.
    prompts = [policy_messages(by_cid[c]["messages"]) for c in fixed["cids"]]
    trl_prompt_ids = trainer._tokenize_prompts(prompts)[0]
    same_prompts = [list(a) for a in trl_prompt_ids] == fixed["prompt_ids"]
    pad_id = trainer.processing_class.pad_token_id
    prompt_ids = pad([torch.tensor(p) for p in fixed["prompt_ids"]], padding_value=pad_id, padding_side="left")
    prompt_mask = pad([torch.ones(len(p), dtype=torch.long) for p in fixed["prompt_ids"]], padding_value=0,
                      padding_side="left")
    completion_ids = pad([torch.tensor(c) for c in fixed["completion_ids"]], padding_value=pad_id,
                         padding_side="right")
    completion_mask = pad([torch.ones(len(c), dtype=torch.long) for c in fixed["completion_ids"]], padding_value=0,
                          padding_side="right")
    rewards = torch.tensor(fixed["rewards"])
    grouped = rewards.view(-1, trainer.num_generations)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + TRL_ADVANTAGE_EPS)).view(-1)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages,
              "num_items_in_batch": completion_mask.sum()}
    if not first_iteration:
        with torch.no_grad():  # as _generate_and_score_completions computes them when num_iterations > 1
            inputs["old_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
                trainer.model, torch.cat([prompt_ids, completion_ids], 1),
                torch.cat([prompt_mask, completion_mask], 1), completion_ids.shape[1])[0]
        move_away_from_reference(trainer.model, True)
    if trainer.beta != 0.0:
        with torch.no_grad():
            inputs["ref_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
                trainer.ref_model, torch.cat([prompt_ids, completion_ids], 1),
                torch.cat([prompt_mask, completion_mask], 1), completion_ids.shape[1])[0]
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    kl = trainer._metrics["train"]["kl"][-1] if trainer.beta != 0.0 else 0.0
    clipped = {key: trainer._metrics["train"][f"clip_ratio/{side}_mean"][-1] for side, key in
               (("low", "clip_low_frac"), ("high", "clip_high_frac"))}
    return {"loss": loss.item(), "kl": kl, "advantages": advantages.tolist(), "same_prompt_tokens": same_prompts,
            **clipped}


# --------------------------------------------------------------------------------------------------
# The parent: parity, then alternating blocks, then the table.
# --------------------------------------------------------------------------------------------------


def compare_gradients(path_a: str, path_b: str) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(path_a), load_file(path_b)
    if set(a) != set(b):
        return {"error": f"different parameters: {sorted(set(a) ^ set(b))[:5]}"}
    diff2 = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    norm_b2 = sum(float(b[k].double().pow(2).sum()) for k in b)
    max_abs = max(float((a[k] - b[k]).abs().max()) for k in a)
    return {"relative_l2": math.sqrt(diff2) / max(math.sqrt(norm_b2), 1e-30), "max_abs": max_abs,
            "grad_norm_trl": math.sqrt(norm_b2)}


def summarise(records: list[dict]) -> dict:
    return {phase: {"seconds": statistics.median(r[phase]["seconds"] for r in records),
                    "peak_mb": max(r[phase]["peak_mb"] for r in records)} for phase in PHASES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train-file", default=str(REPO / "data/synthetic/train.jsonl"))
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--loss-agg", default="token-mean", choices=sorted(LOSS_TYPES))
    parser.add_argument("--kl-coef", type=float, default=0.0, help="l2a kl_coef (k3) = TRL beta")
    parser.add_argument("--num-iterations", type=int, default=1,
                        help="l2a ppo_epochs = TRL num_iterations; > 1: parity at the second iteration (--rounds 0)")
    parser.add_argument("--clip-ratio-c", type=float, default=None,
                        help="l2a clip_ratio_c (dual clip) = TRL delta; must be > 1.2 (1 + epsilon_high)")
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds after the warm-up (0: parity only)")
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write every step's record here (one file per precision)")
    parser.add_argument("--precision", default="float32,fastest",
                        help="comma-separated: float32 (parity + timing, both in float32) and/or fastest (timing, "
                             "each trainer in its fastest setting); one table each")
    parser.add_argument("--l2a-checkpointing", action="store_true",
                        help="l2a with gradient checkpointing as well (TRL's default): the memory-for-compute trade")
    args = parser.parse_args()
    if args.num_iterations > 1 and (args.rounds or args.precision != "float32"):
        parser.error("--num-iterations > 1 checks parity only (--rounds 0 --precision float32): the timed steps "
                     "take one optimizer step per batch")
    if args.clip_ratio_c is not None and not args.clip_ratio_c > 1.2:
        parser.error("--clip-ratio-c must be > 1.2 (1 + epsilon_high): only there is TRL's delta the dual clip")

    parity_ok = True
    for precision in args.precision.split(","):
        settings = Settings(args.model, args.train_file, args.prompts, args.group_size, args.max_new_tokens,
                            args.learning_rate, args.loss_agg, args.kl_coef, args.num_iterations, args.clip_ratio_c,
                            args.seed, args.threads, total_steps=1 + args.rounds * args.steps_per_round,
                            precision=precision, l2a_checkpointing=args.l2a_checkpointing)
        parity_ok &= compare(settings, args)
    print(f"\nrerun: python bench/vs_trl.py {' '.join(sys.argv[1:])}".rstrip())
    if not parity_ok:
        raise SystemExit(1)


PRECISIONS = {"float32": "TRL in float32 without gradient checkpointing, l2a in float32",
              "fastest": "each in its fastest setting: TRL's defaults (bf16 autocast + gradient checkpointing), "
                         "l2a's dtype auto"}


def compare(settings: Settings, args: argparse.Namespace) -> bool:
    """One configuration: both workers, parity, alternating timed blocks, the table. True if parity held."""
    print(f"\n## {settings.precision}: {PRECISIONS[settings.precision]}"
          f"{'; l2a with gradient checkpointing' if settings.l2a_checkpointing else ''}", flush=True)
    context = mp.get_context("spawn")
    workers = {}
    for name, target in (("l2a", l2a_worker), ("TRL", trl_worker)):
        parent_end, child_end = context.Pipe()
        process = context.Process(target=target, args=(child_end, settings), daemon=True)
        process.start()
        workers[name] = (parent_end, process)
    idle = {}
    for name, (conn, _) in workers.items():  # both load at the same time; wait for both
        kind, idle[name] = conn.recv()
        assert kind == "ready"

    # ---- 1. parity -----------------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        l2a_conn, trl_conn = workers["l2a"][0], workers["TRL"][0]
        l2a_conn.send(("parity", f"{tmp}/l2a.safetensors"))
        _, parity_l2a = l2a_conn.recv()
        trl_conn.send(("parity", (f"{tmp}/trl.safetensors", parity_l2a["batch"])))
        _, parity_trl = trl_conn.recv()
        gradients = compare_gradients(f"{tmp}/l2a.safetensors", f"{tmp}/trl.safetensors")
    loss_gap = abs(parity_l2a["loss"] - parity_trl["loss"])
    advantage_gap = max(abs(a - b) for a, b in zip(parity_l2a["advantages"], parity_trl["advantages"]))
    grad_tolerance = GRAD_TOLERANCE[settings.precision]
    parity_ok = (loss_gap <= LOSS_TOLERANCE and gradients.get("relative_l2", 1.0) <= grad_tolerance
                 and parity_trl["same_prompt_tokens"])
    tokens = sum(len(c) for c in parity_l2a["batch"]["completion_ids"])
    print(f"# parity on one fixed batch ({len(parity_l2a['batch']['rewards'])} completions, {tokens} tokens), "
          f"{args.loss_agg} <-> {LOSS_TYPES[args.loss_agg]}, kl_coef = beta = {args.kl_coef}, ppo_epochs = "
          f"num_iterations = {args.num_iterations}, clip_ratio_c = delta = {args.clip_ratio_c}")
    print(f"loss          l2a {parity_l2a['loss']:+.8f}   TRL {parity_trl['loss']:+.8f}   |diff| {loss_gap:.2e} "
          f"(tolerance {LOSS_TOLERANCE:g})")
    print(f"gradients     relative L2 error {gradients.get('relative_l2', float('nan')):.2e} (tolerance "
          f"{grad_tolerance:g}), max |diff| {gradients.get('max_abs', float('nan')):.2e}, "
          f"|grad| {gradients.get('grad_norm_trl', float('nan')):.4f}  {gradients.get('error', '')}")
    print(f"mean KL       l2a {parity_l2a['kl']:.6f}   TRL {parity_trl['kl']:.6f}")
    print(f"ratio         l2a mean {parity_l2a['ratio_mean']:.6f}; clipped low/high/dual l2a "
          f"{parity_l2a['clip_low_frac']:.4f}/{parity_l2a['clip_high_frac']:.4f}/{parity_l2a['clip_dual_frac']:.4f}, "
          f"TRL low/high {parity_trl['clip_low_frac']:.4f}/{parity_trl['clip_high_frac']:.4f}")
    print(f"advantages    max |diff| {advantage_gap:.2e}; prompt tokens identical: {parity_trl['same_prompt_tokens']}")
    print(f"parity: {'OK' if parity_ok else 'FAILED'}\n", flush=True)

    # ---- 2. alternating timed blocks: a warm-up step each, then A B A B ... ----------------------------
    records: dict[str, list[dict]] = {"l2a": [], "TRL": []}
    blocks = [1] + [args.steps_per_round] * args.rounds if args.rounds else []
    for block, steps in enumerate(blocks):
        for name, (conn, _) in workers.items():
            started = time.perf_counter()
            conn.send(("steps", steps))
            kind, block_records = conn.recv()
            assert kind == "records", kind
            if block > 0:
                records[name].extend(block_records)
            print(f"block {block} {name}: {steps} step(s) in {time.perf_counter() - started:.1f} s", flush=True)
    for conn, process in workers.values():
        conn.send(("stop", None))
        conn.recv()
        process.join(timeout=60)

    if not args.rounds:
        return parity_ok

    # ---- 3. the table --------------------------------------------------------------------------------
    ours, theirs = summarise(records["l2a"]), summarise(records["TRL"])
    mean_tokens = {name: statistics.mean(r["tokens"] for r in rs) for name, rs in records.items()}
    print(f"\n# {settings.precision}: {args.model}, {args.prompts} prompts x {args.group_size} completions, <= {args.max_new_tokens} new "
          f"tokens, {args.loss_agg} <-> {LOSS_TYPES[args.loss_agg]}, kl {args.kl_coef}, {args.threads} threads")
    print(f"# median of {args.rounds * args.steps_per_round} steps each, alternating blocks of {args.steps_per_round} "
          f"after a warm-up step; completion tokens per step: l2a {mean_tokens['l2a']:.0f}, TRL {mean_tokens['TRL']:.0f}")
    print(f"{'phase':15s} {'l2a s':>8s} {'TRL s':>8s} {'l2a/TRL':>8s}   {'l2a MB':>8s} {'TRL MB':>8s} {'l2a/TRL':>8s}")
    for phase in PHASES:
        a, b = ours[phase], theirs[phase]
        ratio = a["seconds"] / b["seconds"] if b["seconds"] > 0 else float("nan")
        print(f"{phase:15s} {a['seconds']:8.2f} {b['seconds']:8.2f} {ratio:8.2f}   {a['peak_mb']:8.0f} "
              f"{b['peak_mb']:8.0f} {a['peak_mb'] / b['peak_mb']:8.2f}")
    per_token = {name: 100 * statistics.median(r["generate"]["seconds"] / r["tokens"] for r in rs)
                 for name, rs in records.items()}
    print(f"{'generate/100tok':15s} {per_token['l2a']:8.2f} {per_token['TRL']:8.2f} "
          f"{per_token['l2a'] / per_token['TRL']:8.2f}   (seconds per 100 completion tokens: the runs sample different lengths)")
    print(f"{'idle (loaded)':15s} {'':8s} {'':8s} {'':8s}   {idle['l2a']:8.0f} {idle['TRL']:8.0f} "
          f"{idle['l2a'] / idle['TRL']:8.2f}")
    if args.json:
        path = Path(args.json).with_suffix(f".{settings.precision}.json")
        path.write_text(json.dumps({"settings": asdict(settings), "records": records, "idle_mb": idle,
                                    "parity": {"l2a": parity_l2a, "trl": parity_trl, "gradients": gradients}}))
    return parity_ok




if __name__ == "__main__":
    main()
