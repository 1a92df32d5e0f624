"""Sampling and training on Tinker (``backend: tinker``): the same GRPO step, with a LoRA adapter trained remotely.

    TINKER_API_KEY=... python train.py --config configs/tinker_qwen.yaml

``TinkerPolicy`` has the three methods the loop in ``train.main`` calls, like ``LocalPolicy``; only where the
model lives changes (the Tinker SDK, ``tinker==0.38.0``, does the GPU work remotely; this process stays on CPU):

- ``generate``: ``save_weights_and_get_sampling_client()`` snapshots the current weights into a sampler (Tinker's
  whole "weight sync"), then every prompt's ``sample(prompt, n, params)`` is submitted before any result is
  awaited. Each sequence comes back with the sampler's log-probabilities of its tokens.
- ``update``: one ``Datum`` per completion (``completion_datum``), ``forward_backward`` with Tinker's built-in
  ``importance_sampling`` or ``ppo`` loss, and ``optim_step``, submitted back to back.
- ``save``: ``save_state`` (weights + Adam moments, what ``--resume`` loads) and ``save_weights_for_sampler``
  (what evaluation samples from), by name; their ``tinker://`` paths go into ``trainer_state.pt`` of the same
  local checkpoint layout as the local backend. The final save also downloads the LoRA adapter in Hugging Face
  PEFT format into ``<checkpoint>/adapter`` (best effort: ``tinker checkpoint download`` does it later too).

The same objective as the local backend
---------------------------------------
Tinker's losses are SUMS over every token of every datum: ``importance_sampling`` is
``-(exp(logp - logp_sampler) * A).sum()`` and ``ppo`` is ``-min(ratio * A, clip(ratio) * A).sum()``. The local
loss (``l2a.grpo.grpo_loss``) is a weighted sum of the same per-token terms, with one positive weight per
completion set by ``loss_agg``. Both per-token terms are positively homogeneous in A (``l(s * A) = s * l(A)`` for
``s > 0``), so multiplying each completion's advantage by its weight makes Tinker's sum equal to our loss, in value
and gradient (``tinker_advantage_scale``, checked numerically in ``tests/test_tinker_backend.py``):

    loss_agg                   weight of each token of completion i     advantage sent to Tinker
    token-mean                 1 / N_tokens                             A_i / N_tokens
    seq-mean-token-mean        1 / (len_i * N_seqs)                     A_i / (len_i * N_seqs)
    seq-mean-token-sum-norm    1 / (N_seqs * max_new_tokens)            A_i / (N_seqs * max_new_tokens)

(N_tokens: completion tokens in the step's batch; N_seqs: completions in it.) Adam itself barely notices a
constant factor on the loss, but the gradient clip, the weight decay and the relative weight of tokens and
sequences all do, so without this a "sum" run is a different experiment. The PPO clip range goes to Tinker in
ratio space: ``clip_low_threshold = 1 - clip_low``, ``clip_high_threshold = 1 + clip_high``.
``importance_sampling`` has no clip; its ratio only corrects the small numerical gap between Tinker's sampler
and trainer (one pass per batch, so the policies are otherwise the same, as in the local backend).

Choices
-------
- ``kl_coef > 0`` is refused. Tinker's built-in losses take no reference log-probabilities; the cookbook's way
  (a k1 penalty folded into the advantages, after a base-model prefill of every completion) optimises a
  different objective from the local KL loss, so it would not be "the same run". A rank-32 LoRA moves little.
- ``temperature`` and ``top_p`` must be 1 for training: Tinker's trainer scores tokens under the untempered
  full distribution, and an importance ratio against a tempered or truncated sampler would be wrong.
- AdamW with ``beta1=0.9, beta2=0.999, eps=1e-8``: torch's AdamW defaults, i.e. exactly the local backend's
  optimizer (Tinker's and the cookbook's default ``beta2=0.95`` adapts faster but would change the experiment).
- Failures: the SDK already retries connection errors, timeouts, 408/409/429 and 5xx with exponential backoff
  (about 5 minutes for training calls, with a progress timeout for sampling), and a training client whose request
  failed refuses all further requests. So nothing here retries again: a call that still fails stops the run
  with an ``error:`` line naming the last good checkpoint, and ``--resume`` continues from its saved state.
- Logged per-token statistics: ``ratio_mean`` and the clip fractions come from the trainer log-probabilities
  that ``forward_backward`` returns (clip fractions are 0 for ``importance_sampling``, which has no clip);
  ``entropy`` is the sample estimate ``mean(-logp_sampler)`` (the expected surprisal is the entropy);
  ``kl_mean`` is NaN (no reference model), ``grad_norm`` NaN unless the service reports one.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from l2a.checkpoint import STATE_FILE, load_trainer_state, write_checkpoint
from l2a.cli import UserError
from l2a.grpo import LOSS_AGGREGATIONS
from l2a.model import load_tokenizer
from l2a.rollout import Completion, SamplingConfig, encode_chat, stop_token_ids

try:
    import tinker
except ImportError:  # an optional dependency: only backend=tinker needs it
    tinker = None

log = logging.getLogger(__name__)

API_KEY_ENV = "TINKER_API_KEY"


class TinkerFailure(RuntimeError):
    """A Tinker call failed after the SDK's own retries."""


# --------------------------------------------------------------------------------------------------
# Pure pieces: the advantage scaling and the Datum layout.
# --------------------------------------------------------------------------------------------------


def tinker_advantage_scale(lengths: Sequence[int], loss_agg: str, max_len: int) -> list[float]:
    """Factor ``s_i`` per completion such that Tinker's summed loss with advantages ``A_i * s_i`` equals
    ``grpo_loss(..., loss_agg)`` with advantages ``A_i``:

        sum_i sum_{t < len_i} l_t(A_i * s_i)  =  sum_i s_i * sum_t l_t(A_i)  =  grpo_loss,   with
        token-mean:               s_i = 1 / sum_j len_j
        seq-mean-token-mean:      s_i = 1 / (len_i * N)
        seq-mean-token-sum-norm:  s_i = 1 / (N * max_len)

    The first equality holds because both Tinker losses are positively homogeneous in the advantage
    (``l(s * A) = s * l(A)`` for ``s > 0``; the PPO clip acts on the ratio, not on A).
    ``lengths``: completion lengths in tokens (N = len(lengths) completions, the whole step's batch);
    ``max_len``: the configured maximum completion length (Dr. GRPO's constant). Empty completions count as
    length 1 where a length divides, as ``grpo_loss`` clamps its counts.
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")
    n = len(lengths)
    if loss_agg == "token-mean":
        return [1.0 / max(sum(lengths), 1)] * n
    if loss_agg == "seq-mean-token-mean":
        return [1.0 / (max(length, 1) * n) for length in lengths]
    return [1.0 / (n * max_len)] * n


def completion_datum(completion: Completion, advantage: float) -> tinker.Datum:
    """One completion as a Tinker training example, in the cookbook's layout.

    The model reads ``prompt + tokens[:-1]`` and position i predicts token i + 1 of ``prompt + tokens``, so the
    per-position arrays are shifted by one against the input: the first ``len(prompt) - 1`` positions predict
    prompt tokens and carry zeros (target 0, advantage 0: no loss there), the last ``len(tokens)`` positions
    carry the sampled tokens, the sampler's log-probabilities of them and the (scaled) advantage.
    """
    prompt, tokens, logprobs = completion.prompt_ids, completion.token_ids, completion.logprobs
    if not prompt or not tokens:
        raise ValueError("a training datum needs a non-empty prompt and completion")
    if logprobs is None or len(logprobs) != len(tokens):
        raise ValueError("a training datum needs the sampler's log-probability of every completion token")
    pad = len(prompt) - 1
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(prompt + tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array([0] * pad + tokens, dtype=np.int64),
            "logprobs": np.array([0.0] * pad + list(logprobs), dtype=np.float32),
            "advantages": np.array([0.0] * pad + [advantage] * len(tokens), dtype=np.float32),
        },
    )


def ppo_loss_config(clip_low: float, clip_high: float) -> dict[str, float]:
    """Our clip (distance from 1) as Tinker's ``ppo`` thresholds (ratios)."""
    return {"clip_low_threshold": 1.0 - clip_low, "clip_high_threshold": 1.0 + clip_high}


# --------------------------------------------------------------------------------------------------
# Talking to the service.
# --------------------------------------------------------------------------------------------------


def require_api_key() -> None:
    """Fail before any work if the key is missing. Its value is left to the SDK and never printed."""
    if tinker is None:
        raise UserError("backend=tinker needs the Tinker SDK: pip install -r requirements-tinker.txt")
    if not os.environ.get(API_KEY_ENV):
        raise UserError(f"backend=tinker needs a Tinker API key in the environment variable {API_KEY_ENV}")


def _wait(future: Any, what: str) -> Any:
    """The result of a Tinker future. The SDK has retried transient errors already; what still fails is final."""
    try:
        return future.result()
    except Exception as error:  # only the SDK runs here
        raise TinkerFailure(f"Tinker {what} failed: {type(error).__name__}: {error}") from error


class TinkerEngine:
    """The rollout interface (``generate``, see ``l2a.rollout``) on a Tinker ``SamplingClient``.

    Tinker samples have no repetition penalty: a ``repetition_penalty`` other than 1 is ignored with a warning.
    Greedy decoding (``temperature == 0``) is sent as top-k 1.
    """

    def __init__(self, sampling_client: tinker.SamplingClient, tokenizer):
        self.sampling_client = sampling_client
        self.tokenizer = tokenizer
        self.stop_ids = sorted(stop_token_ids(tokenizer))  # end of the assistant's turn, as in HFEngine
        self._warned_penalty = False

    @classmethod
    def from_path(cls, path: str, tokenizer_source: str | None = None) -> TinkerEngine:
        """An engine for saved weights: a ``tinker://.../sampler_weights/...`` path, or a checkpoint directory
        this backend wrote (its ``trainer_state.pt`` names the sampler weights; its tokenizer is used).
        ``tokenizer_source``: a local Hugging Face directory; by default the checkpoint's, else Tinker's own."""
        require_api_key()
        if not path.startswith("tinker://"):
            state_file = Path(path) / "trainer_state.pt"
            if not state_file.is_file():
                raise UserError(f"{path}: neither a tinker:// path nor a checkpoint directory "
                                 "with trainer_state.pt")
            sampler_path = load_trainer_state(path).get("tinker_sampler_path")
            if sampler_path is None:
                raise UserError(f"{state_file}: no tinker_sampler_path (not written by backend=tinker)")
            path, tokenizer_source = sampler_path, tokenizer_source or str(Path(path))
        try:
            client = _wait(tinker.ServiceClient().create_sampling_client(model_path=path), f"sampler for {path}")
        except TinkerFailure as failure:
            raise UserError(str(failure)) from failure
        tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source else client.get_tokenizer()
        return cls(client, tokenizer)

    def generate(self, prompts: Sequence[list[dict]], n: int, sampling: SamplingConfig) -> list[Completion]:
        encoded = [encode_chat(self.tokenizer, chat) for chat in prompts]
        # Submit everything first: the service batches concurrent requests, awaiting one by one would serialise.
        futures = [
            self.sampling_client.sample(tinker.ModelInput.from_ints(ids), n, self._params(sampling, sampling.seed + i))
            for i, ids in enumerate(encoded)
        ]
        completions = []
        for prompt_index, (ids, future) in enumerate(zip(encoded, futures)):
            sequences = _wait(future, "sampling").sequences
            if len(sequences) != n:
                raise TinkerFailure(f"Tinker sampling returned {len(sequences)} sequences, asked for {n}")
            for sequence in sequences:
                tokens = list(sequence.tokens)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                completions.append(Completion(prompt_index, ids, tokens, text, sequence.stop_reason, sequence.logprobs))
        return completions

    def _params(self, sampling: SamplingConfig, seed: int) -> tinker.SamplingParams:
        if sampling.repetition_penalty != 1.0 and not self._warned_penalty:
            log.warning("Tinker sampling has no repetition penalty; ignoring repetition_penalty=%s",
                        sampling.repetition_penalty)
            self._warned_penalty = True
        greedy = sampling.temperature == 0
        return tinker.SamplingParams(
            max_tokens=sampling.max_new_tokens,
            seed=seed,
            stop=self.stop_ids,
            temperature=1.0 if greedy else sampling.temperature,
            top_k=1 if greedy else -1,
            top_p=1.0 if greedy else sampling.top_p,
        )


# --------------------------------------------------------------------------------------------------
# The policy: what train.main drives.
# --------------------------------------------------------------------------------------------------


def _stops_cleanly(method):
    """A Tinker call that failed for good ends the run with a UserError, naming the checkpoint to resume from."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except TinkerFailure as failure:
            last = self.last_checkpoint or "none yet (nothing was saved; start again)"
            raise UserError(f"{failure}. The run stopped. Last good checkpoint: {last}; "
                             "continue from it with --resume.") from failure

    return wrapper


class TinkerPolicy:
    """The policy as a LoRA adapter on Tinker: ``generate``, ``update`` and ``save``, like ``LocalPolicy``."""

    @_stops_cleanly
    def __init__(self, cfg, resume_from: Path | None):
        require_api_key()
        self.cfg = cfg
        self.last_checkpoint = resume_from
        self.service = tinker.ServiceClient()
        if resume_from is None:
            future = self.service.create_lora_training_client(
                base_model=cfg.tinker_base_model, rank=cfg.lora_rank, seed=cfg.seed)
        else:
            state_file = resume_from / STATE_FILE
            state = load_trainer_state(resume_from)
            if "tinker_state_path" not in state:
                raise UserError(f"{state_file}: no tinker_state_path (a checkpoint of the local backend?)")
            if state["tinker_base_model"] != cfg.tinker_base_model:
                raise UserError(f"{state_file}: trained on {state['tinker_base_model']}, "
                                 f"but tinker_base_model is {cfg.tinker_base_model}")
            # Weights and Adam moments: the resumed run continues as if it had never stopped.
            future = self.service.create_training_client_from_state_with_optimizer(state["tinker_state_path"])
        self.training_client = _wait(future, "creating the training client")
        if Path(cfg.model).is_dir():  # a local copy of the base model's tokenizer (tests use a tiny one)
            self.tokenizer = load_tokenizer(cfg.model)
        else:
            self.tokenizer = self.training_client.get_tokenizer()
        self.engine: TinkerEngine | None = None  # a sampler with the current weights, made when first needed

    @_stops_cleanly
    def generate(self, chats: list[list[dict]], n: int, sampling: SamplingConfig) -> list[Completion]:
        if self.engine is None:
            sampler = _wait(self.training_client.save_weights_and_get_sampling_client(), "sampler weights sync")
            self.engine = TinkerEngine(sampler, self.tokenizer)
        return self.engine.generate(chats, n, sampling)

    @_stops_cleanly
    def update(self, completions: list[Completion], advantages: torch.Tensor) -> dict[str, float]:
        """One ``forward_backward`` over the whole batch and one ``optim_step``: the local backend's step 4 + 5."""
        cfg = self.cfg
        scales = tinker_advantage_scale([len(c.token_ids) for c in completions], cfg.loss_agg, cfg.max_new_tokens)
        scaled = [a * s for a, s in zip(advantages.tolist(), scales)]
        # An empty completion has no token to learn from (and no valid datum); it contributes nothing locally either.
        kept = [(c, a) for c, a in zip(completions, scaled) if c.token_ids]
        datums = [completion_datum(c, a) for c, a in kept]
        config = ppo_loss_config(cfg.clip_low, cfg.clip_high) if cfg.tinker_loss_fn == "ppo" else None
        backward = self.training_client.forward_backward(datums, loss_fn=cfg.tinker_loss_fn, loss_fn_config=config)
        step = self.training_client.optim_step(tinker.AdamParams(
            learning_rate=cfg.learning_rate, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=cfg.weight_decay, grad_clip_norm=cfg.max_grad_norm))
        output = _wait(backward, "forward_backward")
        optim = _wait(step, "optim_step")
        self.engine = None  # the weights changed: the next generate samples from a fresh snapshot
        loss = output.metrics.get("loss:sum", math.nan)
        if "loss:sum" in output.metrics and not math.isfinite(loss):
            # The optimizer step is already taken and Tinker keeps no way to undo it: stop at the last checkpoint.
            raise TinkerFailure(f"Tinker forward_backward returned a non-finite loss ({loss}); "
                                "the updated weights are unusable")
        grad_norm = next((v for k, v in (optim.metrics or {}).items() if "grad_norm" in k), math.nan)
        stats = token_stats(kept, output.loss_fn_outputs, cfg)
        return {"loss": loss, "grad_norm": grad_norm, "applied": True, **stats}

    @_stops_cleanly
    def save(self, step: int, trainer_state: dict) -> Path:
        """Tinker state + sampler weights by name, their paths in ``trainer_state.pt``, written atomically."""
        cfg = self.cfg
        name = f"step-{step:06d}"
        state_future = self.training_client.save_state(name)
        sampler_future = self.training_client.save_weights_for_sampler(name)
        tinker_paths = {
            "tinker_state_path": _wait(state_future, "save_state").path,
            "tinker_sampler_path": _wait(sampler_future, "save_weights_for_sampler").path,
            "tinker_base_model": cfg.tinker_base_model,
            "lora_rank": cfg.lora_rank,
        }

        def fill(folder: Path) -> None:
            self.tokenizer.save_pretrained(folder)  # so evaluation needs no network for the tokenizer
            if step == cfg.steps:
                self._download_adapter(name, folder / "adapter", tinker_paths["tinker_state_path"])

        # Pruning removes local folders only; the Tinker-side states stay (`tinker checkpoint list`).
        self.last_checkpoint = write_checkpoint(cfg.output_dir, step, cfg, {**trainer_state, **tinker_paths}, fill,
                                                cfg.keep_checkpoints)
        return self.last_checkpoint

    def close(self) -> None:
        """Nothing runs here: the service holds the model."""

    def _download_adapter(self, name: str, dest: Path, state_path: str) -> None:
        """The LoRA adapter in Hugging Face PEFT format (``adapter_config.json``, ``adapter_model.safetensors``).

        Best effort: the checkpoint is complete without it, so a failure only warns how to fetch it later.
        """
        try:
            export = _wait(self.training_client.save_weights_external(name), "save_weights_external").path
            urls = _wait(self.service.create_rest_client().get_external_weights_urls(export), "export URLs").urls
            for relative, url in urls.items():
                target = (dest / relative).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise ValueError(f"unsafe file name in the export: {relative!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as f:
                    shutil.copyfileobj(response, f)
        except (TinkerFailure, OSError, ValueError) as error:
            shutil.rmtree(dest, ignore_errors=True)
            log.warning("could not download the LoRA adapter (%s); the checkpoint is complete without it. "
                        "Fetch it later with: tinker checkpoint download %s", error, state_path)


def token_stats(kept: list[tuple[Completion, float]], outputs: list[dict], cfg) -> dict[str, float]:
    """Per-token means for logging, from the sampler's and the trainer's log-probabilities of the same tokens."""
    sampled = torch.tensor([lp for c, _ in kept for lp in c.logprobs], dtype=torch.float64)
    stats = {"entropy": -sampled.mean().item(), "clip_low_frac": math.nan, "clip_high_frac": math.nan,
             "ratio_mean": math.nan, "kl_mean": math.nan}
    if len(outputs) != len(kept) or not all("logprobs" in o for o in outputs):
        return stats
    # The last len(tokens) positions of each datum predict the completion tokens.
    trained = torch.cat([torch.as_tensor(o["logprobs"].to_numpy(), dtype=torch.float64)[-len(c.token_ids):]
                         for (c, _), o in zip(kept, outputs)])
    advantage = torch.tensor([a for c, a in kept for _ in c.token_ids], dtype=torch.float64)
    ratio = torch.exp(trained - sampled)
    stats["ratio_mean"] = ratio.mean().item()
    if cfg.tinker_loss_fn == "ppo":  # where the clip removed the gradient, as in grpo_loss's statistics
        stats["clip_low_frac"] = ((ratio < 1 - cfg.clip_low) & (advantage < 0)).double().mean().item()
        stats["clip_high_frac"] = ((ratio > 1 + cfg.clip_high) & (advantage > 0)).double().mean().item()
    else:  # importance_sampling has no clip
        stats["clip_low_frac"] = stats["clip_high_frac"] = 0.0
    return stats
