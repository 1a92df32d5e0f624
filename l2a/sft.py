"""Supervised fine-tuning on the logs' own hindsight targets: the baseline GRPO is compared with, and its warm start.

Every built sample carries ``target``, what the doctor actually did next (``l2a.data.hindsight_target``): the logged
next question of a continue sample, ``<stop />`` of a stop sample. SFT imitates it. The model reads the policy prompt
(``policy_messages``, rendered by the chat template as in rollouts) and the loss is the cross-entropy of the target
tokens and the end-of-turn token only, averaged over the batch's target tokens, plus the stop/continue decision as
a binary choice, weighted by ``decision_weight`` (lambda):

    loss = -(1 / N) * sum over samples i, target tokens t of  log pi(y_i,t | prompt_i, y_i,<t)
           - lambda * (1 / B) * sum over samples i of  log p_i(d_i),   p_i(stop) = pi(first token of <stop /> | prompt_i)

where d_i is sample i's decision and p_i(continue) = 1 - p_i(stop). Why the second term: the decision is one token
in ~20, and in the token cross-entropy a continue sample's first token is a particular question word ("What",
"Where", ...), so the continue side's probability is spread over many words while ``<stop`` is one: an unsure model
stops under greedy decoding. The binary term trains stop against all of continue. On the embedded default
(128 steps) it took held-out greedy decision accuracy from 0.80 to 0.87 (all 416 test samples; the README).

Two exact savings and one choice make a step cheap on a CPU:

- every prompt starts with the same system prompt (~150 tokens), so it runs once per batch and its key/value cache
  serves every row (gradients flow back through the cache; the same loss and gradient as running each row in full,
  tested);
- the vocabulary projection runs only at the positions that predict a target token;
- ``frozen_layers``: the embeddings and the bottom decoder layers stay fixed, so backward stops halfway and keeps no
  activations of the bottom half (the probe behind this module measured the shared prompt plus the top half of
  SmolLM2-135M at 3.2x faster steps and a third of the memory of plain SFT of all weights, same first-step loss).

``SFTTrainer.step`` is one optimizer step; ``python -m l2a.sft`` runs it as a command and train.py's warm start
(``sft_steps``) runs it on the policy before GRPO:

    python -m l2a.sft                                              # SmolLM2-135M, data/synthetic, runs/sft
    python -m l2a.sft --steps 64 --learning_rate 5e-5 --output_dir runs/sft64
    python -m l2a.evaluate --model runs/sft/checkpoints/step-000128 --out runs/eval-sft
    python train.py --model runs/sft/checkpoints/step-000128 --sft_steps 0   # GRPO from the SFT checkpoint

Checkpoints are train.py's: ``OUTPUT_DIR/checkpoints/step-N`` = a Hugging Face model directory + ``trainer_state.pt``;
``--resume true`` continues a stopped run exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from l2a.checkpoint import latest_checkpoint, load_trainer_state, truncate_metrics, write_checkpoint
from l2a.cli import UserError, arg, parse_dataclass, run_command
from l2a.data import batch_indices, load_samples
from l2a.model import EMBEDDED_DEFAULT, fastest_dtype, load_model, load_tokenizer
from l2a.prompts import STOP_TOKEN, policy_messages
from l2a.rollout import encode_chat


@dataclass
class SFTConfig:
    model: str = arg(EMBEDDED_DEFAULT, f"HF checkpoint directory, or {EMBEDDED_DEFAULT!r} (bundled GGUF, converted once).")
    train_file: str = arg("data/synthetic/train.jsonl", "Training samples with a 'target' (JSONL written by `python -m l2a.data`).")
    output_dir: str = arg("runs/sft", "Metrics and checkpoints go here.")
    seed: int = arg(0, "Seeds the order of the samples.")
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = arg("auto", "Precision, as train.py's: 'bfloat16' (float32 weights and optimizer, bf16 autocast compute), 'float32', 'float64', or 'auto': bfloat16 where the hardware computes it natively, else float32.")
    train_mode: Literal["Ra+Rs", "Ra"] = arg("Ra+Rs", "Which policy system prompt the model reads: with the stop rule ('Ra+Rs') or without ('Ra').")
    steps: int = arg(128, "Optimizer steps (train.py's warm start: sft_steps, the same default).")
    batch_size: int = arg(8, "Samples per step.")
    learning_rate: float = arg(1e-4, "AdamW peak learning rate, decayed to 0 over the steps by a cosine.")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    max_grad_norm: float = arg(1.0, "Gradient norm clip.")
    decision_weight: float = arg(1.0, "Weight lambda of the binary stop/continue cross-entropy of the first answer token, added to the token cross-entropy; 0 = plain SFT.")
    frozen_layers: int = arg(15, "Bottom decoder layers kept fixed, with the embeddings (tied to the output layer in SmolLM2); 0 trains every weight.")
    save_every: int = arg(0, "Write a checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = arg(2, "Keep the newest N checkpoints.")
    resume: bool = arg(False, "Continue from the newest checkpoint in output_dir.")


# --------------------------------------------------------------------------------------------------
# Batches: the shared system prompt once, then each row's dialogue and target


@dataclass
class SFTBatch:
    """Prompt + target rows, split into the prefix every row shares (run once) and the rest of each row.

    A row is ``encode_chat(policy_messages(messages))`` followed by the target's tokens and the end-of-turn token.
    """

    prefix_ids: torch.Tensor  # [S] tokens every row starts with (the system prompt and more)
    rest_ids: torch.Tensor  # [B, R] each row's remaining tokens, right-padded
    rest_mask: torch.Tensor  # [B, R] 1 on real tokens
    target_mask: torch.Tensor  # [B, R] True where the token belongs to the target (the loss is computed there)
    is_stop: torch.Tensor  # [B] True for a stop sample (target "<stop />")


def make_batch(tokenizer: PreTrainedTokenizerBase, samples: list[dict], train_mode: str = "Ra+Rs") -> SFTBatch:
    """Tokenize samples for ``sft_loss``. Raises UserError for a sample without a ``target``."""
    prompts, targets = [], []
    for sample in samples:
        if not sample.get("target"):
            raise UserError(f"sample {sample['cid']} has no 'target': rebuild the data with `python -m l2a.data` "
                            "(files written before targets existed lack them)")
        prompts.append(encode_chat(tokenizer, policy_messages(sample["messages"], train_mode)))
        # The end-of-turn token too: generation stops on it, so the model must learn to emit it after the target.
        targets.append(tokenizer(sample["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    # The shared prefix stops one token short of the shortest prompt, so that every row's first target token is
    # predicted from a position of its own rest.
    shared = min(_common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
    rests = [prompt[shared:] for prompt in prompts]
    width = max(len(rest) + len(target) for rest, target in zip(rests, targets))

    def padded(row: list, value) -> list:
        return row + [value] * (width - len(row))

    return SFTBatch(
        prefix_ids=torch.tensor(prompts[0][:shared]),
        rest_ids=torch.tensor([padded(rest + target, tokenizer.pad_token_id) for rest, target in zip(rests, targets)]),
        rest_mask=torch.tensor([padded([1] * (len(rest) + len(target)), 0) for rest, target in zip(rests, targets)]),
        target_mask=torch.tensor([padded([False] * len(rest) + [True] * len(target), False)
                                  for rest, target in zip(rests, targets)]),
        is_stop=torch.tensor([sample["target"] == STOP_TOKEN for sample in samples]),
    )


def _common_prefix_length(rows: list[list[int]]) -> int:
    length = 0
    for column in zip(*rows):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


# --------------------------------------------------------------------------------------------------
# The loss


def target_logits(model: PreTrainedModel, batch: SFTBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at every position that predicts a target token, and those tokens: ([N, V], [N]).

    Two passes, as in ``l2a.logprobs.completion_logits``: the shared prefix once (batch of 1), keeping its key/value
    cache; then every row's rest on the cache copied to each row. Position j of a row predicts its token j + 1, so
    the logits come from the positions just before the target tokens, and only there is the vocabulary projection
    (the model's output layer) applied.
    """
    decoder, head = model.base_model, model.get_output_embeddings()
    device = batch.rest_ids.device
    rows, width = batch.rest_ids.shape
    prefix_len = batch.prefix_ids.shape[0]
    cache = decoder(input_ids=batch.prefix_ids[None], use_cache=True).past_key_values
    cache.reorder_cache(torch.zeros(rows, dtype=torch.long, device=device))  # index_select: differentiable
    hidden = decoder(
        input_ids=batch.rest_ids,
        # right padding only: a pad comes after every real token, so causal attention never sees it
        attention_mask=torch.cat([torch.ones(rows, prefix_len, dtype=batch.rest_mask.dtype, device=device),
                                  batch.rest_mask], dim=1),
        position_ids=prefix_len + torch.arange(width, device=device).expand(rows, -1),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    predicts_target = batch.target_mask[:, 1:]  # position j predicts token j + 1
    return head(hidden[:, :-1][predicts_target]), batch.rest_ids[:, 1:][predicts_target]


def sft_loss(model: PreTrainedModel, batch: SFTBatch, stop_token_id: int,
             decision_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over the batch's target tokens plus ``decision_weight`` times the mean binary cross-entropy
    of each row's decision (the module's equation), and statistics of the step:

    - ``token_accuracy``: share of target tokens that are the argmax (teacher-forced);
    - ``decision_accuracy``: share of samples whose argmax first token decides right: the first token of
      ``<stop />`` (``stop_token_id``) for a stop sample, any other token for a continue sample. Greedy decoding
      starts with exactly that token, so this is the greedy decision, read off the training batch for free.
    """
    logits, labels = target_logits(model, batch)
    # At least float32 for the log-softmax (half-precision logits lose the small probabilities), never less.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # The first target token of each row: its position among the N selected ones.
    per_row = batch.target_mask[:, 1:].sum(1)
    first = torch.cumsum(per_row, 0) - per_row
    is_stop = batch.is_stop.to(logits.device)
    loss = F.cross_entropy(logits, labels)
    if decision_weight:
        log_p = F.log_softmax(logits[first], dim=-1)
        log_p_stop = log_p[:, stop_token_id]
        # log(1 - p_stop) as the log of every other token's probability summed: no cancellation where p_stop ~ 1
        log_p_continue = torch.logsumexp(
            log_p.index_fill(1, torch.tensor([stop_token_id], device=log_p.device), -math.inf), dim=-1)
        loss = loss - decision_weight * torch.where(is_stop, log_p_stop, log_p_continue).mean()
    with torch.no_grad():
        predicted = logits.argmax(-1)
        says_stop = predicted[first] == stop_token_id
        stats = {
            "token_accuracy": (predicted == labels).float().mean().item(),
            "decision_accuracy": (says_stop == is_stop).float().mean().item(),
            "target_tokens": float(labels.numel()),
        }
    return loss, stats


# --------------------------------------------------------------------------------------------------
# Training


@contextlib.contextmanager
def frozen_layers(model: PreTrainedModel, count: int) -> Iterator[None]:
    """Keep the input embeddings and the bottom ``count`` decoder layers fixed inside the block.

    Parameters that need no gradient make autograd stop there: backward runs through the top layers only and no
    activations of the bottom ones are kept. A tied output layer shares the embedding matrix, so it stays fixed too.
    """
    layers = getattr(model.base_model, "layers", None)
    if layers is None or not 0 <= count <= len(layers):
        raise UserError(f"frozen_layers={count}: the model has {len(layers) if layers is not None else 'no'} "
                        "decoder layers")
    frozen = [p for p in model.get_input_embeddings().parameters()] if count else []
    frozen += [p for layer in layers[:count] for p in layer.parameters()]
    was = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(frozen, was):
            p.requires_grad_(flag)


def cosine_learning_rate(peak: float, step: int, steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps``: ``peak * (1 + cos(pi * step / steps)) / 2``, from
    ``peak`` down towards 0. Why a decay: at a constant rate the decision flips from under- to over-stopping and
    back between checkpoints a few steps apart (measured on the embedded default); the decay lets it settle."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * step / steps))


class SFTTrainer:
    """Supervised steps on ``model``: ``step(samples) -> metrics``. Trains the parameters that require a gradient
    when it is made (see ``frozen_layers``), with its own AdamW."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, learning_rate: float,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0, train_mode: str = "Ra+Rs",
                 bf16_autocast: bool = False, decision_weight: float = 0.0):
        self.model, self.tokenizer, self.train_mode = model, tokenizer, train_mode
        self.decision_weight = decision_weight
        self.peak_learning_rate = learning_rate
        self.max_grad_norm, self.bf16_autocast = max_grad_norm, bf16_autocast
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, weight_decay=weight_decay, fused=True)
        self.stop_token_id = tokenizer(STOP_TOKEN, add_special_tokens=False)["input_ids"][0]

    def scheduled_step(self, samples: list[dict], step: int, steps: int, batch_size: int, seed: int) -> dict[str, float]:
        """Step ``step`` (0-based) of a run of ``steps``: its batch of ``samples`` (``batch_indices``, stream "sft")
        at its point of the cosine (``cosine_learning_rate``). ``python -m l2a.sft`` and train.py's warm start both
        step through this, so the two draw the same batches at the same rates."""
        batch = [samples[i] for i in batch_indices(len(samples), step, batch_size, seed, stream="sft")]
        return self.step(batch, cosine_learning_rate(self.peak_learning_rate, step, steps))

    def step(self, samples: list[dict], learning_rate: float | None = None) -> dict[str, float]:
        """One optimizer step on ``samples`` (at ``learning_rate`` if given, e.g. ``cosine_learning_rate``'s);
        returns loss, grad_norm, token and decision accuracy, seconds."""
        started = time.perf_counter()
        if learning_rate is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate
        was_training = self.model.training
        self.model.train()
        batch = make_batch(self.tokenizer, samples, self.train_mode)
        device = next(self.model.parameters()).device
        batch = SFTBatch(**{name: value.to(device) for name, value in vars(batch).items()})
        # Mixed precision as in GRPO's update: matrix products in bf16, the float32 weights and optimizer unchanged.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16_autocast):
            loss, stats = sft_loss(self.model, batch, self.stop_token_id, self.decision_weight)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm))
        if math.isfinite(grad_norm):  # a non-finite gradient would poison the weights and Adam's moments
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train(was_training)
        return {"loss": loss.item(), "grad_norm": grad_norm, "learning_rate": self.optimizer.param_groups[0]["lr"],
                **stats, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------------
# Command line: python -m l2a.sft


def main(argv: list[str] | None = None) -> None:
    cfg = parse_dataclass(SFTConfig, sys.argv[1:] if argv is None else argv)
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.keep_checkpoints < 1 or cfg.decision_weight < 0:
        raise UserError("steps, batch_size and keep_checkpoints must be at least 1, decision_weight at least 0")
    samples = load_samples(cfg.train_file)
    start, resume_from = 0, latest_checkpoint(cfg.output_dir) if cfg.resume else None
    path = str(resume_from) if resume_from else cfg.model
    if cfg.dtype == "auto":
        cfg.dtype = fastest_dtype(torch.device("cpu"))
        print(f"dtype auto: {cfg.dtype}")
    weights = torch.float64 if cfg.dtype == "float64" else torch.float32  # bfloat16: float32 master weights
    model, tokenizer = load_model(path, weights), load_tokenizer(path)
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    if resume_from:
        state = load_trainer_state(resume_from)
        start = state["step"]
        print(f"resuming from {resume_from} (step {start})")
    with frozen_layers(model, cfg.frozen_layers):
        trainer = SFTTrainer(model, tokenizer, cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm, cfg.train_mode,
                             bf16_autocast=cfg.dtype == "bfloat16", decision_weight=cfg.decision_weight)
        if resume_from:
            try:
                trainer.optimizer.load_state_dict(state["optimizer"])
            except ValueError as err:  # another set of trained parameters
                raise UserError(f"{resume_from}: cannot resume with these settings ({err}); "
                                "was frozen_layers changed?") from None
            truncate_metrics(metrics, start)
        else:
            metrics.unlink(missing_ok=True)
        metrics.parent.mkdir(parents=True, exist_ok=True)
        for step in range(start, cfg.steps):
            measured = trainer.scheduled_step(samples, step, cfg.steps, cfg.batch_size, cfg.seed)
            row = {"step": step + 1, **{f"sft/{key}": value for key, value in measured.items()}}
            with metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"step {step + 1}/{cfg.steps}: loss {row['sft/loss']:.3f}, decision accuracy "
                  f"{row['sft/decision_accuracy']:.2f}, {row['sft/seconds']:.1f} s", flush=True)
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
                save(model, tokenizer, trainer, cfg, step + 1)


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, trainer: SFTTrainer, cfg: SFTConfig,
         step: int) -> Path:
    """A checkpoint like train.py's: Hugging Face model directory + ``trainer_state.pt`` (optimizer, step)."""
    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    final = write_checkpoint(cfg.output_dir, step, cfg, {"optimizer": trainer.optimizer.state_dict(), "step": step},
                             fill, cfg.keep_checkpoints)
    print(f"saved {final}")
    return final


def interrupted_hint(argv: list[str]) -> str:
    last = latest_checkpoint(parse_dataclass(SFTConfig, argv).output_dir)
    if last is None:
        return "no checkpoint was written yet; start again"
    return f"the newest checkpoint is {last}; continue from it with --resume true"


if __name__ == "__main__":
    sys.exit(run_command(main, resume_hint=lambda: interrupted_hint(sys.argv[1:])))
