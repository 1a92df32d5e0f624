"""Data for Learn-to-Ask: turn logged consultations into one training sample per patient turn.

The pipeline of spec section 3, one function per step (and ``python -m l2a.data`` to run it):

1. ``load_sessions``   read raw RealMedConv sessions ``{session_id, diagn, messages}``, validating every line.
2. ``split_session``   cut a session after every block of patient messages: the prefix is what the policy
                       sees, the rest of the log (``remaining``) is the *observed future*. Hindsight labels:
                       ``decision_truth`` is "stop" iff the future holds no patient message (the doctor
                       asked nothing more). ``CONSTRUCTIONS``: the paper's samples (whole history; default) or
                       the reference code's (last round only, plus a stop sample for a trailing doctor-only block).
3. ``extract_all``     an LLM (``LLMExtractor``) reads each future and lists the facts the doctor went on to
                       elicit (``info_set``); resumable, one JSONL record per finished sample. For synthetic
                       data ``oracle_facts`` reads them from the ground truth instead.
4. ``build_dataset``   ``info_truth = ", ".join(info_set)``, drop continue samples that elicit nothing, add the
                       hindsight ``target`` (what the doctor did next, for supervised fine-tuning), and write
                       ``train.jsonl`` / ``test.jsonl``, which ``load_samples`` reads back.

``l2a.synthetic.synthesize_sessions`` generates the bundled offline dataset (``data/synthetic``) in the raw format.

File formats (one JSON object per line):
- raw session:   ``{"session_id": int | str, "diagn": str, "messages": [{"role": "user" | "assistant",
                 "content": str, ...extra keys kept...}]}``
- extraction:    ``{"cid": str, "info_set": [str, ...]}``, or ``{"cid", "info_set": null, "extract_error": str}``
                 for a sample whose every attempt failed (retried on the next run)
- built sample:  ``{"cid", "session_id", "diagn", "messages" (role/content only), "decision_truth"
                 ("continue" | "stop"), "info_truth" (str), "target" (str)}``; files written before ``target``
                 existed load without it
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import logging
import os
import random
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from tqdm import tqdm

from l2a.cli import UserError, run_command
from l2a.endpoint import (
    EndpointRefused,
    RequestFailed,
    api_key,
    chat,
    first_choice_text,
    run_async,
)
from l2a.prompts import STOP_TOKEN, extraction_messages
from l2a.reward import DECISIONS
from l2a.synthetic import decision_baselines, synthesize_sessions

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)

ROLES = ("user", "assistant")
CONTEXTS = ("full", "round")
CONSTRUCTIONS: dict[str, dict[str, Any]] = {
    # the paper's C_{t-1}: the whole history before the policy's turn, one sample per patient turn
    "paper": {"context": "full", "trailing_doctor_round": False},
    # the reference code's splitter (spec section 3.1), with which its published numbers were made
    "reference": {"context": "round", "trailing_doctor_round": True},
}
"""How sessions become samples (``split_session``'s keyword arguments): ``prepare --construction``."""
SAMPLE_KEYS = ("cid", "session_id", "diagn", "messages", "decision_truth", "info_truth", "target")


class DataError(UserError):
    """Bad input data. The message starts with ``path:line:`` so the culprit can be found and fixed."""


class ExtractionFailed(Exception):
    """Every attempt to extract one sample's facts failed; the message is short and safe to store."""


class ExtractionIncomplete(UserError):
    """Some samples have no successful extraction, so the dataset cannot be built without losing them."""


# ---------------------------------------------------------------------------------------------------
# Reading and validating JSONL files


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(type(value), "null")


def _field_problem(record: Any, fields: dict[str, tuple[type | tuple[type, ...], str]]) -> str | None:
    """What is wrong with ``record``'s keys and value types, or None. ``fields``: key -> (types, wording)."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_json_type(record)}"
    for key, (types, wording) in fields.items():
        if key not in record:
            return f"missing key {key!r}"
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, types):  # bool is an int in Python, not here
            return f"{key!r} must be {wording}, got {_json_type(value)}"
    return None


def _messages_problem(messages: list) -> str | None:
    if not messages:
        return "'messages' is empty"
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{j}] must be an object, got {_json_type(message)}"
        if message.get("role") not in ROLES:
            return f"messages[{j}].role must be 'user' or 'assistant', got {message.get('role')!r}"
        if not isinstance(message.get("content"), str):
            return f"messages[{j}].content must be a string, got {_json_type(message.get('content'))}"
    return None


def _read_jsonl(path: str | Path, check: Callable[[Any], str | None], skip_bad: bool) -> tuple[list, list[str]]:
    """Parse a JSONL file; ``check(record)`` says what is wrong with a record, or returns None.

    Returns (records, problems). Blank lines are ignored. A bad line raises ``DataError("path:line: ...")``,
    or with ``skip_bad`` is left out and listed in ``problems``, so nothing disappears unreported.
    """
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({err.strerror})") from None
    records, problems = [], []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            problem = check(record)
        except UnicodeDecodeError:
            problem = "not valid UTF-8"
        except json.JSONDecodeError as err:
            problem = f"invalid JSON ({err.msg} at column {err.colno})"
        if problem is None:
            records.append(record)
        elif skip_bad:
            problems.append(f"{path}:{lineno}: {problem}")
        else:
            raise DataError(f"{path}:{lineno}: {problem}")
    return records, problems


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records as JSONL, atomically: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_sessions(path: str | Path, skip_bad: bool = False) -> tuple[list[dict], list[str]]:
    """Read raw sessions ``{session_id, diagn, messages}`` (extra keys on sessions and messages are kept).

    Returns (sessions, problems). A malformed line (bad JSON, missing key, wrong type, unknown role, empty
    messages, repeated session_id) raises ``DataError("path:line: ...")``; with ``skip_bad=True`` it is
    skipped instead and described in ``problems``.
    """
    seen_ids: set[str] = set()

    def check(record: Any) -> str | None:
        problem = _field_problem(record, {
            "session_id": ((int, str), "an integer or a string"),
            "diagn": (str, "a string"),
            "messages": (list, "an array"),
        }) or _messages_problem(record["messages"])
        if problem:
            return problem
        session_id = str(record["session_id"])  # sample ids are f"{session_id}_{k}", so 7 and "7" collide
        if session_id in seen_ids:
            return f"duplicate session_id {record['session_id']!r}"
        seen_ids.add(session_id)
        return None

    return _read_jsonl(path, check, skip_bad)


def load_samples(path: str | Path) -> list[dict]:
    """Read a built ``train.jsonl`` / ``test.jsonl``; any malformed line raises ``DataError("path:line: ...")``.

    ``target`` is optional (files built before it existed have none; only supervised fine-tuning needs it).
    """
    seen_cids: set[str] = set()

    def check(record: Any) -> str | None:
        problem = _field_problem(record, {
            "cid": (str, "a string"),
            "session_id": ((int, str), "an integer or a string"),
            "diagn": (str, "a string"),
            "messages": (list, "an array"),
            "decision_truth": (str, "a string"),
            "info_truth": (str, "a string"),
        }) or _messages_problem(record["messages"])
        if problem:
            return problem
        if record["decision_truth"] not in DECISIONS:
            return f"'decision_truth' must be 'continue' or 'stop', got {record['decision_truth']!r}"
        if "target" in record and not isinstance(record["target"], str):
            return f"'target' must be a string, got {_json_type(record['target'])}"
        if record["cid"] in seen_cids:
            return f"duplicate cid {record['cid']!r}"
        seen_cids.add(record["cid"])
        return None

    samples, _ = _read_jsonl(path, check, skip_bad=False)
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


# ---------------------------------------------------------------------------------------------------
# Splitting sessions into samples


def split_session(session: dict, context: str = "full", trailing_doctor_round: bool = False) -> list[dict]:
    """One sample per round; a round is a block of doctor (non-user) messages, then a block of patient messages.

    Each sample: ``cid`` (f"{session_id}_{k}", k = 1, 2, ...), ``session_id``, ``diagn``, ``messages`` (what
    the policy sees), ``remaining`` (every later message: the observed future) and ``decision_truth``
    ("stop" iff no patient message remains, i.e. the doctor asked nothing more).

    ``context="full"``: ``messages`` is the whole history up to the round's end (the paper's C_{t-1}), so
    ``messages + remaining`` is the session. ``context="round"``: only this round's doctor and patient
    blocks, as the reference code does (spec section 3.1).

    A trailing doctor block with no patient reply (e.g. the final "<med_search>") gives no sample by default:
    there is no patient turn to respond to. ``trailing_doctor_round=True`` keeps it, as the reference's splitter
    does: one more round whose ``messages`` end with the doctor and whose future is empty, hence a "stop" sample.
    Session 35310 (28 messages ending in "<med_search>"): 7 samples, 1 stop by default; 8 samples, 2 stop with it.
    """
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    messages = session["messages"]
    samples: list[dict] = []
    end = 0
    while end < len(messages):
        start = end
        while end < len(messages) and messages[end]["role"] != "user":
            end += 1
        while end < len(messages) and messages[end]["role"] == "user":
            end += 1
        if messages[end - 1]["role"] != "user" and not trailing_doctor_round:
            break
        remaining = messages[end:]
        samples.append({
            "cid": f"{session['session_id']}_{len(samples) + 1}",
            "session_id": session["session_id"],
            "diagn": session["diagn"],
            "messages": messages[:end] if context == "full" else messages[start:end],
            "remaining": remaining,
            # Decided from roles: the reference code searches the text for "user: ", which content can fake.
            "decision_truth": "continue" if any(m["role"] == "user" for m in remaining) else "stop",
        })
    return samples


def hindsight_target(sample: dict) -> str:
    """What the doctor did next, the target of supervised fine-tuning: ``<stop />`` for a stop sample; for a continue
    sample the logged next doctor turn, i.e. the doctor messages of ``remaining`` before the next patient message,
    joined by spaces (e.g. "Okay. Where exactly is the pain: the forehead or the temples?").
    """
    if sample["decision_truth"] == "stop":
        return STOP_TOKEN
    turn = []
    for message in sample["remaining"]:
        if message["role"] == "user":
            break
        turn.append(message["content"].strip())
    return " ".join(text for text in turn if text)


def split_by_session(sessions: list[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/test split of whole sessions (a session's samples never straddle the two).

    ``round(len(sessions) * test_fraction)`` sessions, drawn with ``seed``, go to test; both parts keep
    the input order.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    order = list(range(len(sessions)))
    random.Random(seed).shuffle(order)
    test_index = set(order[: round(len(sessions) * test_fraction)])
    train = [s for i, s in enumerate(sessions) if i not in test_index]
    test = [s for i, s in enumerate(sessions) if i in test_index]
    return train, test


def batch_indices(num_samples: int, step: int, per_step: int, seed: int, stream: str) -> list[int]:
    """The sample indices a training step uses: a fresh permutation per epoch, a pure function of (seed, stream,
    step), so a resumed run continues with exactly the samples it would have seen. Each ``stream`` ("grpo",
    "sft") has its own order, so GRPO's first prompts are not the ones a supervised warm start just fitted.
    """
    orders: dict[int, list[int]] = {}
    indices = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, num_samples)
        if epoch not in orders:
            orders[epoch] = list(range(num_samples))
            random.Random(f"{stream}-{seed}-{epoch}").shuffle(orders[epoch])  # a str seed is hashed the same everywhere
        indices.append(orders[epoch][offset])
    return indices


def evenly_spaced(samples: list[dict], count: int) -> list[dict]:
    """``count`` samples spread evenly over ``samples`` (all of them if there are no more): a held-out subset
    drawn from many consultations, where the first ``count`` lines would come from a few consecutive ones."""
    if count >= len(samples):
        return list(samples)
    return [samples[i * len(samples) // count] for i in range(count)]


# ---------------------------------------------------------------------------------------------------
# Extracting the facts each future elicits (spec section 3.2)

Extractor = Callable[[list[dict]], Awaitable[list[str]]]
"""Reads a sample's ``remaining`` messages and returns its info_set; raises ExtractionFailed if it cannot."""


def _clip(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_info_list(reply: str | None) -> list[str]:
    """Parse the extractor LLM's reply, a Python list of strings such as ``['symptom: cough']``.

    A surrounding markdown code fence is tolerated; anything else that is not a list of strings raises
    ValueError (the caller retries).
    """
    if not reply:
        raise ValueError("empty reply")
    body = reply.strip()
    fence = re.fullmatch(r"```[\w-]*\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        value = ast.literal_eval(body)  # literals only: safe on untrusted text
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"reply is not a Python literal: {_clip(reply)!r}") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"reply is not a list of strings: {_clip(reply)!r}")
    return [item.strip() for item in value if item.strip()]


class LLMExtractor:
    """Asks an LLM behind any OpenAI-compatible endpoint which facts a consultation's future elicits.

    Retries, with exponential backoff (``retry_delay`` * 1, 2, 4, ... seconds), on HTTP errors, timeouts and
    unparsable replies (``l2a.endpoint.chat``); after ``max_retries`` retries it raises ExtractionFailed. A rejected
    key, model or URL (HTTP 401/403/404) raises EndpointRefused at once, since it would fail every sample alike.
    Give the client ``max_retries=0`` so that this retry loop is the only one.
    """

    def __init__(self, client: openai.AsyncOpenAI, model: str, *, temperature: float = 0.7,
                 max_tokens: int = 512, max_retries: int = 3, retry_delay: float = 1.0):
        self.client = client
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.retry_delay = retry_delay

    async def __call__(self, remaining: list[dict]) -> list[str]:
        try:
            return await chat(self.client, self.model, extraction_messages(remaining), _info_list, what="extraction",
                              max_retries=self.max_retries, backoff=self.retry_delay, temperature=self.temperature,
                              max_tokens=self.max_tokens)
        except RequestFailed as failure:
            raise ExtractionFailed(_clip(str(failure), 200)) from None


def _info_list(completion) -> list[str]:
    return parse_info_list(first_choice_text(completion) or None)


def oracle_facts(remaining: list[dict]) -> list[str]:
    """The exact info_set of a synthetic sample: the facts recorded on the future's doctor questions."""
    return [fact for message in remaining for fact in message.get("elicits", [])]


async def oracle_extractor(remaining: list[dict]) -> list[str]:
    """``oracle_facts`` as an Extractor, so the LLM pipeline runs offline on synthetic data."""
    return oracle_facts(remaining)


def repair_incomplete_tail(path: Path) -> bool:
    """Cut a last line that lacks its newline off a resumable JSONL file; True if there was one.

    Resumable outputs append each record with its newline in one write and flush, so a line without one was
    cut short by a kill mid-write. Removing it lets appending go on cleanly; its sample is simply redone.
    """
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) == len(data):
        return False
    log.warning("%s: removed an incomplete last line (interrupted write); that sample will be redone", path)
    with path.open("r+b") as file:
        file.truncate(len(complete))
    return True


def read_extractions(path: str | Path) -> dict[str, list[str] | None]:
    """Read an extraction file into cid -> info_set (None = failed); later records override earlier ones.

    A last line without its newline was cut short by a kill mid-write: it is removed from the file (so
    appending can go on cleanly) and its sample is simply extracted again.
    """
    path = Path(path)
    if not path.exists():
        return {}
    repair_incomplete_tail(path)

    def check(record: Any) -> str | None:
        problem = _field_problem(record, {"cid": (str, "a string"),
                                          "info_set": ((list, type(None)), "an array or null")})
        if problem is None and not all(isinstance(item, str) for item in record["info_set"] or []):
            problem = "'info_set' must hold only strings"
        return problem

    records, _ = _read_jsonl(path, check, skip_bad=False)
    return {record["cid"]: record["info_set"] for record in records}


async def extract_all(samples: list[dict], extractor: Extractor, path: str | Path,
                      concurrency: int = 8) -> dict[str, list[str] | None]:
    """Find the info_set of every sample, resuming from and appending to the JSONL file ``path``.

    Samples that already have a successful record are not asked again; failed ones are retried. Each
    record is appended and flushed the moment its sample is done, so an interrupted run keeps all it
    finished. At most ``concurrency`` extractions run at once. Stop samples need no call: their future
    holds no patient answer, so there is nothing to extract.

    Returns cid -> info_set for ``samples`` (None where extraction failed, see ``build_dataset``).
    """
    path = Path(path)
    results = read_extractions(path)
    todo = [sample for sample in samples if results.get(sample["cid"]) is None]
    if len(todo) < len(samples):  # say so: results are reused whatever model produced them
        log.info("%s: resuming, %d of %d samples already extracted", path, len(samples) - len(todo), len(samples))
    slots = asyncio.Semaphore(concurrency)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out, tqdm(total=len(todo), desc=path.name, disable=None) as bar:

        async def settle(sample: dict) -> None:
            record: dict[str, Any] = {"cid": sample["cid"], "info_set": []}
            if sample["decision_truth"] == "continue":
                async with slots:
                    try:
                        record["info_set"] = await extractor(sample["remaining"])
                    except ExtractionFailed as err:
                        record = {"cid": sample["cid"], "info_set": None, "extract_error": str(err)}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            results[sample["cid"]] = record["info_set"]
            bar.update()

        try:
            async with asyncio.TaskGroup() as group:  # on an error, cancels the rest before the file closes
                for sample in todo:
                    group.create_task(settle(sample))
        except* EndpointRefused as rejected:
            raise rejected.exceptions[0] from None
    return {sample["cid"]: results.get(sample["cid"]) for sample in samples}


# ---------------------------------------------------------------------------------------------------
# Building the train/test records (spec section 3.3)


def build_dataset(samples: list[dict], info_sets: dict[str, list[str] | None],
                  drop_failed: bool = False) -> tuple[list[dict], dict[str, int]]:
    """Label samples with ``info_truth`` and keep the ones worth training on.

    A continue sample whose future elicits nothing (empty info_truth) has no target question and is
    dropped; stop samples are always kept. A sample without a successful extraction (failed or missing
    in ``info_sets``) makes this raise ExtractionIncomplete, unless ``drop_failed``, which drops and counts it.

    Returns (records with exactly SAMPLE_KEYS, counts: continue, stop, dropped_empty, dropped_failed).
    """
    failed = [sample["cid"] for sample in samples if info_sets.get(sample["cid"]) is None]
    if failed and not drop_failed:
        raise ExtractionIncomplete(
            f"{len(failed)} samples have no extracted info (e.g. {', '.join(failed[:3])}); rerun to retry "
            "them, or pass --drop-failed to build without them")
    counts = {"continue": 0, "stop": 0, "dropped_empty": 0, "dropped_failed": len(failed)}
    records = []
    for sample in samples:
        info_set = info_sets.get(sample["cid"])
        if info_set is None:
            continue
        info_truth = ", ".join(info_set)
        if sample["decision_truth"] == "continue" and not info_truth:
            counts["dropped_empty"] += 1
            continue
        counts[sample["decision_truth"]] += 1
        records.append({
            "cid": sample["cid"],
            "session_id": sample["session_id"],
            "diagn": sample["diagn"],
            "messages": [{"role": m["role"], "content": m["content"]} for m in sample["messages"]],
            "decision_truth": sample["decision_truth"],
            "info_truth": info_truth,
            "target": hindsight_target(sample),
        })
    return records, counts


# ---------------------------------------------------------------------------------------------------
# Command line: python -m l2a.data {synth,prepare} --help


def _load_raw(path: str, skip_bad: bool) -> list[dict]:
    sessions, problems = load_sessions(path, skip_bad)
    for problem in problems[:20]:
        log.warning("skipped %s", problem)
    if problems:
        print(f"{path}: skipped {len(problems)} bad lines")
    return sessions


def _split_all(sessions: list[dict], construction: str) -> list[dict]:
    return [sample for session in sessions for sample in split_session(session, **CONSTRUCTIONS[construction])]


def _write_part(out: Path, name: str, n_sessions: int, n_samples: int, records: list[dict], counts: dict) -> None:
    path = out / f"{name}.jsonl"
    write_jsonl(path, records)
    if not records:
        log.warning("%s has no samples", path)
    failed = f", {counts['dropped_failed']} whose extraction failed" if counts["dropped_failed"] else ""
    stop_share = f" = {counts['stop'] / len(records):.1%}" if records else ""
    print(f"{path}: {len(records)} samples (continue {counts['continue']}, stop {counts['stop']}{stop_share}) from "
          f"{n_sessions} sessions / {n_samples} rounds; dropped {counts['dropped_empty']} continue samples "
          f"with empty info_truth{failed}")


def _synth(args: argparse.Namespace) -> None:
    out = Path(args.out)
    sessions = synthesize_sessions(args.sessions, args.seed)
    write_jsonl(out / "sessions.jsonl", sessions)
    print(f"{out / 'sessions.jsonl'}: {len(sessions)} sessions, {len({s['diagn'] for s in sessions})} conditions")
    kept = {}
    for name, part in zip(("train", "test"), split_by_session(sessions, args.test_fraction, args.seed)):
        samples = _split_all(part, "paper")
        # The oracle needs no LLM, hence no resumable extraction file either.
        info_sets = {sample["cid"]: oracle_facts(sample["remaining"]) for sample in samples}
        records, counts = build_dataset(samples, info_sets)
        _write_part(out, name, len(part), len(samples), records, counts)
        cids = {record["cid"] for record in records}
        kept[name] = [sample for sample in samples if sample["cid"] in cids]
    baselines = decision_baselines(kept["train"], kept["test"])
    print("test decision accuracy: " + ", ".join(f"{name} {value:.3f}" for name, value in baselines.items()))


async def _extract_parts(samples: dict[str, list[dict]], args: argparse.Namespace,
                         key: str | None) -> dict[str, dict[str, list[str] | None]]:
    """Run extraction for each part into ``OUT/extracted_<part>.jsonl`` (one file per part: the train and
    test raw files may reuse session ids, hence cids)."""
    async def run(extractor: Extractor) -> dict[str, dict[str, list[str] | None]]:
        return {name: await extract_all(part, extractor, Path(args.out) / f"extracted_{name}.jsonl",
                                        args.concurrency) for name, part in samples.items()}

    if args.extractor == "oracle":
        return await run(oracle_extractor)
    import openai  # here, not at the top: reading samples (train.py) needs no openai

    async with openai.AsyncOpenAI(base_url=args.base_url, api_key=key, timeout=args.timeout,
                                  max_retries=0) as client:
        return await run(LLMExtractor(client, args.model, temperature=args.temperature,
                                      max_tokens=args.max_tokens, max_retries=args.max_retries,
                                      retry_delay=args.retry_delay))


def _prepare(args: argparse.Namespace) -> None:
    key = None if args.extractor == "oracle" else api_key(args.api_key_env, "--extractor openai (see --api-key-env)")
    train = _load_raw(args.train_raw, args.skip_bad)
    if args.test_raw:
        test = _load_raw(args.test_raw, args.skip_bad)
        shared = {str(s["session_id"]) for s in train} & {str(s["session_id"]) for s in test}
        if shared:
            log.warning("%d session ids occur in both raw files (e.g. %s)", len(shared), min(shared))
    else:
        train, test = split_by_session(train, args.test_fraction, args.seed)
    sessions = {"train": train, "test": test}
    construction = CONSTRUCTIONS[args.construction]
    print(f"construction {args.construction}: context {construction['context']}, trailing doctor-only rounds "
          f"{'kept as stop samples' if construction['trailing_doctor_round'] else 'dropped'}")
    samples = {name: _split_all(part, args.construction) for name, part in sessions.items()}
    info_sets = run_async(_extract_parts(samples, args, key))
    # Build both parts before writing either, so a refusal leaves no half-updated output.
    built = {name: build_dataset(samples[name], info_sets[name], args.drop_failed) for name in sessions}
    for name, (records, counts) in built.items():
        _write_part(Path(args.out), name, len(sessions[name]), len(samples[name]), records, counts)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m l2a.data", description="Learn-to-Ask data preparation.")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write the synthetic dataset (offline, no LLM)",
                                description="Write OUT/sessions.jsonl (raw) and the built OUT/train.jsonl, "
                                            "OUT/test.jsonl, labelled exactly from the synthetic ground truth.")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--sessions", type=int, default=600, help="number of consultations (default: 600)")
    synth.add_argument("--seed", type=int, default=0,
                       help="seed of the generator and of the train/test split (default: 0)")
    synth.add_argument("--test-fraction", type=float, default=0.2,
                       help="share of sessions that go to test.jsonl (default: 0.2)")

    prepare = commands.add_parser("prepare", help="raw sessions -> train/test samples (LLM extraction)",
                                  description="Split raw sessions into samples, extract info_set with an LLM "
                                              "(resumable: OUT/extracted_{train,test}.jsonl), and write "
                                              "OUT/train.jsonl and OUT/test.jsonl. A rerun reuses every "
                                              "successful extraction and retries failed ones; delete the "
                                              "extracted_*.jsonl files to start over (new raw data, model "
                                              "or prompt).")
    prepare.add_argument("--train-raw", required=True, help="raw sessions JSONL, e.g. RealMedConv train_origin.jsonl")
    test = prepare.add_mutually_exclusive_group(required=True)
    test.add_argument("--test-raw", help="raw test sessions JSONL, e.g. RealMedConv test_origin.jsonl")
    test.add_argument("--test-fraction", type=float,
                      help="instead of --test-raw: put this share of the --train-raw sessions in test")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the --test-fraction split (default: 0)")
    prepare.add_argument("--out", required=True, help="output directory")
    prepare.add_argument("--construction", choices=tuple(CONSTRUCTIONS), default="paper",
                         help="paper (default): each sample sees the whole history before its patient turn, and "
                              "a session's trailing doctor-only messages give no sample; reference: as the "
                              "reference code builds them (and its published test set), each sample sees only the "
                              "last doctor and patient blocks, and trailing doctor-only messages (e.g. "
                              "'<med_search>') are one more sample, labelled stop")
    prepare.add_argument("--skip-bad", action="store_true",
                         help="skip and count malformed raw lines instead of stopping at the first one")
    prepare.add_argument("--drop-failed", action="store_true",
                         help="build without the samples whose extraction failed (counted) instead of refusing")
    prepare.add_argument("--extractor", choices=("openai", "oracle"), default="openai",
                         help="openai: an LLM at --base-url (default); oracle: the ground truth stored in "
                              "synthetic sessions (offline)")
    prepare.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    prepare.add_argument("--model", help="extraction model served at --base-url")
    prepare.add_argument("--api-key-env", default="OPENAI_API_KEY",
                         help="environment variable holding the API key (default: OPENAI_API_KEY; any "
                              "non-empty value for a server without auth); the key is never printed or saved")
    prepare.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default: 8)")
    prepare.add_argument("--max-retries", type=int, default=3,
                         help="retries per sample after an HTTP error, timeout or unparsable reply (default: 3)")
    prepare.add_argument("--retry-delay", type=float, default=1.0,
                         help="seconds before the first retry, doubled for each next one (default: 1.0)")
    prepare.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a reply (default: 60)")
    prepare.add_argument("--temperature", type=float, default=0.7, help="extraction temperature (default: 0.7)")
    prepare.add_argument("--max-tokens", type=int, default=512, help="max tokens per reply (default: 512)")
    return parser


def _check_prepare_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check prepare's arguments before any work."""
    if args.test_fraction is not None and not 0 < args.test_fraction < 1:
        parser.error("--test-fraction must be between 0 and 1")
    if args.concurrency < 1 or args.max_retries < 0:
        parser.error("--concurrency must be at least 1 and --max-retries at least 0")
    if args.extractor == "openai" and (not args.base_url or not args.model):
        parser.error("--extractor openai needs --base-url and --model")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "synth" and not 0 < args.test_fraction < 1:
        parser.error("--test-fraction must be between 0 and 1")
    if args.command == "prepare":
        _check_prepare_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    work = (lambda: _synth(args)) if args.command == "synth" else (lambda: _prepare(args))
    return run_command(work, resume_hint="finished extractions are saved; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
