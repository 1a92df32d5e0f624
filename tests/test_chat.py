"""`python -m l2a.chat`: a terminal consultation, run as a real process with the patient's answers on stdin.

The pharmacist is the tiny test model, taught with l2a.sft to ask one question after the complaint and to say
<stop /> once it is answered, so the whole loop runs: question, answer, question ... <stop />.
"""

from __future__ import annotations

import subprocess

import pytest
from subprocesses import python, spawned

from l2a.model import load_model, load_tokenizer
from l2a.prompts import STOP_TOKEN
from l2a.sft import SFTTrainer

COMPLAINT = "I have had a headache for two days."
QUESTION = "Where is the headache: forehead or temples?"


@pytest.fixture(scope="module")
def asking_model(tiny_model_dir, tmp_path_factory):
    """The tiny model after enough SFT steps to ask QUESTION after COMPLAINT and stop after one answer."""
    opening = [{"role": "user", "content": COMPLAINT}]
    answered = opening + [{"role": "assistant", "content": QUESTION}, {"role": "user", "content": "The temples."}]
    samples = [{"cid": "a", "messages": opening, "target": QUESTION},
               {"cid": "b", "messages": answered, "target": STOP_TOKEN}]
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    trainer = SFTTrainer(model, tokenizer, learning_rate=1e-2)
    for _ in range(60):
        trainer.step(samples)
    out = tmp_path_factory.mktemp("asking")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def consult(model_dir, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    with spawned(python("-m", "l2a.chat", "--model", str(model_dir), *flags), stdin=subprocess.PIPE) as process:
        stdout, stderr = process.communicate(stdin, timeout=120)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def replies(stdout: str) -> list[str]:
    return [line.split("pharmacist: ", 1)[1] for line in stdout.splitlines() if "pharmacist: " in line]


def test_asks_one_question_at_a_time_until_stop(asking_model):
    done = consult(asking_model, f"{COMPLAINT}\nThe temples.\nthis line is never read\n")
    assert done.returncode == 0, done.stderr[-3000:]
    assert replies(done.stdout) == [QUESTION, STOP_TOKEN]
    assert "enough information to suggest a medication after 1 question" in done.stdout
    assert done.stdout.count("patient> ") == 2  # the complaint and one answer; the third line is never asked for


def test_end_of_input_and_question_limit_leave_the_consultation_open(asking_model, tiny_model_dir):
    done = consult(asking_model, f"\n{COMPLAINT}\n")  # blank lines are skipped; then stdin ends
    assert done.returncode == 0 and replies(done.stdout) == [QUESTION]
    assert "end of input" in done.stdout
    # The untrained model never says <stop />: the limit ends the consultation.
    done = consult(tiny_model_dir, f"{COMPLAINT}\na\nb\nc\n", "--max-questions", "2", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(replies(done.stdout)) == 2 and "no <stop /> within 2 questions" in done.stdout


def test_bad_model_path_is_one_error_line(tmp_path):
    done = consult(tmp_path / "missing", "hello\n")
    assert done.returncode == 2 and done.stderr.startswith("error: --model") and "Traceback" not in done.stderr
