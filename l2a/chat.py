"""See it ask: a consultation in the terminal, you as the patient, a checkpoint as the pharmacist's assistant.

    python -m l2a.chat --model runs/default/checkpoints/step-000016

You describe your complaint; the model asks one question at a time (the policy prompt of training and evaluation,
``policy_messages``), you answer each on one line, until it says ``<stop />``: it has what it needs to suggest a
medication. That is the deployment side of Learn-to-Ask: the policy decides both what to ask and when to stop.
Ctrl-D (end of input) ends the consultation early. Decoding is greedy by default, so the same answers always get
the same questions.
"""

from __future__ import annotations

import argparse
import sys

from l2a.cli import UserError, run_command
from l2a.prompts import STOP_TOKEN, policy_messages
from l2a.reward import predicted_decision

PATIENT, ASSISTANT = "patient> ", "pharmacist: "


def consult(engine, sampling, read_line, write, max_questions: int) -> list[dict]:
    """Run one consultation; returns its messages. ``read_line()`` gives the patient's next line (None at the end of
    input), ``write(text)`` shows a line."""
    messages: list[dict] = []
    complaint = _next_answer(read_line)
    if complaint is None:
        return messages
    messages.append({"role": "user", "content": complaint})
    questions = 0
    while True:
        reply = engine.generate([policy_messages(messages)], 1, sampling)[0].text.strip()
        write(ASSISTANT + reply)
        messages.append({"role": "assistant", "content": reply})
        if predicted_decision(reply) == "stop":
            write(f"(enough information to suggest a medication after {questions} question{'s' * (questions != 1)})")
            return messages
        questions += 1
        if questions == max_questions:
            write(f"(no {STOP_TOKEN} within {max_questions} questions: consultation left open)")
            return messages
        answer = _next_answer(read_line)
        if answer is None:
            write("(end of input: consultation left open)")
            return messages
        messages.append({"role": "user", "content": answer})


def _next_answer(read_line) -> str | None:
    """The patient's next non-empty line, or None at the end of input."""
    while (line := read_line()) is not None:
        if line.strip():
            return line.strip()
    return None


def _read_line() -> str | None:
    try:
        return input(PATIENT)
    except EOFError:
        return None


def main(argv: list[str] | None = None) -> int:
    from l2a.model import EMBEDDED_DEFAULT

    parser = argparse.ArgumentParser(prog="python -m l2a.chat", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_DEFAULT,
                        help=f"HF checkpoint directory (train.py's or l2a.sft's checkpoints/step-N), or {EMBEDDED_DEFAULT!r}.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Length limit of one reply in tokens.")
    parser.add_argument("--max-questions", type=int, default=10, help="End the consultation after this many questions.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds sampling when --temperature > 0.")
    args = parser.parse_args(argv)
    if args.max_questions < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        parser.error("--max-questions and --max-new-tokens must be at least 1, --temperature at least 0")
    return run_command(lambda: chat(args), resume_hint="consultation ended")


def chat(args: argparse.Namespace) -> None:
    from l2a.model import load_model, load_tokenizer
    from l2a.rollout import HFEngine, SamplingConfig

    try:
        tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    except (OSError, ValueError) as err:  # FileNotFoundError is an OSError
        raise UserError(f"--model {args.model}: cannot load it ({str(err).splitlines()[0]})") from None
    engine = HFEngine(model.eval(), tokenizer, batch_size=1)
    sampling = SamplingConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(f"Describe your complaint, then answer each question on one line ({args.model}; Ctrl-D ends).", flush=True)
    consult(engine, sampling, _read_line, lambda text: print(text, flush=True), args.max_questions)


if __name__ == "__main__":
    sys.exit(main())
