"""FSDP2 on CPU processes (gloo), for the tests and the CPU mode of bench/gpu_smoke.py.

accelerate 1.15 turns FSDP on only for GPU process groups (``AcceleratorState`` checks for MULTI_GPU and
friends), but torch's FSDP2 (``fully_shard``) itself runs on CPU over gloo. ``shard_with_fsdp2`` sets an
accelerator's state to FSDP2 right after it is built, so train.py's FSDP2 paths run for real: policy and
reference sharded as DTensors, sharded optimizer state saved and resumed, weights gathered for checkpoints and
for the rollout engine.
"""

from __future__ import annotations


def shard_with_fsdp2(accelerator) -> None:
    from accelerate import FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT")
    # Both shared states, as AcceleratorState.__init__ does on GPUs (it is re-read from PartialState).
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
