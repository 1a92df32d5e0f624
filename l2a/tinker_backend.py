"""Sampling and training on Tinker (``backend: tinker``): the same GRPO step, with a LoRA adapter trained remotely.

    TINKER_API_KEY=... python train.py --config configs/tinker_qwen.yaml

``TinkerPolicy`` has the three methods the loop in ``train.main`` calls, like ``LocalPolicy``; only where the
model lives changes (the Tinker SDK, ``tinker==0.38.0``, does the GPU work remotely; this process stays on CPU,
and there is only one: each process would start a training run of its own, so several are refused):

- ``generate``: ``save_weights_and_get_sampling_client()`` snapshots the current weights into a sampler (Tinker's
  whole "weight sync"), then every prompt's ``sample(prompt, n, params)`` is submitted before any result is
  awaited. Each sequence comes back with the sampler's log-probabilities of its tokens.
- ``update``: one ``Datum`` per completion (``completion_datum``), ``forward_backward`` with Tinker's built-in
  ``importance_sampling`` or ``ppo`` loss, and ``optim_step``, submitted back to back: one optimizer step, on a
  batch or (``ppo_epochs``, ``mini_batches``) on one mini-batch of it. ``sync_sampler`` drops the sampler, so the
  next ``generate`` snapshots the weights afresh; the loop calls it every ``sync_interval`` optimizer steps.
- ``save``: ``save_state`` (weights + Adam moments, what ``--resume`` loads) and ``save_weights_for_sampler``
  (what evaluation samples from), by name; their ``tinker://`` paths go into ``trainer_state.pt`` of the same
  local checkpoint layout as the local backend. Tinker keeps (and bills) these remote copies until they are
  deleted or expire, so they expire after ``tinker_checkpoint_ttl_hours`` (the final checkpoint's never), and
  when ``keep_checkpoints`` prunes a local checkpoint its remote copies are deleted too. The final save also
  exports the LoRA adapter, downloads it and converts it into a Hugging Face PEFT adapter directory
  ``<checkpoint>/adapter`` (``peft_adapter``; best effort: ``tinker checkpoint download`` fetches it later too).

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
``importance_sampling`` has no clip; with one optimizer step per batch its ratio only corrects the small
numerical gap between Tinker's sampler and trainer (the policies are otherwise the same, as in the local backend).

Several optimizer steps per batch, a lagging sampler: each datum carries the *sampler's* log-probabilities, and
both Tinker losses take them as the old policy, so the ratio is pi_trainer / pi_sampler. It leaves 1 after the
batch's first optimizer step, and with ``sync_interval > 1`` already at the first (the sampler is older than the
trainer); the PPO clip then binds against the sampler's policy, as in Trinity-RFT, where the rollout engine's
log-probabilities are the old ones. (The local backend instead takes pi_old from the trainer's weights at the
batch's start and corrects for the sampler with importance weights, ``vllm_is_correction``.) Tinker's ``ppo``
loss has no dual clip: ``clip_ratio_c`` is refused.

Choices
-------
- ``kl_coef > 0`` is refused. Tinker's built-in losses take no reference log-probabilities; the cookbook's way
  (a k1 penalty folded into the advantages, after a base-model prefill of every completion) optimises a
  different objective from the local KL loss, so it would not be "the same run". A rank-32 LoRA moves little.
- ``temperature`` and ``top_p`` must be 1 for training: Tinker's trainer scores tokens under the untempered
  full distribution, and an importance ratio against a tempered or truncated sampler would be wrong.
- AdamW with ``beta1=0.9, beta2=0.999, eps=1e-8``: torch's AdamW defaults, i.e. exactly the local backend's
  optimizer (Tinker's and the cookbook's default ``beta2=0.95`` adapts faster but would change the experiment).
- Seeds: a request for ``n > 1`` samples of one prompt goes without a seed, as in the tinker-cookbook's RL loop.
  With an integer seed the service has been reported to return many token-identical samples in one such request
  (tinker-feedback issue #79), and a group of copies has zero advantage: paid tokens with nothing to learn. The
  alternative, ``n`` single-sample requests with seeds of their own, would prefill (and bill) every prompt ``n``
  times and still not make a run reproducible: the service does not promise deterministic seeded sampling
  (tinker-cookbook issue #206 reports seeded samples that differ). Single-sample requests (evaluation) keep
  their seed. Neither behaviour was measured here (no live service); the test double reproduces the report.
- Failures: the SDK already retries connection errors, timeouts, 408/409/429 and 5xx with exponential backoff
  (about 5 minutes for training calls, with a progress timeout for sampling), and a training client whose request
  failed refuses all further requests. So nothing here retries again: a call that still fails stops the run
  with an ``error:`` line naming the last good checkpoint, and ``--resume`` continues from its saved state. That
  includes creating the clients: the SDK contacts the service inside the creating call itself (the first one
  opens the session), so a bad key or an unreachable service fails there, not only in the future it returns.
- Logged per-token statistics: ``ratio_mean`` and the clip fractions come from the trainer log-probabilities
  that ``forward_backward`` returns (clip fractions are 0 for ``importance_sampling``, which has no clip);
  ``entropy`` is the sample estimate ``mean(-logp_sampler)`` (the expected surprisal is the entropy);
  ``kl_mean`` is NaN (no reference model), ``grad_norm`` NaN unless the service reports one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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
EXPORT_TTL_SECONDS = 3600  # the shortest TTL Tinker accepts; the adapter export only lives until it is downloaded


class TinkerFailure(UserError):
    """A Tinker call failed after the SDK's own retries: one ``error:`` line (``l2a.cli.run_command``), and in
    training one that names the checkpoint to resume from (``_stops_cleanly``)."""


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
# The trained adapter: Tinker's export as a Hugging Face PEFT adapter.
# --------------------------------------------------------------------------------------------------

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight")
# Tinker's module names that differ from the Hugging Face model's: the output projection (the "unembedding").
HF_MODULE = {"model.unembed_tokens": "lm_head"}


def peft_adapter(export: Path, dest: Path, base_model: str) -> None:
    """Tinker's LoRA export (``save_weights_external``) as a PEFT adapter directory ``dest``.

    The export uses PEFT's file names, ``adapter_model.safetensors`` with keys
    ``base_model.model.<module>.lora_A.weight`` (shape rank x in) and ``.lora_B.weight`` (out x rank) and
    ``adapter_config.json`` with ``r`` and ``lora_alpha``, but Tinker's module names: the output projection is
    ``model.unembed_tokens`` where a Hugging Face model has ``lm_head`` (the tinker-cookbook's
    ``build_lora_adapter`` renames it the same way). ``dest`` gets the same tensors under the model's names and a
    complete PEFT config (``target_modules``, ``base_model_name_or_path``, ``task_type``), e.g.

        base_model.model.model.unembed_tokens.lora_B.weight  ->  base_model.model.lm_head.lora_B.weight

    For a model with tied embeddings the cookbook maps the unembedding LoRA onto ``embed_tokens`` instead (the
    shared matrix, which is what a merge must change); here it stays on ``lm_head``, the output projection it
    was named after. Which of the two matches Tinker's forward pass for tied models was not checked; the
    preset's Qwen3-8B has a separate ``lm_head``, where both agree. Expert (3-D) tensors of mixture-of-experts
    models are refused (ValueError): the cookbook's converter handles them.
    """
    config_file, weights_file = export / ADAPTER_CONFIG, export / ADAPTER_WEIGHTS
    config = json.loads(config_file.read_text())
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)):
            raise ValueError(f"{config_file}: no {key!r} (not a Tinker LoRA export?)")
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(weights_file).items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{weights_file}: {key!r} is not a LoRA tensor")
        if tensor.dim() != 2:
            raise ValueError(f"{weights_file}: {key} is {tensor.dim()}-D (mixture-of-experts LoRA); convert it with "
                             "the tinker-cookbook's build_lora_adapter")
        module = HF_MODULE.get(match["module"], match["module"])
        new_key = f"base_model.model.{module}.lora_{match['half']}.weight"
        if new_key in renamed:
            raise ValueError(f"{weights_file}: two tensors for {new_key}")
        renamed[new_key] = tensor
    modules = {LORA_KEY.fullmatch(key)["module"] for key in renamed}
    for module in modules:
        a, b = (renamed.get(f"base_model.model.{module}.lora_{half}.weight") for half in "AB")
        if a is None or b is None or a.shape[0] != config["r"] or b.shape[1] != config["r"]:
            raise ValueError(f"{weights_file}: {module} lacks a lora_A (r x in) and lora_B (out x r) pair of "
                             f"rank {config['r']}")
    dest.mkdir(parents=True)
    save_file(renamed, dest / ADAPTER_WEIGHTS, metadata={"format": "pt"})  # the metadata transformers expects
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config["r"], "lora_alpha": config["lora_alpha"], "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module in modules}),
        "fan_in_fan_out": False, "inference_mode": True,
    }
    (dest / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Talking to the service.
# --------------------------------------------------------------------------------------------------


def require_api_key() -> None:
    """Fail before any work if the key is missing. Its value is left to the SDK and never printed."""
    if tinker is None:
        raise UserError("backend=tinker needs the Tinker SDK: pip install -r requirements-tinker.txt")
    if not os.environ.get(API_KEY_ENV):
        raise UserError(f"backend=tinker needs a Tinker API key in the environment variable {API_KEY_ENV}")


@contextlib.contextmanager
def _tinker_call(what: str) -> Iterator[None]:
    """Whatever the SDK calls inside raise becomes one ``TinkerFailure`` naming ``what``: failures of the call
    itself (the SDK may contact the service there) as well as of the future it returns. The SDK has retried
    transient errors already; what still fails is final."""
    try:
        yield
    except Exception as error:  # only SDK calls run inside
        raise TinkerFailure(f"Tinker {what} failed: {type(error).__name__}: {error}") from error


def _wait(future: Any, what: str) -> Any:
    """The result of a Tinker future (``_tinker_call`` for its failures)."""
    with _tinker_call(what):
        return future.result()


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
        with _tinker_call(f"sampler for {path}"):
            client = tinker.ServiceClient().create_sampling_client(model_path=path).result()
        if tokenizer_source:
            tokenizer = load_tokenizer(tokenizer_source)
        else:
            with _tinker_call(f"tokenizer of {path}"):
                tokenizer = client.get_tokenizer()
        return cls(client, tokenizer)

    def generate(self, prompts: Sequence[list[dict]], n: int, sampling: SamplingConfig) -> list[Completion]:
        encoded = [encode_chat(self.tokenizer, chat) for chat in prompts]
        # No seed when asking for several samples: seeded, they can come back as copies ("Seeds" above).
        seeds = [sampling.seed + i if n == 1 else None for i in range(len(encoded))]
        # Submit everything first: the service batches concurrent requests, awaiting one by one would serialise.
        with _tinker_call("sampling"):
            futures = [self.sampling_client.sample(tinker.ModelInput.from_ints(ids), n, self._params(sampling, seed))
                       for ids, seed in zip(encoded, seeds)]
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

    def _params(self, sampling: SamplingConfig, seed: int | None) -> tinker.SamplingParams:
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
        self.service = tinker.ServiceClient()  # contacts the service only when its first client is made
        self._rest = None  # a tinker.RestClient (deleting checkpoints, export URLs), made when first needed
        if resume_from is None:
            create = functools.partial(self.service.create_lora_training_client,
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
            create = functools.partial(self.service.create_training_client_from_state_with_optimizer,
                                       state["tinker_state_path"])
        with _tinker_call("creating the training client"):
            self.training_client = create().result()
        if Path(cfg.model).is_dir():  # a local copy of the base model's tokenizer (tests use a tiny one)
            self.tokenizer = load_tokenizer(cfg.model)
        else:
            with _tinker_call(f"tokenizer of {cfg.tinker_base_model}"):
                self.tokenizer = self.training_client.get_tokenizer()
        self.engine: TinkerEngine | None = None  # a sampler with the current weights, made when first needed

    @_stops_cleanly
    def generate(self, chats: list[list[dict]], n: int, sampling: SamplingConfig) -> list[Completion]:
        if self.engine is None:
            with _tinker_call("sampler weights sync"):
                sampler = self.training_client.save_weights_and_get_sampling_client().result()
            self.engine = TinkerEngine(sampler, self.tokenizer)
        return self.engine.generate(chats, n, sampling)

    def logprobs_before_update(self, completions: list[Completion]) -> None:
        """None: the datums carry the sampler's log-probabilities, which Tinker's losses take as pi_old."""
        return None

    @_stops_cleanly
    def update(self, completions: list[Completion], advantages: torch.Tensor, old_logprobs: None = None
               ) -> dict[str, float]:
        """One ``forward_backward`` over these completions (the batch, or a mini-batch of it: the advantage scales
        count its tokens and sequences) and one ``optim_step``: the local backend's ``update``."""
        cfg = self.cfg
        scales = tinker_advantage_scale([len(c.token_ids) for c in completions], cfg.loss_agg, cfg.max_new_tokens)
        scaled = [a * s for a, s in zip(advantages.tolist(), scales)]
        # An empty completion has no token to learn from (and no valid datum); it contributes nothing locally either.
        kept = [(c, a) for c, a in zip(completions, scaled) if c.token_ids]
        datums = [completion_datum(c, a) for c, a in kept]
        config = ppo_loss_config(cfg.clip_low, cfg.clip_high) if cfg.tinker_loss_fn == "ppo" else None
        adam = tinker.AdamParams(learning_rate=cfg.learning_rate, beta1=0.9, beta2=0.999, eps=1e-8,
                                 weight_decay=cfg.weight_decay, grad_clip_norm=cfg.max_grad_norm)
        with _tinker_call("submitting forward_backward and optim_step"):
            backward = self.training_client.forward_backward(datums, loss_fn=cfg.tinker_loss_fn,
                                                             loss_fn_config=config)
            step = self.training_client.optim_step(adam)
        output = _wait(backward, "forward_backward")
        optim = _wait(step, "optim_step")
        loss = output.metrics.get("loss:sum", math.nan)
        if "loss:sum" in output.metrics and not math.isfinite(loss):
            # The optimizer step is already taken and Tinker keeps no way to undo it: stop at the last checkpoint.
            raise TinkerFailure(f"Tinker forward_backward returned a non-finite loss ({loss}); "
                                "the updated weights are unusable")
        grad_norm = next((v for k, v in (optim.metrics or {}).items() if "grad_norm" in k), math.nan)
        stats = token_stats(kept, output.loss_fn_outputs, cfg)
        return {"loss": loss, "grad_norm": grad_norm, "applied": True, **stats}

    def sync_sampler(self) -> float:
        """The next ``generate`` samples from a fresh snapshot of the current weights (taken there, lazily)."""
        self.engine = None
        return 0.0

    @_stops_cleanly
    def save(self, step: int, trainer_state: dict) -> Path:
        """Tinker state + sampler weights by name, their paths in ``trainer_state.pt``, written atomically.

        The remote copies expire after ``tinker_checkpoint_ttl_hours`` (0: never), except the final checkpoint's;
        those of a checkpoint that ``keep_checkpoints`` prunes are deleted with its folder."""
        cfg = self.cfg
        name = f"step-{step:06d}"
        final = step == cfg.steps
        ttl = cfg.tinker_checkpoint_ttl_hours * 3600 if cfg.tinker_checkpoint_ttl_hours and not final else None
        with _tinker_call("submitting save_state and save_weights_for_sampler"):
            state_future = self.training_client.save_state(name, ttl_seconds=ttl)
            sampler_future = self.training_client.save_weights_for_sampler(name, ttl_seconds=ttl)
        tinker_paths = {
            "tinker_state_path": _wait(state_future, "save_state").path,
            "tinker_sampler_path": _wait(sampler_future, "save_weights_for_sampler").path,
            "tinker_base_model": cfg.tinker_base_model,
            "lora_rank": cfg.lora_rank,
        }

        def fill(folder: Path) -> None:
            self.tokenizer.save_pretrained(folder)  # so evaluation needs no network for the tokenizer
            if final:
                self._download_adapter(name, folder, tinker_paths["tinker_state_path"])

        self.last_checkpoint = write_checkpoint(cfg.output_dir, step, cfg, {**trainer_state, **tinker_paths}, fill,
                                                cfg.keep_checkpoints, on_prune=self._delete_remote_copies)
        return self.last_checkpoint

    def close(self) -> None:
        """Nothing runs here: the service holds the model."""

    def _download_adapter(self, name: str, checkpoint: Path, state_path: str) -> None:
        """``<checkpoint>/adapter``: the LoRA adapter as a Hugging Face PEFT adapter (``peft_adapter``).

        Best effort: the checkpoint is complete without it, so a failure only warns. An export that downloads
        but does not convert stays as Tinker wrote it, in ``<checkpoint>/adapter-tinker``.
        """
        export, dest = checkpoint / "adapter-tinker", checkpoint / "adapter"
        try:
            self._download_export(name, export)
        except (TinkerFailure, OSError, ValueError) as error:
            shutil.rmtree(export, ignore_errors=True)
            log.warning("could not download the LoRA adapter (%s); the checkpoint is complete without it. Fetch "
                        "it later with `tinker checkpoint download %s`, then convert it with "
                        "l2a.tinker_backend.peft_adapter", error, state_path)
            return
        try:
            peft_adapter(export, dest, self.cfg.tinker_base_model)
        except (OSError, ValueError) as error:
            shutil.rmtree(dest, ignore_errors=True)
            log.warning("the LoRA adapter is not converted to PEFT (%s); Tinker's export of it is kept in the "
                        "checkpoint's %s folder", error, export.name)
            return
        shutil.rmtree(export)

    def _download_export(self, name: str, into: Path) -> None:
        """The current weights exported by Tinker (``save_weights_external``), downloaded file by file. The
        export is a temporary copy: deleted once downloaded, and set to expire within the hour if that fails."""
        with _tinker_call("save_weights_external"):
            export = self.training_client.save_weights_external(name, ttl_seconds=EXPORT_TTL_SECONDS).result().path
        try:
            with _tinker_call("export URLs"):
                urls = self._rest_client().get_external_weights_urls(export).result().urls
            for relative, url in urls.items():
                target = (into / relative).resolve()
                if not target.is_relative_to(into.resolve()):
                    raise ValueError(f"unsafe file name in the export: {relative!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as f:
                    shutil.copyfileobj(response, f)
        finally:
            self._delete_remote(export)

    def _delete_remote_copies(self, checkpoint: Path) -> None:
        """The Tinker state and sampler weights of a local checkpoint that is being pruned."""
        state = load_trainer_state(checkpoint, mmap=True)
        for key in ("tinker_state_path", "tinker_sampler_path"):
            if key in state:
                self._delete_remote(state[key])

    def _delete_remote(self, tinker_path: str) -> None:
        """Delete a checkpoint on Tinker; best effort, as it expires by its TTL anyway (unless it was final)."""
        try:
            with _tinker_call(f"deleting {tinker_path}"):
                self._rest_client().delete_checkpoint_from_tinker_path(tinker_path).result()
        except TinkerFailure as failure:
            log.warning("%s; it stays on Tinker until it expires, or `tinker checkpoint delete %s`", failure,
                        tinker_path)

    def _rest_client(self) -> Any:
        """``tinker.RestClient`` (no session; constructing it contacts the service, so call inside _tinker_call)."""
        if self._rest is None:
            self._rest = tinker.RestClient()
        return self._rest


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
