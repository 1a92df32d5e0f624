"""Supervised fine-tuning (l2a.sft): the loss is the plain masked cross-entropy plus the binary decision term, frozen
layers stay put, and the command trains, saves train.py-style checkpoints and resumes exactly. Tiny random model,
float64 where exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from device_watch import StrayFactoryWatch
from subprocesses import python, run_to_end
from transformers import AutoModelForCausalLM

from l2a.cli import UserError
from l2a.model import load_model, load_tokenizer
from l2a.prompts import STOP_TOKEN, policy_messages
from l2a.rollout import encode_chat
from l2a.sft import SFTTrainer, cosine_learning_rate, frozen_layers, make_batch, sft_loss


def _samples() -> list[dict]:
    def sample(i: int, target: str) -> dict:
        messages = [{"role": "user", "content": f"I have had a headache for {i + 1} days" + " and more" * i},
                    {"role": "assistant", "content": "Where is it?"}, {"role": "user", "content": "The temples."}]
        return {"cid": f"s_{i}", "session_id": "s", "diagn": "d", "messages": messages[: 1 + 2 * (i % 2)],
                "decision_truth": "stop" if target == STOP_TOKEN else "continue", "info_truth": "", "target": target}

    return [sample(0, "How severe is the pain: mild or severe?"), sample(1, STOP_TOKEN),
            sample(2, "What brings it on?"), sample(3, STOP_TOKEN)]


def plain_loss(model, tokenizer, samples: list[dict], decision_weight: float = 0.0) -> torch.Tensor:
    """The textbook computation: each row in full, logits everywhere, cross-entropy on the target tokens only; plus
    ``decision_weight`` times the mean of -log p(stop) (stop samples) or -log(1 - p(stop)) (continue samples), p(stop)
    the probability of ``<stop />``'s first token as the answer's first token."""
    stop_id = tokenizer(STOP_TOKEN, add_special_tokens=False)["input_ids"][0]
    total, count, decision = 0.0, 0, 0.0
    for sample in samples:
        prompt = encode_chat(tokenizer, policy_messages(sample["messages"]))
        target = tokenizer(sample["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        logits = model(input_ids=torch.tensor([prompt + target])).logits[0]
        predicted = logits[len(prompt) - 1 : -1]  # position j predicts token j + 1
        total = total + F.cross_entropy(predicted, torch.tensor(target), reduction="sum")
        count += len(target)
        p_stop = predicted[0].softmax(-1)[stop_id]
        decision = decision - torch.log(p_stop if sample["target"] == STOP_TOKEN else 1 - p_stop)
    return total / count + decision_weight * decision / len(samples)


@pytest.mark.parametrize("decision_weight", [0.0, 0.7])
def test_loss_and_gradient_equal_the_plain_masked_cross_entropy(tiny_model_dir, decision_weight):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    samples = _samples()
    model = load_model(str(tiny_model_dir), torch.float64)
    batch = make_batch(tokenizer, samples)
    assert batch.prefix_ids.shape[0] > 20  # the system prompt is shared, and run once
    stop_id = tokenizer(STOP_TOKEN, add_special_tokens=False)["input_ids"][0]
    with StrayFactoryWatch() as watch:  # on a GPU every tensor of the loss must be made on the batch's device
        loss, stats = sft_loss(model, batch, stop_id, decision_weight)
    assert watch.strays == [], watch.strays
    loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected = plain_loss(model, tokenizer, samples, decision_weight)
    expected.backward()
    if decision_weight:  # the decision term is there, and not negligible
        assert abs(expected.item() - plain_loss(model, tokenizer, samples).item()) > 0.1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    targets = [tokenizer(s["target"], add_special_tokens=False)["input_ids"] + [0] for s in samples]
    assert stats["target_tokens"] == sum(len(t) for t in targets)


def test_frozen_layers_stay_fixed_and_thaw_afterwards(tiny_model_dir):
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with frozen_layers(model, 1):
        trainer = SFTTrainer(model, tokenizer, learning_rate=1e-2)
        metrics = trainer.step(_samples())
    assert metrics["grad_norm"] > 0
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    # The embeddings (tied to the output layer) and layer 0 are frozen; layer 1 and the final norm train.
    assert moved and all(name.startswith(("model.layers.1.", "model.norm.")) for name in moved), sorted(moved)
    assert any(name.startswith("model.layers.1.") for name in moved)
    assert all(p.requires_grad for p in model.parameters())  # thawed for whatever trains next (GRPO)
    with pytest.raises(UserError, match="frozen_layers=3: the model has 2 decoder layers"):
        with frozen_layers(model, 3):
            pass


def test_cosine_learning_rate_decays_from_the_peak_towards_zero():
    rates = [cosine_learning_rate(1e-4, step, 32) for step in range(32)]
    assert rates[0] == 1e-4 and rates[16] == pytest.approx(5e-5) and 0 < rates[-1] < 1e-6
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_a_sample_without_target_is_refused(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    old = {k: v for k, v in _samples()[0].items() if k != "target"}  # a file built before targets existed
    with pytest.raises(UserError, match="sample s_0 has no 'target'"):
        make_batch(tokenizer, [old])


def _data_file(path: Path) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in _samples()))
    return path


def test_command_saves_checkpoints_and_resumes_exactly(tiny_model_dir, tmp_path):
    """`python -m l2a.sft`: 4 steps straight, or a run that lost everything after step 2's checkpoint, then --resume
    to 4: the same weights and metrics (the learning-rate schedule spans the 4 steps either way)."""
    def sft(out: Path, steps: int, *extra: str) -> None:
        done = run_to_end(python("-m", "l2a.sft", "--model", str(tiny_model_dir), "--train_file", str(data),
                                 "--output_dir", str(out), "--steps", str(steps), "--batch_size", "3",
                                 "--learning_rate", "1e-2", "--frozen_layers", "0", "--save_every", "2", *extra),
                          timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    data = _data_file(tmp_path / "train.jsonl")
    sft(tmp_path / "full", 4)
    sft(tmp_path / "cut", 4)
    shutil.rmtree(tmp_path / "cut/checkpoints/step-000004")  # as if the run had stopped after step 2's checkpoint
    sft(tmp_path / "cut", 4, "--resume", "true")
    final = "checkpoints/step-000004"
    assert sorted(p.name for p in (tmp_path / "full/checkpoints").iterdir()) == ["step-000002", "step-000004"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / final)  # a Hugging Face model directory
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / final)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, p), q, p0 in zip(a.named_parameters(), b.parameters(), initial.parameters()):
        assert torch.equal(p, q), name
        assert not torch.equal(p, p0), name  # frozen_layers 0: every weight trains
    state = torch.load(tmp_path / "full" / final / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and state["optimizer"]["state"]
    strip = lambda row: {k: v for k, v in row.items() if k != "sft/seconds"}  # noqa: E731
    rows = lambda run: [strip(json.loads(line)) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["step"] for r in rows("full")] == [1, 2, 3, 4] and rows("full") == rows("cut")
    # the cosine decay goes on from the resumed step, not from the peak
    assert [r["sft/learning_rate"] for r in rows("cut")] == pytest.approx([1e-2, 0.5e-2 * (1 + 0.5 ** 0.5), 0.5e-2,
                                                                         0.5e-2 * (1 - 0.5 ** 0.5)])
    assert rows("full")[-1]["sft/loss"] < rows("full")[0]["sft/loss"]
