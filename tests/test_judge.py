"""Judges: OpenAIJudge against a local HTTP stub, the offline RubricJudge, and score_responses.

``ChatStub`` is a test double for a remote, paid service (an LLM grader behind the chat-completions API): a real
HTTP server on 127.0.0.1, so the real ``openai`` client, its timeouts and HTTP errors are exercised.
"""

import json
import threading
import time
from pathlib import Path

import pytest
from openai_stub import ChatStub, Reply

from l2a.endpoint import EndpointRefused
from l2a.judges import (
    GraderSampling,
    JudgeRequest,
    OpenAIJudge,
    RubricJudge,
    count_questions,
    grade_sync,
    parse_info_truth,
    score_responses,
)
from l2a.prompts import STOP_TOKEN
from l2a.reward import Grade

SAMPLES = Path(__file__).resolve().parents[2] / "shared/data/realmedconv_samples"
GOOD = "<think>one direct question</think><format_score>1.0</format_score><content_score>0.5</content_score>"
INFO = "symptom: headache, symptom nature: throbbing, symptom location: left temple, symptom severity: moderate"
DIALOGUE = [
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "I have had a headache since yesterday and took paracetamol."},
]


def request(response: str, info_truth: str = INFO, messages=DIALOGUE) -> JudgeRequest:
    return JudgeRequest(messages=messages, response=response, info_truth=info_truth)


def judge_for(stub: ChatStub, **overrides) -> OpenAIJudge:
    options = dict(model="grader", timeout=5.0, max_retries=2, backoff=0.01)
    options.update(overrides)
    return OpenAIJudge(stub.base_url, **options)


# --- OpenAIJudge -----------------------------------------------------------------------------------------------


def test_openai_judge_sends_the_grader_prompt_and_keeps_order(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs no key: "EMPTY" is sent

    def handler(body):  # echo the graded response back in the think, to check the order of the results
        return f"<think>{body['messages'][1]['content'].splitlines()[-1]}</think>" + GOOD.split("</think>")[1]

    responses = ["Where does it hurt?", "How bad is it?", "Is it throbbing?"]
    with ChatStub(handler) as stub:
        judge = judge_for(stub, sampling=GraderSampling(temperature=0.3, max_tokens=77))
        grades = grade_sync(judge, [request(r) for r in responses])
    assert [g.think for g in grades] == [f"doctor: {r}" for r in responses]
    assert all((g.format_score, g.content_score) == (1.0, 0.5) for g in grades)
    assert (judge.requests, judge.failures) == (3, 0)
    # Requests run concurrently, so the server may see them in any order: match each by its last line.
    graded_last_lines = sorted(body["messages"][1]["content"].splitlines()[-1] for body in stub.requests)
    assert graded_last_lines == sorted(f"doctor: {r}" for r in responses)
    for body in stub.requests:
        assert (body["model"], body["temperature"], body["max_tokens"]) == ("grader", 0.3, 77)
        system, user = body["messages"]
        assert system["role"] == "system" and INFO in system["content"] and "<format_score>" in system["content"]
        assert user["role"] == "user"
        assert user["content"].startswith("doctor: Hello, how can I help?\npatient: I have had a headache")


def test_openai_judge_retries_unreadable_answers():
    answers = iter(["I think it is a good question.", GOOD])
    with ChatStub(lambda body: next(answers)) as stub:
        judge = judge_for(stub)
        [grade] = grade_sync(judge, [request("Where does it hurt?")])
    assert grade == Grade(1.0, 0.5, "one direct question")
    assert len(stub.requests) == 2 and judge.failures == 0


def test_openai_judge_gives_none_after_repeated_server_errors():
    with ChatStub(lambda body: Reply(status=500)) as stub:
        judge = judge_for(stub, max_retries=2)
        grades = grade_sync(judge, [request("Where does it hurt?"), request("How bad is it?")])
    assert grades == [None, None]
    assert len(stub.requests) == 2 * 3  # first try + 2 retries each
    assert (judge.requests, judge.failures) == (2, 2)


def test_openai_judge_times_out_and_retries():
    calls = []

    def handler(body):  # the first call hangs past the client timeout, later ones answer at once
        calls.append(body)
        return Reply(GOOD, delay=2.0 if len(calls) == 1 else 0.0)

    with ChatStub(handler) as stub:
        judge = judge_for(stub, timeout=0.3, max_retries=1)
        start = time.monotonic()
        [grade] = grade_sync(judge, [request("Where does it hurt?")])
        elapsed = time.monotonic() - start
    assert grade is not None and len(calls) == 2 and judge.failures == 0
    assert elapsed < 1.5  # gave up on the slow answer (2 s) after the 0.3 s timeout instead of waiting for it


def test_openai_judge_gives_none_when_every_attempt_times_out():
    with ChatStub(lambda body: Reply(GOOD, delay=1.0)) as stub:
        judge = judge_for(stub, timeout=0.3, max_retries=1)
        assert grade_sync(judge, [request("Where does it hurt?")]) == [None]
    assert len(stub.requests) == 2 and judge.failures == 1


def test_openai_judge_bounds_concurrency():
    lock, active, peak = threading.Lock(), [0], [0]

    def handler(body):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.15)
        with lock:
            active[0] -= 1
        return GOOD

    with ChatStub(handler) as stub:
        judge = judge_for(stub, concurrency=3)
        grades = grade_sync(judge, [request(f"Question {i}?") for i in range(9)])
    assert all(g is not None for g in grades)
    assert peak[0] == 3  # never more than 3 at once, and the 3 slots were used in parallel


def test_openai_judge_raises_on_configuration_errors(monkeypatch):
    monkeypatch.setenv("L2A_TEST_KEY", "sk-secret-value")
    with ChatStub(lambda body: Reply(status=401)) as stub:
        judge = judge_for(stub, api_key_env="L2A_TEST_KEY")
        with pytest.raises(EndpointRefused, match="refused") as error:
            grade_sync(judge, [request("Where does it hurt?")])
    assert len(stub.requests) == 1  # no retries: a bad key stays bad
    assert stub.base_url in str(error.value) and "sk-secret-value" not in str(error.value)


# --- RubricJudge -----------------------------------------------------------------------------------------------


def rubric(response: str, info_truth: str = INFO, messages=DIALOGUE) -> Grade:
    return RubricJudge().grade_one(request(response, info_truth, messages))


def test_rubric_direct_question_scores_full_marks():
    for question in [
        "Where exactly is the pain, on the left or the right side? A) Left B) Right",  # location cue
        "How severe is the headache: mild, moderate or severe?",  # severity cue
        "Does it feel throbbing? A) Yes B) No",  # new value word
    ]:
        grade = rubric(question)
        assert (grade.format_score, grade.content_score) == (1.0, 1.0), (question, grade.think)
        assert "asks about" in grade.think


def test_rubric_related_but_not_direct_scores_half():
    for question in [
        "Do you have any allergies to medication? A) Yes B) No",  # generic medical term
        "Did the paracetamol help? A) Yes B) No",  # a word from the patient's messages
        "Do you have a headache? A) Yes B) No",  # the item's value, but the patient already said it
    ]:
        grade = rubric(question)
        assert (grade.format_score, grade.content_score) == (1.0, 0.5), (question, grade.think)


def test_rubric_irrelevant_question_scores_zero_content():
    grade = rubric("Do you like pizza? A) Yes B) No")
    assert (grade.format_score, grade.content_score) == (1.0, 0.0)


@pytest.mark.parametrize("info_truth", ["", "None", "None.", "[]"])
def test_rubric_without_reference_information_scores_zero_content(info_truth):
    assert rubric("Where is the pain?", info_truth).content_score == 0.0


@pytest.mark.parametrize(
    "response,questions,format_score",
    [
        ("Is the pain throbbing or dull?", 1, 1.0),
        ("Please describe the pain.", 1, 1.0),  # a request without "?" is a question
        ("Please tell me whether you have a fever.", 1, 1.0),
        ("Do you feel it when you cough or when you swallow?", 1, 1.0),  # subordinate "when" clauses
        ("What's it like? A) Sharp B) Dull C) Throbbing", 1, 1.0),
        ("Where does it hurt and how bad is it?", 2, 0.5),
        ("Where does it hurt? How bad is it?", 2, 0.5),
        ("Where is it, how bad is it and what makes it worse?", 3, 0.0),
        ("Fever? Cough? Nausea?", 3, 0.0),
        ("I see, thank you for the details.", 0, 0.0),
        ("Take one tablet twice a day.", 0, 0.0),
        ("", 0, 0.0),
    ],
)
def test_rubric_format_counts_questions(response, questions, format_score):
    assert count_questions(response) == questions
    assert rubric(response).format_score == format_score


def test_rubric_no_question_scores_zero_content_too():
    assert rubric("The throbbing on your left temple is probably a tension headache.") == Grade(
        0.0, 0.0, "no question in the message"
    )


def test_rubric_is_hard_to_game_with_cue_lists():
    stuffed_questions = "Where is it? How severe? What triggers it? Any other symptoms? Is it sharp or dull?"
    assert rubric(stuffed_questions).format_score == 0.0
    stuffed_sentence = "Is it sharp, dull or throbbing, where, how severe, and what triggers it?"
    assert rubric(stuffed_sentence).format_score == 0.0
    one_question_many_cues = "Is the pain sharp or dull and mild or severe, worse after meals?"
    grade = rubric(one_question_many_cues)
    assert grade.content_score == 0.5 and "field kinds" in grade.think


def test_rubric_agrees_with_the_recorded_llm_grades():
    example = json.loads((SAMPLES / "eval_output_example_206_1.json").read_text())
    for response, recorded in zip(example["rollouts"], example["grades"]):
        grade = rubric(response, example["info_truth"], example["messages"])
        assert (grade.format_score, grade.content_score) == (recorded["format_score"], recorded["content_score"])


def test_parse_info_truth():
    assert parse_info_truth("symptom: cough, symptom severity: 4-5 times per day, mild") == [
        ("symptom", "cough"),
        ("symptom severity", "4-5 times per day, mild"),
    ]
    assert parse_info_truth(" None ") == []


# --- score_responses -------------------------------------------------------------------------------------------


class CountingJudge(RubricJudge):
    def __init__(self):
        self.seen: list[JudgeRequest] = []

    async def grade(self, requests):
        self.seen.extend(requests)
        return await super().grade(requests)


CONTINUE = {"cid": "1_1", "messages": DIALOGUE, "decision_truth": "continue", "info_truth": INFO}
STOP = {"cid": "1_2", "messages": DIALOGUE, "decision_truth": "stop", "info_truth": ""}


def test_score_responses_asks_the_judge_only_for_correct_continues():
    judge = CountingJudge()
    question = "Where is the pain? A) Left B) Right"
    samples = [CONTINUE, CONTINUE, STOP, STOP, CONTINUE]
    responses = [question, STOP_TOKEN, STOP_TOKEN, question, "Do you like pizza?"]
    scored = score_responses(judge, samples, responses)
    assert [r.response for r in judge.seen] == [question, "Do you like pizza?"]
    assert [s.reward.total for s in scored] == [4.0, 0.0, 4.0, 0.0, 2.0]
    assert [s.grade is not None for s in scored] == [True, False, False, False, True]
    assert judge.seen[0].info_truth == INFO and judge.seen[0].messages == DIALOGUE


def test_score_responses_passes_the_modes_through():
    scored = score_responses(CountingJudge(), [CONTINUE, STOP], ["Where is the pain?", STOP_TOKEN], "Ra+Rs", "sum")
    assert [s.reward.total for s in scored] == [3.0, 3.0]


def test_score_responses_keeps_failed_grades_as_none():
    with ChatStub(lambda body: Reply(status=503)) as stub:
        judge = judge_for(stub, max_retries=0)
        [scored] = score_responses(judge, [CONTINUE], ["Where is the pain?"])
    assert scored.grade is None and scored.reward.total == 1.0 and judge.failures == 1


@pytest.mark.parametrize(
    "samples,responses,message",
    [
        ([CONTINUE], ["a?", "b?"], "1 samples but 2 responses"),
        ([CONTINUE, {"cid": "9_9", "messages": []}], ["a?", "b?"], "sample 9_9 lacks"),
        ([{**STOP, "decision_truth": "halt"}], ["a?"], "sample 1_2: unknown decision_truth"),
    ],
)
def test_score_responses_rejects_bad_input_before_calling_the_judge(samples, responses, message):
    judge = CountingJudge()
    with pytest.raises(ValueError, match=message):
        score_responses(judge, samples, responses)
    assert judge.seen == []


def test_score_responses_rejects_unknown_modes_before_calling_the_judge():
    judge = CountingJudge()
    with pytest.raises(ValueError, match="train_mode"):
        score_responses(judge, [CONTINUE], ["Where?"], train_mode="Rx")
    assert judge.seen == []
