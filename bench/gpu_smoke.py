"""GPU smoke test: train.py's FSDP2 path on this machine's GPUs for a few steps, with gradient checkpointing, a KL
reference, checkpoints and a resume; then each phase's peak memory against ``l2a.memory``'s budget.

    python bench/gpu_smoke.py            # every visible GPU; a ~0.7B random Llama built here, bf16 compute
    python bench/gpu_smoke.py --cpu      # the reduced mode that CI runs: 2 CPU processes (gloo), the tiny model

Nothing is downloaded (the model is built from a config, the tokenizer trained on the spot, the data is the bundled
synthetic set, the judge the offline rubric). Rollouts come from a colocated vLLM engine when ``vllm`` imports, else
from transformers' generate. Needs only torch, transformers, accelerate and pyyaml (no openai, gguf or vllm).
Exit status 0 when both runs finished, the resumed run continued the first, and (on GPUs) no phase exceeded the
budget; the report is printed either way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # run from anywhere; the model builder lives with the tests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="2 CPU processes and the tiny model (CI).")
    parser.add_argument("--steps", type=int, default=3, help="Steps in all; the first run stops one before.")
    parser.add_argument("--out", default=None, help="Work folder (default: a new temporary one).")
    args = parser.parse_args()
    import torch

    from tiny_model import make_tiny_model

    started = time.perf_counter()
    gpus = 0 if args.cpu else torch.cuda.device_count()
    if not args.cpu and not gpus:
        print("error: no GPU visible (use --cpu for the reduced CPU mode)", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="l2a-gpu-smoke-"))
    shape = {} if args.cpu else dict(hidden=2048, layers=16, kv_heads=4, intermediate=5504)
    model_dir = make_tiny_model(out / "model", **shape)
    vllm = not args.cpu and importlib.util.find_spec("vllm") is not None
    train_args = [
        "--model", str(model_dir), "--train_file", str(REPO / "data/synthetic/train.jsonl"),
        "--eval_file", str(REPO / "data/synthetic/test.jsonl"), "--output_dir", str(out / "run"),
        "--prompts_per_step", str(2 if args.cpu else 8 * gpus), "--group_size", "4",
        "--max_new_tokens", "8" if args.cpu else "128", "--micro_batch_size", "4" if args.cpu else "8",
        "--gradient_checkpointing", "true", "--kl_coef", "0.01", "--sft_steps", "0", "--eval_every", "0",
        "--save_every", "1",
        "--learning_rate", "1e-5", "--judge", "rubric", "--rollout_engine", "vllm" if vllm else "hf",
        *([] if not vllm else ["--vllm_dtype", "bfloat16", "--vllm_kv_cache_gb", "0", "--vllm_sleep_mode", "true",
                               "--vllm_gpu_memory_utilization", "0.3"]),
    ]
    launch = accelerate_config(out, gpus)
    runs = [launch_training(launch, args.cpu, [*train_args, "--steps", str(args.steps - 1)]),
            launch_training(launch, args.cpu, [*train_args, "--steps", str(args.steps), "--resume", "true"])]
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in rows] == list(range(1, args.steps + 1))
    print(f"\n# gpu_smoke: {'CPU (2 processes)' if args.cpu else f'{gpus} GPU(s)'}, rollouts "
          f"{'vLLM' if vllm else 'transformers'}, {args.steps} steps (run 1: {runs[0]:.0f} s, run 2 resumed: "
          f"{runs[1]:.0f} s), total {time.perf_counter() - started:.0f} s; steps logged {[r['step'] for r in rows]}")
    within = report_memory(rows, model_dir, train_args, gpus, launch)
    return 0 if resumed and within else 1


def accelerate_config(out: Path, gpus: int) -> Path:
    """FSDP2 over every GPU with bf16 compute (as configs/accelerate/fsdp_8gpu.yaml); on CPU, two gloo processes."""
    if not gpus:
        return REPO / "configs/accelerate/cpu_2proc.yaml"
    import yaml

    config = yaml.safe_load((REPO / "configs/accelerate/fsdp_8gpu.yaml").read_text())
    config["num_processes"] = gpus
    path = out / "accelerate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch_training(config: Path, cpu: bool, train_args: list[str]) -> float:
    """``accelerate launch`` this file as a worker around train.main; the seconds it took."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(port), __file__, "--worker", *(["--cpu"] if cpu else []), *train_args]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    return time.perf_counter() - started


def worker(cpu: bool, train_args: list[str]) -> None:
    import train

    if cpu:  # accelerate enables FSDP on GPU groups only; tests/fsdp_on_cpu.py explains the switch
        from accelerate import Accelerator
        from fsdp_on_cpu import shard_with_fsdp2

        def sharded_accelerator(*args, **kwargs) -> Accelerator:
            accelerator = Accelerator(*args, **kwargs)
            shard_with_fsdp2(accelerator)
            return accelerator

        train.Accelerator = sharded_accelerator
    train.main(train_args)


def report_memory(rows: list[dict], model_dir: Path, train_args: list[str], gpus: int, launch: Path) -> bool:
    """Each phase's measured peak (the most any step used) beside the budget's; True if all are within it."""
    import yaml

    import train
    from l2a.data import load_samples
    from l2a.memory import GiB, Architecture, Shapes, budget
    from l2a.model import load_tokenizer
    from l2a.prompts import policy_messages
    from l2a.rollout import encode_chat

    cfg = train.parse_config([*train_args, "--steps", "1"])
    tokenizer = load_tokenizer(str(model_dir))
    prompt_tokens = max(len(encode_chat(tokenizer, policy_messages(s["messages"])))
                        for s in load_samples(cfg.train_file)[:64])
    compute = 2 if yaml.safe_load(launch.read_text()).get("mixed_precision") == "bf16" else 4
    arch = Architecture.from_config(json.loads((model_dir / "config.json").read_text()))
    gpu_bytes = 0
    if gpus:
        import torch

        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    parts = budget(cfg, arch, Shapes(processes=max(gpus, 2), prompt_tokens=prompt_tokens, compute_bytes=compute),
                   gpu_bytes)
    planned = {"train": sum(p[1] for p in parts) / GiB, "generate": sum(p[2] for p in parts) / GiB}
    print(f"# {arch.parameters() / 1e9:.2f}B parameters; prompts up to {prompt_tokens} tokens")
    print("| phase | budget | torch allocated (peak) | device used (end of phase) |\n|---|---:|---:|---:|")
    within = True
    for phase in ("generate", "train"):
        allocated = max((r.get(f"memory/{phase}_allocated_gb", 0.0) for r in rows), default=0.0)
        device = max((r.get(f"memory/{phase}_device_gb", 0.0) for r in rows), default=0.0)
        measured = "n/a (CPU)" if not gpus else f"{allocated:.1f} GiB"
        print(f"| {phase} | {planned[phase]:.1f} GiB | {measured} | {'n/a' if not gpus else f'{device:.1f} GiB'} |")
        within &= not gpus or device <= planned[phase]
    return within


if __name__ == "__main__":
    if "--worker" in sys.argv:
        rest = [a for a in sys.argv[1:] if a not in ("--worker", "--cpu")]
        worker("--cpu" in sys.argv, rest)
    else:
        sys.exit(main())
