"""Distillation on several processes, launched by `torchrun` or `accelerate launch` (they set WORLD_SIZE,
RANK and LOCAL_RANK): one process per device, gloo on CPU, nccl on CUDA.

Every rank holds the whole (frozen) teacher. The student is wrapped in DDP (a replica per rank, gradients
averaged) or FSDP (`fully_shard` per decoder layer: parameters, gradients and optimizer state sharded).
Checkpoints hold the full, unwrapped state in the single-process format, so any world size resumes them.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vcompress.core.errors import InputError

MODES = ("auto", "ddp", "fsdp", "none")


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank, the world size, its device and how the student is wrapped."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mode: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (every rank gets it)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def broadcast(self, value: float) -> float:
        """Rank 0's `value` on every rank: decisions (early stop, time budget) must be the same everywhere."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return t.item()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(mode: str = "auto") -> Ranks:
    """Join the launcher's process group (once); one process without a launcher."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if mode == "auto":
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")  # `accelerate launch --use_fsdp` or its config
        mode = "none" if world == 1 else "fsdp" if fsdp else "ddp"
    if world == 1:  # one process: nothing to wrap, whatever was asked
        return Ranks(device=torch.device("cuda" if cuda else "cpu"))
    if mode == "none":
        raise InputError(
            f"launched on {world} processes with distributed 'none'; use --distributed auto, ddp or fsdp, or launch one process"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        # Rank 0 alone scores the student before and after training while the others wait: allow it time.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return Ranks(dist.get_rank(), dist.get_world_size(), device, mode)


def wrap(student: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """The module to train through: the student itself, DDP around it, or the student sharded in place."""
    if ranks.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        # Buffers (rotary tables) never change, so no broadcast per forward: ranks may then run forwards alone.
        return DistributedDataParallel(student, device_ids=ids, forward_sync_buffers=False)
    if ranks.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(student):
            fully_shard(layer)
        return fully_shard(student)
    return student


def _decoder_layers(model) -> list[torch.nn.Module]:
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(blocks, key=len)) if blocks else []


# --- full state: what a checkpoint holds, the same for every world size -------------------------


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state(student, ranks: Ranks) -> dict:
    """A CPU copy of the student's full weights (under FSDP: a collective, and rank 0 alone gets them)."""
    if ranks.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(student, options=_options(cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}


def load_model_state(student, state: dict, ranks: Ranks) -> None:
    if ranks.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(student, state, options=_options(broadcast_from_rank0=True))
    else:
        student.load_state_dict(state)


def optimizer_state(student, optimizer, ranks: Ranks) -> dict:
    """The optimizer's state as a single process keeps it (parameters by index), whatever the wrapping."""
    if ranks.mode != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(student, optimizer, options=_options(cpu_offload=True))
    if not state:  # ranks other than 0
        return state
    index = {name: i for i, (name, _) in enumerate(student.named_parameters())}
    return {
        "state": {index[name]: s for name, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]],
    }


def load_optimizer_state(student, optimizer, state: dict, ranks: Ranks) -> None:
    if ranks.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = [name for name, _ in student.named_parameters()]
    state = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(student, optimizer, state, options=_options(broadcast_from_rank0=True))
