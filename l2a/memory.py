"""The per-GPU memory budget of a training config, before anyone pays for a GPU.

    python -m l2a.memory --config configs/qwen2.5-7b_8gpu.yaml --accelerate configs/accelerate/fsdp_8gpu.yaml

What one GPU holds while train.py runs, part by part, in the two phases of a step (rollouts: the colocated vLLM
engine samples; training: forward and backward of one micro-batch). The formulas follow the code:

- policy weights, gradients, AdamW's two moments: float32, sharded over the processes by FSDP2 (1/N each);
  gradients exist from the first backward to the optimizer step (``zero_grad(set_to_none=True)``);
- the frozen reference (``kl_coef > 0``): stored like the policy;
- gathered weights: with N > 1, FSDP2 unshards a decoder layer (and prefetches the next) in the compute dtype,
  and keeps the root's parameters (embeddings, output layer) whole from forward to backward;
- the vLLM engine: ``vllm_gpu_memory_utilization`` of the GPU (weights and KV cache) while it samples; nothing
  during training when it sleeps (``vllm_sleep_mode``);
- activations kept for backward (``l2a.logprobs``): one micro-batch's tokens are the distinct prompts once plus
  the completions; with gradient checkpointing each layer keeps only its input (``tokens x hidden``), plus one
  layer's full activations while it is recomputed; the completions' view of the prompt cache (keys and values)
  is kept for every layer;
- logits: ``logprob_chunk_tokens`` rows of vocabulary-sized logits at a time, in the compute dtype, in float32,
  and the softmax of backward;
- the CUDA context, NCCL buffers and allocator fragmentation: a fixed 3 GiB plus 5%.

The per-token activation constants were measured on CPU with small Llama shapes (tests/test_memory.py checks
the formulas against autograd's saved tensors and the optimizer's state).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

GiB = 2**30
CONTEXT_BYTES = 3 * GiB
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer (the fields of a Hugging Face ``config.json``)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    attention_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_parameters(self) -> int:
        q, kv, hidden = self.heads * self.head_dim, self.kv_dim, self.hidden
        attention = hidden * q + 2 * hidden * kv + q * hidden + ((q + 2 * kv) if self.attention_bias else 0)
        return attention + 3 * hidden * self.intermediate + 2 * hidden

    def root_parameters(self) -> int:
        """Embeddings, the output layer (unless tied to them) and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def parameters(self) -> int:
        return self.layers * self.layer_parameters() + self.root_parameters()

    @classmethod
    def from_config(cls, config: dict) -> Architecture:
        return cls(hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                   heads=config["num_attention_heads"],
                   kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                   intermediate=config["intermediate_size"], vocab=config["vocab_size"],
                   tied=bool(config.get("tie_word_embeddings", False)),
                   attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")))


KNOWN = {  # config.json values of models a preset names by a path that may not exist here
    "Qwen2.5-7B-Instruct": Architecture(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                                        vocab=152064, tied=False, attention_bias=True),
}


def layer_activation_elements(arch: Architecture, tokens: int) -> float:
    """Elements one decoder layer keeps for backward per micro-batch, without checkpointing (measured on CPU:
    ~19 hidden-sized and 4 intermediate-sized vectors per token, and the keys and values; the attention scores
    of a math kernel come on top, which GPU kernels do not keep)."""
    return tokens * (19 * arch.hidden + 4 * arch.intermediate + arch.kv_dim)


def checkpointed_activation_elements(arch: Architecture, tokens: int) -> float:
    """With checkpointing each layer keeps its input; one layer at a time recomputes its full activations."""
    return arch.layers * tokens * arch.hidden + layer_activation_elements(arch, tokens)


@dataclass(frozen=True)
class Shapes:
    """What one process computes in a step."""

    processes: int
    prompt_tokens: int
    compute_bytes: int  # 2 for bf16 mixed precision, 4 for float32

    def micro_batch(self, cfg) -> tuple[int, int]:
        """(completions, distinct prompts) of one micro-batch (whole groups, as LocalPolicy splits them)."""
        per_process = cfg.prompts_per_step // self.processes * cfg.group_size
        completions = min(max(cfg.group_size, cfg.micro_batch_size // cfg.group_size * cfg.group_size), per_process)
        return completions, max(1, completions // cfg.group_size)


def budget(cfg, arch: Architecture, shapes: Shapes, gpu_bytes: int) -> list[tuple[str, float, float]]:
    """(part, bytes in the training phase, bytes in the rollout phase) for one GPU."""
    n, params = shapes.processes, arch.parameters()
    shard = params * 4 / n  # float32 master weights, one shard per process
    completions, prompts = shapes.micro_batch(cfg)
    tokens = prompts * shapes.prompt_tokens + completions * cfg.max_new_tokens
    cb = shapes.compute_bytes
    activations = (checkpointed_activation_elements(arch, tokens) if cfg.gradient_checkpointing
                   else arch.layers * layer_activation_elements(arch, tokens)) * cb
    prompt_cache = arch.layers * completions * shapes.prompt_tokens * 2 * arch.kv_dim * cb
    rows = max(1, cfg.logprob_chunk_tokens // cfg.max_new_tokens)
    logits = min(rows, completions) * cfg.max_new_tokens * arch.vocab * (cb + 4 + 4)
    gathered = (2 * arch.layer_parameters() + arch.root_parameters()) * cb if n > 1 else 0
    engine = 0.0
    if cfg.rollout_engine == "vllm":
        engine = (cfg.vllm_gpu_memory_utilization * gpu_bytes if not cfg.vllm_kv_cache_gb
                  else params * 2 + cfg.vllm_kv_cache_gb * GiB)
    parts = [
        ("policy weights (float32, 1/N)", shard, shard),
        ("gradients (float32, 1/N)", shard, 0.0),
        ("AdamW moments (float32, 1/N)", 2 * shard, 2 * shard),
        ("frozen reference (float32, 1/N)", shard if cfg.kl_coef else 0.0, shard if cfg.kl_coef else 0.0),
        ("gathered layers and root", gathered, 0.0),
        ("vLLM engine", 0.0 if cfg.vllm_sleep_mode else engine, engine),
        ("activations kept for backward", activations, 0.0),
        ("prompt keys/values of the completions", prompt_cache, 0.0),
        (f"logits ({min(rows, completions)} rows x {cfg.max_new_tokens} tokens)", logits, 0.0),
    ]
    train, rollout = (sum(p[i] for p in parts) for i in (1, 2))
    parts.append(("CUDA context, buffers, fragmentation", CONTEXT_BYTES + FRAGMENTATION * train,
                  CONTEXT_BYTES + FRAGMENTATION * rollout))
    return parts


def format_budget(parts: list[tuple[str, float, float]], gpu_bytes: int) -> str:
    lines = ["| part | training phase | rollout phase |", "|---|---:|---:|"]
    for name, train, rollout in parts:
        lines.append(f"| {name} | {train / GiB:.1f} GiB | {rollout / GiB:.1f} GiB |")
    train, rollout = (sum(p[i] for p in parts) for i in (1, 2))
    peak = max(train, rollout)
    lines.append(f"| **total** | **{train / GiB:.1f} GiB** | **{rollout / GiB:.1f} GiB** |")
    lines.append(f"\npeak {peak / GiB:.1f} GiB of {gpu_bytes / GiB:.0f} GiB: margin {(gpu_bytes - peak) / GiB:.1f} GiB "
                 f"({100 * (gpu_bytes - peak) / gpu_bytes:.0f}%)")
    return "\n".join(lines)


def architecture_of(model: str) -> Architecture:
    """The architecture from a model directory's config.json, else a known model named by the path's last part."""
    from l2a.model import EMBEDDED_DEFAULT, cache_dir

    folder = cache_dir() / "SmolLM2-135M-Instruct" if model == EMBEDDED_DEFAULT else Path(model)
    if (folder / "config.json").exists():
        return Architecture.from_config(json.loads((folder / "config.json").read_text()))
    if folder.name in KNOWN:
        return KNOWN[folder.name]
    raise ValueError(f"{model}: no config.json there, and not one of {', '.join(KNOWN)}")


def main(argv: list[str] | None = None) -> int:
    import train
    from l2a.cli import UserError, run_command

    parser = argparse.ArgumentParser(prog="python -m l2a.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="A train.py preset (YAML).")
    parser.add_argument("--accelerate", default=None, help="The accelerate config it runs with (processes, bf16).")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="Memory of one GPU in GiB.")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="Typical prompt length (RealMedConv: ~1k).")
    args = parser.parse_args(argv)

    def report() -> None:
        cfg = train.parse_config(["--config", args.config])
        launch = yaml.safe_load(Path(args.accelerate).read_text()) if args.accelerate else {}
        processes = int(launch.get("num_processes", 1))
        compute = 2 if launch.get("mixed_precision") in ("bf16", "fp16") else 4
        try:
            arch = architecture_of(cfg.model)
        except ValueError as err:
            raise UserError(str(err)) from None
        gpu = int(args.gpu_gb * GiB)
        shapes = Shapes(processes=processes, prompt_tokens=args.prompt_tokens, compute_bytes=compute)
        print(f"{args.config}: {arch.parameters() / 1e9:.2f}B parameters, {processes} process(es), "
              f"{'bf16' if compute == 2 else 'float32'} compute, {args.gpu_gb:g} GiB per GPU, "
              f"prompts ~{args.prompt_tokens} tokens\n")
        print(format_budget(budget(cfg, arch, shapes, gpu), gpu))

    return run_command(report, resume_hint="nothing to resume")


if __name__ == "__main__":
    sys.exit(main())
