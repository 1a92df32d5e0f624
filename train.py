"""Learn-to-Ask with GRPO: the Config, then the training loop, top to bottom.

    python train.py                                   # embedded default: SmolLM2-135M, synthetic data, CPU
    python train.py --config configs/default_cpu.yaml --steps 5   # a preset, with a flag on top
    python train.py --rollout_engine vllm             # rollouts from a colocated vLLM engine, synced every step
    python train.py --config configs/tinker_qwen.yaml # sampling and LoRA training on Tinker
    accelerate launch --config_file configs/accelerate/fsdp_8gpu.yaml train.py --config configs/qwen2.5-7b_8gpu.yaml

First, unless ``sft_steps`` is 0, a supervised warm start (``warm_start``, ``l2a.sft``): the base model never
samples ``<stop />``, so GRPO alone could never reward stopping; a few steps of imitating the logged next turn put it
among the samples. Then each GRPO step:
  1. rollouts: take ``prompts_per_step`` consultations (each process its share) and sample ``group_size``
     completions for each: a question for the patient, or ``<stop />``;
  2. rewards: the judge grades correct "continue" questions, ``compute_reward`` turns decision, content and
     format into one number (the paper's R = R_s (1 + 2 R_a) + P);
  3. advantages: how much better each completion is than its siblings (``group_advantages``);
  4. update: the clipped policy-gradient loss (plus a KL term to a frozen reference if ``kl_coef > 0``) over
     micro-batches, with the token counts of what is trained on, and an optimizer step (``policy.update``):
     once per batch by default, or ``ppo_epochs`` passes over ``mini_batches`` slices of it, the ratio taken
     against log pi_old from before the batch's first step; then the rollout engine gets the new weights, after
     every step or (``sync_interval``) every k optimizer steps, a lagging sampler as in the reference run;
  5. log, evaluate on held-out consultations every ``eval_every`` steps, save every ``save_every`` steps.
``--resume true`` continues a stopped run exactly. The policy is ``l2a.local_policy.LocalPolicy`` (torch here,
any number of processes) or ``l2a.tinker_backend.TinkerPolicy``: the loop is the same.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from tqdm import tqdm

from l2a.checkpoint import latest_checkpoint, resume_position, truncate_metrics
from l2a.cli import UserError, arg, parse_dataclass, run_command
from l2a.data import batch_indices, evenly_spaced, load_samples
from l2a.grpo import AdvantageScale, KLEstimator, LossAggregation, group_advantages
from l2a.judges import TRAINING_GRADER, make_judge, score_responses
from l2a.metrics import compute_metrics, graded_record
from l2a.model import EMBEDDED_DEFAULT, fastest_dtype
from l2a.prompts import STOP_TOKEN, policy_messages
from l2a.reward import FusionMode, TrainMode
from l2a.rollout import SamplingConfig


@dataclass
class Config:
    # --- what to train on -------------------------------------------------------------------------
    model: str = arg(EMBEDDED_DEFAULT, f"HF checkpoint directory, or {EMBEDDED_DEFAULT!r} (bundled GGUF, converted once).")
    train_file: str = arg("data/synthetic/train.jsonl", "Training samples (JSONL written by `python -m l2a.data`).")
    eval_file: str = arg("data/synthetic/test.jsonl", "Held-out samples for the periodic evaluation.")
    output_dir: str = arg("runs/default", "Metrics, plots and checkpoints go here.")
    backend: Literal["local", "tinker"] = arg("local", "'local' (torch here, any number of processes) or 'tinker' (sampling and training on Tinker).")
    seed: int = arg(0, "Seeds data order, sampling and initialisation.")
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = arg("auto", "Precision of training and rollouts: 'bfloat16' (float32 master weights and optimizer, bf16 compute and sampling), 'float32', 'float64' (exact arithmetic, for checks), or 'auto': bfloat16 where the hardware computes it natively (GPUs with bf16, CPUs with AVX512-BF16 or AMX), else float32.")
    # --- rollouts ---------------------------------------------------------------------------------
    prompts_per_step: int = arg(4, "Consultations per step (rollout batch), over all processes (the paper: 64).")
    group_size: int = arg(4, "Completions sampled per consultation: the GRPO group (the paper: 5).")
    max_new_tokens: int = arg(32, "Completion length limit in tokens (the paper: 1024).")
    temperature: float = arg(1.0, "Sampling temperature; the trainer's log-probabilities use the same one.")
    top_p: float = arg(1.0, "Nucleus sampling threshold for rollouts.")
    rollout_engine: Literal["hf", "vllm"] = arg("hf", "Rollout engine: 'hf' (transformers generate) or 'vllm' (colocated, synced every sync_interval optimizer steps).")
    generation_batch_size: int = arg(32, "Sequences generated at once by the HF engine.")
    # --- vLLM engine (rollout_engine=vllm): one per process, colocated with the trainer -----------------
    vllm_dtype: Literal["float32", "bfloat16", "float16"] = arg("float32", "Engine weights: 'float32' (matches the trainer exactly) or 'bfloat16' (GPU).")
    vllm_max_model_len: int = arg(2048, "Longest prompt + completion the engine accepts, in tokens.")
    vllm_kv_cache_gb: float = arg(1.0, "KV cache per engine in GiB (required on CPU); 0 = from vllm_gpu_memory_utilization.")
    vllm_gpu_memory_utilization: float = arg(0.3, "GPU share for the engine when vllm_kv_cache_gb is 0; the trainer keeps the rest.")
    vllm_tensor_parallel_size: int = arg(1, "GPUs per engine; one-process runs only (with N processes, one GPU per engine).")
    vllm_in_process: bool | None = arg(None, "Engine inside the trainer's process (default: yes, but for several processes on CPU).")
    vllm_sleep_mode: bool = arg(False, "GPU: the engine frees its weights and KV cache between rollouts (more memory for training).")
    vllm_max_num_batched_tokens: int = arg(4096, "Tokens vLLM schedules per pass; bounds its activation memory.")
    vllm_sync_dir: str = arg("", "Folder for weight-sync files of a multi-process engine (CPU); '' = /dev/shm.")
    vllm_is_correction: bool = arg(False, "Weight each token's policy-gradient term by min(pi_old/pi_sampler, vllm_is_cap): for the vLLM engine's numerical gap, and for a lagging sampler (sync_interval > 1, either engine).")
    vllm_is_cap: float = arg(3.0, "Cap C of the truncated importance-sampling weight.")
    # --- reward -----------------------------------------------------------------------------------
    judge: Literal["rubric", "openai"] = arg("rubric", "'rubric' (offline, deterministic) or 'openai' (an OpenAI-compatible LLM grader).")
    judge_url: str = arg("http://127.0.0.1:8000/v1", "Base URL of the grader endpoint (judge=openai).")
    judge_model: str = arg("Qwen/Qwen2.5-32B-Instruct", "Grader model name (judge=openai).")
    judge_api_key_env: str = arg("OPENAI_API_KEY", "Environment variable holding the grader's API key (unset: 'EMPTY').")
    judge_concurrency: int = arg(16, "Grader requests in flight at once.")
    train_mode: TrainMode = arg("Ra+Rs", "Reward: 'Ra+Rs' (paper), 'Ra' (no stop reward/rule), 'Rs' (no question reward).")
    fusion_mode: FusionMode = arg("default", "With Ra+Rs: 'default' = R_s(1+2R_a)+P (hierarchical), 'sum' = R_s+R_a+P.")
    # --- supervised warm start before GRPO (l2a.sft; logged at steps -sft_steps+1..0) --------------
    sft_steps: int = arg(128, "Supervised steps on the data's hindsight targets (the logged next question, or <stop />) before GRPO; 0 = none.")
    sft_batch_size: int = arg(8, "Samples per supervised step.")
    sft_learning_rate: float = arg(1e-4, "AdamW peak learning rate of the warm start, decayed to 0 by a cosine over sft_steps.")
    sft_decision_weight: float = arg(1.0, "Weight of the warm start's binary stop/continue loss on the first answer token (l2a.sft's decision_weight); 0 = plain SFT.")
    sft_frozen_layers: int = arg(15, "Bottom decoder layers (and the embeddings) the warm start keeps fixed: about 3x faster steps; GRPO trains every weight.")
    # --- GRPO -------------------------------------------------------------------------------------
    steps: int = arg(36, "Rollout batches, i.e. loop iterations, each of ppo_epochs x mini_batches optimizer steps (ignored when epochs is set).")
    epochs: int = arg(0, "Passes over train_file, the reference's total_epochs: when > 0, steps = ceil(epochs * train samples / prompts_per_step), computed and printed at start-up; 0 = use steps.")
    ppo_epochs: int = arg(1, "Passes over each rollout batch (the GRPO paper's mu, TRL's num_iterations, verl's ppo_epochs); 1 = on-policy, ratio 1.")
    mini_batches: int = arg(1, "Optimizer steps per pass: each process's groups split into this many equal slices, in order.")
    sync_interval: int = arg(1, "The rollout engine's weights are refreshed every k optimizer steps (Trinity-RFT's sync_interval), at the end of the rollout batch that reaches a multiple of k; 1 = every batch samples from the newest weights.")
    learning_rate: float = arg(1e-5, "AdamW learning rate, constant (the paper: 5e-7 for 7B).")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    adv_scale: AdvantageScale = arg("group", "Advantage scaling: 'group' (GRPO), 'batch', or 'none' (Dr. GRPO).")
    clip_low: float = arg(0.2, "PPO clip: ratio floor is 1 - clip_low.")
    clip_high: float = arg(0.2, "PPO clip: ratio ceiling is 1 + clip_high (DAPO suggests 0.28).")
    clip_ratio_c: float | None = arg(None, "Dual clip: where the advantage A < 0, the per-token loss is capped at -clip_ratio_c * A (verl's and Trinity-RFT's clip_ratio_c, 3.0 there); > 1, unset = off.")
    kl_coef: float = arg(0.0, "Weight of the KL penalty to the frozen initial model; 0 loads no reference.")
    kl_estimator: KLEstimator = arg("k3", "KL estimator: k1, k2 or k3.")
    loss_agg: LossAggregation = arg("token-mean", "'token-mean', 'seq-mean-token-mean' (GRPO paper) or 'seq-mean-token-sum-norm' (Dr. GRPO).")
    max_grad_norm: float = arg(1.0, "Gradient norm clip.")
    micro_batch_size: int = arg(16, "Completions per forward/backward pass, in whole groups (gradient accumulation inside a step).")
    gradient_checkpointing: bool = arg(False, "Recompute each layer's activations in backward: far less memory, ~1/3 more compute.")
    logprob_chunk_tokens: int = arg(4096, "Completion tokens whose vocabulary logits exist at once (larger batches are chunked).")
    # --- Tinker backend (backend=tinker) ---------------------------------------------------------------
    tinker_base_model: str = arg("Qwen/Qwen3-8B", "Base model trained with LoRA on Tinker.")
    lora_rank: int = arg(32, "LoRA rank on Tinker.")
    tinker_loss_fn: Literal["importance_sampling", "ppo"] = arg("importance_sampling", "Tinker's built-in loss: 'importance_sampling' or 'ppo'.")
    tinker_checkpoint_ttl_hours: int = arg(168, "Tinker deletes a checkpoint's remote state and sampler weights this many hours after saving (0 = never; the final checkpoint's never). Resume before they expire.")
    # --- evaluation, logging, checkpoints -------------------------------------------------------
    eval_every: int = arg(18, "Evaluate on held-out samples every N steps (and at the start and end); 0 = never.")
    eval_samples: int = arg(64, "Held-out samples per evaluation (greedy decoding, one completion each), spread evenly over eval_file.")
    save_every: int = arg(0, "Write a checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = arg(2, "Keep the newest N checkpoints.")
    resume: bool = arg(False, "Continue from the newest checkpoint in output_dir.")
    log_with: Literal["", "tensorboard", "wandb"] = arg("", "Also log to 'tensorboard' or 'wandb' through accelerate's trackers.")
    dist_timeout_minutes: int = arg(60, "How long processes wait for each other (NCCL/gloo), e.g. while rank 0 writes a checkpoint (~91 GB for 7B).")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.prompts_per_step % world or (cfg.prompts_per_step // world) % cfg.mini_batches:
        raise UserError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the {world} processes times "
                        f"mini_batches={cfg.mini_batches} (each process's groups split evenly into mini-batches)")
    if cfg.sft_steps and world > 1:
        raise UserError("the warm start (sft_steps) runs in one process: run `python -m l2a.sft` first, then train "
                        "from its checkpoint with --model <checkpoint> --sft_steps 0")
    train_samples = load_samples(cfg.train_file)
    if cfg.epochs:
        cfg.steps = steps_for_epochs(cfg.epochs, len(train_samples), cfg.prompts_per_step)
        accelerator.print(f"{cfg.epochs} epochs of {len(train_samples)} samples, {cfg.prompts_per_step} per step: "
                          f"{cfg.steps} steps")
    eval_samples = evenly_spaced(load_samples(cfg.eval_file), cfg.eval_samples) if cfg.eval_every else []
    judge = make_judge(cfg.judge, cfg.judge_url, cfg.judge_model, cfg.judge_api_key_env, TRAINING_GRADER,
                       cfg.judge_concurrency)
    judge.preflight()  # an unreachable or unreadable grader fails here, not after hours of zero rewards
    start_step, skipped_steps, resume_from = 0, 0, None
    if cfg.resume and (resume_from := latest_checkpoint(cfg.output_dir)) is not None:
        start_step, skipped_steps = resume_position(resume_from)
        accelerator.print(f"resuming from {resume_from} (step {start_step})")
    policy = make_policy(cfg, accelerator, resume_from)
    log = MetricsLog(accelerator, cfg, resumed_at=start_step if resume_from else None)

    try:
        if cfg.sft_steps and start_step == 0:  # a resumed run has it in its weights already
            warm_start(policy, train_samples, eval_samples, judge, cfg, log)
        if eval_samples and start_step == 0:
            log(evaluate_heldout(policy, judge, eval_samples, cfg), step=0)
        progress = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
                        disable=not accelerator.is_main_process, desc="grpo")
        for step in progress:
            t0, peaks = time.perf_counter(), DevicePeaks(accelerator.device)
            # ---- 1. rollouts: this process's share of the step's prompts, group_size completions each -----------
            indices = batch_indices(len(train_samples), step, cfg.prompts_per_step, cfg.seed, stream="grpo")
            my_samples = [train_samples[i] for i in indices[rank::world]]
            sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                      seed=cfg.seed * 1_000_003 + step * 1_009 + rank)
            chats = [policy_messages(s["messages"], cfg.train_mode) for s in my_samples]
            completions = policy.generate(chats, cfg.group_size, sampling)  # groups contiguous
            t1 = time.perf_counter()
            peaks.phase("generate")

            # ---- 2. rewards: the judge grades correct "continue" questions, compute_reward does the rest --------
            answered = [my_samples[c.prompt_index] for c in completions]
            scored = score_responses(judge, answered, [c.text for c in completions], cfg.train_mode, cfg.fusion_mode)
            t2 = time.perf_counter()

            # ---- 3. advantages: every group is whole on one process; gather so "batch" scaling sees all ---------
            local = torch.tensor([[s.reward.total, s.reward.decision, s.reward.content, s.reward.format,
                                   len(c.token_ids), float(STOP_TOKEN in c.text), float(s.judge_failed),
                                   float(s.judge_failed or s.grade is not None)]
                                  for s, c in zip(scored, completions)], device=accelerator.device)
            everything = accelerator.gather(local)  # [prompts_per_step * group_size, 8], rank order (collective)
            stop_if_the_judge_fails(failed=everything[:, 6], asked=everything[:, 7], judge=judge, step=step)
            advantages = group_advantages(everything[:, 0], cfg.group_size, cfg.adv_scale).view(world, -1)[rank]

            # ---- 4. update: ppo_epochs passes over mini_batches slices of whole groups, an optimizer step each
            #      (GRPO loss over micro-batches, backward, AdamW; skipped if not finite), then the sampler's sync ---
            old_logprobs = policy.logprobs_before_update(completions)  # log pi_old; None: one step, pi_old = pi
            updates = []
            for epoch in range(cfg.ppo_epochs):
                for part in mini_batch_slices(len(completions), cfg.mini_batches):
                    updates.append(policy.update(completions[part], advantages[part],
                                                 old_logprobs[part] if old_logprobs else None))
            optimizer_steps = (step + 1) * len(updates)
            sync_seconds = 0.0
            if sampler_is_due(optimizer_steps, len(updates), cfg.sync_interval) or step + 1 == cfg.steps:
                sync_seconds = policy.sync_sampler()  # the next rollouts (or the last evaluation) see the new weights
            peaks.phase("train")
            if skipped := sum(not update.pop("applied") for update in updates):
                skipped_steps += skipped
                accelerator.print(f"step {step + 1}: non-finite loss or gradient, {skipped} of {len(updates)} "
                                  "optimizer steps skipped")
            t3 = time.perf_counter()

            # ---- 5. log (whole-batch numbers, all processes), evaluate, save --------------------------------------
            parts, groups = everything.mean(dim=0), everything[:, 0].view(-1, cfg.group_size)
            metrics = {
                "reward": parts[0].item(),
                "reward_std": everything[:, 0].std().item(),
                "reward_content": parts[2].item(),
                "reward_format": parts[3].item(),
                "decision_accuracy": parts[1].item(),
                "frac_zero_std_groups": (groups.max(1).values == groups.min(1).values).float().mean().item(),
                **mean_over_updates(updates),
                "optimizer_steps": optimizer_steps,
                "completion_length": parts[4].item(),
                "stop_rate": parts[5].item(),
                "judge_failures": int(everything[:, 6].sum().item()),
                "tokens_per_second": everything[:, 4].sum().item() / (t1 - t0),
                "time/generate": t1 - t0,
                "time/judge": t2 - t1,
                "time/train": t3 - t2,
                "time/sync": sync_seconds,
                "skipped_steps": skipped_steps,
                **peaks.metrics,
            }
            if eval_samples and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                metrics.update(evaluate_heldout(policy, judge, eval_samples, cfg))
            log(metrics, step=step + 1)
            progress.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['decision_accuracy']:.2f}")
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
                policy.save(step + 1, {"step": step + 1, "skipped_steps": skipped_steps})
    finally:
        policy.close()  # before end_training, which destroys the default process group (an in-process engine's too)
    accelerator.end_training()
    if accelerator.is_main_process:
        try:
            from l2a.plot import plot_run
        except ImportError:  # matplotlib: not on every GPU machine; `python -m l2a.plot` draws them later
            accelerator.print("curves: not drawn (matplotlib is not installed)")
        else:
            accelerator.print(f"curves: {plot_run(cfg.output_dir)}")


# --------------------------------------------------------------------------------------------------
# The pieces the loop calls, in the order it meets them.
# --------------------------------------------------------------------------------------------------


def parse_config(argv: list[str]) -> Config:
    """Defaults < YAML file (``--config``) < command-line flags; then ``check_config``."""
    cfg = parse_dataclass(Config, argv)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Settings that are valid one by one (the types and choices are checked when parsed) but not together."""
    problems = []
    if cfg.group_size < 2:
        problems.append("group_size must be at least 2 (advantages compare the completions of a group)")
    for name in ("prompts_per_step", "max_new_tokens", "micro_batch_size", "keep_checkpoints", "ppo_epochs",
                 "mini_batches", "sync_interval"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be at least 1")
    if cfg.mini_batches >= 1 and cfg.prompts_per_step % cfg.mini_batches:
        problems.append(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of mini_batches="
                        f"{cfg.mini_batches} (a mini-batch is whole groups)")
    if cfg.clip_ratio_c is not None and not cfg.clip_ratio_c > 1:
        problems.append(f"clip_ratio_c must be > 1 (it caps the ratio above the clip range), got {cfg.clip_ratio_c}")
    if cfg.sync_interval > 1 and min(cfg.ppo_epochs, cfg.mini_batches) >= 1:
        # A lagging engine holds the trained weights only right after a sync: evaluations sample from it, and a
        # checkpoint must fall there so that --resume (whose engine starts from the checkpoint) continues exactly.
        period = cfg.sync_interval // math.gcd(cfg.sync_interval, cfg.ppo_epochs * cfg.mini_batches)
        for name in ("eval_every", "save_every"):
            if getattr(cfg, name) % period:
                problems.append(f"{name}={getattr(cfg, name)} must be a multiple of {period}: with sync_interval "
                                f"{cfg.sync_interval} the rollout engine holds the trained weights only every "
                                f"{period} steps (evaluations sample from it; --resume restarts it from a checkpoint)")
    if cfg.epochs < 0:
        problems.append("epochs must be 0 (use steps) or more")
    elif cfg.epochs and cfg.steps != Config.steps:  # a changed steps would be silently replaced: say so instead
        problems.append(f"steps={cfg.steps} and epochs={cfg.epochs} both set: epochs computes the steps from the "
                        "train file; give one of them (epochs 0 to use steps)")
    if cfg.temperature <= 0:
        problems.append("temperature must be > 0 for training (greedy sampling has no log-probabilities to train)")
    if cfg.vllm_is_correction and ((cfg.rollout_engine != "vllm" and cfg.sync_interval == 1) or cfg.top_p != 1.0):
        problems.append("vllm_is_correction needs the sampler's log-probabilities at top_p: 1: rollout_engine vllm, "
                        "or sync_interval > 1 (a lagging HF sampler reports them; one that does not lag samples "
                        "from the trained weights themselves), and top_p 1 (a nucleus is not the trainer's "
                        "distribution)")
    if cfg.sft_steps < 0 or (cfg.sft_steps and cfg.sft_batch_size < 1) or cfg.sft_decision_weight < 0:
        problems.append("sft_steps and sft_decision_weight must be at least 0, and sft_batch_size at least 1")
    if cfg.sft_steps and cfg.kl_coef != 0:
        problems.append("kl_coef > 0 with a warm start would anchor GRPO to the model before it (the reference is "
                        "loaded from `model`): run `python -m l2a.sft` first, then train from its checkpoint with "
                        "--model <checkpoint> --sft_steps 0")
    if cfg.backend == "tinker":
        if cfg.sft_steps:
            problems.append("backend tinker has no warm start: set sft_steps to 0")
        if cfg.kl_coef != 0:
            problems.append("backend tinker has no KL term (its losses take no reference model): set kl_coef to 0")
        if cfg.clip_ratio_c is not None:
            problems.append("backend tinker has no dual clip (its ppo loss clips the ratio only): unset clip_ratio_c")
        if cfg.temperature != 1.0 or cfg.top_p != 1.0:
            problems.append("backend tinker trains on untempered, untruncated log-probabilities: set temperature "
                            f"and top_p to 1 (got {cfg.temperature} and {cfg.top_p})")
        if cfg.tinker_checkpoint_ttl_hours != 0 and not 1 <= cfg.tinker_checkpoint_ttl_hours <= 87_600:
            problems.append("tinker_checkpoint_ttl_hours must be 0 (never expire) or from 1 to 87600 (Tinker's "
                            f"limits: 1 hour to 10 years), got {cfg.tinker_checkpoint_ttl_hours}")
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))


def make_accelerator(cfg: Config) -> Accelerator:
    """The processes' meeting point (and, for one process, a thin wrapper). Resolves ``dtype: auto``.

    Without GPUs, `accelerate launch` runs CPU processes that talk over gloo (DDP). With ``dtype: bfloat16`` the
    accelerator runs the model's forward passes under bf16 autocast (mixed precision)."""
    if cfg.dtype == "auto":  # Tinker trains remotely: the local side only reads tokens and log-probabilities
        cfg.dtype = "float32" if cfg.backend == "tinker" else fastest_dtype(
            torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return Accelerator(cpu=not torch.cuda.is_available(), log_with=cfg.log_with or None,
                       mixed_precision="bf16" if cfg.dtype == "bfloat16" else "no", project_dir=cfg.output_dir,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.dist_timeout_minutes))])


def make_policy(cfg: Config, accelerator: Accelerator, resume_from: Path | None):
    """The policy the loop drives: ``generate``, ``update``, ``save``, ``close``."""
    if cfg.backend == "tinker":
        if accelerator.num_processes > 1:  # each process would start its own Tinker run, saving into one folder
            raise UserError(f"backend tinker runs in one process (Tinker does the parallel work), got "
                            f"{accelerator.num_processes}: start it with `python train.py`, not `accelerate launch`")
        from l2a.tinker_backend import TinkerPolicy

        return TinkerPolicy(cfg, resume_from)
    from l2a.local_policy import LocalPolicy

    return LocalPolicy(cfg, accelerator, resume_from)


def warm_start(policy, train_samples: list[dict], eval_samples: list[dict], judge, cfg: Config, log: MetricsLog) -> None:
    """Stage 0: ``sft_steps`` supervised steps (``l2a.sft``) on the hindsight targets, before GRPO.

    Why: GRPO learns from differences within a group. The base model never samples ``<stop />``, so on a stop sample
    every completion scores 0 and the group gives no gradient: RL cannot discover stopping. Imitating the logged next
    turn (a question, or ``<stop />``) puts stopping among the samples; GRPO then has something to choose between,
    and learns *when*. Logged as ``sft/*`` at steps -sft_steps+1 .. 0, after a held-out evaluation of the base model
    at step -sft_steps, so the curves show both stages on one axis.
    """
    from l2a.sft import SFTTrainer, frozen_layers

    if eval_samples:
        log(evaluate_heldout(policy, judge, eval_samples, cfg), step=-cfg.sft_steps)
    model = policy.accelerator.unwrap_model(policy.model)
    with frozen_layers(model, cfg.sft_frozen_layers):
        trainer = SFTTrainer(model, policy.tokenizer, cfg.sft_learning_rate, max_grad_norm=cfg.max_grad_norm,
                             train_mode=cfg.train_mode, bf16_autocast=cfg.dtype == "bfloat16",
                             decision_weight=cfg.sft_decision_weight)
        for k in tqdm(range(cfg.sft_steps), desc="sft", disable=not policy.accelerator.is_main_process):
            metrics = trainer.scheduled_step(train_samples, k, cfg.sft_steps, cfg.sft_batch_size, cfg.seed)
            log({f"sft/{key}": value for key, value in metrics.items()}, step=k + 1 - cfg.sft_steps)
    policy.sync_sampler()  # the rollout engine (vLLM, or the bf16 replica) samples the warm-started weights


class MetricsLog:
    """``metrics.jsonl`` (one JSON line per logged step) and accelerate's trackers (``log_with``).

    A fresh run starts a fresh file; a resumed one drops the lines written after the checkpoint it resumes from,
    so the file reads as if the run had never stopped.
    """

    def __init__(self, accelerator: Accelerator, cfg: Config, resumed_at: int | None):
        self.accelerator = accelerator
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        accelerator.init_trackers("l2a", config=asdict(cfg))
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resumed_at is None:
                self.path.unlink(missing_ok=True)
            else:
                truncate_metrics(self.path, resumed_at)

    def __call__(self, metrics: dict, step: int) -> None:
        self.accelerator.log(metrics, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def stop_if_the_judge_fails(failed: torch.Tensor, asked: torch.Tensor, judge, step: int) -> None:
    """A run whose grader fails most of its grades trains on zeros: stop it, naming the grader. ``failed`` and
    ``asked`` (1 per completion the judge was asked about) cover every completion of the step on all processes,
    so every process decides alike. A failed grade scores content 0 and format 0."""
    failures, graded = int(failed.sum().item()), int(asked.sum().item())
    if failures > graded / 2:
        raise UserError(f"step {step + 1}: {failures} of the {graded} grades from {judge.describe()} failed "
                        f"({judge.last_problem}); the run stops rather than train on rewards without content scores")


def mini_batch_slices(num_completions: int, mini_batches: int) -> list[slice]:
    """``mini_batches`` equal consecutive slices of this process's completions, in order.

    Groups are contiguous and each process's share splits into whole groups per slice (checked at start). And
    since process r holds prompts r, r + N, r + 2N, ... of the step, slice m of every process together is slice m
    of the batch one process would hold: N processes train on the same mini-batches as one.
    """
    size = num_completions // mini_batches
    return [slice(m * size, (m + 1) * size) for m in range(mini_batches)]


def sampler_is_due(optimizer_steps: int, just_taken: int, sync_interval: int) -> bool:
    """Whether the rollout engine gets the trained weights after this batch: when its optimizer steps reached a
    multiple of ``sync_interval``. One step per batch and sync_interval 10: after batches 10, 20, ... (batches
    11-20 are sampled with the weights after step 10, up to 9 steps old); 4 steps per batch and sync_interval 8:
    after every second batch; sync_interval <= steps per batch: after every batch."""
    return optimizer_steps // sync_interval > (optimizer_steps - just_taken) // sync_interval


def mean_over_updates(updates: list[dict[str, float]]) -> dict[str, float]:
    """The step's numbers from those of its optimizer steps: each key's mean (the maximum for ``*_max``).
    With one optimizer step per batch they are that step's, bit for bit."""

    def mean(values: list[float]) -> float:
        return sum(values[1:], start=values[0]) / len(values)

    return {key: (max if key.endswith("_max") else mean)([u[key] for u in updates]) for key in updates[0]}


class DevicePeaks:
    """On a GPU: the most memory torch allocated in each phase of a step, and what the whole device used at its
    end (vLLM's engine and other processes included), as ``memory/<phase>_allocated_gb`` / ``_device_gb``."""

    def __init__(self, device: torch.device):
        self.cuda, self.device, self.metrics = device.type == "cuda", device, {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def phase(self, name: str) -> None:
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            self.metrics[f"memory/{name}_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.metrics[f"memory/{name}_device_gb"] = (total - free) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)


def steps_for_epochs(epochs: int, num_samples: int, per_step: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_samples`` prompts, ``per_step`` a step, rounded up:

        steps = ceil(epochs * num_samples / per_step)      e.g. 4 epochs of 6,909 samples, 64 a step: 432

    ``l2a.data.batch_indices`` runs on across epoch boundaries, so these steps draw every sample ``epochs`` times (the
    last step may take a few prompts of the next epoch's order).
    """
    return -(-epochs * num_samples // per_step)


@torch.no_grad()
def evaluate_heldout(policy, judge, samples: list[dict], cfg: Config) -> dict[str, float]:
    """Greedy answers to held-out consultations (one each), graded by the training judge and summarised by the
    metric code of ``l2a.evaluate`` (``compute_metrics``): every metric ``key`` is logged as ``eval/<key>``.

    Besides those: ``eval/reward``, the training reward (``train_mode``, ``fusion_mode``) to set beside the rollouts'
    ``reward`` (with the default modes it equals ``eval/ave_total_reward``), and ``eval/decision_accuracy`` and
    ``eval/stop_accuracy``, the older names of ``eval/ave_total_decision`` and ``eval/ave_stop_decision``. A metric
    without any pair (no stop sample among ``samples``) is not logged. One greedy answer graded at the training
    grader's settings is a cheaper protocol than ``l2a.evaluate``'s, so the numbers are comparable within a run.
    """
    chats = [policy_messages(s["messages"], cfg.train_mode) for s in samples]
    completions = policy.generate(chats, 1, SamplingConfig(temperature=0.0, max_new_tokens=cfg.max_new_tokens))
    answers = [c.text for c in completions]
    scored = score_responses(judge, samples, answers, cfg.train_mode, cfg.fusion_mode)
    metrics = compute_metrics(graded_record(s, [a], [g]) for s, a, g in zip(samples, answers, scored))
    logged = {
        "eval/reward": sum(s.reward.total for s in scored) / len(scored),
        "eval/decision_accuracy": metrics["ave_total_decision"],
        "eval/stop_accuracy": metrics["ave_stop_decision"],
        **{f"eval/{key}": value for key, value in metrics.items()},
    }
    return {key: value for key, value in logged.items() if value is not None}


def interrupted_hint(argv: list[str]) -> str:
    """What a stopped run kept, and how to continue it."""
    last = latest_checkpoint(parse_config(argv).output_dir)
    if last is None:
        return "no checkpoint was written yet; start again (metrics.jsonl keeps the steps logged so far)"
    return f"the newest checkpoint is {last}; continue from it with --resume true"


if __name__ == "__main__":
    sys.exit(run_command(main, resume_hint=lambda: interrupted_hint(sys.argv[1:])))
