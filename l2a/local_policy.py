"""The policy trained here, with torch: model, optimizer, frozen reference, rollout engine, sharding.

``LocalPolicy`` has the methods train.py's loop calls, like ``l2a.tinker_backend.TinkerPolicy`` (its peer, with
sampling and training on Tinker instead):

    completions = policy.generate(chats, n, sampling)     # step 1: rollouts, from the sampler's weights
    old = policy.logprobs_before_update(completions)      # step 4: log pi_old, once per batch (None: ratio 1)
    metrics = policy.update(part, advantages, old_part)   # GRPO loss, backward, one optimizer step
    policy.sync_sampler()                                 # the rollout engine gets the trained weights
    policy.save(step, trainer_state)                      # a checkpoint; ``close()`` at the end

Under ``accelerate launch`` every process holds one; with FSDP2 the model, the reference and the optimizer
state are sharded over the processes, and whatever needs whole weights (the rollout engine, checkpoints)
gathers them. The places where processes meet are marked "collective": every process must call them, in the
same order.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from l2a.checkpoint import checkpoints_dir, load_trainer_state, write_checkpoint
from l2a.cli import UserError
from l2a.grpo import grpo_loss, kl_penalty
from l2a.logprobs import (
    allow_checkpointing_with_prompt_cache,
    completion_logprobs,
    pack_completions,
    padded,
    sampler_logprobs,
)
from l2a.model import load_model, load_tokenizer
from l2a.rollout import Completion, HFEngine, SamplingConfig
from l2a.vllm_engine import full_state_dict_items

if TYPE_CHECKING:
    from train import Config


class LocalPolicy:
    """The policy trained in this process with torch: model, optimizer, frozen reference, rollout engine."""

    def __init__(self, cfg: Config, accelerator: Accelerator, resume_from: Path | None):
        self.cfg, self.accelerator = cfg, accelerator
        if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
            raise UserError("FSDP1 is not supported: set `fsdp_version: 2` in the accelerate config")
        self.sharded = accelerator.is_fsdp2  # each process holds one shard of every weight
        path = str(resume_from) if resume_from else cfg.model
        self.tokenizer = load_tokenizer(path)
        # bfloat16 is mixed precision: float32 master weights and optimizer state, bf16 compute (the accelerator's
        # autocast) and a bf16 copy of the weights to sample from; float64 is float64 throughout.
        self.dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        model = load_model(path, self.dtype)
        model.config.use_cache = False
        model.train()  # from_pretrained returns eval mode, in which checkpointed layers do not checkpoint
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            allow_checkpointing_with_prompt_cache(model)
        # fused: one kernel for all parameters instead of a dozen elementwise passes (0.65 -> 0.22 s per step
        # for SmolLM2-135M on 2 CPU cores, bench/vs_trl.py); the same AdamW update.
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      fused=True)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if resume_from:
            self.load_optimizer_state(load_trainer_state(resume_from)["optimizer"])
        self.reference = None
        if cfg.kl_coef:  # the frozen starting point: never the resumed weights
            self.reference = self.prepare_frozen(load_model(cfg.model, self.dtype).eval().requires_grad_(False))
        self.replica = None  # a full copy of the weights for the HF engine: under FSDP2, in bf16, lagging (make_engine)
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
        if cfg.rollout_engine == "hf":
            if not self.sharded and cfg.dtype != "bfloat16" and cfg.sync_interval == 1:
                return HFEngine(accelerator.unwrap_model(self.model), self.tokenizer, cfg.generation_batch_size)
            # Sample from a full replica of the weights instead, loaded at every sync_sampler: under FSDP2 a sharded
            # model gathers its weights in every forward pass, a collective, and processes stop generating at
            # different lengths; in bfloat16, decoding reads every weight for each token, so a bf16 copy halves what
            # it reads (autocast would convert the float32 weights at every step instead); a lagging sampler keeps
            # older weights than the trainer's.
            dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else self.dtype
            self.replica = load_model(path, dtype).to(accelerator.device).eval().requires_grad_(False)
            return HFEngine(self.replica, self.tokenizer, cfg.generation_batch_size)
        if cfg.top_p != 1.0:  # vLLM then reports log-probabilities renormalised over the nucleus
            accelerator.print(f"warning: top_p={cfg.top_p}: vLLM's log-probabilities differ from the trainer's")
        if cfg.vllm_tensor_parallel_size > 1 and accelerator.num_processes > 1:
            raise UserError("vllm_tensor_parallel_size > 1 works for single-process runs only")
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
                sleep_mode=cfg.vllm_sleep_mode,
                max_num_batched_tokens=cfg.vllm_max_num_batched_tokens,
                sync_dir=cfg.vllm_sync_dir or None,
            )

    def generate(self, chats: list[list[dict]], n: int, sampling: SamplingConfig) -> list[Completion]:
        """Step 1. A colocated vLLM engine shares the GPU with training: it gets the memory the trainer's allocator
        cached, wakes up for the rollouts and (vllm_sleep_mode) frees its weights and KV cache again after them.
        A lagging HF sampler reports its own log-probabilities of what it sampled, as vLLM does (for the
        importance weights and the sampler metrics)."""
        if self.cfg.rollout_engine != "vllm":
            completions = self.engine.generate(chats, n, sampling)
            if self.cfg.sync_interval > 1 and sampling.temperature > 0:
                rows = self.logprobs_of(self.replica, completions, sampling.temperature)
                completions = [replace(c, logprobs=row.tolist()) for c, row in zip(completions, rows)]
            return completions
        release_cached_memory(self.accelerator.device)
        self.engine.wake_up()
        completions = self.engine.generate(chats, n, sampling)
        self.engine.sleep()
        return completions

    def logprobs_before_update(self, completions: list[Completion]) -> list[torch.Tensor] | None:
        """log pi_old of every completion token (one tensor per completion), from the weights the batch's first
        update starts from: one forward pass without gradients, before any of the batch's optimizer steps.

        None when the batch gets a single optimizer step (``ppo_epochs`` and ``mini_batches`` 1): then pi_old is
        the trained pass's own log-probabilities, detached (ratio 1, see l2a/grpo.py), and this pass is not needed.
        Collective under FSDP2: every process calls it."""
        if self.cfg.ppo_epochs * self.cfg.mini_batches == 1:
            return None
        return self.logprobs_of(self.model, completions, self.cfg.temperature)

    @torch.no_grad()
    def logprobs_of(self, model, completions: list[Completion], temperature: float) -> list[torch.Tensor]:
        """``model``'s log-probabilities of each completion's tokens, micro-batched like the update."""
        rows = []
        for part in self.micro_batches(completions):
            batch = pack_completions(completions[part], self.tokenizer.pad_token_id, self.accelerator.device,
                                     min_width=2 if self.sharded else 1)  # see micro_batch_loss
            logprobs, _ = completion_logprobs(model, batch, temperature, self.cfg.logprob_chunk_tokens)
            rows += [row[: len(c.token_ids)] for row, c in zip(logprobs, completions[part])]
        return rows

    def micro_batches(self, completions: list) -> list[slice]:
        """Micro-batches of whole groups (so each prompt's forward pass is shared by its group, logprobs.py)."""
        cfg = self.cfg
        per_micro = max(cfg.group_size, cfg.micro_batch_size // cfg.group_size * cfg.group_size)
        return [slice(start, start + per_micro) for start in range(0, len(completions), per_micro)]

    def update(self, completions: list[Completion], advantages: torch.Tensor,
               old_logprobs: list[torch.Tensor] | None = None) -> dict[str, float]:
        """One optimizer step on these completions (a batch, or one mini-batch of it): the GRPO loss over
        micro-batches, backward, gradient clip, AdamW. ``old_logprobs``: from ``logprobs_before_update``."""
        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        # The loss divides by the counts of everything this step trains on (all processes, all micro-batches),
        # so the pieces add up to the loss of the whole (mini-)batch however it is split.
        num_tokens, num_seqs = across_processes(accelerator, [sum(len(c.token_ids) for c in completions),
                                                              len(completions)])
        sums: dict[str, float] = {}  # statistics summed over this process's tokens (the loss: its pieces)
        largest_gap = 0.0
        parts = self.micro_batches(completions)
        for i, part in enumerate(parts):
            # DDP: only the last micro-batch all-reduces the gradients. FSDP2 reduce-scatters after every one: skipping
            # that would keep an unsharded copy of every gradient until the last (~14 GiB per GPU for 7B in bf16).
            accumulate = i < len(parts) - 1 and not self.sharded
            with accelerator.no_sync(model) if accumulate else contextlib.nullcontext():
                loss, part_sums, gap = self.micro_batch_loss(completions[part], advantages[part],
                                                             old_logprobs[part] if old_logprobs else None,
                                                             num_tokens, num_seqs)
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
        metrics = {"loss": totals.pop("loss"), "grad_norm": grad_norm, "applied": applied}
        metrics.update({key: total / max(num_tokens, 1) for key, total in totals.items()})
        if "sampler_logprob_diff" in metrics:
            metrics["sampler_logprob_diff_max"] = across_processes(accelerator, [largest_gap], op="max")[0]
        return metrics

    def micro_batch_loss(self, part: list[Completion], advantages: torch.Tensor,
                         old_logprobs: list[torch.Tensor] | None, num_tokens: float, num_seqs: float):
        """Loss of a few groups (the gradient flows through it) and their statistics summed over tokens."""
        cfg = self.cfg
        # Under FSDP every forward pass is a collective; with completions of one token the second pass would be
        # skipped on some processes only, so pad to two columns there (the padding is masked).
        batch = pack_completions(part, self.tokenizer.pad_token_id, self.accelerator.device,
                                 min_width=2 if self.sharded else 1)
        mask = batch.completion_mask
        logprobs, entropy = completion_logprobs(self.model, batch, cfg.temperature, cfg.logprob_chunk_tokens)
        # pi_old: the weights the batch's updates started from; with one update per batch, these very weights
        old = logprobs.detach() if old_logprobs is None else padded(old_logprobs, mask.shape[1])
        ref_logprobs = None
        if self.reference is not None:
            with torch.no_grad():
                ref_logprobs, _ = completion_logprobs(self.reference, batch, cfg.temperature, cfg.logprob_chunk_tokens)
        # Summed over tokens; the same keys, in the same order, on every process (they are summed across).
        sums, largest_gap, token_weights = {"entropy": (entropy * mask).sum().item()}, 0.0, None
        sampled = sampler_logprobs(part, mask.shape[1], mask.device)  # None with an HF engine that does not lag
        if sampled is not None:
            # How far the sampler's numbers are from pi_old's for the same tokens: numerical noise of the engine,
            # plus, with a lagging sampler, the optimizer steps its weights are behind.
            log_ratio = old - sampled
            gap = log_ratio.abs() * mask
            sums["sampler_logprob_diff"], largest_gap = gap.sum().item(), gap.max().item()
            # KL(sampler || pi_old), estimated on the sampler's own tokens (k3, l2a/grpo.py)
            sums["kl_to_sampler"] = (kl_penalty(sampled, old, "k3") * mask).sum().item()
            if cfg.vllm_is_correction:
                # Truncated importance sampling: the tokens were drawn from the sampler's distribution.
                token_weights = torch.exp(log_ratio).clamp(max=cfg.vllm_is_cap)
                sums["is_weight_mean"] = (token_weights * mask).sum().item()
        loss, stats = grpo_loss(
            logprobs,
            old,
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
            num_seqs=num_seqs,
            token_weights=token_weights,
            clip_ratio_c=cfg.clip_ratio_c,
        )
        sums["loss"] = loss.item()
        n = mask.sum().item()
        for key in ("clip_low_frac", "clip_high_frac", "clip_dual_frac", "ratio_mean", "kl_mean"):
            if key in stats:
                sums[key] = stats[key].item() * n
        return loss, sums, largest_gap

    def sync_sampler(self) -> float:
        """Make the rollout engine sample with the weights just trained; returns the seconds taken.

        Collective under FSDP2: ``full_state_dict_items`` gathers every weight, so each process walks all
        weights in the same order, each into its own engine. The HF engine on an unsharded model that does not
        lag samples from the trained module itself, so it needs nothing.
        """
        if self.cfg.rollout_engine == "vllm":
            release_cached_memory(self.accelerator.device)  # room for the gathered weights and the engine's copy
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
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

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
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        name_of = {param: name for name, param in self.model.named_parameters()}
        names = [name_of[p] for group in self.optimizer.param_groups for p in group["params"]]
        by_name = renamed_optimizer_state(state, names.__getitem__)
        set_optimizer_state_dict(self.model, self.optimizer.optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def close(self) -> None:
        """Stop the vLLM engine: its processes, or (in-process) the torch.distributed group it made."""
        if self.cfg.rollout_engine == "vllm":
            self.engine.close()

    def save(self, step: int, trainer_state: dict) -> Path:
        """A Hugging Face model directory plus the optimizer state in ``trainer_state.pt``, written atomically."""
        accelerator, cfg = self.accelerator, self.cfg
        # Both gather shards under FSDP2 (collectives): every process calls them, the main one writes.
        state_dict = accelerator.get_state_dict(self.model)
        optimizer_state = self.optimizer_state()
        final = checkpoints_dir(cfg.output_dir) / f"step-{step:06d}"
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(self.model)
            if self.sharded:  # gathered tensors share no storage: re-tie, so a tied weight is written once
                state_dict.update({name: state_dict[source] for name, source in model.all_tied_weights_keys.items()})

            def fill(folder: Path) -> None:
                model.save_pretrained(folder, state_dict=state_dict)
                self.tokenizer.save_pretrained(folder)

            final = write_checkpoint(cfg.output_dir, step, cfg, {"optimizer": optimizer_state, **trainer_state}, fill,
                                     cfg.keep_checkpoints)
        accelerator.wait_for_everyone()
        return final


def release_cached_memory(device: torch.device) -> None:
    """Give the blocks torch's CUDA allocator keeps cached back to the GPU, where the colocated vLLM engine (with an
    allocator of its own) can use them. Nothing to do on CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
