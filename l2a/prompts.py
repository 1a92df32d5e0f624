"""Every prompt l2a sends to a model, in one place.

Three models read prompts here:
- the *policy* (the model we train) gets ``policy_messages``: a system prompt plus the consultation so far;
- the *grader* (an LLM judge) gets ``grader_messages``: a rubric with the reference facts plus the
  consultation, ending with the policy's candidate question;
- the *extractor* (data preparation) gets ``extraction_messages``: the future part of a consultation,
  from which it lists the facts the doctor went on to ask about.

The requirements each prompt meets are those of the Learn-to-Ask reference prompts (paper and spec
sections 3.2, 4 and 5); the wording is our own.
"""

from __future__ import annotations

STOP_TOKEN = "<stop />"

_POLICY_TASK = """# Task
You are a medical assistant helping a pharmacist consult with a patient. Read the conversation so far and \
continue the medical inquiry in English, one step at a time.

## Rules
1. Reply with exactly one clear, short medical question, and offer 2 or 3 answer choices the patient can pick from.
2. Never repeat a question that was already asked in the conversation.
3. Write your whole reply as a single sentence."""

_STOP_RULE = f"""
4. When the conversation already holds enough information to suggest a medication, reply with {STOP_TOKEN} and nothing else."""

POLICY_PROMPT = _POLICY_TASK + _STOP_RULE
"""System prompt of the policy for train modes Ra+Rs and Rs, and for evaluation."""

POLICY_PROMPT_RA = _POLICY_TASK
"""System prompt for train mode "Ra" (the ablation without R_s): the same rules without the stop rule."""

GRADER_PROMPT = """# Task
You grade a doctor's message. The user gives you a consultation between a doctor and a patient. \
Judge only the doctor's final message.

# Grading policy
## Format score
- 1.0: the final message asks exactly one question.
- 0.5: the final message asks exactly two questions.
- 0.0: the final message asks three or more questions.

## Content score
- 1.0: the question asks directly about at least one item of the Reference Information.
- 0.5: the question is closely related to an item of the Reference Information but does not ask about it directly.
- 0.0: the question is unrelated to every item of the Reference Information.

# Reference Information
{reference}

# Output format
Answer with exactly these three tags, in this order, and nothing outside them:
<think>your reasoning</think>
<format_score>1.0, 0.5 or 0.0</format_score>
<content_score>1.0, 0.5 or 0.0</content_score>
Both scores must depend only on the doctor's final message and the Reference Information."""
"""System prompt of the grader; ``{reference}`` is replaced by the sample's ``info_truth``."""

EXTRACTION_PROMPT = """# Task
You are a medical information assistant. The user gives you part of a consultation between a physician \
(assistant) and a patient (user). List the clinical facts the physician wanted to know, judging by the \
physician's questions, each paired with what the patient answered.

# Fields
Use only these fields: symptom, symptom nature, symptom location, symptom severity, symptom trigger.

# Rules
- Include a field only if the physician explicitly asked about it; leave out every field nobody asked about.
- Never invent information and never add other fields; ignore what the patient says about earlier \
medication, allergies or other illnesses.
- Never write vague values such as "unspecified" or "unknown".
- Do not repeat yourself: if a symptom already names the body part, do not add a separate symptom location.
- Turn colloquial wording into short, standard clinical terms.

# Output
Only a Python list of single-quoted strings, nothing else, no explanation, for example:
['symptom: diarrhea', 'symptom nature: watery stool', 'symptom severity: 4-5 times per day']
If the conversation has nothing to do with these fields, output exactly []"""
"""System prompt of the info extractor (data preparation)."""


def policy_messages(messages: list[dict], train_mode: str = "Ra+Rs") -> list[dict]:
    """The chat the policy sees: ``[system prompt] + messages`` (messages passed through unmerged)."""
    system = POLICY_PROMPT_RA if train_mode == "Ra" else POLICY_PROMPT
    return [{"role": "system", "content": system}] + [
        {"role": m["role"], "content": m["content"]} for m in messages
    ]


def render_dialogue(messages: list[dict], response: str | None = None) -> str:
    """Render a consultation as ``patient: ...`` / ``doctor: ...`` lines for the grader.

    The candidate ``response`` is appended as the doctor's final message. System messages are skipped.
    """
    speaker = {"user": "patient", "assistant": "doctor"}
    lines = [f"{speaker[m['role']]}: {m['content']}" for m in messages if m["role"] in speaker]
    if response is not None:
        lines.append(f"doctor: {response}")
    return "\n".join(lines)


def grader_messages(messages: list[dict], response: str, info_truth: str) -> list[dict]:
    """The chat the grader sees: rubric with ``info_truth`` as reference, then the dialogue to judge."""
    reference = info_truth.strip() or "None."
    return [
        {"role": "system", "content": GRADER_PROMPT.replace("{reference}", reference)},
        {"role": "user", "content": render_dialogue(messages, response)},
    ]


def render_future(remaining: list[dict]) -> str:
    """The observed future as ``role: content`` lines (the reference code's ``remaining_chat``)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in remaining)


def extraction_messages(remaining: list[dict]) -> list[dict]:
    """The chat the extractor sees: instructions, then the future of the consultation in a code fence."""
    return [
        {"role": "system", "content": EXTRACTION_PROMPT},
        {"role": "user", "content": "```\n" + render_future(remaining) + "\n```"},
    ]
