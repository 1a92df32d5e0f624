"""Data for Learn-to-Ask: turn logged consultations into one training sample per patient turn.

The pipeline of spec section 3, one function per step (and ``python -m l2a.data`` to run it):

1. ``load_sessions``   read raw RealMedConv sessions ``{session_id, diagn, messages}``, validating every line.
2. ``split_session``   cut a session after every block of patient messages: the prefix is what the policy
                       sees, the rest of the log (``remaining``) is the *observed future*. Hindsight labels:
                       ``decision_truth`` is "stop" iff the future holds no patient message (the doctor
                       asked nothing more).
3. ``extract_all``     an LLM (``LLMExtractor``) reads each future and lists the facts the doctor went on to
                       elicit (``info_set``); resumable, one JSONL record per finished sample. For synthetic
                       data ``oracle_facts`` reads them from the ground truth instead.
4. ``build_dataset``   ``info_truth = ", ".join(info_set)``, drop continue samples that elicit nothing, and
                       write ``train.jsonl`` / ``test.jsonl``, which ``load_samples`` reads back.

``synthesize_sessions`` generates the bundled offline dataset (``data/synthetic``) in the raw format.

File formats (one JSON object per line):
- raw session:   ``{"session_id": int | str, "diagn": str, "messages": [{"role": "user" | "assistant",
                 "content": str, ...extra keys kept...}]}``
- extraction:    ``{"cid": str, "info_set": [str, ...]}``, or ``{"cid", "info_set": null, "extract_error": str}``
                 for a sample whose every attempt failed (retried on the next run)
- built sample:  ``{"cid", "session_id", "diagn", "messages" (role/content only), "decision_truth"
                 ("continue" | "stop"), "info_truth" (str)}``
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import openai
from tqdm import tqdm

from l2a.prompts import extraction_messages

log = logging.getLogger(__name__)

ROLES = ("user", "assistant")
CONTEXTS = ("full", "round")
DECISIONS = ("continue", "stop")
SAMPLE_KEYS = ("cid", "session_id", "diagn", "messages", "decision_truth", "info_truth")


class DataError(ValueError):
    """Bad input data. The message starts with ``path:line:`` so the culprit can be found and fixed."""


class ExtractionFailed(Exception):
    """Every attempt to extract one sample's facts failed; the message is short and safe to store."""


class EndpointRejected(Exception):
    """The endpoint refused us (wrong key, model or URL): no retry and no other sample can succeed."""


class ExtractionIncomplete(Exception):
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
    """Read a built ``train.jsonl`` / ``test.jsonl``; any malformed line raises ``DataError("path:line: ...")``."""
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


def split_session(session: dict, context: str = "full") -> list[dict]:
    """One sample per round; a round is a block of doctor (non-user) messages, then a block of patient messages.

    Each sample: ``cid`` (f"{session_id}_{k}", k = 1, 2, ...), ``session_id``, ``diagn``, ``messages`` (what
    the policy sees), ``remaining`` (every later message: the observed future) and ``decision_truth``
    ("stop" iff no patient message remains, i.e. the doctor asked nothing more).

    ``context="full"``: ``messages`` is the whole history up to the round's end (the paper's C_{t-1}), so
    ``messages + remaining`` is the session. ``context="round"``: only this round's doctor and patient
    blocks, as the reference code does (spec section 3.1). A trailing doctor block with no patient reply
    (e.g. the final "<med_search>") gives no sample: there is no patient turn to respond to.
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
        if messages[end - 1]["role"] != "user":
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
    unparsable replies; after ``max_retries`` retries it raises ExtractionFailed. A rejected key, model or
    URL (HTTP 401/403/404) raises EndpointRejected at once, since it would fail every sample alike.
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
        error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.retry_delay * 2 ** (attempt - 1))
            try:
                response = await self.client.chat.completions.create(
                    model=self.model,
                    messages=extraction_messages(remaining),
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                )
                return parse_info_list(response.choices[0].message.content if response.choices else None)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
                raise EndpointRejected(self._describe(err)) from None
            except (openai.APIError, ValueError) as err:  # HTTP error, timeout, connection, bad reply
                error = err
        raise ExtractionFailed(self._describe(error))

    def _describe(self, error: Exception | None) -> str:
        """A short description of an error, with the API key blanked out should a server echo it."""
        text = _clip(f"{type(error).__name__}: {error}", 200)
        key = self.client.api_key
        return text.replace(key, "***") if key else text


def oracle_facts(remaining: list[dict]) -> list[str]:
    """The exact info_set of a synthetic sample: the facts recorded on the future's doctor questions."""
    return [fact for message in remaining for fact in message.get("elicits", [])]


async def oracle_extractor(remaining: list[dict]) -> list[str]:
    """``oracle_facts`` as an Extractor, so the LLM pipeline runs offline on synthetic data."""
    return oracle_facts(remaining)


def read_extractions(path: str | Path) -> dict[str, list[str] | None]:
    """Read an extraction file into cid -> info_set (None = failed); later records override earlier ones.

    A last line without its newline was cut short by a kill mid-write: it is removed from the file (so
    appending can go on cleanly) and its sample is simply extracted again.
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        log.warning("%s: removed an incomplete last line (interrupted write); that sample will be redone", path)
        with path.open("r+b") as file:
            file.truncate(len(complete))

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
        except* EndpointRejected as rejected:
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
        })
    return records, counts


# ---------------------------------------------------------------------------------------------------
# Synthetic consultations: the offline default dataset
#
# A patient describes a complaint; the doctor asks one question per turn about a field not yet known, often
# offering answer choices; the patient states the fact; after 2-4 questions the doctor closes. Every
# question carries its ground truth, ``"elicits": ["<field>: <value>"]``, which ``oracle_facts`` reads.
# Questions use plain cue words per field ("feel like", "where", "how severe", "bring on", "other
# symptoms") so that an offline rubric judge can match them to info_truth items.


@dataclass(frozen=True)
class Condition:
    """A condition and the values a patient may report; value phrases are spoken by both doctor and patient,
    so they avoid "my"/"your"."""

    diagn: str
    complaint: str             # the doctor's word for it: "How severe is the {complaint}?"
    openings: tuple[str, ...]  # the patient's first words, completed by a duration ("for two days")
    nature: tuple[str, ...]    # fits "It's {}." and "I'd describe it as {}."
    location: tuple[str, ...]  # fits "I feel it in {}."; empty when the complaint already names the place
    trigger: tuple[str, ...]   # fits "I think it's {}." and "It seems to come from {}."
    others: tuple[str, ...]    # associated symptoms, fits "Yes, I also have {}."
    advice: str


CONDITIONS = (
    Condition("Tension headache", "headache", ("I've had a headache", "my head has been aching"),
              ("dull and pressing", "tight, like a band", "a steady ache"),
              ("the forehead", "both temples", "the back of the head"),
              ("stress at work", "long hours at the screen", "lack of sleep"),
              ("tight neck muscles", "tiredness", "trouble concentrating"),
              "Rest, take regular breaks from the screen, and paracetamol or ibuprofen can ease the pain."),
    Condition("Migraine", "headache", ("I've had a really bad headache", "my head has been hurting a lot"),
              ("throbbing", "pulsating", "pounding"),
              ("the left side of the head", "the right side of the head", "the area behind one eye"),
              ("bright light", "skipping meals", "red wine"),
              ("nausea", "sensitivity to light", "flashing spots in the vision"),
              "Rest in a dark, quiet room; ibuprofen or a migraine tablet taken early works best."),
    Condition("Gastroenteritis", "diarrhea", ("I've had diarrhea", "my stomach has been upset"),
              ("watery", "loose and frequent", "mixed with mucus"),
              (),
              ("street food", "a takeaway meal", "undercooked chicken"),
              ("vomiting", "stomach cramps", "a mild fever"),
              "Drink plenty of fluids with oral rehydration salts and eat light food for a few days."),
    Condition("Acid reflux", "heartburn", ("I've had heartburn", "I've been getting heartburn"),
              ("burning", "sour and burning", "a rising warmth"),
              ("the chest behind the breastbone", "the upper belly", "the throat"),
              ("lying down after meals", "spicy food", "coffee"),
              ("a sour taste in the mouth", "burping", "a hoarse voice in the morning"),
              "An antacid or a short course of omeprazole can help; avoid late, large or spicy meals."),
    Condition("Common cold", "runny nose", ("I've had a runny nose", "my nose has been running"),
              ("clear and watery", "thick and white", "yellowish"),
              (),
              ("getting caught in the rain", "a colleague who had a cold", "cold weather"),
              ("sneezing", "a sore throat", "a mild cough"),
              "Rest, drink warm fluids, and a saline nasal spray or paracetamol can ease the symptoms."),
    Condition("Allergic rhinitis", "sneezing", ("I've been sneezing a lot", "I haven't been able to stop sneezing"),
              ("in sudden bouts", "constant", "on and off"),
              (),
              ("pollen", "dust", "cat hair"),
              ("itchy eyes", "a blocked nose", "an itchy throat"),
              "A non-drowsy antihistamine such as loratadine and a steroid nasal spray usually help."),
    Condition("Conjunctivitis", "eye redness", ("my eyes have been red", "I've had red, irritated eyes"),
              ("itchy", "gritty", "burning"),
              ("the left eye", "the right eye", "both eyes"),
              ("a classmate with pink eye", "wearing contact lenses", "rubbing the eyes"),
              ("sticky discharge", "watery eyes", "crusty eyelids in the morning"),
              "Clean the eyes with cooled boiled water, don't share towels, and use antibiotic drops if "
              "the discharge is thick."),
    Condition("Contact dermatitis", "rash", ("I've had a rash", "my skin has been breaking out"),
              ("itchy and red", "dry and scaly", "blistering"),
              ("the hands", "the wrists", "the neck"),
              ("a new laundry detergent", "a new hand cream", "a metal watch strap"),
              ("a burning feeling on the skin", "small blisters", "cracked skin"),
              "Avoid the trigger, use a fragrance-free moisturiser, and a mild hydrocortisone cream helps."),
    Condition("Sprained ankle", "ankle pain", ("I've had ankle pain", "my ankle has been hurting"),
              ("sharp", "aching", "throbbing"),
              ("the outer side of the ankle", "the inner side of the ankle", "the front of the ankle"),
              ("walking", "climbing stairs", "standing for a long time"),
              ("swelling", "bruising", "stiffness"),
              "Rest, ice, compression and elevation help; ibuprofen gel or tablets can ease the pain."),
    Condition("Lower back strain", "back pain", ("I've had back pain", "my back has been hurting"),
              ("dull and aching", "sharp", "stiff"),
              ("the lower back", "the left side of the lower back", "the right side of the lower back"),
              ("bending forward", "lifting heavy boxes", "sitting for a long time"),
              ("muscle spasms", "stiffness in the morning", "pain spreading to the buttock"),
              "Keep gently active, use a heat pack, and ibuprofen or paracetamol can help for a few days."),
    Condition("Urinary tract infection", "pain when urinating",
              ("it's been burning when I pee", "I've had pain when urinating"),
              ("burning", "stinging", "sharp"),
              (),
              ("not drinking enough water", "holding in urine for a long time"),
              ("needing to pee often", "cloudy urine", "lower belly pain"),
              "Drink plenty of water and please see a doctor for a urine test, as antibiotics are usually needed."),
    Condition("Pharyngitis", "sore throat", ("I've had a sore throat", "my throat has been hurting"),
              ("scratchy", "raw and burning", "dry and tight"),
              (),
              ("swallowing", "talking a lot", "cold drinks"),
              ("a mild fever", "swollen glands in the neck", "a dry cough"),
              "Warm salt-water gargles, throat lozenges and paracetamol can help."),
    Condition("Acute bronchitis", "cough", ("I've had a cough", "I've been coughing"),
              ("dry", "wet with yellow phlegm", "hacking"),
              (),
              ("cold air", "lying down at night", "talking"),
              ("chest tightness", "wheezing", "tiredness"),
              "Rest and drink warm fluids; honey or a cough syrup can soothe it, and see a doctor if you "
              "get short of breath."),
    Condition("Constipation", "constipation",
              ("I've been constipated", "I haven't been able to go to the toilet properly"),
              ("hard and dry", "lumpy and painful to pass", "small and pellet-like"),
              (),
              ("a low-fibre diet", "not drinking enough water", "travelling"),
              ("bloating", "stomach cramps", "loss of appetite"),
              "Eat more fibre and drink more water; a gentle laxative such as macrogol can help."),
    Condition("Indigestion", "stomach pain", ("I've had stomach pain", "my stomach has been hurting"),
              ("burning", "gnawing", "crampy"),
              ("the upper belly", "the area just below the ribs", "the middle of the belly"),
              ("large meals", "fatty food", "alcohol"),
              ("bloating", "nausea", "burping"),
              "Eat smaller meals, cut down on fatty food and alcohol, and an antacid can ease the discomfort."),
    Condition("Hemorrhoids", "pain when passing stool",
              ("it's been painful to pass stool", "I've had pain in my bottom"),
              ("sharp", "itchy", "burning"),
              (),
              ("straining on the toilet", "sitting for a long time", "constipation"),
              ("bright red blood on the toilet paper", "a small lump near the anus",
               "a feeling of incomplete emptying"),
              "Keep stools soft with fibre and water; a haemorrhoid cream or suppository can ease the pain."),
    Condition("Sinusitis", "facial pain", ("I've had pain in my face", "my face has been aching"),
              ("pressure-like", "dull and heavy", "throbbing"),
              ("the forehead", "the cheeks", "the area around the eyes"),
              ("bending forward", "lying down", "cold air"),
              ("a blocked nose", "thick yellow mucus", "a reduced sense of smell"),
              "Saline nasal rinses, steam and a decongestant spray for a few days can help."),
    Condition("Dental pain", "toothache", ("I've had a toothache", "my tooth has been hurting"),
              ("throbbing", "sharp", "dull"),
              ("the upper left teeth", "the lower right teeth", "the front teeth"),
              ("cold drinks", "sweet food", "chewing"),
              ("swollen gums", "a bad taste in the mouth", "jaw pain"),
              "Ibuprofen or paracetamol can ease the pain for now, but please see a dentist soon."),
    Condition("Mouth ulcer", "mouth ulcer", ("I've had a mouth ulcer", "I've had a painful sore in my mouth"),
              ("stinging", "burning", "sore"),
              ("the inside of the cheek", "the tongue", "the lower lip"),
              ("spicy food", "acidic fruit", "brushing the teeth"),
              ("pain when eating", "a tender lump under the jaw", "tiredness"),
              "A numbing mouth gel or an antiseptic mouthwash helps; avoid spicy and acidic food for now."),
    Condition("Eczema", "itchy skin", ("I've had itchy skin", "my skin has been very itchy"),
              ("dry and flaky", "red and itchy", "rough and thickened"),
              ("the inner elbows", "the backs of the knees", "the face"),
              ("hot showers", "wool clothes", "dry winter air"),
              ("cracked skin", "trouble sleeping because of the itch", "small bumps"),
              "Use a thick emollient several times a day, keep showers lukewarm, and a mild steroid cream "
              "helps flare-ups."),
    Condition("Urticaria", "rash", ("I've had an itchy rash with raised bumps", "I've been breaking out in hives"),
              ("itchy", "raised and red", "burning"),
              ("the arms", "the chest", "the whole body"),
              ("seafood", "a new medicine", "heat"),
              ("a flushed face", "warm skin", "tiredness"),
              "A non-drowsy antihistamine such as cetirizine usually helps; seek urgent care if your lips or "
              "throat swell."),
    Condition("Athlete's foot", "itching", ("my feet have been itching", "I've had itchy feet"),
              ("itchy and peeling", "burning", "cracked and sore"),
              ("the skin between the toes", "the soles of the feet", "the sides of the feet"),
              ("wearing sports shoes all day", "sweaty socks", "public showers"),
              ("a bad smell", "small blisters", "white, soggy skin"),
              "Use an antifungal cream such as terbinafine, keep the feet dry and change socks daily."),
    Condition("Neck strain", "neck pain", ("I've had neck pain", "my neck has been hurting"),
              ("stiff", "aching", "sharp"),
              ("the left side of the neck", "the right side of the neck", "the back of the neck"),
              ("turning the head", "sleeping on a new pillow", "looking down at a phone"),
              ("a headache", "tight shoulders", "tingling in the arm"),
              "Keep moving gently, use a warm compress, and ibuprofen gel or tablets can ease the stiffness."),
    Condition("Menstrual cramps", "period pain", ("I've had bad period pain", "my period cramps have been painful"),
              ("crampy", "dull and aching", "stabbing"),
              ("the lower belly", "the lower back", "the upper thighs"),
              ("the first day of the period", "standing for a long time", "cold drinks"),
              ("nausea", "bloating", "tiredness"),
              "Ibuprofen or naproxen started early works best, and a heat pad on the belly also helps."),
    Condition("Motion sickness", "nausea", ("I've been feeling sick to my stomach", "I've had nausea"),
              ("queasy", "light-headed and queasy", "a constant urge to vomit"),
              (),
              ("car rides", "boat trips", "reading in the car"),
              ("cold sweats", "dizziness", "a headache"),
              "Take a motion sickness tablet such as dimenhydrinate before travelling, and look at the horizon."),
    Condition("Swimmer's ear", "earache", ("I've had an earache", "I've had ear pain"),
              ("sharp", "itchy", "dull and throbbing"),
              ("the left ear", "the right ear", "both ears"),
              ("swimming", "using cotton buds", "wearing earphones"),
              ("discharge from the ear", "muffled hearing", "pain when touching the ear"),
              "Keep the ear dry and avoid cotton buds; pharmacy ear drops for swimmer's ear can help."),
    Condition("Influenza", "fever", ("I've had a fever", "I've been running a temperature"),
              ("high with chills", "coming and going", "constant"),
              (),
              ("a flu outbreak at work", "a family member with flu", "a crowded flight"),
              ("body aches", "a dry cough", "a headache"),
              "Rest, drink plenty of fluids and take paracetamol for the fever; see a doctor if you struggle "
              "to breathe."),
    Condition("Plantar fasciitis", "heel pain", ("I've had heel pain", "my heel has been hurting"),
              ("sharp", "stabbing", "aching"),
              ("the bottom of the heel", "the arch of the foot", "the back of the heel"),
              ("the first steps in the morning", "running", "standing for a long time"),
              ("stiffness in the foot", "swelling", "a burning feeling"),
              "Stretch the calf and foot, wear supportive shoes, and ibuprofen or an ice pack eases the pain."),
    Condition("Tennis elbow", "elbow pain", ("I've had elbow pain", "my elbow has been hurting"),
              ("burning", "aching", "sharp"),
              ("the outer side of the elbow", "the inner side of the elbow", "the forearm"),
              ("gripping things", "lifting a kettle", "typing"),
              ("a weak grip", "stiffness", "pain down the forearm"),
              "Rest the arm from gripping tasks, use an elbow strap, and ibuprofen gel can help."),
    Condition("Carpal tunnel syndrome", "hand numbness",
              ("my hand has been going numb", "I've had numbness in my hand"),
              ("tingling", "numb", "burning"),
              ("the thumb and index finger", "the middle finger", "the whole hand"),
              ("typing", "holding a phone", "driving"),
              ("a weak grip", "dropping things", "pain in the wrist"),
              "A wrist splint at night and regular breaks help; see a doctor if the numbness persists."),
    Condition("Dry eye", "eye dryness", ("my eyes have been dry", "I've had dry, tired eyes"),
              ("gritty", "burning", "tired and scratchy"),
              (),
              ("long screen time", "air conditioning", "wind"),
              ("blurred vision", "red eyes", "watery eyes"),
              "Lubricating eye drops several times a day and regular screen breaks usually help."),
    Condition("Sunburn", "sunburn", ("I've had a sunburn", "my skin has been red and sore from the sun"),
              ("hot and stinging", "tender", "itchy"),
              ("the shoulders", "the face", "the back"),
              ("a day at the beach", "gardening in the sun", "a long hike"),
              ("peeling skin", "small blisters", "a headache"),
              "Cool the skin, apply aloe vera or a soothing lotion, drink water, and stay out of the sun."),
    Condition("Cold sore", "cold sore", ("I've had a cold sore", "I've had a sore on my lip"),
              ("tingling", "burning", "itchy"),
              ("the upper lip", "the lower lip", "the corner of the mouth"),
              ("stress", "a cold", "strong sun"),
              ("small blisters", "crusting", "swollen glands"),
              "An antiviral cream such as aciclovir works best when started early; don't pick the sore."),
    Condition("Irritable bowel syndrome", "stomach pain", ("I've had stomach pain", "my belly has been cramping"),
              ("crampy", "sharp", "dull"),
              ("the lower belly", "the left side of the belly", "the area around the navel"),
              ("stress", "dairy products", "large meals"),
              ("bloating", "alternating diarrhea and constipation", "gas"),
              "Regular meals, less fatty food and an antispasmodic such as mebeverine can help."),
    Condition("Dandruff", "scalp itching", ("my scalp has been itchy", "I've had an itchy scalp"),
              ("itchy and flaky", "oily and scaly", "dry and tight"),
              (),
              ("cold weather", "a new shampoo", "stress"),
              ("white flakes on clothes", "red patches", "hair loss"),
              "An anti-dandruff shampoo with ketoconazole or zinc pyrithione, twice a week, usually clears it."),
    Condition("Leg cramps", "cramp", ("I've had leg cramps", "my legs have been cramping at night"),
              ("sudden and tight", "sharp", "knotted"),
              ("the calf", "the thigh", "the foot"),
              ("exercise", "lying in bed", "hot weather"),
              ("muscle soreness", "tiredness", "tingling"),
              "Stretch the calf before bed, drink enough water, and gently massage the muscle during a cramp."),
    Condition("Positional vertigo", "dizziness", ("I've been dizzy", "I've had dizziness"),
              ("spinning", "light-headed", "unsteady"),
              (),
              ("turning over in bed", "looking up", "standing up quickly"),
              ("nausea", "ringing in the ears", "a headache"),
              "Move slowly when you change position, and see a doctor if the dizziness keeps coming back."),
)

SEVERITIES = ("mild", "moderate", "severe")
FIELDS = ("symptom", "symptom nature", "symptom location", "symptom severity", "symptom trigger")

# Doctor questions: {c} = the complaint, {choices} = "a, b or c".
QUESTIONS_WITH_CHOICES = {
    "symptom": ("Do you have any other symptoms, such as {choices}?",
                "Apart from the {c}, have you noticed any other symptoms, like {choices}?",
                "Any other symptoms besides the {c}, for example {choices}?"),
    "symptom nature": ("What does the {c} feel like: {choices}?",
                       "What kind of {c} is it, {choices}?",
                       "How would you describe the {c}: {choices}?"),
    "symptom location": ("Where exactly is the {c}: {choices}?",
                         "Where do you feel the {c} most, {choices}?"),
    "symptom severity": ("How severe is the {c}: {choices}?",
                         "How bad is the {c}, would you say {choices}?",
                         "On a scale from mild to severe, how bad is the {c}: {choices}?"),
    "symptom trigger": ("What brings on the {c}: {choices}?",
                        "Does anything make the {c} worse, like {choices}?",
                        "Did you notice what triggers the {c}, {choices}?"),
}
OPEN_QUESTIONS = {
    "symptom": ("Do you have any other symptoms?", "Have you noticed any other symptoms apart from the {c}?"),
    "symptom nature": ("What does the {c} feel like?", "What kind of {c} is it?"),
    "symptom location": ("Where exactly do you feel the {c}?", "Where is the {c}?"),
    "symptom severity": ("How severe is the {c}?", "On a scale from mild to severe, how bad is the {c}?"),
    "symptom trigger": ("What brings on the {c} or makes it worse?", "Does anything trigger the {c}?"),
}
ANSWERS = {  # {v} = the value
    "symptom": ("Yes, I also have {v}.", "Now that you mention it, {v} too.", "Yes, {v}."),
    "symptom nature": ("It's {v}.", "Mostly {v}, I think.", "I'd describe it as {v}."),
    "symptom location": ("Mostly {v}.", "It's around {v}.", "I feel it in {v}."),
    "symptom severity": ("I'd say {v}.", "{v}, I think.", "It's {v}.", "Probably {v}."),
    "symptom trigger": ("I think it's {v}.", "It seems to come from {v}.", "Probably {v}."),
}
VOLUNTEERED = {  # facts a patient may state unasked in the opening
    "symptom": "I also have {v}.",
    "symptom nature": "It's {v}.",
    "symptom location": "I feel it in {v}.",
    "symptom severity": "It's {v}, I'd say.",
    "symptom trigger": "I think {v} brought it on.",
}
DURATIONS = ("since yesterday", "for two days", "for three days", "for about a week", "since this morning")
GREETINGS = ("Hello, many people are consulting right now, please wait patiently.",
             "Hi, I'm the pharmacist on duty. How can I help?",
             "Hello, thanks for waiting. What seems to be the problem?")
PATIENT_ASKS = ("What medicine can I take?", "What should I do?", "Can you recommend something?")
DOCTOR_FILLERS = ("Okay.", "I see.", "Thanks for explaining.", "Got it.")
PATIENT_FILLERS = ("Please be quick, I'm at work.", "Is it serious?", "I hope it's nothing bad.")
CLOSING_LEADS = ("Thank you, I have enough information now.", "Okay, thanks for the details.")
CLOSING_SAFETY = ("If it gets worse or lasts more than a few days, please see a doctor in person.",
                  "Please see a doctor if it doesn't improve.")


def _values(condition: Condition, field: str) -> tuple[str, ...]:
    return {"symptom": condition.others, "symptom nature": condition.nature,
            "symptom location": condition.location, "symptom severity": SEVERITIES,
            "symptom trigger": condition.trigger}[field]


def _fact(field: str, value: str) -> str:
    """The fact for a field and value, e.g. "symptom location: forehead" (facts carry no article)."""
    return f"{field}: {re.sub(r'^(the|a|an) ', '', value)}"


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _either(options: list[str]) -> str:
    """Join answer choices as "a, b or c"."""
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]


def _question(rng: random.Random, condition: Condition, field: str, value: str) -> str:
    """A doctor question about ``field``, usually offering answer choices that include the true ``value``."""
    if rng.random() < 0.2:
        return rng.choice(OPEN_QUESTIONS[field]).format(c=condition.complaint)
    if field == "symptom severity":
        choices = list(SEVERITIES)
    else:
        decoys = [v for v in _values(condition, field) if v != value]
        choices = [value] + rng.sample(decoys, rng.randint(1, len(decoys)) if decoys else 0)
        rng.shuffle(choices)
    return rng.choice(QUESTIONS_WITH_CHOICES[field]).format(c=condition.complaint, choices=_either(choices))


def _opening(rng: random.Random, condition: Condition, volunteered: list[tuple[str, str]]) -> list[str]:
    """The patient's first messages: the complaint, maybe some facts unasked, maybe a request."""
    complaint = f"{rng.choice(condition.openings)} {rng.choice(DURATIONS)}."
    facts = [_capitalize(VOLUNTEERED[field].format(v=value)) for field, value in volunteered]
    ask = rng.choice(PATIENT_ASKS)
    style = rng.randrange(3)
    if style == 0:  # everything in one message
        greeting = rng.choice(("Hello, ", "Hi doctor, ", ""))
        return [" ".join([greeting + complaint if greeting else _capitalize(complaint), *facts, ask])]
    if style == 1:  # chat style: one short message after another
        return ["Hello", _capitalize(complaint), *facts, ask]
    return [_capitalize(complaint) + (" " + " ".join(facts) if facts else ""), ask]


def synthesize_session(rng: random.Random, session_id: int) -> dict:
    """One synthetic consultation in the raw RealMedConv format, with ``elicits`` on every question."""
    condition = rng.choice(CONDITIONS)
    value = {field: rng.choice(_values(condition, field)) for field in FIELDS if _values(condition, field)}
    fields = list(value)
    rng.shuffle(fields)
    n_questions = rng.randint(2, 4)
    asked = fields[:n_questions]
    volunteered = fields[n_questions:][: rng.randint(0, 2)]

    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "assistant", "content": rng.choice(GREETINGS)})
    for text in _opening(rng, condition, [(field, value[field]) for field in volunteered]):
        messages.append({"role": "user", "content": text})
    for field in asked:
        if rng.random() < 0.15:
            messages.append({"role": "assistant", "content": rng.choice(DOCTOR_FILLERS)})
        messages.append({"role": "assistant", "content": _question(rng, condition, field, value[field]),
                         "elicits": [_fact(field, value[field])]})
        messages.append({"role": "user", "content": _capitalize(rng.choice(ANSWERS[field]).format(v=value[field]))})
        if rng.random() < 0.15:
            messages.append({"role": "user", "content": rng.choice(PATIENT_FILLERS)})
    advice = f"{rng.choice(CLOSING_LEADS)} {condition.advice} {rng.choice(CLOSING_SAFETY)}"
    for text in rng.choice((["<med_search>"], [advice], [advice, "<med_search>"])):
        messages.append({"role": "assistant", "content": text})
    return {"session_id": session_id, "diagn": condition.diagn, "messages": messages}


def synthesize_sessions(n_sessions: int = 600, seed: int = 0) -> list[dict]:
    """``n_sessions`` synthetic consultations, session ids 1..n; the same seed gives the same sessions."""
    rng = random.Random(seed)
    return [synthesize_session(rng, session_id) for session_id in range(1, n_sessions + 1)]


# ---------------------------------------------------------------------------------------------------
# Command line: python -m l2a.data {synth,prepare} --help


def _load_raw(path: str, skip_bad: bool) -> list[dict]:
    sessions, problems = load_sessions(path, skip_bad)
    for problem in problems[:20]:
        log.warning("skipped %s", problem)
    if problems:
        print(f"{path}: skipped {len(problems)} bad lines")
    return sessions


def _split_all(sessions: list[dict], context: str) -> list[dict]:
    return [sample for session in sessions for sample in split_session(session, context)]


def _write_part(out: Path, name: str, n_sessions: int, n_samples: int, records: list[dict], counts: dict) -> None:
    path = out / f"{name}.jsonl"
    write_jsonl(path, records)
    if not records:
        log.warning("%s has no samples", path)
    failed = f", {counts['dropped_failed']} whose extraction failed" if counts["dropped_failed"] else ""
    print(f"{path}: {len(records)} samples (continue {counts['continue']}, stop {counts['stop']}) from "
          f"{n_sessions} sessions / {n_samples} rounds; dropped {counts['dropped_empty']} continue samples "
          f"with empty info_truth{failed}")


def _synth(args: argparse.Namespace) -> None:
    out = Path(args.out)
    sessions = synthesize_sessions(args.sessions, args.seed)
    write_jsonl(out / "sessions.jsonl", sessions)
    print(f"{out / 'sessions.jsonl'}: {len(sessions)} sessions, {len({s['diagn'] for s in sessions})} conditions")
    for name, part in zip(("train", "test"), split_by_session(sessions, args.test_fraction, args.seed)):
        samples = _split_all(part, "full")
        # The oracle needs no LLM, hence no resumable extraction file either.
        info_sets = {sample["cid"]: oracle_facts(sample["remaining"]) for sample in samples}
        _write_part(out, name, len(part), len(samples), *build_dataset(samples, info_sets))


async def _extract_parts(samples: dict[str, list[dict]], args: argparse.Namespace,
                         api_key: str | None) -> dict[str, dict[str, list[str] | None]]:
    """Run extraction for each part into ``OUT/extracted_<part>.jsonl`` (one file per part: the train and
    test raw files may reuse session ids, hence cids)."""
    async def run(extractor: Extractor) -> dict[str, dict[str, list[str] | None]]:
        return {name: await extract_all(part, extractor, Path(args.out) / f"extracted_{name}.jsonl",
                                        args.concurrency) for name, part in samples.items()}

    if args.extractor == "oracle":
        return await run(oracle_extractor)
    async with openai.AsyncOpenAI(base_url=args.base_url, api_key=api_key, timeout=args.timeout,
                                  max_retries=0) as client:
        return await run(LLMExtractor(client, args.model, temperature=args.temperature,
                                      max_tokens=args.max_tokens, max_retries=args.max_retries,
                                      retry_delay=args.retry_delay))


def _prepare(args: argparse.Namespace, api_key: str | None) -> None:
    train = _load_raw(args.train_raw, args.skip_bad)
    if args.test_raw:
        test = _load_raw(args.test_raw, args.skip_bad)
        shared = {str(s["session_id"]) for s in train} & {str(s["session_id"]) for s in test}
        if shared:
            log.warning("%d session ids occur in both raw files (e.g. %s)", len(shared), min(shared))
    else:
        train, test = split_by_session(train, args.test_fraction, args.seed)
    sessions = {"train": train, "test": test}
    samples = {name: _split_all(part, args.context) for name, part in sessions.items()}
    info_sets = asyncio.run(_extract_parts(samples, args, api_key))
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
    prepare.add_argument("--context", choices=CONTEXTS, default="full",
                         help="full: the whole history before each patient turn (paper, default); "
                              "round: only the last doctor and patient blocks (reference code)")
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


def _api_key(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Check prepare's arguments before any work; return the API key (None for the oracle)."""
    if args.test_fraction is not None and not 0 < args.test_fraction < 1:
        parser.error("--test-fraction must be between 0 and 1")
    if args.concurrency < 1 or args.max_retries < 0:
        parser.error("--concurrency must be at least 1 and --max-retries at least 0")
    if args.extractor == "oracle":
        return None
    if not args.base_url or not args.model:
        parser.error("--extractor openai needs --base-url and --model")
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
        parser.error(f"environment variable {args.api_key_env} (named by --api-key-env) is not set or empty; "
                     "it must hold the API key for --base-url")
    return api_key


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "synth" and not 0 < args.test_fraction < 1:
        parser.error("--test-fraction must be between 0 and 1")
    api_key = _api_key(parser, args) if args.command == "prepare" else None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.command == "synth":
            _synth(args)
        else:
            _prepare(args, api_key)
    except DataError as err:  # bad input: say where, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except EndpointRejected as err:
        print(f"error: the endpoint rejected the request ({err}); check --base-url, --model and "
              f"${args.api_key_env}", file=sys.stderr)
        return 1
    except ExtractionIncomplete as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished extractions are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
