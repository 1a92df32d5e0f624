"""Tests of l2a.data: loading, splitting, LLM info extraction, resuming, building, synthetic data, CLI.

Every test of the extractor talks real HTTP to ``ChatStub`` on 127.0.0.1, a test double for the remote,
paid chat-completions service (an LLM) that ``prepare`` uses in production.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import openai
import pytest
from openai_stub import ChatStub, Reply
from subprocesses import (
    command_env,
    python,
    run_to_end,
    spawned,
    stop_and_wait,
    wait_until,
)

from l2a.data import (
    CONSTRUCTIONS,
    SAMPLE_KEYS,
    DataError,
    ExtractionIncomplete,
    LLMExtractor,
    batch_indices,
    build_dataset,
    evenly_spaced,
    extract_all,
    hindsight_target,
    load_samples,
    load_sessions,
    main,
    oracle_facts,
    parse_info_list,
    read_extractions,
    split_by_session,
    split_session,
    write_jsonl,
)
from l2a.endpoint import EndpointRefused
from l2a.prompts import extraction_messages
from l2a.synthetic import (
    CONDITION_BY_NAME,
    CONDITIONS,
    _values,
    decision_baselines,
    pharmacist_stops,
    synthesize_sessions,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared/data/realmedconv_samples"


def realmedconv_session() -> dict:
    sessions, problems = load_sessions(FIXTURES / "raw_sessions.jsonl")
    assert problems == [] and len(sessions) == 1
    return sessions[0]


def synthetic_samples(n_sessions: int = 6, seed: int = 1) -> list[dict]:
    return [s for session in synthesize_sessions(n_sessions, seed) for s in split_session(session)]


def future_text(request: dict) -> str:
    """The part of an extraction request that identifies its sample: the rendered future."""
    return request["messages"][-1]["content"]


def oracle_replies(samples: list[dict]) -> dict[str, str]:
    """What a perfect extractor answers for each sample's future."""
    return {extraction_messages(s["remaining"])[-1]["content"]: repr(oracle_facts(s["remaining"])) for s in samples}


def run_extraction(stub: ChatStub, samples: list[dict], path: Path, *, timeout: float = 5.0,
                   max_retries: int = 2, concurrency: int = 4, api_key: str = "test-key") -> dict:
    async def go():
        async with openai.AsyncOpenAI(base_url=stub.base_url, api_key=api_key, timeout=timeout,
                                      max_retries=0) as client:
            extractor = LLMExtractor(client, "stub-model", max_retries=max_retries, retry_delay=0.01)
            return await extract_all(samples, extractor, path, concurrency)

    return asyncio.run(go())


# ---------------------------------------------------------------------------------------------------
# Splitting


def test_realmedconv_session_full_context():
    session = realmedconv_session()
    samples = split_session(session)
    assert [s["cid"] for s in samples] == [f"35310_{k}" for k in range(1, 8)]
    assert [s["decision_truth"] for s in samples] == ["continue"] * 6 + ["stop"]
    for s in samples:
        assert s["messages"] + s["remaining"] == session["messages"]
        assert s["messages"][-1]["role"] == "user" and s["session_id"] == 35310
    assert samples[-1]["remaining"] == [{"role": "assistant", "content": "<med_search>"}]
    # Hindsight targets for SFT: the doctor's next turn (all its messages), or <stop />.
    assert [hindsight_target(s) for s in samples[4:]] == [
        "Does it affect your vision? Do you have eye pain? Itchy eyes? Foreign body sensation? Tears?",
        "Okay Have you had any medical examinations or medication history? Any history of drug allergies or "
        "chronic diseases?", "<stop />"]
    assert session["messages"][23:25] == [{"role": "assistant", "content": "Okay"}, {"role": "assistant", "content": (
        "Have you had any medical examinations or medication history? Any history of drug allergies or chronic "
        "diseases?")}]
    # The documented context/future pair (called 35310_7 in the README) is round 2 of the code's numbering.
    pair = json.loads((FIXTURES / "context_future_pairs.jsonl").read_text())
    assert samples[1]["messages"] == pair["messages"]
    assert samples[1]["remaining"] == pair["remaining_chat"]


def test_realmedconv_session_round_context():
    session = realmedconv_session()
    full, rounds = split_session(session, "full"), split_session(session, context="round")
    assert [len(s["messages"]) for s in rounds] == [5, 3, 3, 3, 4, 5, 4]
    assert rounds[1]["messages"] == session["messages"][5:8]
    # The round blocks tile the session except for the final "<med_search>"; labels do not depend on context.
    assert sum((s["messages"] for s in rounds), []) == session["messages"][:-1]
    for f, r in zip(full, rounds):
        assert (f["cid"], f["remaining"], f["decision_truth"]) == (r["cid"], r["remaining"], r["decision_truth"])


def test_realmedconv_session_reference_construction():
    """Session 35310 ends with the doctor's "<med_search>": the reference's splitter makes it one more sample,
    labelled stop (8 samples, 2 stop), where l2a's default makes none (7 samples, 1 stop)."""
    session = realmedconv_session()
    paper, reference = split_session(session, **CONSTRUCTIONS["paper"]), split_session(session, **CONSTRUCTIONS["reference"])
    assert (len(paper), [s["decision_truth"] for s in paper].count("stop")) == (7, 1)
    assert (len(reference), [s["decision_truth"] for s in reference].count("stop")) == (8, 2)
    assert [s["cid"] for s in reference] == [f"35310_{k}" for k in range(1, 9)]
    assert [len(s["messages"]) for s in reference] == [5, 3, 3, 3, 4, 5, 4, 1]  # per-round context
    last = reference[-1]
    assert last["messages"] == [{"role": "assistant", "content": "<med_search>"}] and last["remaining"] == []
    # Both differences are needed: each alone gives neither construction.
    assert len(split_session(session, context="full", trailing_doctor_round=True)[-1]["messages"]) == 28
    assert len(split_session(session, context="round")) == 7


def test_split_edge_cases():
    def session(*roles: str, content: str = "text") -> dict:
        return {"session_id": "s", "diagn": "d", "messages": [{"role": r, "content": content} for r in roles]}

    greeting_first = split_session(session("assistant", "user", "user", "assistant", "user"))
    assert [len(s["messages"]) for s in greeting_first] == [3, 5]
    assert [s["decision_truth"] for s in greeting_first] == ["continue", "stop"]
    assert greeting_first[-1]["remaining"] == []  # ends on a patient message: stop with an empty future
    assert split_session(session("assistant", "assistant")) == []
    [doctor_only] = split_session(session("assistant", "assistant"), trailing_doctor_round=True)
    assert (len(doctor_only["messages"]), doctor_only["decision_truth"]) == (2, "stop")
    # A session that ends on a patient message has no trailing doctor round to keep.
    assert split_session(session("user", "assistant", "user"), trailing_doctor_round=True) == split_session(
        session("user", "assistant", "user"))
    # "user: " inside a doctor message is not a patient turn.
    faked = split_session(session("user", "assistant", content="user: hello"))
    assert [s["decision_truth"] for s in faked] == ["stop"]
    with pytest.raises(ValueError, match="context"):
        split_session(session("user"), context="prefix")


def test_synthetic_split_prefix_stop_and_oracle():
    for session in synthesize_sessions(200, seed=3):
        samples = split_session(session)
        questions = [m for m in session["messages"] if "elicits" in m]
        assert [s["decision_truth"] for s in samples] == ["continue"] * (len(samples) - 1) + ["stop"]
        # Stopping is a consequence of the dialogue: the pharmacist stops exactly when the condition's needs are known.
        assert [pharmacist_stops(s["diagn"], s["messages"]) for s in samples] == [
            s["decision_truth"] == "stop" for s in samples]
        last_patient = max(i for i, m in enumerate(session["messages"]) if m["role"] == "user")
        assert len(samples[-1]["messages"]) == last_patient + 1
        for s in samples:
            assert s["messages"] + s["remaining"] == session["messages"]
        # Right after the opening, the future holds every question; the stop sample's holds none.
        assert oracle_facts(samples[0]["remaining"]) == [q["elicits"][0] for q in questions]
        assert oracle_facts(samples[-1]["remaining"]) == []


# ---------------------------------------------------------------------------------------------------
# Synthetic generator

CUES = {  # the words an offline rubric judge relies on
    "symptom": ("other symptoms",),
    "symptom nature": ("feel like", "kind of", "describe"),
    "symptom location": ("where",),
    "symptom severity": ("severe", "how bad"),
    "symptom trigger": ("bring", "worse", "trigger"),
}


def test_synthesize_is_deterministic_and_well_formed(tmp_path):
    sessions = synthesize_sessions(600, seed=0)
    assert sessions == synthesize_sessions(600, seed=0)
    assert sessions != synthesize_sessions(600, seed=1)
    assert len(CONDITIONS) >= 30 and len({s["diagn"] for s in sessions}) == len(CONDITIONS)
    for condition in CONDITIONS:  # three different fields, each with values to report
        assert len(set(condition.needs)) == 3 and all(_values(condition, field) for field in condition.needs)
    write_jsonl(tmp_path / "raw.jsonl", sessions)
    assert load_sessions(tmp_path / "raw.jsonl") == (sessions, [])  # valid raw format, extra keys kept
    openings, n_questions = Counter(), Counter()
    for session in sessions:
        messages, needs = session["messages"], CONDITION_BY_NAME[session["diagn"]].needs
        questions = [m for m in messages if "elicits" in m]
        fields = [q["elicits"][0].split(": ")[0] for q in questions]
        assert len(set(fields)) == len(fields) and set(fields) <= set(needs)  # asks only what is needed, once
        # Every needed fact is stated exactly once, volunteered in the opening or answered, and nothing else is.
        stated = [fact for m in messages for fact in m.get("states", [])]
        assert sorted(fact.split(": ")[0] for fact in stated) == sorted(needs)
        assert all(m["role"] == "user" for m in messages if "states" in m)
        for question, field in zip(questions, fields):
            assert question["role"] == "assistant" and len(question["elicits"]) == 1
            assert any(cue in question["content"].lower() for cue in CUES[field]), question["content"]
            answer = messages[messages.index(question) + 1]
            assert answer["role"] == "user" and answer["states"] == question["elicits"]
            assert question["elicits"][0].split(": ")[1] in answer["content"].lower()  # the answer states the fact
        for message in messages[: messages.index(questions[0])]:  # volunteered facts are said, not just annotated
            for fact in message.get("states", []):
                assert fact.split(": ")[1] in message["content"].lower(), (fact, message["content"])
        assert messages[-1]["role"] == "assistant" and "elicits" not in messages[-1]
        patient_openers = sum(m["role"] == "user" for m in messages[: messages.index(questions[0])])
        openings[messages[0]["role"], patient_openers > 1] += 1
        n_questions[len(questions)] += 1
    # Varied openings: greeting first or not, one or several patient messages; 1, 2 or 3 questions.
    assert set(openings) == {("user", False), ("user", True), ("assistant", False), ("assistant", True)}
    assert set(n_questions) == {1, 2, 3}


def test_decision_baselines_are_majority_votes_scored_on_test():
    def sample(diagn: str, answers: int, known: list[str], decision: str) -> dict:
        messages = [{"role": "user", "content": "opening", "states": [f"{k}: x" for k in known]}]
        messages += [{"role": "assistant", "content": "q", "elicits": ["symptom: x"]}] * answers
        return {"diagn": diagn, "messages": messages, "decision_truth": decision}

    # Migraine needs nature, severity and other symptoms.
    train = [sample("Migraine", 1, ["symptom nature"], "continue"), sample("Migraine", 1, ["symptom nature"], "continue"),
             sample("Migraine", 1, ["symptom nature", "symptom severity", "symptom"], "stop")]
    test = [sample("Migraine", 1, ["symptom nature"], "continue"),
            sample("Migraine", 1, ["symptom nature", "symptom severity", "symptom"], "stop"),
            sample("Migraine", 2, ["symptom"], "continue")]  # 2 answers: unseen in train, the overall majority
    assert decision_baselines(train, test) == {"always_continue": 2 / 3, "majority_by_answers": 2 / 3,
                                               "majority_by_condition_and_known": 1.0, "rule": 1.0}
    test[0]["decision_truth"] = "stop"  # a label that breaks the rule is counted against it
    assert decision_baselines(train, test)["rule"] == 2 / 3


def test_readmes_state_the_bundled_data_baselines():
    """The decision accuracies quoted in the READMEs are those of the bundled data."""
    build = lambda part: [s for session in part for s in split_session(session)]  # noqa: E731
    train, test = split_by_session(synthesize_sessions(600, seed=0), 0.2, seed=0)
    baselines = decision_baselines(build(train), build(test))
    assert baselines["rule"] == 1.0
    for readme in (REPO / "README.md", REPO / "data/synthetic/README.md"):
        text = readme.read_text()
        for name in ("always_continue", "majority_by_answers", "majority_by_condition_and_known"):
            assert f"{baselines[name]:.3f}" in text, (readme, name)


# ---------------------------------------------------------------------------------------------------
# Loading and validation

GOOD = '{"session_id": 1, "diagn": "d", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.mark.parametrize("bad_line, problem", [
    ('{"session_id": 2, "diagn": "d", "messages": [', "invalid JSON"),
    ('{"session_id": 2, "messages": [{"role": "user", "content": "hi"}]}', "missing key 'diagn'"),
    ('{"session_id": 2, "diagn": "d", "messages": [{"role": "doctor", "content": "hi"}]}', "role must be"),
    ('{"session_id": 2, "diagn": "d", "messages": [{"role": "user", "content": 5}]}', "content must be a string"),
    ('{"session_id": 2.5, "diagn": "d", "messages": [{"role": "user", "content": "hi"}]}', "'session_id' must be"),
    ('{"session_id": 2, "diagn": "d", "messages": "hi"}', "'messages' must be an array"),
    ('{"session_id": 2, "diagn": "d", "messages": []}', "'messages' is empty"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"session_id": "1", "diagn": "d", "messages": [{"role": "user", "content": "hi"}]}', "duplicate session_id"),
])
def test_load_sessions_names_file_and_line(tmp_path, bad_line, problem):
    path = tmp_path / "raw.jsonl"
    path.write_text(GOOD + "\n\n" + bad_line + "\n")  # the blank line counts for the line number
    with pytest.raises(DataError, match=rf"^{path}:3: .*{problem}"):
        load_sessions(path)
    sessions, problems = load_sessions(path, skip_bad=True)
    assert [s["session_id"] for s in sessions] == [1]
    assert len(problems) == 1 and problems[0].startswith(f"{path}:3: ")


def test_load_sessions_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_sessions(tmp_path / "nope.jsonl")


def test_load_samples_validates(tmp_path):
    samples = synthetic_samples()
    records, _ = build_dataset(samples, {s["cid"]: oracle_facts(s["remaining"]) for s in samples})
    write_jsonl(tmp_path / "train.jsonl", records)
    assert load_samples(tmp_path / "train.jsonl") == records
    assert load_samples(FIXTURES / "labeled_samples.jsonl")[1]["cid"] == "206_1"  # built before targets: no target
    for broken, problem in [({**records[0], "decision_truth": "maybe"}, "'decision_truth' must be"),
                            ({**records[0], "cid": "x", "target": None}, "'target' must be a string"),
                            ({k: v for k, v in records[0].items() if k != "info_truth"}, "missing key 'info_truth'"),
                            (records[0], "duplicate cid")]:
        write_jsonl(tmp_path / "bad.jsonl", [records[0], broken])
        with pytest.raises(DataError, match=rf"^{tmp_path / 'bad.jsonl'}:2: {problem}"):
            load_samples(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no samples"):
        load_samples(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------------------------------------------
# Building


def test_build_filters_and_shapes_records():
    messages = [{"role": "user", "content": "a", "extra": 1}]
    future = [{"role": "assistant", "content": "Okay."}, {"role": "assistant", "content": "Where is it?"},
              {"role": "user", "content": "Here."}, {"role": "assistant", "content": "How bad?"}]
    samples = [{"cid": c, "session_id": 7, "diagn": "d", "messages": messages,
                "remaining": future if d == "continue" else [], "decision_truth": d}
               for c, d in [("7_1", "continue"), ("7_2", "continue"), ("7_3", "stop"), ("7_4", "continue")]]
    info = {"7_1": ["symptom: cough", "symptom severity: mild"], "7_2": [], "7_3": [], "7_4": None}
    with pytest.raises(ExtractionIncomplete, match="7_4"):
        build_dataset(samples, info)
    records, counts = build_dataset(samples, info, drop_failed=True)
    assert counts == {"continue": 1, "stop": 1, "dropped_empty": 1, "dropped_failed": 1}
    assert [r["cid"] for r in records] == ["7_1", "7_3"]
    assert records[0] == {"cid": "7_1", "session_id": 7, "diagn": "d", "messages": [{"role": "user", "content": "a"}],
                          "decision_truth": "continue", "info_truth": "symptom: cough, symptom severity: mild",
                          "target": "Okay. Where is it?"}  # the doctor's whole next turn, up to the patient's reply
    assert records[1]["target"] == "<stop />"
    assert all(tuple(r) == SAMPLE_KEYS for r in records)
    with pytest.raises(ExtractionIncomplete):  # a sample never extracted counts as failed too
        build_dataset(samples[:1], {})


def test_split_by_session_is_deterministic_and_disjoint():
    sessions = synthesize_sessions(50, seed=0)
    train, test = split_by_session(sessions, 0.2, seed=4)
    assert (train, test) == split_by_session(sessions, 0.2, seed=4)
    assert len(test) == 10 and len(train) == 40
    assert {s["session_id"] for s in train}.isdisjoint(s["session_id"] for s in test)
    assert split_by_session(sessions, 0.2, seed=5)[1] != test
    with pytest.raises(ValueError):
        split_by_session(sessions, 1.0, seed=0)


# ---------------------------------------------------------------------------------------------------
# Extraction against the stub


def test_parse_info_list():
    assert parse_info_list("['symptom: cough', ' symptom severity: mild ']") == [
        "symptom: cough", "symptom severity: mild"]
    assert parse_info_list("```python\n['symptom: cough']\n```") == ["symptom: cough"]
    assert parse_info_list("[]") == []
    for bad in ["Sure! The facts are: cough", "('a', 'b')", "[1, 2]", "", None, "__import__('os')"]:
        with pytest.raises(ValueError):
            parse_info_list(bad)


def test_extract_good_answers(tmp_path):
    samples = synthetic_samples()
    replies = oracle_replies(samples)
    with ChatStub(lambda request: replies[future_text(request)]) as stub:
        result = run_extraction(stub, samples, tmp_path / "ex.jsonl")
    assert result == {s["cid"]: oracle_facts(s["remaining"]) for s in samples}
    continues = [s for s in samples if s["decision_truth"] == "continue"]
    assert len(stub.requests) == len(continues)  # stop samples have no patient answer to extract from
    request = stub.requests[0]
    assert (request["model"], request["temperature"], request["max_tokens"]) == ("stub-model", 0.7, 512)
    assert request["messages"] in [extraction_messages(s["remaining"]) for s in continues]
    assert read_extractions(tmp_path / "ex.jsonl") == result


def test_extract_retries_garbage_http_errors_and_timeouts(tmp_path):
    samples = [s for s in synthetic_samples() if s["decision_truth"] == "continue"][:4]
    replies = oracle_replies(samples)
    failures = ["Here you go: cough", Reply(status=500), Reply("[]", delay=1.5), Reply(status=429)]
    first_failure = dict(zip(replies, failures))  # garbage, HTTP 500, a timeout (client waits 0.5 s), HTTP 429
    seen = Counter()
    lock = threading.Lock()

    def handler(request):
        future = future_text(request)
        with lock:
            seen[future] += 1
            attempt = seen[future]
        return first_failure[future] if attempt == 1 else replies[future]

    with ChatStub(handler) as stub:
        result = run_extraction(stub, samples, tmp_path / "ex.jsonl", timeout=0.5)
    assert result == {s["cid"]: oracle_facts(s["remaining"]) for s in samples}
    assert sorted(seen.values()) == [2, 2, 2, 2]


def test_extract_all_attempts_fail_is_recorded_then_retried(tmp_path):
    samples = synthetic_samples()
    replies = oracle_replies(samples)
    doomed = next(s for s in samples if s["decision_truth"] == "continue")
    doomed_future = extraction_messages(doomed["remaining"])[-1]["content"]

    def flaky(request):
        future = future_text(request)
        return "I cannot help with that." if future == doomed_future else replies[future]

    path = tmp_path / "ex.jsonl"
    with ChatStub(flaky) as stub:
        result = run_extraction(stub, samples, path, max_retries=2)
    assert result[doomed["cid"]] is None
    assert sum(future_text(r) == doomed_future for r in stub.requests) == 3  # first try + 2 retries
    record = [json.loads(line) for line in path.read_text().splitlines() if doomed["cid"] in line][0]
    assert record["info_set"] is None and record["extract_error"].startswith("unreadable answer: reply is not")
    with pytest.raises(ExtractionIncomplete, match=doomed["cid"]):
        build_dataset(samples, result)

    with ChatStub(lambda request: replies[future_text(request)]) as stub:  # the next run retries only it
        result = run_extraction(stub, samples, path)
    assert [future_text(r) for r in stub.requests] == [doomed_future]
    assert result == {s["cid"]: oracle_facts(s["remaining"]) for s in samples}


def test_extract_http_500_every_time_is_recorded(tmp_path):
    samples = [s for s in synthetic_samples() if s["decision_truth"] == "continue"][:2]
    with ChatStub(lambda request: Reply(status=500)) as stub:
        result = run_extraction(stub, samples, tmp_path / "ex.jsonl", max_retries=1, api_key="sk-secret-1")
    assert result == {s["cid"]: None for s in samples} and len(stub.requests) == 4
    text = (tmp_path / "ex.jsonl").read_text()
    assert "InternalServerError" in text and "sk-secret-1" not in text


def test_rejected_key_aborts_the_run(tmp_path):
    samples = [s for s in synthetic_samples() if s["decision_truth"] == "continue"]
    with ChatStub(lambda request: Reply(status=401)) as stub:
        with pytest.raises(EndpointRefused, match="refused the request"):
            run_extraction(stub, samples, tmp_path / "ex.jsonl", concurrency=2)
    assert len(stub.requests) <= 2  # no retries, no further samples


def test_concurrency_is_bounded(tmp_path):
    samples = synthetic_samples()
    replies = oracle_replies(samples)
    in_flight, peak = [0], [0]
    lock = threading.Lock()

    def slow(request):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1
        return replies[future_text(request)]

    with ChatStub(slow) as stub:
        run_extraction(stub, samples, tmp_path / "ex.jsonl", concurrency=3)
    assert len(stub.requests) > 6 and peak[0] == 3


def test_resume_asks_each_sample_once_and_loses_none(tmp_path):
    samples = synthetic_samples(10)
    replies = oracle_replies(samples)
    path = tmp_path / "ex.jsonl"
    with ChatStub(lambda request: replies[future_text(request)]) as stub:
        run_extraction(stub, samples[:15], path)
        result = run_extraction(stub, samples, path)
    counts = Counter(future_text(r) for r in stub.requests)
    continues = [s for s in samples if s["decision_truth"] == "continue"]
    assert len(counts) == len(continues) and set(counts.values()) == {1}
    assert result == {s["cid"]: oracle_facts(s["remaining"]) for s in samples}
    assert len(path.read_text().splitlines()) == len(samples)


def test_truncated_last_line_is_repaired(tmp_path):
    samples = synthetic_samples()
    replies = oracle_replies(samples)
    first, second = [s for s in samples if s["decision_truth"] == "continue"][:2]
    path = tmp_path / "ex.jsonl"
    path.write_text(json.dumps({"cid": first["cid"], "info_set": ["symptom: x"]}) + "\n"
                    + json.dumps({"cid": second["cid"], "info_set": ["symptom: y"]})[:25])  # killed mid-write
    assert read_extractions(path) == {first["cid"]: ["symptom: x"]}
    assert path.read_text().endswith("\n")
    with ChatStub(lambda request: replies[future_text(request)]) as stub:
        result = run_extraction(stub, samples, path)
    assert result[first["cid"]] == ["symptom: x"]  # kept, not asked again
    assert result[second["cid"]] == oracle_facts(second["remaining"])
    assert all(json.loads(line) for line in path.read_text().splitlines())
    path.write_text(path.read_text() + "garbage\n" + json.dumps({"cid": "x", "info_set": []}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:\d+: invalid JSON"):  # a bad middle line is not ours
        read_extractions(path)


# ---------------------------------------------------------------------------------------------------
# Command line


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_to_end(python("-m", "l2a.data", *args), timeout=60, env=command_env(**(env or {})))


def test_cli_synth(tmp_path):
    done = run_cli("synth", "--out", str(tmp_path / "a"), "--sessions", "40", "--seed", "2")
    assert done.returncode == 0, done.stderr
    assert "40 sessions" in done.stdout and "train.jsonl: " in done.stdout and "stop " in done.stdout
    assert "test decision accuracy: always_continue " in done.stdout and "rule 1.000" in done.stdout
    assert main(["synth", "--out", str(tmp_path / "b"), "--sessions", "40", "--seed", "2"]) == 0
    for name in ("sessions.jsonl", "train.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, test = load_samples(tmp_path / "a/train.jsonl"), load_samples(tmp_path / "a/test.jsonl")
    assert len({s["session_id"] for s in test}) == 8
    assert {s["session_id"] for s in train}.isdisjoint(s["session_id"] for s in test)
    assert all(s["info_truth"] for s in train if s["decision_truth"] == "continue")
    assert all((s["target"] == "<stop />") == (s["decision_truth"] == "stop") and s["target"] for s in train)


def test_bundled_synthetic_data_is_up_to_date(tmp_path):
    """data/synthetic is exactly what the generator makes: regenerate it after changing the generator."""
    assert main(["synth", "--out", str(tmp_path)]) == 0
    for name in ("sessions.jsonl", "train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "data/synthetic" / name).read_bytes(), name


def test_cli_prepare_with_openai_extractor(tmp_path):
    sessions = synthesize_sessions(10, seed=5)
    write_jsonl(tmp_path / "raw.jsonl", sessions)
    samples = [s for session in sessions for s in split_session(session)]
    replies = oracle_replies(samples)
    key = "sk-l2a-test-9f8e7d6c5b4a"
    out = tmp_path / "out"
    with ChatStub(lambda request: replies[future_text(request)]) as stub:
        done = run_cli("prepare", "--train-raw", str(tmp_path / "raw.jsonl"), "--test-fraction", "0.3",
                       "--out", str(out), "--base-url", stub.base_url, "--model", "m",
                       "--api-key-env", "L2A_TEST_KEY", env={"L2A_TEST_KEY": key})
    assert done.returncode == 0, done.stderr
    assert len(stub.requests) == sum(s["decision_truth"] == "continue" for s in samples)
    train, test = split_by_session(sessions, 0.3, seed=0)
    for name, part in [("train", train), ("test", test)]:
        part_samples = [s for session in part for s in split_session(session)]
        expected, _ = build_dataset(part_samples, {s["cid"]: oracle_facts(s["remaining"]) for s in part_samples})
        assert load_samples(out / f"{name}.jsonl") == expected
    outputs = done.stdout + done.stderr + "".join(p.read_text() for p in out.iterdir())
    assert key not in outputs


@pytest.mark.parametrize("construction, samples, stops, share", [("paper", 7, 1, "14.3%"),
                                                                   ("reference", 8, 2, "25.0%")])
def test_cli_prepare_construction(tmp_path, capsys, monkeypatch, construction, samples, stops, share):
    """--construction reference builds session 35310 as the reference does; the stop share of each part is printed.

    The extractor is ChatStub (a test double for the LLM), answering one fact for every future.
    """
    write_jsonl(tmp_path / "train_raw.jsonl", synthesize_sessions(4, seed=0))
    out = tmp_path / "out"
    with ChatStub(lambda request: "['symptom: sore throat']") as stub:
        args = ["prepare", "--train-raw", str(tmp_path / "train_raw.jsonl"), "--test-raw",
                str(FIXTURES / "raw_sessions.jsonl"), "--out", str(out), "--base-url", stub.base_url, "--model", "m",
                "--api-key-env", "L2A_TEST_KEY", "--construction", construction]
        monkeypatch.setenv("L2A_TEST_KEY", "k")
        assert main(args) == 0
    test = load_samples(out / "test.jsonl")
    assert (len(test), [s["decision_truth"] for s in test].count("stop")) == (samples, stops)
    expected = split_session(realmedconv_session(), **CONSTRUCTIONS[construction])
    assert [(s["cid"], s["messages"]) for s in test] == [(s["cid"], s["messages"]) for s in expected]
    context = CONSTRUCTIONS[construction]["context"]
    printed = capsys.readouterr().out
    assert f"construction {construction}: context {context}" in printed
    assert f"test.jsonl: {samples} samples (continue {samples - stops}, stop {stops} = {share})" in printed


def test_cli_prepare_needs_the_key_before_any_request(tmp_path, capsys):
    write_jsonl(tmp_path / "raw.jsonl", synthesize_sessions(4, seed=0))
    with ChatStub(lambda request: "[]") as stub:
        assert main(["prepare", "--train-raw", str(tmp_path / "raw.jsonl"), "--test-fraction", "0.5", "--out",
                     str(tmp_path / "out"), "--base-url", stub.base_url, "--model", "m",
                     "--api-key-env", "L2A_UNSET_KEY_FOR_TEST"]) == 2
    assert stub.requests == []
    assert "L2A_UNSET_KEY_FOR_TEST" in capsys.readouterr().err


def test_cli_bad_input_and_skip_bad(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    lines = [json.dumps(s) for s in synthesize_sessions(4, seed=0)]
    raw.write_text("\n".join(lines[:2] + ['{"session_id": 9, "diagn": "d"}'] + lines[2:]) + "\n")
    args = ["prepare", "--train-raw", str(raw), "--test-fraction", "0.25", "--out", str(tmp_path / "out"),
            "--extractor", "oracle"]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: {raw}:3: missing key 'messages'\n"
    assert main(args + ["--skip-bad"]) == 0
    stdout = capsys.readouterr().out
    assert "skipped 1 bad lines" in stdout
    assert len(load_samples(tmp_path / "out/train.jsonl")) + len(load_samples(tmp_path / "out/test.jsonl")) == sum(
        len(split_session(s)) for s in synthesize_sessions(4, seed=0))


@pytest.mark.parametrize("signal_number, ignore_sigint", [
    (signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGKILL, False),
], ids=["SIGINT", "SIGINT-in-background-job", "SIGTERM", "SIGKILL"])
def test_cli_interrupted_run_loses_nothing(tmp_path, signal_number, ignore_sigint, monkeypatch):
    """Ctrl-C, SIGTERM or kill during extraction keeps every finished record; the rerun asks only for the rest.

    SIGINT and SIGTERM end the run within seconds with the resume message, also when the process inherited
    SIGINT as ignored (a background job of a script): it used to keep working then, ~30 s per request here.
    """
    sessions = synthesize_sessions(8, seed=6)
    write_jsonl(tmp_path / "raw.jsonl", sessions)
    samples = [s for session in sessions for s in split_session(session)]
    replies = oracle_replies(samples)
    out = tmp_path / "out"
    args = python("-m", "l2a.data", "prepare", "--train-raw", str(tmp_path / "raw.jsonl"),
                  "--test-fraction", "0.25", "--out", str(out), "--model", "m", "--concurrency", "1")
    answered = []

    def first_four_then_hang(request):  # so the run cannot finish (and close its file) before the signal
        answered.append(request)
        return Reply(replies[future_text(request)], delay=0.05 if len(answered) <= 4 else 30)

    with ChatStub(first_four_then_hang) as stub, spawned(args + ["--base-url", stub.base_url], ignore_sigint=ignore_sigint,
                                                          env=command_env(OPENAI_API_KEY="k")) as process:
        extracted = out / "extracted_train.jsonl"
        # generous: on a loaded 2-core machine the start-up alone can take a while
        wait_until(lambda: extracted.exists() and extracted.read_text().count('"info_set": ["') >= 3, 120, process,
                   "three extractions")
        stopped = stop_and_wait(process, signal_number, within=30)
    stderr = stopped.stderr
    if signal_number == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 128 + signal_number and stopped.seconds < 10, \
            (process.returncode, stopped.timing(), stderr)
        assert f"interrupted ({signal.Signals(signal_number).name}): finished extractions are saved" in stderr
        assert "Traceback" not in stderr
    saved = read_extractions(extracted)
    assert sum(bool(info) for info in saved.values()) >= 3
    first_run = Counter(future_text(r) for r in stub.requests)

    with ChatStub(lambda request: replies[future_text(request)]) as stub:
        monkeypatch.setenv("OPENAI_API_KEY", "k")
        assert main(args[3:] + ["--base-url", stub.base_url]) == 0
    rerun = Counter(future_text(r) for r in stub.requests)
    saved_futures = {extraction_messages(s["remaining"])[-1]["content"] for s in samples if saved.get(s["cid"])}
    assert saved_futures.isdisjoint(rerun)  # nothing finished is asked again
    continues = [s for s in samples if s["decision_truth"] == "continue"]
    assert set(first_run) | set(rerun) == {extraction_messages(s["remaining"])[-1]["content"] for s in continues}
    assert len(load_samples(out / "train.jsonl")) + len(load_samples(out / "test.jsonl")) == len(samples)


def test_batch_indices_walk_a_fresh_permutation_per_epoch():
    """Steps of 3 over 7 samples: each epoch sees every sample once; the order is a pure function of (seed, stream,
    step), so a resumed run draws the same batches, and the warm start's stream is not GRPO's."""
    epochs = [sum((batch_indices(7, step, 1, 0, "grpo") for step in range(e * 7, e * 7 + 7)), []) for e in range(2)]
    assert all(sorted(order) == list(range(7)) for order in epochs) and epochs[0] != epochs[1]
    steps = [batch_indices(7, step, 3, 0, "grpo") for step in range(5)]
    assert sum(steps, [])[:14] == epochs[0] + epochs[1]  # batches run on across the epoch boundary
    assert steps == [batch_indices(7, step, 3, 0, "grpo") for step in range(5)]
    assert batch_indices(7, 0, 7, 0, "sft") != epochs[0] and batch_indices(7, 0, 7, 1, "grpo") != epochs[0]


def test_evenly_spaced_spreads_the_subset_over_the_file():
    samples = [{"cid": str(i)} for i in range(10)]
    assert [s["cid"] for s in evenly_spaced(samples, 4)] == ["0", "2", "5", "7"]
    assert evenly_spaced(samples, 10) == samples and evenly_spaced(samples, 99) == samples
