"""Seconds and peak memory per phase of one GRPO step on the embedded default (or any model).

    python bench/step.py                       # SmolLM2-135M, 4 prompts x 4 completions x 40 tokens, 3 steps
    python bench/step.py --prompts 2 --group-size 8 --max-new-tokens 64 --threads 2

Prints one line per phase: median seconds over the measured steps (the first step is a warm-up and
is not counted) and the peak resident memory of the process during that phase; then the roofline: the
machine's measured matmul FLOP/s and memory bandwidth (bench/roofline.py), and the share of them that decoding
(weights read per decoding step) and the training forward+backward (6 FLOPs per parameter per token) reach.

    python bench/step.py --dtype bfloat16      # train.py's mixed precision: bf16 autocast, bf16 sampling copy
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from bench import roofline  # noqa: E402
from bench.memory import MemorySampler  # noqa: E402
from l2a.data import load_samples  # noqa: E402
from l2a.grpo import group_advantages, grpo_loss
from l2a.model import EMBEDDED_DEFAULT, load_model, load_tokenizer
from l2a.prompts import policy_messages
from l2a.judges import RubricJudge, score_responses
from l2a.logprobs import completion_logprobs, pack_completions
from l2a.rollout import HFEngine, SamplingConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_DEFAULT)
    parser.add_argument("--data", default=str(REPO / "data/synthetic/train.jsonl"))
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--steps", type=int, default=3, help="measured steps (plus one warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: as train.py's mixed precision (float32 master weights, bf16 compute and sampling)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bf16 = args.dtype == "bfloat16"
    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    sampler = load_model(args.model, torch.bfloat16) if bf16 else model  # as LocalPolicy's sampling replica
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # as train.py
    engine, judge = HFEngine(sampler, tokenizer), RubricJudge()
    samples = load_samples(args.data)
    memory = MemorySampler(period=0.005)
    memory.start()
    times: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}

    @contextmanager
    def phase(name: str, record: bool):
        start = time.perf_counter()
        yield
        if record:
            end = time.perf_counter()
            times.setdefault(name, []).append(end - start)
            peaks[name] = max(peaks.get(name, 0.0), memory.peak([(start, end)]))

    tokens, decode_steps, trained_tokens = [], [], []
    for step in range(args.steps + 1):
        record = step > 0
        batch_samples = samples[step * args.prompts : (step + 1) * args.prompts]
        with phase("generate", record):
            completions = engine.generate([policy_messages(s["messages"]) for s in batch_samples], args.group_size,
                                          SamplingConfig(max_new_tokens=args.max_new_tokens, seed=step))
        with phase("judge+reward", record):
            answered = [batch_samples[c.prompt_index] for c in completions]
            rewards = torch.tensor([s.reward.total for s in score_responses(judge, answered, [c.text for c in completions])])
            advantages = group_advantages(rewards, args.group_size)
        batch = pack_completions(completions, tokenizer.pad_token_id)
        with phase("forward (logprobs)", record), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logprobs, _ = completion_logprobs(model, batch)
            loss, _ = grpo_loss(logprobs, logprobs.detach(), advantages, batch.completion_mask)
        with phase("backward", record):
            loss.backward()
        with phase("optimizer step", record):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if bf16:
                sampler.load_state_dict(model.state_dict())  # LocalPolicy.sync_sampler, after every step by default
        if record:
            tokens.append(sum(len(c.token_ids) for c in completions))
            decode_steps.append(max(len(c.token_ids) for c in completions))  # one generate call: all rows together
            trained_tokens.append(batch.prompt_mask.sum().item() + batch.completion_mask.sum().item())

    prompt_tokens = statistics.mean(len(c.prompt_ids) for c in completions)
    print(f"# {args.model}: {args.prompts} prompts x {args.group_size} completions, <= {args.max_new_tokens} new tokens "
          f"(mean {statistics.mean(tokens) / (args.prompts * args.group_size):.1f}), prompt ~{prompt_tokens:.0f} tokens, "
          f"{args.threads} threads, median of {args.steps} steps")
    total = 0.0
    for name, values in times.items():
        median = statistics.median(values)
        total += median
        print(f"{name:20s} {median:8.2f} s   peak RSS {peaks[name]:7.0f} MB")
    print(f"{'step':20s} {total:8.2f} s   generation {statistics.mean(tokens) / statistics.median(times['generate']):.1f} tok/s")

    parameters = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in sampler.parameters())
    flops, bandwidth = roofline.matmul_flops(torch.bfloat16 if bf16 else torch.float32), roofline.memory_bandwidth()
    train_seconds = statistics.median(times["forward (logprobs)"]) + statistics.median(times["backward"])
    print(f"# roofline: matmul {flops / 1e9:.0f} GFLOP/s ({args.dtype}), memory {bandwidth / 1e9:.1f} GB/s "
          "(bench/roofline.py, measured now)")
    decode = roofline.fraction_of_bandwidth(round(statistics.mean(decode_steps)), weight_bytes,
                                            statistics.median(times["generate"]), bandwidth)
    print(f"{'decoding':20s} {100 * decode:7.1f}% of the bandwidth limit ({statistics.mean(decode_steps):.0f} steps "
          f"x {weight_bytes / 1e6:.0f} MB of weights; prefill and sampling included)")
    train = roofline.fraction_of_flops(parameters, round(statistics.mean(trained_tokens)), train_seconds, flops)
    print(f"{'forward+backward':20s} {100 * train:7.1f}% of the matmul peak ({statistics.mean(trained_tokens):.0f} "
          f"tokens x {parameters / 1e6:.0f}M parameters x 6 FLOPs)")


if __name__ == "__main__":
    main()
