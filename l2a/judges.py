"""Judges: who grades a policy's question, and scoring a batch of responses with them.

A judge reads the consultation, the policy's response and the target facts (``info_truth``) and returns a
``Grade`` (format score P and content score R_a, spec section 5); ``l2a.reward.compute_reward`` turns it into
the reward. Only correct "continue" decisions are graded (``score_responses`` asks for nothing else).

- ``OpenAIJudge``: an LLM grader behind any OpenAI-compatible endpoint (the paper's setting);
- ``RubricJudge``: the same rubric as deterministic keyword rules, so the defaults run offline;
- ``make_judge``: the one place both are built, for training (``TRAINING_GRADER`` sampling) and for
  evaluation (``EVALUATION_GRADER``).
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

from l2a.cli import UserError
from l2a.endpoint import RequestFailed, chat, first_choice_text, run_async
from l2a.prompts import grader_messages
from l2a.reward import (
    DECISIONS,
    Grade,
    Reward,
    check_modes,
    compute_reward,
    needs_grade,
)

if TYPE_CHECKING:
    import openai

# ---------------------------------------------------------------------------------------------------------------
# Reading a grader's answer
# ---------------------------------------------------------------------------------------------------------------


def _tag(name: str) -> re.Pattern[str]:
    # DOTALL: a grader may break a tag's content over several lines (the reference regex missed those).
    return re.compile(rf"<{name}>(.*?)</{name}>", re.DOTALL)


_THINK, _FORMAT, _CONTENT = _tag("think"), _tag("format_score"), _tag("content_score")


def parse_grade(text: str) -> Grade | None:
    """Read ``<think>``, ``<format_score>`` and ``<content_score>`` from a grader's answer.

    Returns None (never raises) when a score is missing, not a number, NaN/inf or outside [0, 1]; the caller
    decides whether to retry. If a tag occurs several times the last one wins, since a grader that quotes the
    tags while reasoning states its verdict at the end. A missing ``<think>`` gives ``think=""``.
    """
    scores = []
    for pattern in (_FORMAT, _CONTENT):
        found = pattern.findall(text)
        if not found:
            return None
        try:
            scores.append(float(found[-1].strip()))
        except ValueError:
            return None
    think = _THINK.findall(text)
    try:
        return Grade(scores[0], scores[1], think[0].strip() if think else "")
    except ValueError:  # NaN, inf or out of range
        return None


# ---------------------------------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeRequest:
    """One response to grade: the dialogue so far, the policy's response, and the target facts I*."""

    messages: list[dict]
    response: str
    info_truth: str


class Judge(Protocol):
    async def grade(self, requests: list[JudgeRequest]) -> list[Grade | None]:
        """Grade a batch; one entry per request, in order, None where no valid grade could be obtained."""
        ...

    def preflight(self) -> None:
        """Check, before any long work, that the judge answers readable grades; a UserError if not."""
        ...


PREFLIGHT = JudgeRequest(
    messages=[{"role": "user", "content": "I have had a headache since yesterday."}],
    response="Where exactly is the headache: the forehead, the temples or the back of the head?",
    info_truth="symptom location: temples",
)
"""The one request a judge must grade before a run starts: any working grader reads it and scores it."""


def grade_sync(judge: Judge, requests: list[JudgeRequest]) -> list[Grade | None]:
    """Run ``judge.grade`` from synchronous code (training and evaluation loops)."""
    return run_async(judge.grade(requests))


@dataclass(frozen=True)
class GraderSampling:
    """How an LLM grader samples its verdict."""

    temperature: float
    max_tokens: int
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    """Sent as vLLM's extension field ``repetition_penalty`` when it is not 1 (plain OpenAI has no such field)."""

    def request_options(self) -> dict:
        options = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.top_p != 1.0:
            options["top_p"] = self.top_p
        if self.repetition_penalty != 1.0:
            options["extra_body"] = {"repetition_penalty": self.repetition_penalty}
        return options


TRAINING_GRADER = GraderSampling(temperature=0.7, max_tokens=1024)
"""The reference's training grader (AgentScope tuner: Qwen2.5-32B-Instruct at temperature 0.7, 1,024 tokens)."""

EVALUATION_GRADER = GraderSampling(temperature=1.0, max_tokens=512, top_p=0.95, repetition_penalty=1.2)
"""The reference's evaluation grades with the policy's own sampling settings (``3_rollout_then_evaluate.py``)."""


class OpenAIJudge:
    """An LLM grader behind any OpenAI-compatible chat endpoint (OpenAI, DashScope, a local ``vllm serve``...).

    The API key is read from the environment variable ``api_key_env`` and never logged. When the variable is
    unset the placeholder "EMPTY" is sent, which is what a local ``vllm serve`` without ``--api-key`` accepts.

    Each request may be tried ``1 + max_retries`` times, with exponential backoff (``backoff``, 2x, 4x ...
    seconds), after a timeout, a connection or HTTP error, or an answer ``parse_grade`` cannot read
    (``l2a.endpoint.chat``). When all attempts fail the request's grade is None and it is counted in ``failures``
    (``requests`` counts them all). A rejected key, model or URL raises ``EndpointRefused``: no retry fixes it.
    At most ``concurrency`` requests are in flight at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        sampling: GraderSampling = TRAINING_GRADER,
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 16,
        backoff: float = 1.0,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.sampling = sampling
        self.timeout = timeout
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.backoff = backoff
        self._api_key = os.environ.get(api_key_env) or "EMPTY"
        self.requests = 0
        self.failures = 0
        self.last_problem = ""

    async def grade(self, requests: list[JudgeRequest]) -> list[Grade | None]:
        # Client and semaphore are made per call: both bind to the running event loop, and grade_sync starts a
        # new loop each time. The client's own retries are off so that ours are the only ones.
        import openai  # here, not at the top: the rubric judge needs no openai

        slots = asyncio.Semaphore(self.concurrency)
        async with openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._api_key, timeout=self.timeout, max_retries=0
        ) as client:
            return list(await asyncio.gather(*(self._grade_one(client, slots, r) for r in requests)))

    async def _grade_one(self, client: openai.AsyncOpenAI, slots: asyncio.Semaphore, request: JudgeRequest) -> Grade | None:
        self.requests += 1
        try:
            return await chat(client, self.model, grader_messages(request.messages, request.response, request.info_truth),
                              _readable_grade, what="judge", max_retries=self.max_retries, backoff=self.backoff,
                              slots=slots, **self.sampling.request_options())
        except RequestFailed as failure:
            self.failures += 1
            self.last_problem = str(failure)
            return None

    def describe(self) -> str:
        return f"the judge at {self.base_url} (model {self.model!r})"

    def preflight(self) -> None:
        """One request before the run: a grader that cannot be reached, or whose answers are unreadable (not the
        three tags: a wrong model or prompt format), would otherwise score every question 0 without a word."""
        if grade_sync(self, [PREFLIGHT])[0] is None:
            raise UserError(f"{self.describe()} gave no readable grade for a test request: {self.last_problem}. "
                            "Check that it is running at that URL and serves that model.")


def _readable_grade(completion) -> Grade:
    text = first_choice_text(completion)
    grade = parse_grade(text)
    if grade is None:
        raise ValueError(f"no valid scores in the grader's answer {text[:120]!r}")
    return grade


# --- RubricJudge: the grader rubric as deterministic keyword rules -----------------------------------------------

_STOPWORDS = frozenset(
    """a about above after again all also am an and any are as at be been before being below between both but by
    can could did do does doing during each few for from had has have having he her here hers him his how i if in
    into is it its itself just me more most my no nor not now of off on once only or other our out over own same
    she should so some such than that the their them then there these they this those through to too under until
    up very was we were what when where which while who whom why will with would you your yours yourself yes sure
    please ok okay hello hi thank thanks really well like get got take took make feel felt know think want need
    let tell much many time times day days today still currently people consult consulting wait patiently
    symptom symptoms sensation feeling b c d""".split()
)
"""Words that name no particular fact: function words, chat filler, answer-choice letters, and the field-like
words "symptom"/"sensation" that many reference values share (they would make every "symptoms?" a direct hit)."""

_FIELD_CUES: dict[str, tuple[str, ...]] = {
    # Words with which a question asks about a kind of field, whatever the patient's answer (the value) is.
    "symptom": ("other symptom", "any other", "anything else", "what else", "else", "other discomfort"),
    "nature": ("feel like", "kind of", "type of", "sort of", "describe", "sharp", "dull", "burning", "stabbing",
               "throbbing", "colour", "color", "thick", "thin", "watery", "dry", "texture"),
    "location": ("where", "which part", "what part", "area", "side", "located", "location", "spread", "radiate"),
    "severity": ("how bad", "how severe", "severe", "severity", "scale", "intense", "intensity", "mild",
                 "moderate", "how high", "worst"),
    "trigger": ("trigger", "worse", "worsen", "better", "bring on", "brought on", "after", "cause", "caused"),
    "duration": ("how long", "since when", "when did", "start", "began", "begin", "onset"),
    "frequency": ("how often", "how many times", "frequency", "often"),
}

_FIELD_CATEGORY = (  # keyword in an info_truth field name -> cue category; specific before generic
    (("nature", "quality", "character", "type"), "nature"),
    (("location", "site", "position"), "location"),
    (("severity", "intensity", "degree"), "severity"),
    (("trigger", "cause", "aggravat", "reliev"), "trigger"),
    (("duration", "onset", "start", "time"), "duration"),
    (("frequency",), "frequency"),
    (("symptom",), "symptom"),
)

_GENERIC_MEDICAL = frozenset(
    """allergy allergic allergies medication medicine drug tablet pill dose history chronic disease
    condition illness fever temperature pain ache hurt sore swelling dizzy symptom sensation cough diarrhea vomit
    nausea rash sleep appetite pregnant pregnancy breastfeeding age weight blood pressure diabetes heart surgery
    treatment examination test hospital doctor prescription antibiotic infection""".split()
)

_WH_WORDS = frozenset("what when where which who whom whose why how".split())
_AUXILIARIES = frozenset("do does did is are was were am have has had can could would will should may might".split())
_SUBJECTS = frozenset("you it he she they there your the this that these those".split())  # not "i": "may I ask"
_PRONOUNS = frozenset("i you he she it we they".split())
_REQUEST_VERBS = frozenset("tell describe share confirm specify indicate rate explain".split())
_CONTRACTIONS = ((r"can't\b", "can not"), (r"won't\b", "will not"), (r"n't\b", " not"), (r"'s\b", " is"),
                 (r"'re\b", " are"), (r"'ve\b", " have"), (r"'ll\b", " will"), (r"'d\b", " would"),
                 (r"'m\b", " am"))


def _words(text: str) -> list[str]:
    text = text.lower().replace("\u2019", "'")
    for pattern, expansion in _CONTRACTIONS:
        text = re.sub(pattern, expansion, text)
    return re.findall(r"[a-z]+", text)


def _stem(word: str) -> str:
    """A tiny suffix stripper, enough to match "triggers"/"triggered"/"trigger" or "throbbing"/"throb"."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and not word.endswith("ss") and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiousl":
        word = word[:-1]
    return word


def _content_stems(text: str) -> set[str]:
    return {_stem(w) for w in _words(text) if w not in _STOPWORDS}


def _is_question_clause(words: list[str]) -> bool:
    """Does a clause open like a question? ("how bad is it", "do you ...", "please describe ...")."""
    if not words:
        return False
    first, rest = words[0], words[1:]
    if first in _WH_WORDS:
        # "when you cough", "what you ate", "when taking it" are subordinate clauses, not questions.
        return not rest or not (rest[0] in _PRONOUNS or rest[0].endswith("ing"))
    if first in _AUXILIARIES:
        subject = rest[1:2] if rest[:1] == ["not"] else rest[:1]  # "do not you ..." from "don't you ..."
        return bool(subject) and subject[0] in _SUBJECTS
    if first == "please":
        words = rest
    return bool(words) and (words[0] in _REQUEST_VERBS or words[:3] == ["let", "me", "know"])


def count_questions(text: str) -> int:
    """Count the questions in a message, for the format score.

    The text is cut into sentences, and each sentence into clauses at commas, semicolons, colons, "and", "or"
    and "but". A clause is a question if it opens like one (``_is_question_clause``), so indirect requests
    without "?" ("Please describe the pain.") count, and so do several questions packed into one sentence
    ("Where is it, how bad is it and what makes it worse?" = 3). A sentence ending in "?" counts at least once
    ("Any fever?"). Answer choices ("A) Yes B) No") and statements count zero.
    """
    total = 0
    for sentence in re.findall(r"[^.?!\n]+[.?!]*", text):
        clauses = re.split(r"[,;:]|\b(?:and|or|but)\b", sentence.lower())
        questions = sum(_is_question_clause(_words(clause)) for clause in clauses)
        total += max(questions, 1) if sentence.rstrip().endswith("?") else questions
    return total


def _cue_categories(text: str) -> dict[str, str]:
    """The cue categories a text mentions, each with the first cue phrase found (matched on stemmed words)."""
    stems = " " + " ".join(_stem(w) for w in _words(text)) + " "
    found = {}
    for category, phrases in _FIELD_CUES.items():
        for phrase in phrases:
            if " " + " ".join(_stem(w) for w in _words(phrase)) + " " in stems:
                found[category] = phrase
                break
    return found


def _field_category(field: str) -> str | None:
    field = field.lower()
    for keywords, category in _FIELD_CATEGORY:
        if any(k in field for k in keywords):
            return category
    return None


def parse_info_truth(info_truth: str) -> list[tuple[str, str]]:
    """Split "field: value, field: value" into (field, value) pairs.

    A comma-separated piece without a colon continues the previous value ("severity: 4-5 times, mild").
    "", "None", "None." and "[]" mean no reference information.
    """
    if info_truth.strip() in ("", "None", "None.", "[]"):
        return []
    items: list[tuple[str, str]] = []
    for piece in info_truth.split(","):
        field, colon, value = piece.partition(":")
        if colon:
            items.append((field.strip(), value.strip()))
        elif items:
            items[-1] = (items[-1][0], f"{items[-1][1]}, {piece.strip()}")
        elif piece.strip():
            items.append(("", piece.strip()))
    return items


class RubricJudge:
    """The grader rubric (spec section 5) as deterministic keyword rules: an offline stand-in for an LLM judge.

    Format: 1.0 / 0.5 / 0.0 for one / two / three-or-more questions (``count_questions``); a message with no
    question breaks the policy's one-question rule and gets 0.0 for format and content alike.

    Content, matching the response against the ``info_truth`` items:
    - 1.0 (direct): for some item, the response uses a cue word of the item's field (``_FIELD_CUES``, e.g.
      "where" for a location) or a content word of the item's value (stemmed, stop-words removed) that the
      patient has NOT already said. A value the patient already gave is old news: naming it again is a repeated
      question, so it only counts as related. Cue words always count, since "how bad is your sore throat?" is a
      direct severity question even though the sore throat is known.
    - 0.5 (related): no direct match, but the response mentions an item's value, a word the patient used, a
      field cue, or a generic medical term (allergy, medication, history, fever...). Also 0.5 when a direct match
      comes with cue words of three or more field kinds: a question listing every cue is a shotgun, not a
      direct question.
    - 0.0: anything else, and always when ``info_truth`` is empty or "None".
    """

    def preflight(self) -> None:
        """Nothing to check: the rules run here."""

    async def grade(self, requests: list[JudgeRequest]) -> list[Grade | None]:
        return [self.grade_one(r) for r in requests]

    def grade_one(self, request: JudgeRequest) -> Grade:
        n_questions = count_questions(request.response)
        if n_questions == 0:
            return Grade(0.0, 0.0, "no question in the message")
        format_score = {1: 1.0, 2: 0.5}.get(n_questions, 0.0)
        content_score, reason = self._content(request)
        return Grade(format_score, content_score, f"{n_questions} question(s); {reason}")

    @staticmethod
    def _content(request: JudgeRequest) -> tuple[float, str]:
        items = parse_info_truth(request.info_truth)
        if not items:
            return 0.0, "no reference information"
        response_stems = _content_stems(request.response)
        cues = _cue_categories(request.response)
        patient_said = _content_stems(" ".join(m["content"] for m in request.messages if m["role"] == "user"))

        for field, value in items:
            category = _field_category(field)
            new_value_words = sorted(response_stems & (_content_stems(value) - patient_said))
            if category in cues:
                why = f"asks about '{field}: {value}' (cue '{cues[category]}')"
            elif new_value_words:
                why = f"asks about '{field}: {value}' (mentions {', '.join(new_value_words)})"
            else:
                continue
            if len(cues) >= 3:
                return 0.5, f"{why}, but lists cues of {len(cues)} field kinds ({', '.join(sorted(cues))})"
            return 1.0, why

        value_stems = set().union(*(_content_stems(value) for _, value in items))
        generic = {_stem(w) for w in _words(request.response)} & {_stem(w) for w in _GENERIC_MEDICAL}
        related = sorted(response_stems & (value_stems | patient_said) | generic)
        if related or cues:
            return 0.5, f"related to the consultation ({', '.join(related or sorted(cues))}) but asks about no item"
        return 0.0, "unrelated to the reference information"



def make_judge(kind: str, url: str = "", model: str = "", api_key_env: str = "OPENAI_API_KEY",
               sampling: GraderSampling = TRAINING_GRADER, concurrency: int = 16, timeout: float = 60.0,
               max_retries: int = 3) -> Judge:
    """The judge named by ``kind``: "rubric" (offline) or "openai" (an LLM grader at ``url`` serving ``model``)."""
    if kind == "rubric":
        return RubricJudge()
    if kind == "openai":
        return OpenAIJudge(url, model, api_key_env=api_key_env, sampling=sampling, timeout=timeout,
                           max_retries=max_retries, concurrency=concurrency)
    raise ValueError(f"judge must be 'rubric' or 'openai', got {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# Scoring a batch
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoredResponse:
    """The reward of one response and the judge's grade (None when the judge was not asked, or failed)."""

    reward: Reward
    grade: Grade | None
    judge_failed: bool = False
    """The judge was asked (a correct "continue") and gave no valid grade: content and format count 0."""


def _check_samples(samples: Sequence[dict]) -> None:
    for i, sample in enumerate(samples):
        name = sample.get("cid", f"#{i}")
        missing = [key for key in ("messages", "decision_truth", "info_truth") if key not in sample]
        if missing:
            raise ValueError(f"sample {name} lacks {missing} (needs messages, decision_truth, info_truth)")
        if sample["decision_truth"] not in DECISIONS:
            truth = sample["decision_truth"]
            raise ValueError(f"sample {name}: unknown decision_truth {truth!r}; expected one of {DECISIONS}")


def score_responses(
    judge: Judge,
    samples: Sequence[dict],
    responses: Sequence[str],
    train_mode: str = "Ra+Rs",
    fusion_mode: str = "default",
) -> list[ScoredResponse]:
    """Reward ``responses[i]`` as an answer to ``samples[i]``, asking the judge (in one batch) only where needed.

    Samples are dicts with ``messages``, ``decision_truth`` and ``info_truth``; for several responses per sample
    (a GRPO group, or evaluation repeats) repeat the sample. Labels and modes are checked before any judge call.
    """
    if len(samples) != len(responses):
        raise ValueError(f"{len(samples)} samples but {len(responses)} responses; pass one sample per response")
    check_modes(train_mode, fusion_mode)
    _check_samples(samples)

    to_grade = [i for i, r in enumerate(responses) if needs_grade(r, samples[i]["decision_truth"])]
    asked = set(to_grade)
    grades: list[Grade | None] = [None] * len(samples)
    if to_grade:
        batch = [JudgeRequest(samples[i]["messages"], responses[i], samples[i]["info_truth"]) for i in to_grade]
        results = grade_sync(judge, batch)
        if len(results) != len(batch):
            raise RuntimeError(f"judge returned {len(results)} grades for {len(batch)} requests")
        for i, grade in zip(to_grade, results):
            grades[i] = grade
    return [
        ScoredResponse(compute_reward(response, sample["decision_truth"], grade, train_mode, fusion_mode), grade,
                       judge_failed=i in asked and grade is None)
        for i, (sample, response, grade) in enumerate(zip(samples, responses, grades))
    ]
