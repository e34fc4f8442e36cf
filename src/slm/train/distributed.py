"""Several processes under torchrun: DDP (each rank holds the whole model) or FSDP (each rank
holds 1/N of the weights, gradients and optimizer state, for models that do not fit one device).

Every rank takes every world-th row of the same global batch, so N processes follow the
1-process trajectory. Gloo on the CPU, NCCL on GPUs. Rank 0 writes all files.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """(world size, rank, this rank's device); starts the process group under torchrun."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        import torch.distributed as dist
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def wrap(model: nn.Module, world: int, fsdp: bool, device: torch.device) -> nn.Module:
    """The module to call forward on: the model itself, DDP around it, or the model sharded in
    place by FSDP2 (each block one unit, so only one block is ever gathered whole)."""
    if world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """FSDP: the whole weights and optimizer state on rank 0's CPU (a collective: all ranks call it).
    Returns (model state dict, {"<name>.<key>": tensor}) on rank 0 and empty dicts elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tensors = {f"{name}.{key}": v if torch.is_tensor(v) else torch.tensor(v)
               for name, st in osd.get("state", {}).items() for key, v in st.items()}
    return msd, tensors


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, msd: dict, tensors: dict) -> None:
    """FSDP: scatter whole weights and optimizer state (as written by full_state) to the shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    groups = get_optimizer_state_dict(model, optimizer, options=opts)["param_groups"]
    state: dict = {}
    for k, v in tensors.items():
        name, key = k.rsplit(".", 1)
        state.setdefault(name, {})[key] = v
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict={"state": state, "param_groups": groups},
                   options=opts)
