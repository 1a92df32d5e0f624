"""Rollout speed of vLLM vs Hugging Face ``generate``, and the cost of a weight sync.

    python bench/rollout_speed.py                   # SmolLM2-135M, 4 prompts x 4 completions x 64 tokens
    python bench/rollout_speed.py --multi-process   # the engine in its own processes instead
    python bench/rollout_speed.py --model path/to/hf_checkpoint --prompts 8 --n 8

Prints one line per measurement: the HF and vLLM rollout throughput (generated tokens per second,
median of --repeats timed calls after one warm-up call), the engine's start-up time, first-call time
and resident memory, and the median seconds of a full weight sync for the model and for the tiny
test model. Prompts are the first test chats of data/synthetic/test.jsonl, with the policy prompt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
sys.path.insert(1, str(REPO / "tests"))  # the tiny test model

from l2a.data import load_samples  # noqa: E402
from l2a.model import EMBEDDED_DEFAULT, load_model, load_tokenizer  # noqa: E402
from l2a.prompts import policy_messages  # noqa: E402
from l2a.rollout import HFEngine, SamplingConfig  # noqa: E402
from l2a.vllm_engine import VLLMEngine, full_state_dict_items  # noqa: E402

TEST_FILE = REPO / "data" / "synthetic" / "test.jsonl"


def rss_mb() -> float:
    """Resident memory of this process and its children (the multi-process engine), in MB."""
    import psutil

    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]) / 2**20


def report(what: str, **values) -> None:
    print(
        what,
        " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
        flush=True,
    )


def timed_rollouts(engine, chats, n, sampling, repeats) -> tuple[float, float, int]:
    """(first-call seconds, median tokens/s of the next calls, tokens per call)."""
    started = time.perf_counter()
    engine.generate(chats, n, sampling)
    first = time.perf_counter() - started
    rates, tokens = [], 0
    for repeat in range(repeats):
        sampling.seed = repeat + 1
        started = time.perf_counter()
        completions = engine.generate(chats, n, sampling)
        tokens = sum(len(c.token_ids) for c in completions)
        rates.append(tokens / (time.perf_counter() - started))
    return first, statistics.median(rates), tokens


def sync_seconds(engine: VLLMEngine, model: torch.nn.Module, repeats: int) -> float:
    """Median seconds of a full sync after a small change to every weight (as an optimizer step)."""
    seconds = []
    for _ in range(repeats):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0001)
        seconds.append(engine.sync_weights(full_state_dict_items(model)))
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=EMBEDDED_DEFAULT)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--multi-process", action="store_true", help="run the engine in its own processes")
    args = parser.parse_args()
    in_process = not args.multi_process
    mode = "in-process" if in_process else "multi-process"

    chats = [policy_messages(s["messages"]) for s in load_samples(TEST_FILE)[: args.prompts]]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens)
    report(
        "setup",
        model=args.model,
        prompts=len(chats),
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        engine=mode,
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )

    model = load_model(args.model, dtype=getattr(torch, args.dtype))
    hf = HFEngine(model, load_tokenizer(args.model))
    first, rate, tokens = timed_rollouts(hf, chats, args.n, sampling, args.repeats)
    report("hf_generate", tokens=tokens, first_call_s=first, tokens_per_s=rate)

    rss_before = rss_mb()
    engine = VLLMEngine(args.model, dtype=args.dtype, max_model_len=2048, in_process=in_process)
    report("vllm_init", seconds=engine.init_seconds, rss_mb=rss_mb(), rss_added_mb=rss_mb() - rss_before)
    first, rate, tokens = timed_rollouts(engine, chats, args.n, sampling, args.repeats)
    report("vllm_generate", tokens=tokens, first_call_s=first, tokens_per_s=rate)
    report("vllm_sync", model=args.model, seconds=sync_seconds(engine, model, args.repeats))
    engine.close()

    from tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        tiny_dir = str(make_tiny_model(folder))
        engine = VLLMEngine(
            tiny_dir, max_model_len=512, kv_cache_memory_bytes=32 * 2**20, in_process=in_process
        )
        report("vllm_sync", model="tiny", seconds=sync_seconds(engine, load_model(tiny_dir), args.repeats))
        engine.close()

    rerun = " ".join(["python", "bench/rollout_speed.py", *sys.argv[1:]])
    print(f"rerun: {rerun}")


if __name__ == "__main__":  # required: the multi-process vLLM engine starts its processes with spawn
    main()
