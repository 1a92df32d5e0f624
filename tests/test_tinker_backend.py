"""The Tinker backend, offline: advantage scaling, Datum layout, and train.main against a fake Tinker service.

Tinker is a remote, paid, GPU-backed service and its SDK has no local mode, so the loop tests replace
``tinker.ServiceClient`` and ``tinker.RestClient`` with ``FakeTinker``: a test double with the SDK's method names
that returns the SDK's own types (``SampleResponse``, ``SampledSequence``, ``ForwardBackwardOutput``,
``SaveWeightsResponse``...) in finished futures with ``.result()``, and records every request (the Datums above
all) so the tests can check what would have been sent. It also fails the way the service does or is reported
to: copies for a seeded request of several samples, errors raised by the call that creates a client, a 400 for
a malformed Datum or TTL, a 404 for a deleted checkpoint. (Faking it at the HTTP level would mean re-implementing
Tinker's session, futures polling and binary encodings.) Nothing here opens a network connection.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from l2a.cli import UserError, run_command
from l2a.grpo import LOSS_AGGREGATIONS, grpo_loss
from l2a.model import load_tokenizer
from l2a.rollout import Completion, SamplingConfig, encode_chat

tinker = pytest.importorskip("tinker")  # requirements-tinker.txt

from l2a.tinker_backend import (  # noqa: E402
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TinkerEngine,
    completion_datum,
    peft_adapter,
    ppo_loss_config,
    tinker_advantage_scale,
)

SECRET = "tk-test-secret-never-printed"
REPLIES = ["<stop />", "How severe is the pain: mild, moderate or severe?", "Where is it? Since when?"]
BASE_MODEL = "Qwen/Qwen3-8B"


# --------------------------------------------------------------------------------------------------
# The loss: Tinker's documented sums on scaled advantages == grpo_loss, value and gradient.
# --------------------------------------------------------------------------------------------------


def test_advantage_scale_by_hand():
    lengths = [2, 4, 0, 6]
    assert tinker_advantage_scale(lengths, "token-mean", 10) == [1 / 12] * 4
    assert tinker_advantage_scale(lengths, "seq-mean-token-mean", 10) == [1 / 8, 1 / 16, 1 / 4, 1 / 24]
    assert tinker_advantage_scale(lengths, "seq-mean-token-sum-norm", 10) == [1 / 40] * 4
    with pytest.raises(ValueError, match="loss_agg"):
        tinker_advantage_scale(lengths, "sum", 10)


def _tinker_objective(loss_fn: str, datums: list, trainer_logprobs: list[torch.Tensor], clip: dict) -> torch.Tensor:
    """Tinker's built-in losses as documented, summed over every position of every datum."""
    total = torch.zeros((), dtype=torch.float64)
    for datum, target in zip(datums, trainer_logprobs):
        sampled = datum.loss_fn_inputs["logprobs"].to_torch().double()
        advantage = datum.loss_fn_inputs["advantages"].to_torch().double()
        ratio = torch.exp(target - sampled)
        if loss_fn == "importance_sampling":
            total = total - (ratio * advantage).sum()
        else:
            clipped = ratio.clamp(clip["clip_low_threshold"], clip["clip_high_threshold"])
            total = total - torch.minimum(ratio * advantage, clipped * advantage).sum()
    return total


CASES = [  # (loss_fn, largest |trainer - sampler| log-ratio): 0 = on-policy; 0.15 stays inside the clip range
    ("importance_sampling", 0.0), ("ppo", 0.0), ("importance_sampling", 0.15), ("ppo", 0.15), ("ppo", 0.7)]


@pytest.mark.parametrize("loss_agg", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("loss_fn,offset", CASES)
def test_tinker_sum_on_scaled_advantages_equals_grpo_loss(loss_agg, loss_fn, offset):
    generator = torch.Generator().manual_seed(0)
    lengths, prompt_lengths, max_len, clip_low, clip_high = [3, 1, 7, 5, 2, 6], [4, 2, 5, 3, 6, 1], 9, 0.2, 0.28
    batch, width = len(lengths), max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths], dtype=torch.float64)
    logprobs = (-3 * torch.rand(batch, width, generator=generator, dtype=torch.float64)).requires_grad_()
    shift = offset * (2 * torch.rand(batch, width, generator=generator, dtype=torch.float64) - 1)
    sampler = (logprobs.detach() + shift).float().double()  # what the sampler reports, in the Datum's float32
    advantages = torch.randn(batch, generator=generator, dtype=torch.float64)

    local, _ = grpo_loss(logprobs, sampler, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                         loss_agg=loss_agg, max_len=max_len)
    (local_grad,) = torch.autograd.grad(local, logprobs)

    scales = tinker_advantage_scale(lengths, loss_agg, max_len)
    datums, targets = [], []
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        prompt, tokens = list(range(100, 100 + p)), list(range(7, 7 + n))
        completion = Completion(i, prompt, tokens, "", "stop", sampler[i, :n].tolist())
        datums.append(completion_datum(completion, advantages[i].item() * scales[i]))
        # The trainer's log-probabilities of every position: prompt positions carry advantage 0, any value will do.
        targets.append(torch.cat([torch.full((p - 1,), -1.0, dtype=torch.float64), logprobs[i, :n]]))
    remote = _tinker_objective(loss_fn, datums, targets, ppo_loss_config(clip_low, clip_high))
    (remote_grad,) = torch.autograd.grad(remote, logprobs)

    assert remote.item() == pytest.approx(local.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(remote_grad, local_grad, rtol=1e-5, atol=1e-8)
    assert local_grad.abs().sum() > 0  # a zero gradient would make the comparison vacuous


# --------------------------------------------------------------------------------------------------
# The Datum layout.
# --------------------------------------------------------------------------------------------------


def test_datum_layout_is_shifted_by_one_with_zeros_over_the_prompt():
    completion = Completion(0, [5, 6, 7], [8, 9, 10], "", "stop", [-0.5, -1.0, -1.5])
    datum = completion_datum(completion, 0.25)
    inputs = datum.loss_fn_inputs
    assert datum.model_input.to_ints() == [5, 6, 7, 8, 9]  # prompt + completion[:-1]
    assert inputs["target_tokens"].to_numpy().tolist() == [0, 0, 8, 9, 10]  # position i predicts token i + 1
    assert inputs["logprobs"].to_numpy().tolist() == [0.0, 0.0, -0.5, -1.0, -1.5]
    assert inputs["advantages"].to_numpy().tolist() == [0.0, 0.0, 0.25, 0.25, 0.25]
    assert {key: t.dtype for key, t in inputs.items()} == {"target_tokens": "int64", "logprobs": "float32",
                                                           "advantages": "float32"}
    assert all(t.shape == [datum.model_input.length] for t in inputs.values())

    single = completion_datum(Completion(0, [5, 6], [8], "", "length", [-0.1]), -1.0)
    assert single.model_input.to_ints() == [5, 6]
    assert single.loss_fn_inputs["target_tokens"].to_numpy().tolist() == [0, 8]

    with pytest.raises(ValueError, match="log-probability"):
        completion_datum(Completion(0, [5, 6], [8, 9], "", "stop", None), 1.0)



# --------------------------------------------------------------------------------------------------
# A fake Tinker service with the SDK's method names and types, and the service's ways to fail.
# --------------------------------------------------------------------------------------------------


class Done:
    """A finished future, like the SDK's ``APIFuture`` once its result is in."""

    def __init__(self, value=None, error: Exception | None = None):
        self.value, self.error = value, error

    def result(self, timeout=None):
        if self.error is not None:
            raise self.error
        return self.value


def status_error(cls: type, status: int, message: str) -> Exception:
    """An SDK error for an HTTP status, as the SDK raises it (``tinker.BadRequestError`` for 400...)."""
    import httpx

    return cls(message, response=httpx.Response(status, request=httpx.Request("POST", "https://tinker.invalid/")),
               body=None)


def linear_layers(model_dir: Path) -> dict[str, torch.nn.Linear]:
    """The Hugging Face model's linear modules by name: what a LoRA adapts and PEFT addresses."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def write_tinker_export(layers: dict[str, torch.nn.Linear], folder: Path, rank: int = 4, seed: int = 0) -> None:
    """A LoRA export in Tinker's format (as the tinker-cookbook reads it): PEFT's file names and key layout with
    Tinker's module names (the output projection is ``model.unembed_tokens``), a config with ``r``/``lora_alpha``."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in layers.items():
        tinker_name = "model.unembed_tokens" if name == "lm_head" else name
        tensors[f"base_model.model.{tinker_name}.lora_A.weight"] = torch.randn(rank, layer.in_features,
                                                                               generator=generator)
        tensors[f"base_model.model.{tinker_name}.lora_B.weight"] = torch.randn(layer.out_features, rank,
                                                                               generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 32}))


# What the service checks of a Datum for the built-in RL losses: these inputs, one value per input position.
RL_LOSS_INPUTS = {"target_tokens": "int64", "logprobs": "float32", "advantages": "float32"}
PPO_CONFIG_KEYS = {"clip_low_threshold", "clip_high_threshold"}
TTL_RANGE = (3600, 10 * 365 * 24 * 3600)  # what the SDK documents for ttl_seconds: 1 hour to 10 years


def datum_problem(datum, vocab_size: int) -> str | None:
    """Why the service would refuse this Datum (a 400), or None."""
    length, inputs = datum.model_input.length, datum.loss_fn_inputs
    if set(inputs) != set(RL_LOSS_INPUTS):
        return f"loss_fn_inputs must be {sorted(RL_LOSS_INPUTS)}, got {sorted(inputs)}"
    for key, dtype in RL_LOSS_INPUTS.items():
        if inputs[key].dtype != dtype or inputs[key].shape != [length]:
            return f"{key} must be {dtype} of length {length} (the model input's), got {inputs[key].dtype} " \
                   f"{inputs[key].shape}"
    targets = inputs["target_tokens"].to_numpy()
    if targets.min() < 0 or targets.max() >= vocab_size:
        return "target_tokens out of the vocabulary"
    if not all(np.isfinite(inputs[key].to_numpy()).all() for key in ("logprobs", "advantages")):
        return "non-finite logprobs or advantages"
    return None


class FakeTinker:
    """The service's state, a log of every request, and the failures a test can switch on."""

    TRAINER_SHIFT = -0.02  # trainer log-prob minus sampler log-prob: a small, known numerical gap

    def __init__(self, tokenizer, layers: dict[str, torch.nn.Linear], export_dir: Path):
        self.tokenizer, self.layers, self.export_dir = tokenizer, layers, export_dir
        self.services = 0
        self.created: list[tuple] = []  # ("lora", base_model, rank, seed) | ("from_state", path)
        self.sampler_paths: list[str] = []
        self.samples: list[dict] = []  # prompt, params, weights version, sequences [(tokens, logprobs)]
        self.backward: list[tuple] = []  # (datums, loss_fn, loss_fn_config)
        self.optim: list = []  # AdamParams
        self.checkpoints: dict[str, int | None] = {}  # every tinker:// path saved -> its ttl_seconds
        self.deleted: list[str] = []
        self.fail_backward_call: int | None = None  # 1-based forward_backward call that fails
        # Raised by the call that creates a client (or a RestClient), not by its future: the SDK opens the
        # session inside the first such call, so a bad key or an unreachable service fails right there.
        self.fail_creation: Exception | None = None

    def service_client(self, *args, **kwargs):
        self.services += 1
        return FakeServiceClient(self)

    def rest_client(self, *args, **kwargs):
        self.creating()
        return FakeRestClient(self)

    def creating(self) -> None:
        if self.fail_creation is not None:
            raise self.fail_creation

    def alive(self) -> set[str]:
        """The checkpoints still stored (and billed) on Tinker."""
        return set(self.checkpoints) - set(self.deleted)

    def store(self, path: str, ttl_seconds: int | None) -> Exception | None:
        if ttl_seconds is not None and not TTL_RANGE[0] <= ttl_seconds <= TTL_RANGE[1]:
            return status_error(tinker.BadRequestError, 400, f"ttl_seconds out of range: {ttl_seconds}")
        self.checkpoints[path] = ttl_seconds
        return None

    def training_samples(self, version: int) -> list[tuple[list[int], list[int], list[float]]]:
        """(prompt, tokens, logprobs) of the rollouts sampled from the given weights, in request order."""
        return [(s["prompt"], tokens, logprobs) for s in self.samples
                if s["params"].top_k == -1 and s["version"] == version for tokens, logprobs in s["sequences"]]


class FakeServiceClient:
    def __init__(self, world: FakeTinker):
        self.world = world

    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None, **kwargs):
        self.world.creating()
        self.world.created.append(("lora", base_model, rank, seed))
        return Done(FakeTrainingClient(self.world, version=0))

    def create_training_client_from_state_with_optimizer(self, path: str, **kwargs):
        self.world.creating()
        self.world.created.append(("from_state", path))
        if path not in self.world.alive():
            return Done(error=status_error(tinker.NotFoundError, 404, f"checkpoint not found: {path}"))
        return Done(FakeTrainingClient(self.world, version=int(path.rsplit("-", 1)[1])))  # ".../step-000002"

    def create_sampling_client(self, model_path: str | None = None, **kwargs):
        self.world.creating()
        self.world.sampler_paths.append(model_path)
        return Done(FakeSamplingClient(self.world, version=int(model_path.rsplit("-", 1)[1])))

    def create_rest_client(self):
        warnings.warn("DEPRECATED: ServiceClient.create_rest_client() is deprecated and will be removed in a future "
                      "tinker SDK version. Construct tinker.RestClient() directly instead; it takes the same base_url "
                      "and api_key and needs no ServiceClient.", FutureWarning, stacklevel=2)  # tinker 0.38's warning
        return self.world.rest_client()


class FakeTrainingClient:
    def __init__(self, world: FakeTinker, version: int):
        self.world, self.version = world, version  # version: optimizer steps taken since the initial LoRA
        self.run = f"run-{len(world.created)}"

    def save_weights_and_get_sampling_client(self, **kwargs):
        return Done(FakeSamplingClient(self.world, self.version))

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        self.world.backward.append((data, loss_fn, loss_fn_config))
        if len(self.world.backward) == self.world.fail_backward_call:
            import httpx

            return Done(error=tinker.APIConnectionError(request=httpx.Request("POST", "https://tinker.invalid/")))
        problems = [f"datum {i}: {p}" for i, d in enumerate(data) if (p := datum_problem(d, len(self.world.tokenizer)))]
        if set(loss_fn_config or {}) - (PPO_CONFIG_KEYS if loss_fn == "ppo" else set()):
            problems.append(f"unknown loss_fn_config for {loss_fn}: {sorted(loss_fn_config)}")
        if problems:
            return Done(error=status_error(tinker.BadRequestError, 400, "; ".join(problems)))
        outputs, loss = [], 0.0
        clip = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2, **(loss_fn_config or {})}
        for datum in data:
            sampled = datum.loss_fn_inputs["logprobs"].to_numpy().astype(np.float64)
            advantage = datum.loss_fn_inputs["advantages"].to_numpy().astype(np.float64)
            trained = sampled + FakeTinker.TRAINER_SHIFT
            ratio = np.exp(trained - sampled)
            if loss_fn == "ppo":
                clipped = np.clip(ratio, clip["clip_low_threshold"], clip["clip_high_threshold"])
                loss -= np.minimum(ratio * advantage, clipped * advantage).sum()
            else:
                loss -= (ratio * advantage).sum()
            outputs.append({"logprobs": tinker.TensorData.from_numpy(trained.astype(np.float32))})
        return Done(tinker.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs,
                                                 metrics={"loss:sum": float(loss)}))

    def optim_step(self, adam_params):
        self.world.optim.append(adam_params)
        self.version += 1
        return Done(tinker.OptimStepResponse(metrics=None))

    def _save(self, kind: str, name: str, ttl_seconds: int | None, response: type):
        path = f"tinker://{self.run}/{kind}/{name}"
        refused = self.world.store(path, ttl_seconds)
        return Done(error=refused) if refused else Done(response(path=path))

    def save_state(self, name: str, ttl_seconds: int | None = None, **kwargs):
        return self._save("weights", name, ttl_seconds, tinker.types.SaveWeightsResponse)

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None, **kwargs):
        return self._save("sampler_weights", name, ttl_seconds, tinker.types.SaveWeightsForSamplerResponse)

    def save_weights_external(self, name: str, ttl_seconds: int | None = None, **kwargs):
        return self._save("external_weights", name, ttl_seconds, tinker.types.SaveWeightsExternalResponse)

    def get_tokenizer(self):
        raise AssertionError("the tests pass a local tokenizer; get_tokenizer would download one")


class FakeSamplingClient:
    def __init__(self, world: FakeTinker, version: int):
        self.world, self.version = world, version

    def sample(self, prompt, num_samples, sampling_params, **kwargs):
        """Replies drawn at random. Without a seed every request and sample draws afresh; with one, every sample
        of the request repeats the same draw: the service has been reported to return token-identical samples
        for a seeded request of several (tinker-feedback #79), and this is that report at its worst."""
        tokenizer, params = self.world.tokenizer, sampling_params
        fresh = [len(self.world.samples), self.version, prompt.length]
        sequences, record = [], []
        for i in range(num_samples):
            rng = np.random.default_rng(fresh + [i] if params.seed is None else [params.seed, self.version])
            reply = REPLIES[0 if params.top_k == 1 else int(rng.integers(len(REPLIES)))]
            tokens = tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.eos_token_id]
            reason = "length" if len(tokens) > params.max_tokens else "stop"
            tokens = tokens[: params.max_tokens]
            logprobs = rng.uniform(-2.5, -0.05, len(tokens)).astype(np.float32)
            sequences.append(tinker.SampledSequence(stop_reason=reason, sequence_id=f"s{i}",
                                                    tokens_np=np.array(tokens, dtype=np.int32), logprobs_np=logprobs))
            record.append((tokens, logprobs.tolist()))
        self.world.samples.append({"prompt": prompt.to_ints(), "params": params, "version": self.version,
                                   "sequences": record})
        return Done(tinker.SampleResponse(sequences=sequences))


class FakeRestClient:
    def __init__(self, world: FakeTinker):
        self.world = world

    def get_external_weights_urls(self, tinker_path: str):
        """The export, written as local files in Tinker's format (the real service signs HTTPS URLs)."""
        import datetime

        if tinker_path not in self.world.alive():
            return Done(error=status_error(tinker.NotFoundError, 404, f"checkpoint not found: {tinker_path}"))
        folder = self.world.export_dir / tinker_path.rsplit("/", 1)[1]
        write_tinker_export(self.world.layers, folder)
        urls = {path.name: path.as_uri() for path in folder.iterdir()}
        return Done(tinker.types.ExternalWeightsUrlsResponse(urls=urls, expires=datetime.datetime.now(datetime.UTC)))

    def delete_checkpoint_from_tinker_path(self, tinker_path: str):
        if tinker_path not in self.world.alive():
            return Done(error=status_error(tinker.NotFoundError, 404, f"checkpoint not found: {tinker_path}"))
        self.world.deleted.append(tinker_path)
        return Done(None)


# --------------------------------------------------------------------------------------------------
# The double itself: it fails the way the service does.
# --------------------------------------------------------------------------------------------------


def test_the_double_returns_copies_for_a_seeded_request_of_several_samples(world):
    client, prompt = FakeSamplingClient(world, version=0), tinker.ModelInput.from_ints([5, 6, 7])

    def distinct(params) -> int:
        sequences = client.sample(prompt, 4, params).result().sequences
        return len({(tuple(s.tokens), tuple(s.logprobs)) for s in sequences})

    assert distinct(tinker.SamplingParams(max_tokens=20, seed=7)) == 1
    assert distinct(tinker.SamplingParams(max_tokens=20)) == 4


def test_the_double_refuses_what_the_service_refuses(world):
    client = FakeTrainingClient(world, version=0)
    good = completion_datum(Completion(0, [5, 6, 7], [8, 9], "", "stop", [-0.5, -1.0]), 0.5)
    assert client.forward_backward([good], "importance_sampling").result().metrics["loss:sum"] != 0
    inputs = good.loss_fn_inputs
    unshifted = tinker.Datum(model_input=tinker.ModelInput.from_ints([5, 6, 7, 8, 9]), loss_fn_inputs=inputs)
    no_advantages = tinker.Datum(model_input=good.model_input, loss_fn_inputs={
        k: v for k, v in inputs.items() if k != "advantages"})
    float_targets = tinker.Datum(model_input=good.model_input, loss_fn_inputs={
        **inputs, "target_tokens": np.array([0, 0, 8, 9], dtype=np.float32)})
    beyond_vocab = tinker.Datum(model_input=good.model_input, loss_fn_inputs={
        **inputs, "target_tokens": np.array([0, 0, 8, len(world.tokenizer)], dtype=np.int64)})
    for bad, problem in [(unshifted, "length 5"), (no_advantages, "loss_fn_inputs must be"),
                         (float_targets, "target_tokens must be int64"), (beyond_vocab, "vocabulary")]:
        with pytest.raises(tinker.BadRequestError, match=problem):
            client.forward_backward([good, bad], "ppo").result()
    with pytest.raises(tinker.BadRequestError, match="loss_fn_config"):
        client.forward_backward([good], "importance_sampling", {"clip_low_threshold": 0.8}).result()
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds"):
        client.save_state("short", ttl_seconds=60).result()


# --------------------------------------------------------------------------------------------------
# train.main --backend tinker against the fake.
# --------------------------------------------------------------------------------------------------


def _sample(i: int, decision: str) -> dict:
    messages = [{"role": "user", "content": f"I have had a headache for {i + 1} days."},
                {"role": "assistant", "content": "Where exactly is the pain?"},
                {"role": "user", "content": "Mostly the temples."}]
    info = "" if decision == "stop" else "symptom severity: moderate, symptom trigger: screen work"
    return {"cid": f"s{i}_1", "session_id": f"s{i}", "diagn": "tension headache", "messages": messages,
            "decision_truth": decision, "info_truth": info}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    path.write_text("".join(json.dumps(_sample(i, "stop" if i % 2 else "continue")) + "\n" for i in range(8)))
    return path


@pytest.fixture(scope="module")
def tiny_layers(tiny_model_dir) -> dict[str, torch.nn.Linear]:
    return linear_layers(tiny_model_dir)


@pytest.fixture
def world(tiny_model_dir, tiny_layers, tmp_path, monkeypatch) -> FakeTinker:
    monkeypatch.setenv("TINKER_API_KEY", SECRET)
    (tmp_path / "export").mkdir()
    fake = FakeTinker(load_tokenizer(str(tiny_model_dir)), tiny_layers, tmp_path / "export")
    monkeypatch.setattr(tinker, "ServiceClient", fake.service_client)
    monkeypatch.setattr(tinker, "RestClient", fake.rest_client)
    return fake


def _args(model_dir, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--backend", "tinker", "--model", str(model_dir), "--train_file", str(data), "--eval_file", str(data),
            "--output_dir", str(out), "--prompts_per_step", "2", "--group_size", "3", "--max_new_tokens", "12",
            "--judge", "rubric", "--eval_samples", "4", "--sft_steps", "0", *extra]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_loop_sends_what_the_local_backend_would_optimise(world, tiny_model_dir, data_file, tmp_path, capfd,
                                                                   recwarn):
    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, data_file, out, "--steps", "3", "--save_every", "2", "--eval_every", "2",
                     "--keep_checkpoints", "1", "--tinker_loss_fn", "ppo", "--clip_high", "0.28",
                     "--loss_agg", "seq-mean-token-mean", "--learning_rate", "3e-5", "--weight_decay", "0.01",
                     "--max_grad_norm", "0.5"))

    assert world.created == [("lora", BASE_MODEL, 32, 0)]
    assert [(loss_fn, config) for _, loss_fn, config in world.backward] == \
        [("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.28})] * 3
    assert all(p.model_dump() == {"learning_rate": 3e-5, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                                  "weight_decay": 0.01, "grad_clip_norm": 0.5} for p in world.optim)
    assert len(world.optim) == 3

    recovered = []
    for step, (datums, _, _) in enumerate(world.backward):
        rollouts = world.training_samples(version=step)  # each step samples from the weights of the step before
        assert len(datums) == len(rollouts) == 6
        for datum, (prompt, tokens, logprobs) in zip(datums, rollouts):
            inputs = {k: v.to_numpy() for k, v in datum.loss_fn_inputs.items()}
            pad = len(prompt) - 1
            assert datum.model_input.to_ints() == prompt + tokens[:-1]
            assert inputs["target_tokens"].tolist() == [0] * pad + tokens
            assert inputs["logprobs"].tolist() == [0.0] * pad + logprobs
            assert not inputs["advantages"][:pad].any() and len(set(inputs["advantages"][pad:])) == 1
            # seq-mean-token-mean sends A_i / (len_i * N): undo it to recover the group advantages.
            recovered.append(inputs["advantages"][-1] * len(tokens) * len(datums))
    groups = torch.tensor(recovered, dtype=torch.float64).view(-1, 3)
    assert torch.allclose(groups.sum(1), torch.zeros(len(groups), dtype=torch.float64), atol=1e-5)
    varied = groups.std(1) > 0
    assert varied.any()
    assert torch.allclose(groups[varied].std(1), torch.ones(int(varied.sum()), dtype=torch.float64), atol=1e-4)
    # Group requests go unseeded (the double returns copies for seeded ones); single evaluation requests keep a seed.
    assert {s["params"].seed for s in world.samples if len(s["sequences"]) > 1} == {None}
    assert None not in {s["params"].seed for s in world.samples if len(s["sequences"]) == 1}

    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and "eval/reward" in rows[0] and "eval/reward" in rows[2]
    assert {s["version"] for s in world.samples if s["params"].top_k == 1} == {0, 2, 3}  # evaluations: fresh weights
    for r in rows[1:]:
        assert math.isfinite(r["loss"]) and r["skipped_steps"] == 0
        assert r["ratio_mean"] == pytest.approx(math.exp(FakeTinker.TRAINER_SHIFT), rel=1e-5)
        assert r["clip_low_frac"] == r["clip_high_frac"] == 0.0 and r["entropy"] > 0
        assert math.isnan(r["kl_mean"]) and math.isnan(r["grad_norm"])

    checkpoints = sorted((out / "checkpoints").glob("*"))
    assert [c.name for c in checkpoints] == ["step-000003"]  # keep_checkpoints 1; no temporary left behind
    state = torch.load(checkpoints[0] / "trainer_state.pt", weights_only=False)
    assert (state["step"], state["skipped_steps"]) == (3, 0)
    assert state["tinker_state_path"] == "tinker://run-1/weights/step-000003"
    assert state["tinker_sampler_path"] == "tinker://run-1/sampler_weights/step-000003"

    # On Tinker: step 2's copies expire after the TTL and went with their pruned folder; the final ones never
    # expire; the adapter export lived for an hour at most and was deleted once downloaded.
    week, run = 168 * 3600, "tinker://run-1"
    assert world.checkpoints == {f"{run}/weights/step-000002": week, f"{run}/sampler_weights/step-000002": week,
                                 f"{run}/weights/step-000003": None, f"{run}/sampler_weights/step-000003": None,
                                 f"{run}/external_weights/step-000003": 3600}
    assert world.alive() == {state["tinker_state_path"], state["tinker_sampler_path"]}

    adapter = checkpoints[0] / "adapter"  # converted to PEFT's names; Tinker's export not kept
    assert sorted(p.name for p in checkpoints[0].glob("adapter*")) == ["adapter"]
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_MODEL
    assert "base_model.model.lm_head.lora_A.weight" in load_file(adapter / "adapter_model.safetensors")

    engine = TinkerEngine.from_path(str(checkpoints[0]))  # what `python -m l2a.evaluate` would use
    assert world.sampler_paths == ["tinker://run-1/sampler_weights/step-000003"]
    (answer,) = engine.generate([[{"role": "user", "content": "hi"}]], 1, SamplingConfig(temperature=0))
    assert answer.text == REPLIES[0]

    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err
    assert not [w for w in recwarn if "create_rest_client" in str(w.message)]  # deprecated in tinker 0.38


def test_resume_continues_from_the_saved_tinker_state(world, tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, data_file, out, "--steps", "2", "--save_every", "1", "--eval_every", "0"))
    assert world.created == [("lora", BASE_MODEL, 32, 0)] and len(world.backward) == 2

    train.main(_args(tiny_model_dir, data_file, out, "--steps", "3", "--save_every", "1", "--eval_every", "0",
                     "--resume", "true"))
    assert world.created[1:] == [("from_state", "tinker://run-1/weights/step-000002")]
    assert len(world.backward) == 3 and world.training_samples(version=2)  # step 3 sampled the resumed weights
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").glob("*")) == ["step-000002", "step-000003"]
    state = torch.load(out / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and state["tinker_state_path"] == "tinker://run-2/weights/step-000003"
    # Pruning step 1 deleted the first run's copies of it; what the two kept folders name is still there.
    assert {"tinker://run-1/weights/step-000001", "tinker://run-1/sampler_weights/step-000001"} <= set(world.deleted)
    assert {"tinker://run-1/weights/step-000002", "tinker://run-2/weights/step-000003"} <= world.alive()


def test_ppo_epochs_mini_batches_and_a_lagging_sampler(world, tiny_model_dir, data_file, tmp_path):
    """ppo_epochs 2 x mini_batches 2: four forward_backward + optim_step pairs per batch, each on one mini-batch (one
    prompt's 3 completions) with advantages scaled by that mini-batch's own token count; sync_interval 8: the
    sampler snapshot is renewed after every second batch, so batches 3 and 4 sample the weights after 8 steps."""
    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, data_file, out, "--steps", "4", "--eval_every", "0", "--ppo_epochs", "2",
                     "--mini_batches", "2", "--sync_interval", "8", "--tinker_loss_fn", "ppo"))
    assert len(world.backward) == len(world.optim) == 16 and all(len(d) == 3 for d, _, _ in world.backward)
    assert len(world.training_samples(version=0)) == len(world.training_samples(version=8)) == 12
    assert [r["optimizer_steps"] for r in _rows(out)] == [4, 8, 12, 16]
    spreads = []
    for datums, _, _ in world.backward:
        tokens = [int((d.loss_fn_inputs["logprobs"].to_numpy() != 0).sum()) for d in datums]  # 0 over the prompt
        # token-mean sends A_i / (tokens of the mini-batch); group advantages have sum A_i^2 = G - 1 = 2
        recovered = [d.loss_fn_inputs["advantages"].to_numpy()[-1] * sum(tokens) for d in datums]
        spreads.append(sum(a * a for a in recovered))
    assert any(s > 0 for s in spreads) and all(s == pytest.approx(2.0, rel=1e-4) for s in spreads if s > 0)


def test_a_failed_step_stops_the_run_naming_the_last_good_checkpoint(world, tiny_model_dir, data_file, tmp_path):
    world.fail_backward_call = 2
    out = tmp_path / "run"
    with pytest.raises(UserError) as stopped:
        train.main(_args(tiny_model_dir, data_file, out, "--steps", "3", "--save_every", "1", "--eval_every", "0"))
    message = str(stopped.value)
    assert "forward_backward failed: APIConnectionError" in message
    assert str(out / "checkpoints" / "step-000001") in message and "--resume" in message
    assert sorted(p.name for p in (out / "checkpoints").glob("*")) == ["step-000001"]


@pytest.mark.parametrize("resume", [False, True])
def test_a_client_that_cannot_be_created_is_one_error_line(world, tiny_model_dir, data_file, tmp_path, capsys, resume):
    """A bad key or an unreachable service: the SDK raises inside the creating call, before any future exists."""
    out = tmp_path / "run"
    args = _args(tiny_model_dir, data_file, out, "--steps", "1", "--eval_every", "0")
    if resume:
        train.main(args)
        args = _args(tiny_model_dir, data_file, out, "--steps", "2", "--eval_every", "0", "--resume", "true")
        import httpx

        world.fail_creation = tinker.APIConnectionError(request=httpx.Request("POST", "https://tinker.invalid/"))
    else:
        world.fail_creation = status_error(tinker.AuthenticationError, 401, "invalid API key")
    capsys.readouterr()
    assert run_command(lambda: train.main(args), resume_hint="") == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err
    assert "creating the training client failed: " + ("APIConnectionError" if resume else "AuthenticationError") in line
    assert (str(out / "checkpoints" / "step-000001") if resume else "none yet") in line


def test_evaluate_with_a_client_that_cannot_be_created_is_one_error_line(world, tiny_model_dir, data_file, tmp_path,
                                                                         capsys):
    from l2a import evaluate

    world.fail_creation = status_error(tinker.AuthenticationError, 401, "invalid API key")
    code = evaluate.main(["--engine", "tinker", "--tinker-path", "tinker://run-1/sampler_weights/step-000001",
                          "--model", str(tiny_model_dir), "--test-file", str(data_file), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "AuthenticationError" in line


def test_several_processes_are_refused_before_any_tinker_call(world, tiny_model_dir, data_file, tmp_path):
    """Each process would start a Tinker training run of its own, all saving into one checkpoint folder."""
    cfg = train.parse_config(_args(tiny_model_dir, data_file, tmp_path / "run", "--steps", "1"))
    with pytest.raises(UserError, match="one process"):
        train.make_policy(cfg, SimpleNamespace(num_processes=2), None)
    assert world.services == 0


def test_missing_api_key_is_a_clear_error_before_any_work(world, tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.delenv("TINKER_API_KEY")
    with pytest.raises(UserError, match="TINKER_API_KEY"):
        train.main(_args(tiny_model_dir, data_file, tmp_path / "run", "--steps", "1"))
    assert world.services == 0


@pytest.mark.parametrize("flags,problem", [(["--kl_coef", "0.1"], "kl_coef"),
                                           (["--clip_ratio_c", "3"], "no dual clip"),
                                           (["--temperature", "0.7"], "temperature"),
                                           (["--tinker_checkpoint_ttl_hours", "-1"], "ttl_hours must be 0")])
def test_settings_tinker_cannot_honour_are_refused(world, tiny_model_dir, data_file, tmp_path, flags, problem):
    with pytest.raises(UserError, match=problem):
        train.main(_args(tiny_model_dir, data_file, tmp_path / "run", "--steps", "1", *flags))
    assert world.services == 0


def test_unknown_tinker_loss_is_refused_when_parsed(world, tiny_model_dir, data_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(_args(tiny_model_dir, data_file, tmp_path / "run", "--steps", "1", "--tinker_loss_fn", "cispo"))
    assert "tinker_loss_fn" in capsys.readouterr().err and world.services == 0


def test_engine_groups_completions_and_maps_sampling_settings(world, caplog):
    tokenizer = world.tokenizer
    engine = TinkerEngine(FakeSamplingClient(world, version=0), tokenizer)
    chats = [[{"role": "user", "content": "My head hurts."}], [{"role": "user", "content": "I feel dizzy."}]]
    with caplog.at_level(logging.WARNING):
        greedy_penalised = SamplingConfig(temperature=0.0, max_new_tokens=40, repetition_penalty=1.2)
        completions = engine.generate(chats, 3, greedy_penalised)
    assert "no repetition penalty" in caplog.text
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1]
    assert all(c.prompt_ids == encode_chat(tokenizer, chats[c.prompt_index]) for c in completions)
    assert all(c.text == REPLIES[0] and c.finish_reason == "stop" and c.token_ids[-1] == tokenizer.eos_token_id
               and len(c.logprobs) == len(c.token_ids) for c in completions)
    greedy = world.samples[0]["params"]
    assert (greedy.top_k, greedy.temperature, greedy.max_tokens, greedy.stop) == (1, 1.0, 40, [tokenizer.eos_token_id])

    engine.generate(chats[:1], 2, SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=3, seed=7))
    sampled = world.samples[-1]
    assert (sampled["params"].top_k, sampled["params"].top_p) == (-1, 0.9)
    assert all(len(tokens) == 3 for tokens, _ in sampled["sequences"])


def test_a_group_is_distinct_samples_and_a_single_sample_keeps_its_seed(world):
    engine = TinkerEngine(FakeSamplingClient(world, version=0), world.tokenizer)
    chats = [[{"role": "user", "content": "My head hurts."}], [{"role": "user", "content": "I feel dizzy."}]]
    completions = engine.generate(chats, 4, SamplingConfig(max_new_tokens=40, seed=7))
    for prompt_index in (0, 1):
        group = [(tuple(c.token_ids), tuple(c.logprobs)) for c in completions if c.prompt_index == prompt_index]
        assert len(group) == len(set(group)) == 4
    assert [s["params"].seed for s in world.samples] == [None, None]
    engine.generate(chats, 1, SamplingConfig(max_new_tokens=40, seed=7))
    assert [s["params"].seed for s in world.samples[2:]] == [7, 8]  # reproducible where the service allows


def test_evaluate_a_tinker_checkpoint(world, tiny_model_dir, data_file, tmp_path):
    """`python -m l2a.evaluate --engine tinker` samples the checkpoint's sampler weights on (fake) Tinker."""
    from l2a import evaluate

    out = tmp_path / "run"
    train.main(_args(tiny_model_dir, data_file, out, "--steps", "1", "--eval_every", "0"))
    checkpoint = out / "checkpoints" / "step-000001"
    code = evaluate.main(["--engine", "tinker", "--tinker-path", str(checkpoint), "--test-file", str(data_file),
                          "--out", str(tmp_path / "eval"), "--limit", "2", "-n", "2", "--repetition-penalty", "1.0"])
    assert code == 0
    assert world.sampler_paths[-1] == "tinker://run-1/sampler_weights/step-000001"
    graded = [json.loads(line) for line in (tmp_path / "eval" / "graded.jsonl").read_text().splitlines()]
    assert len(graded) == 2 and all(len(r["rollouts"]) == 2 and set(r["rollouts"]) <= set(REPLIES) for r in graded)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())


# --------------------------------------------------------------------------------------------------
# The adapter: Tinker's export becomes a PEFT adapter of the Hugging Face model.
# --------------------------------------------------------------------------------------------------


def test_tinker_export_becomes_a_peft_adapter_of_the_model(tiny_layers, tmp_path):
    """Every key names a linear module of the (tied-embedding) tiny Llama under PEFT's prefix, with PEFT's shapes
    (A: rank x in, B: out x rank): what ``PeftModel.from_pretrained`` needs to load every tensor."""
    write_tinker_export(tiny_layers, tmp_path / "export", rank=4)
    peft_adapter(tmp_path / "export", tmp_path / "peft", BASE_MODEL)

    exported = load_file(tmp_path / "export" / ADAPTER_WEIGHTS)
    converted = load_file(tmp_path / "peft" / ADAPTER_WEIGHTS)
    assert len(converted) == len(exported) == 2 * len(tiny_layers)
    for name, layer in tiny_layers.items():
        a, b = (converted.pop(f"base_model.model.{name}.lora_{half}.weight") for half in "AB")
        assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4)
        source = "model.unembed_tokens" if name == "lm_head" else name
        assert torch.equal(b, exported[f"base_model.model.{source}.lora_B.weight"])
    assert not converted  # nothing left over under a name the model does not have
    config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 32, BASE_MODEL)
    assert config["target_modules"] == sorted({name.rsplit(".", 1)[-1] for name in tiny_layers})
    assert "lm_head" in config["target_modules"]


def test_an_export_that_is_not_a_dense_lora_is_refused(tiny_layers, tmp_path):
    from safetensors.torch import save_file

    write_tinker_export(tiny_layers, tmp_path / "moe", rank=2)
    experts = {"base_model.model.model.layers.0.mlp.experts.w1.lora_A.weight": torch.zeros(1, 2, 64),
               "base_model.model.model.layers.0.mlp.experts.w1.lora_B.weight": torch.zeros(4, 128, 2)}
    save_file(experts, tmp_path / "moe" / ADAPTER_WEIGHTS)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        peft_adapter(tmp_path / "moe", tmp_path / "out1", BASE_MODEL)

    write_tinker_export(tiny_layers, tmp_path / "no-rank")
    (tmp_path / "no-rank" / ADAPTER_CONFIG).write_text(json.dumps({"lora_alpha": 32}))
    with pytest.raises(ValueError, match="'r'"):
        peft_adapter(tmp_path / "no-rank", tmp_path / "out2", BASE_MODEL)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
