"""Learn-to-Ask with GRPO: the whole training loop, top to bottom.

    python train.py                                   # embedded default: SmolLM2-135M, synthetic data, CPU
    python train.py --config configs/default_cpu.yaml --steps 5   # a preset, with a flag on top
    python train.py --rollout_engine vllm             # rollouts from a colocated vLLM engine, synced every step
    accelerate launch --config_file configs/accelerate/fsdp_8gpu.yaml train.py --config configs/qwen2.5-7b_8gpu.yaml

Each step:
  1. take ``prompts_per_step`` consultations (each process its share) and sample ``group_size``
     completions for each: a question for the patient, or ``<stop />``;
  2. score every completion: the judge grades correct "continue" questions, ``compute_reward``
     turns decision, content and format into one number (the paper's R = R_s(1 + 2 R_a) + P);
  3. group-relative advantages: how much better each completion is than its siblings;
  4. the clipped policy-gradient loss (plus a KL term to a frozen reference if ``kl_coef > 0``),
     accumulated over micro-batches with global token counts, so N processes and any micro-batch
     size give the same update;
  5. clip the gradient norm and take an optimizer step (skipped if anything is not finite).
Every ``eval_every`` steps the policy answers held-out consultations greedily; every ``save_every``
steps a Hugging Face checkpoint plus the trainer state is written, and ``--resume`` continues a
stopped run exactly.

Under ``accelerate launch`` every process runs this same loop on its share of the prompts, with its
own rollout engine; the few places where processes meet are marked "collective" (every process must
call them, in the same order). N processes give the same update as one (tests/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm import tqdm
from transformers import HfArgumentParser

from l2a.cli import run_command
from l2a.data import load_samples
from l2a.grpo import group_advantages, grpo_loss, token_entropy, token_logprobs
from l2a.model import EMBEDDED_DEFAULT, load_model, load_tokenizer
from l2a.prompts import STOP_TOKEN, policy_messages
from l2a.reward import OpenAIJudge, RubricJudge, score_responses
from l2a.rollout import Completion, HFEngine, PackedBatch, SamplingConfig, completion_logits, pack_completions
from l2a.vllm_engine import full_state_dict_items


def arg(default, help: str):
    """A config field with its documentation (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- what to train on -------------------------------------------------------------------------
    model: str = arg(EMBEDDED_DEFAULT, f"HF checkpoint directory, or {EMBEDDED_DEFAULT!r} (bundled GGUF, converted once).")
    train_file: str = arg("data/synthetic/train.jsonl", "Training samples (JSONL written by `python -m l2a.data`).")
    eval_file: str = arg("data/synthetic/test.jsonl", "Held-out samples for the periodic evaluation.")
    output_dir: str = arg("runs/default", "Metrics, plots and checkpoints go here.")
    backend: str = arg("local", "'local' (torch here, any number of processes) or 'tinker' (sampling and training on Tinker).")
    seed: int = arg(0, "Seeds data order, sampling and initialisation.")
    dtype: str = arg("float32", "Weights and compute of the trained model (and its reference): 'float32', or "
                                "'float64' (exact arithmetic, e.g. to check that splitting a batch changes nothing).")
    # --- rollouts ---------------------------------------------------------------------------------
    prompts_per_step: int = arg(4, "Consultations per optimizer step, over all processes (the paper: 64).")
    group_size: int = arg(4, "Completions sampled per consultation: the GRPO group (the paper: 5).")
    max_new_tokens: int = arg(32, "Completion length limit in tokens (the paper: 1024).")
    temperature: float = arg(1.0, "Sampling temperature; the trainer's log-probabilities use the same one.")
    top_p: float = arg(1.0, "Nucleus sampling threshold for rollouts.")
    rollout_engine: str = arg("hf", "Rollout engine: 'hf' (transformers generate) or 'vllm' (colocated, synced every step).")
    generation_batch_size: int = arg(32, "Sequences generated at once by the HF engine.")
    # --- vLLM engine (rollout_engine=vllm): one per process, colocated with the trainer -----------------
    vllm_dtype: str = arg("float32", "Engine weights: 'float32' (matches the trainer exactly) or 'bfloat16' (GPU).")
    vllm_max_model_len: int = arg(2048, "Longest prompt + completion the engine accepts, in tokens.")
    vllm_kv_cache_gb: float = arg(1.0, "KV cache per engine in GiB (required on CPU); 0 = from vllm_gpu_memory_utilization.")
    vllm_gpu_memory_utilization: float = arg(0.3, "GPU share for the engine when vllm_kv_cache_gb is 0; the trainer keeps the rest.")
    vllm_tensor_parallel_size: int = arg(1, "GPUs per engine; one-process runs only (with N processes, one GPU per engine).")
    vllm_in_process: bool | None = arg(None, "Engine inside the trainer's process (default: yes for one process, else no).")
    vllm_is_correction: bool = arg(False, "Weight each token's policy-gradient term by min(pi_trainer/pi_vllm, vllm_is_cap).")
    vllm_is_cap: float = arg(3.0, "Cap C of the truncated importance-sampling weight.")
    # --- reward -----------------------------------------------------------------------------------
    judge: str = arg("rubric", "'rubric' (offline, deterministic) or 'openai' (an OpenAI-compatible LLM grader).")
    judge_url: str = arg("http://127.0.0.1:8000/v1", "Base URL of the grader endpoint (judge=openai).")
    judge_model: str = arg("Qwen/Qwen2.5-32B-Instruct", "Grader model name (judge=openai).")
    judge_api_key_env: str = arg("OPENAI_API_KEY", "Environment variable holding the grader's API key.")
    judge_concurrency: int = arg(16, "Grader requests in flight at once.")
    train_mode: str = arg("Ra+Rs", "Reward: 'Ra+Rs' (paper), 'Ra' (no stop reward/rule), 'Rs' (no question reward).")
    fusion_mode: str = arg("default", "With Ra+Rs: 'default' = R_s(1+2R_a)+P (hierarchical), 'sum' = R_s+R_a+P.")
    # --- GRPO -------------------------------------------------------------------------------------
    steps: int = arg(16, "Optimizer steps.")
    learning_rate: float = arg(2e-5, "AdamW learning rate, constant (the paper: 5e-7 for 7B).")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    adv_scale: str = arg("group", "Advantage scaling: 'group' (GRPO), 'batch', or 'none' (Dr. GRPO).")
    clip_low: float = arg(0.2, "PPO clip: ratio floor is 1 - clip_low.")
    clip_high: float = arg(0.2, "PPO clip: ratio ceiling is 1 + clip_high (DAPO suggests 0.28).")
    kl_coef: float = arg(0.0, "Weight of the KL penalty to the frozen initial model; 0 loads no reference.")
    kl_estimator: str = arg("k3", "KL estimator: k1, k2 or k3.")
    loss_agg: str = arg("token-mean", "'token-mean', 'seq-mean-token-mean' (GRPO paper) or 'seq-mean-token-sum-norm' (Dr. GRPO).")
    max_grad_norm: float = arg(1.0, "Gradient norm clip.")
    micro_batch_size: int = arg(16, "Completions per forward/backward pass, in whole groups (gradient accumulation inside a step).")
    gradient_checkpointing: bool = arg(False, "Recompute activations in backward: far less memory, more compute (prompts unshared).")
    # --- Tinker backend (backend=tinker) ---------------------------------------------------------------
    tinker_base_model: str = arg("Qwen/Qwen3-8B", "Base model trained with LoRA on Tinker.")
    lora_rank: int = arg(32, "LoRA rank on Tinker.")
    tinker_loss_fn: str = arg("importance_sampling", "Tinker's built-in loss: 'importance_sampling' or 'ppo'.")
    # --- evaluation, logging, checkpoints -------------------------------------------------------
    eval_every: int = arg(8, "Evaluate on held-out samples every N steps (and at the start and end); 0 = never.")
    eval_samples: int = arg(24, "Held-out samples per evaluation (greedy decoding, one completion each).")
    save_every: int = arg(0, "Write a checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = arg(2, "Keep the newest N checkpoints.")
    resume: bool = arg(False, "Continue from the newest checkpoint in output_dir.")
    log_with: str = arg("", "Also log to 'tensorboard' or 'wandb' through accelerate's trackers.")


def parse_config(argv: list[str]) -> Config:
    """Defaults < YAML file (``--config``) < command-line flags."""
    parser = HfArgumentParser(Config)
    parser.add_argument("--config", default=None, help="YAML file with Config fields.")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        with open(known.config) as f:
            overrides = yaml.safe_load(f) or {}
        unknown = sorted(set(overrides) - {f for f in Config.__dataclass_fields__})
        if unknown:
            raise SystemExit(f"error: {known.config}: unknown config keys: {', '.join(unknown)}")
        parser.set_defaults(**overrides)
    config, _ = parser.parse_args_into_dataclasses(argv)
    return config


# --------------------------------------------------------------------------------------------------
# Checkpoints: a Hugging Face model directory plus trainer_state.pt, written atomically.
# --------------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: str) -> Path | None:
    found = sorted((Path(output_dir) / "checkpoints").glob("step-*"))
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------------
# Data order: a fresh permutation per epoch, a pure function of (seed, step) -> resumable for free.
# --------------------------------------------------------------------------------------------------


def prompts_for_step(num_samples: int, step: int, per_step: int, seed: int) -> list[int]:
    indices = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, num_samples)
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        indices.append(int(torch.randperm(num_samples, generator=generator)[offset]))
    return indices


def make_judge(cfg: Config):
    if cfg.judge == "rubric":
        return RubricJudge()
    if cfg.judge == "openai":
        return OpenAIJudge(cfg.judge_url, cfg.judge_model, api_key_env=cfg.judge_api_key_env, concurrency=cfg.judge_concurrency)
    raise SystemExit(f"error: judge must be 'rubric' or 'openai', got {cfg.judge!r}")


def score(judge, samples: list[dict], completions: list[Completion], cfg: Config):
    """Rewards of completions; ``completions[i]`` answers ``samples[completions[i].prompt_index]``."""
    answered = [samples[c.prompt_index] for c in completions]
    scored = score_responses(judge, answered, [c.text for c in completions], cfg.train_mode, cfg.fusion_mode)
    return [s.reward for s in scored]


@torch.no_grad()
def evaluate(policy, judge, samples: list[dict], cfg: Config) -> dict[str, float]:
    """Greedy answers to held-out consultations, scored like training rollouts."""
    chats = [policy_messages(s["messages"], cfg.train_mode) for s in samples]
    completions = policy.generate(chats, 1, SamplingConfig(temperature=0.0, max_new_tokens=cfg.max_new_tokens))
    rewards = score(judge, samples, completions, cfg)
    is_stop = [s["decision_truth"] == "stop" for s in samples]
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {
        "eval/reward": mean([r.total for r in rewards]),
        "eval/decision_accuracy": mean([r.action for r in rewards]),
        "eval/stop_accuracy": mean([r.action for r, s in zip(rewards, is_stop) if s]),
        "eval/continue_accuracy": mean([r.action for r, s in zip(rewards, is_stop) if not s]),
        "eval/content": mean([r.content for r in rewards]),
        "eval/format": mean([r.format for r in rewards]),
    }


# --------------------------------------------------------------------------------------------------
# Running on N processes: the small pieces that differ from one process.
# --------------------------------------------------------------------------------------------------


def across_processes(accelerator: Accelerator, values: list[float], op: str = "sum") -> list[float]:
    """Each value summed (or maxed) over all processes. Collective: every process must call it."""
    local = torch.tensor([values], dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(local)  # [processes, len(values)]
    return (gathered.sum(dim=0) if op == "sum" else gathered.amax(dim=0)).tolist()


def renamed_optimizer_state(state: dict, key) -> dict:
    """The same optimizer state with every parameter key ``k`` replaced by ``key(k)``.

    torch's ``optimizer.state_dict()`` keys parameters by position in the param groups; the FSDP2
    helpers key them by name. Checkpoints always store positions, so any sharding resumes any other.
    """
    return {
        "state": {key(k): v for k, v in state["state"].items()},
        "param_groups": [{**group, "params": [key(k) for k in group["params"]]} for group in state["param_groups"]],
    }


def engine_environment(accelerator: Accelerator) -> dict[str, str]:
    """Under ``accelerate launch`` on GPUs: start this process's vLLM engine on this process's GPU.

    The multi-process engine runs in child processes, which inherit the environment and would all
    pick GPU 0, so they are shown only ours while they start. CUDA is already initialised here, so
    the trainer itself keeps seeing every GPU.
    """
    if accelerator.device.type != "cuda" or accelerator.num_processes == 1:
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return {"CUDA_VISIBLE_DEVICES": visible[accelerator.device.index]}


def full_sequence_logits(model, batch: PackedBatch) -> torch.Tensor:
    """``completion_logits`` without the shared key/value cache, for gradient checkpointing: [B, C, V].

    A checkpointed layer runs its forward pass again during backward, so transformers drops the cache
    under checkpointing (a replay would append to it twice). Each completion then runs with its own
    copy of its prompt, in one pass; the logits are the same (tested), the prompt compute is not shared.
    """
    prompt_mask = batch.prompt_mask[batch.prompt_of]
    attention_mask = torch.cat([prompt_mask, torch.ones_like(batch.completion_ids)], dim=1)
    completion_len = batch.completion_ids.shape[1]
    logits = model(
        input_ids=torch.cat([batch.prompt_ids[batch.prompt_of], batch.completion_ids], dim=1),
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        logits_to_keep=completion_len + 1,  # the last prompt position predicts the first completion token
    ).logits
    return logits[:, :-1]


def sampler_logprobs(completions: list[Completion], width: int) -> torch.Tensor | None:
    """The engine's log-probabilities of the sampled tokens, [B, width] (0 on padding); None if it reports none."""
    if any(c.logprobs is None for c in completions):
        return None
    return torch.tensor([c.logprobs + [0.0] * (width - len(c.logprobs)) for c in completions])


class LocalPolicy:
    """The policy trained in this process with torch: model, optimizer, frozen reference, rollout engine.

    The loop in ``main`` only calls ``generate``, ``update`` and ``save``; ``l2a.tinker_backend``
    offers the same three methods with sampling and training on Tinker instead. Under FSDP2 the model,
    the reference and the optimizer state are sharded over the processes; everything that needs whole
    weights (the rollout engine, checkpoints) gathers them.
    """

    def __init__(self, cfg: Config, accelerator: Accelerator, resume_from: Path | None):
        self.cfg, self.accelerator = cfg, accelerator
        if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
            raise SystemExit("error: FSDP1 is not supported: set `fsdp_version: 2` in the accelerate config")
        self.sharded = accelerator.is_fsdp2  # each process holds one shard of every weight
        path = str(resume_from) if resume_from else cfg.model
        self.tokenizer = load_tokenizer(path)
        self.dtype = getattr(torch, cfg.dtype)
        model = load_model(path, self.dtype)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # fused: one kernel for all parameters instead of a dozen elementwise passes (0.65 -> 0.22 s per step
        # for SmolLM2-135M on 2 CPU cores, bench/vs_trl.py); the same AdamW update.
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      fused=True)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if resume_from:
            self.load_optimizer_state(trainer_state(resume_from)["optimizer"])
        # Checkpointed layers (ours, or accelerate's FSDP activation checkpointing) cannot keep a cache.
        fsdp_checkpointing = self.sharded and accelerator.state.fsdp_plugin.activation_checkpointing
        checkpointing = cfg.gradient_checkpointing or fsdp_checkpointing
        self.completion_logits = full_sequence_logits if checkpointing else completion_logits
        self.reference = None
        if cfg.kl_coef:  # the frozen starting point: never the resumed weights
            self.reference = self.prepare_frozen(load_model(cfg.model, self.dtype).eval().requires_grad_(False))
        self.replica = None  # a full copy of the weights for the HF engine under FSDP2 (see make_engine)
        self.engine = self.make_engine(path)

    def prepare_frozen(self, model):
        """The reference, placed like the policy. ``evaluation_mode`` would keep a whole copy on every
        process (under FSDP even on the CPU), so under FSDP2 it is sharded like the policy instead."""
        if self.sharded:
            from accelerate.utils import fsdp2_prepare_model

            return fsdp2_prepare_model(self.accelerator, model)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def make_engine(self, path: str):
        cfg, accelerator = self.cfg, self.accelerator
        if cfg.vllm_is_correction and cfg.rollout_engine != "vllm":
            raise SystemExit("error: vllm_is_correction needs rollout_engine: vllm (the HF engine reports no logprobs)")
        if cfg.rollout_engine == "hf":
            if not self.sharded:
                return HFEngine(accelerator.unwrap_model(self.model), self.tokenizer, cfg.generation_batch_size)
            # A sharded model gathers its weights in every forward pass, a collective, and processes stop
            # generating at different lengths: sample from a full replica instead, synced after every step.
            self.replica = load_model(path, self.dtype).to(accelerator.device).eval().requires_grad_(False)
            return HFEngine(self.replica, self.tokenizer, cfg.generation_batch_size)
        if cfg.rollout_engine != "vllm":
            raise SystemExit(f"error: rollout_engine must be 'hf' or 'vllm', got {cfg.rollout_engine!r}")
        if cfg.top_p != 1.0:
            # vLLM then reports log-probabilities renormalised over the nucleus, not the trainer's.
            message = f"top_p={cfg.top_p}: vLLM's log-probabilities differ from the trainer's (use top_p 1)"
            if cfg.vllm_is_correction:
                raise SystemExit(f"error: vllm_is_correction with {message}")
            accelerator.print(f"warning: {message}")
        if cfg.vllm_tensor_parallel_size > 1 and accelerator.num_processes > 1:
            raise SystemExit("error: vllm_tensor_parallel_size > 1 works for single-process runs only")
        from l2a.vllm_engine import VLLMEngine, environment

        with environment(engine_environment(accelerator)):
            return VLLMEngine(
                path,
                dtype=cfg.vllm_dtype,
                max_model_len=cfg.vllm_max_model_len,
                kv_cache_memory_bytes=int(cfg.vllm_kv_cache_gb * 2**30) or None,
                gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                seed=cfg.seed,
                in_process=cfg.vllm_in_process,
            )

    def generate(self, chats: list[list[dict]], n: int, sampling: SamplingConfig) -> list[Completion]:
        return self.engine.generate(chats, n, sampling)

    def update(self, completions: list[Completion], advantages: torch.Tensor) -> dict[str, float]:
        """Steps 4 and 5: the GRPO loss over micro-batches, one optimizer step, then the weight sync."""
        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        # The loss divides by the counts of the whole batch (all processes, all micro-batches), so the
        # pieces add up to the loss of the whole batch however it is split.
        (num_tokens,) = across_processes(accelerator, [sum(len(c.token_ids) for c in completions)])
        sums: dict[str, float] = {}  # statistics summed over this process's tokens (the loss: its pieces)
        largest_gap = 0.0
        # Micro-batches hold whole groups, so each prompt's forward pass is shared by its group (rollout.py).
        per_micro = max(cfg.group_size, cfg.micro_batch_size // cfg.group_size * cfg.group_size)
        starts = range(0, len(completions), per_micro)
        for i, start in enumerate(starts):
            part = completions[start : start + per_micro]
            # Only the last micro-batch synchronises gradients across processes.
            with accelerator.no_sync(model) if i < len(starts) - 1 else contextlib.nullcontext():
                loss, part_sums, gap = self.micro_batch_loss(part, advantages[start : start + len(part)], num_tokens)
                # DDP/FSDP average gradients over processes; the loss already divides by global counts.
                accelerator.backward(loss * accelerator.num_processes)
            for key, value in part_sums.items():
                sums[key] = sums.get(key, 0.0) + value
            largest_gap = max(largest_gap, gap)

        totals = dict(zip(sums, across_processes(accelerator, list(sums.values()))))  # same keys everywhere
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        applied = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
        if applied:  # a non-finite loss or gradient would poison the weights and Adam's moments
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync_seconds = self.sync_rollout_weights() if applied else 0.0
        metrics = {"loss": totals.pop("loss"), "grad_norm": grad_norm, "applied": applied, "time/sync": sync_seconds}
        metrics.update({key: total / max(num_tokens, 1) for key, total in totals.items()})
        if "sampler_logprob_diff" in metrics:
            metrics["sampler_logprob_diff_max"] = across_processes(accelerator, [largest_gap], op="max")[0]
        return metrics

    def micro_batch_loss(self, part: list[Completion], advantages: torch.Tensor, num_tokens: float):
        """Loss of a few groups (the gradient flows through it) and their statistics summed over tokens."""
        cfg = self.cfg
        batch = self.pack(part)
        mask = batch.completion_mask
        logits = self.completion_logits(self.model, batch)
        logprobs = token_logprobs(logits, batch.completion_ids, cfg.temperature)
        entropy = token_entropy(logits, cfg.temperature)
        del logits  # [b, C, V] is the biggest tensor of the step: free it before backward
        ref_logprobs = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logits = completion_logits(self.reference, batch)
                ref_logprobs = token_logprobs(ref_logits, batch.completion_ids, cfg.temperature)
        # Summed over tokens; the same keys, in the same order, on every process (they are summed across).
        sums, largest_gap, token_weights = {"entropy": (entropy * mask).sum().item()}, 0.0, None
        sampled = sampler_logprobs(part, mask.shape[1])  # None with the HF engine
        if sampled is not None:
            # How far the engine's numbers are from the trainer's, for the same weights and tokens.
            log_ratio = logprobs.detach() - sampled.to(mask.device)
            gap = log_ratio.abs() * mask
            sums["sampler_logprob_diff"], largest_gap = gap.sum().item(), gap.max().item()
            if cfg.vllm_is_correction:
                # Truncated importance sampling: the tokens were drawn from the engine's distribution.
                token_weights = torch.exp(log_ratio).clamp(max=cfg.vllm_is_cap)
                sums["is_weight_mean"] = (token_weights * mask).sum().item()
        loss, stats = grpo_loss(
            logprobs,
            logprobs.detach(),  # one pass per batch: pi_old = pi, ratio 1 (see grpo.py)
            advantages,
            mask,
            ref_logprobs,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            kl_coef=cfg.kl_coef,
            kl_estimator=cfg.kl_estimator,
            loss_agg=cfg.loss_agg,
            num_tokens=num_tokens,
            max_len=cfg.max_new_tokens,
            num_seqs=cfg.prompts_per_step * cfg.group_size,
            token_weights=token_weights,
        )
        sums["loss"] = loss.item()
        n = mask.sum().item()
        for key in ("clip_low_frac", "clip_high_frac", "ratio_mean", "kl_mean"):
            sums[key] = stats[key].item() * n
        return loss, sums, largest_gap

    def pack(self, part: list[Completion]) -> PackedBatch:
        """The completions as tensors on this process's device."""
        batch = pack_completions(part, self.tokenizer.pad_token_id)
        if self.sharded and batch.completion_ids.shape[1] == 1:
            # completion_logits skips its second pass when every completion is one token long; under FSDP
            # each pass is a collective, so all processes must run both: add a padding column (mask 0).
            pad = torch.full_like(batch.completion_ids, self.tokenizer.pad_token_id)
            batch = replace(batch, completion_ids=torch.cat([batch.completion_ids, pad], 1),
                            completion_mask=torch.cat([batch.completion_mask, torch.zeros_like(batch.completion_mask)], 1))
        return PackedBatch(**{f.name: getattr(batch, f.name).to(self.accelerator.device) for f in fields(batch)})

    def sync_rollout_weights(self) -> float:
        """Make the rollout engine sample with the weights just trained; returns the seconds taken.

        Collective under FSDP2: ``full_state_dict_items`` gathers every weight, so each process walks all
        weights in the same order, each into its own engine. The HF engine on an unsharded model samples
        from the trained module itself, so it needs nothing.
        """
        if self.cfg.rollout_engine == "vllm":
            return self.engine.sync_weights(full_state_dict_items(self.model))
        if self.replica is None:
            return 0.0
        started = time.perf_counter()
        self.replica.load_state_dict(dict(full_state_dict_items(self.model)))
        return time.perf_counter() - started

    def optimizer_state(self) -> dict:
        """``optimizer.state_dict()`` as one process would have it. Collective under FSDP2 (gathers the
        shards); the main process gets the state, the others an empty dict."""
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        by_name = get_optimizer_state_dict(self.model, self.optimizer.optimizer, options=options)
        if not by_name:
            return {}
        names = [name for group in by_name["param_groups"] for name in group["params"]]
        return renamed_optimizer_state(by_name, names.index)

    def load_optimizer_state(self, state: dict) -> None:
        """The inverse of ``optimizer_state``; under FSDP2 each process keeps its shard."""
        if not self.sharded:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        name_of = {param: name for name, param in self.model.named_parameters()}
        names = [name_of[p] for group in self.optimizer.param_groups for p in group["params"]]
        by_name = renamed_optimizer_state(state, names.__getitem__)
        set_optimizer_state_dict(self.model, self.optimizer.optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        """Stop the vLLM engine: its processes, or (in-process) the torch.distributed group it made."""
        if self.cfg.rollout_engine == "vllm":
            self.engine.close()

    def save(self, step: int, trainer_state: dict) -> Path:
        """A Hugging Face model directory plus ``trainer_state.pt``, written atomically."""
        accelerator, cfg = self.accelerator, self.cfg
        out = Path(cfg.output_dir) / "checkpoints"
        final = out / f"step-{step:06d}"
        # Both gather shards under FSDP2 (collectives): every process calls them, the main one writes.
        state_dict = accelerator.get_state_dict(self.model)
        optimizer_state = self.optimizer_state()
        if accelerator.is_main_process:
            tmp = out / f".tmp-step-{step:06d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            model = accelerator.unwrap_model(self.model)
            if self.sharded:  # gathered tensors share no storage: re-tie, so a tied weight is written once
                state_dict.update({name: state_dict[source] for name, source in model.all_tied_weights_keys.items()})
            model.save_pretrained(tmp, state_dict=state_dict)
            self.tokenizer.save_pretrained(tmp)
            torch.save({"optimizer": optimizer_state, **trainer_state}, tmp / "trainer_state.pt")
            (tmp / "l2a_config.json").write_text(json.dumps(asdict(cfg), indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # a checkpoint directory exists only once it is complete
            for old in sorted(out.glob("step-*"))[: -cfg.keep_checkpoints]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final


def trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer_state.pt", weights_only=False)


def resume_position(checkpoint: Path) -> tuple[int, int]:
    """(step, skipped_steps) of a checkpoint. The file also holds the optimizer state (twice the model's
    size); memory-mapping it reads only these two numbers, and nothing stays loaded for the whole run."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False, mmap=True)
    return state["step"], state["skipped_steps"]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    # Without GPUs, `accelerate launch` runs CPU processes that talk over gloo (DDP).
    cpu = not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, log_with=cfg.log_with or None, project_dir=cfg.output_dir)
    set_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.prompts_per_step % world:
        raise SystemExit(f"error: prompts_per_step={cfg.prompts_per_step} must be a multiple of {world} processes")

    train_samples = load_samples(cfg.train_file)
    eval_samples = load_samples(cfg.eval_file)[: cfg.eval_samples] if cfg.eval_every else []
    judge = make_judge(cfg)

    start_step, skipped_steps, resume_from = 0, 0, None
    if cfg.resume and (resume_from := latest_checkpoint(cfg.output_dir)) is not None:
        start_step, skipped_steps = resume_position(resume_from)
        accelerator.print(f"resuming from {resume_from} (step {start_step})")
    if cfg.backend == "local":
        policy = LocalPolicy(cfg, accelerator, resume_from)
    elif cfg.backend == "tinker":
        from l2a.tinker_backend import TinkerPolicy

        policy = TinkerPolicy(cfg, resume_from)
    else:
        raise SystemExit(f"error: backend must be 'local' or 'tinker', got {cfg.backend!r}")

    accelerator.init_trackers("l2a", config=asdict(cfg))
    metrics_file = out_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None and metrics_file.exists():
            metrics_file.unlink()  # a fresh run starts a fresh log
        elif resume_from is not None:  # drop lines written after the checkpoint we resume from
            kept = [l for l in metrics_file.read_text().splitlines() if l and json.loads(l)["step"] <= start_step]
            metrics_file.write_text("".join(l + "\n" for l in kept))

    def log(metrics: dict, step: int) -> None:
        accelerator.log(metrics, step=step)
        if accelerator.is_main_process:
            with metrics_file.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    try:
        if eval_samples and start_step == 0:
            log(evaluate(policy, judge, eval_samples, cfg), step=0)

        progress = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
                        disable=not accelerator.is_main_process, desc="grpo")
        for step in progress:
            t0 = time.perf_counter()
            # ---- 1. rollouts: this process's share of the step's prompts, group_size completions each ----
            indices = prompts_for_step(len(train_samples), step, cfg.prompts_per_step, cfg.seed)
            my_samples = [train_samples[i] for i in indices[rank::world]]
            sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                      seed=cfg.seed * 1_000_003 + step * 1_009 + rank)
            chats = [policy_messages(s["messages"], cfg.train_mode) for s in my_samples]
            completions = policy.generate(chats, cfg.group_size, sampling)
            t1 = time.perf_counter()

            # ---- 2. rewards: the judge grades correct "continue" questions, compute_reward does the rest -
            rewards = score(judge, my_samples, completions, cfg)
            local = torch.tensor([[r.total, r.action, r.content, r.format, len(c.token_ids), float(STOP_TOKEN in c.text)]
                                  for r, c in zip(rewards, completions)], device=accelerator.device)
            t2 = time.perf_counter()

            # ---- 3. advantages: every group is whole on one process; gather so "batch" scaling sees all --
            everything = accelerator.gather(local)  # [prompts_per_step * group_size, 6], in rank order (collective)
            advantages = group_advantages(everything[:, 0], cfg.group_size, cfg.adv_scale).view(world, -1)[rank]

            # ---- 4.+5. loss, backward, optimizer step (skipped if anything is not finite) --------------
            update = policy.update(completions, advantages)
            if not update.pop("applied"):
                skipped_steps += 1
                accelerator.print(f"step {step + 1}: non-finite loss or gradient, update skipped")
            t3 = time.perf_counter()

            # ---- logging: whole-batch numbers (all processes) ----------------------------------------------
            parts = everything.mean(dim=0)
            groups = everything[:, 0].view(-1, cfg.group_size)
            metrics = {
                "reward": parts[0].item(),
                "reward_std": everything[:, 0].std().item(),
                "reward_action": parts[1].item(),
                "reward_content": parts[2].item(),
                "reward_format": parts[3].item(),
                "decision_accuracy": parts[1].item(),
                "frac_zero_std_groups": (groups.max(1).values == groups.min(1).values).float().mean().item(),
                **update,
                "completion_length": parts[4].item(),
                "stop_rate": parts[5].item(),
                "tokens_per_second": everything[:, 4].sum().item() / (t1 - t0),
                "time/generate": t1 - t0,
                "time/judge": t2 - t1,
                "time/train": t3 - t2,
                "skipped_steps": skipped_steps,
            }
            if eval_samples and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                metrics.update(evaluate(policy, judge, eval_samples, cfg))
            log(metrics, step=step + 1)
            progress.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['decision_accuracy']:.2f}")

            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
                policy.save(step + 1, {"step": step + 1, "skipped_steps": skipped_steps})

    finally:
        if cfg.backend == "local":
            policy.close()  # first: end_training destroys the default process group, an in-process engine's too
    accelerator.end_training()
    if accelerator.is_main_process:
        from l2a.plot import plot_run

        accelerator.print(f"curves: {plot_run(out_dir)}")


def interrupted_hint(argv: list[str]) -> str:
    """What a stopped run kept, and how to continue it."""
    last = latest_checkpoint(parse_config(argv).output_dir)
    if last is None:
        return "no checkpoint was written yet; start again (metrics.jsonl keeps the steps logged so far)"
    return f"the newest checkpoint is {last}; continue from it with --resume true"


if __name__ == "__main__":
    sys.exit(run_command(main, resume_hint=lambda: interrupted_hint(sys.argv[1:])))
