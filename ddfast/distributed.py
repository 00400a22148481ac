"""Several processes, one method: what ddfast needs from torch.distributed.

Under ``torchrun`` every process holds a slice of each global batch, in rank order. The memory
terms and the memories must be those of ONE process holding the whole batch (method.md sections
2-3), so that adding GPUs never changes the method:

* each class's extreme cosine is found on every rank, gathered, and only the rank holding the
  global extreme (the first rank on ties, which holds the earlier sample) keeps its gradient;
  the number of distinct classes n comes from the global batch;
* the items inserted into the memories are gathered from every rank and inserted in rank order,
  so every rank holds identical memories;
* DDP averages gradients over R ranks, so each rank scales its memory terms by R.

``Dist`` is a small value object: ``Dist.single()`` is the one-process case (every collective is
the identity), ``Dist.from_env()`` joins the process group torchrun describes (NCCL on GPUs, gloo
on CPUs).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddfast.errors import ConfigError

__all__ = ["Dist"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    forced: bool = False  # DDFAST_DDP=1: the process-group path even for one process

    @staticmethod
    def single() -> Dist:
        return Dist()

    @staticmethod
    def from_env(device_type: str = "cpu", timeout_s: float = 1800.0) -> Dist:
        """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
        LOCAL_RANK, MASTER_ADDR, MASTER_PORT); one process when WORLD_SIZE is unset or 1,
        unless ``DDFAST_DDP=1`` asks for the DDP path even then (``python -m ddfast.check``
        tests it that way on one GPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 and os.environ.get("DDFAST_DDP") != "1":
            return Dist.single()
        if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
            raise ConfigError(f"WORLD_SIZE={world} (or DDFAST_DDP=1) needs torchrun's environment "
                              "(RANK, MASTER_ADDR): start the job with `torchrun --standalone "
                              "--nproc_per_node N -m ddfast.train ...`")
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return Dist(rank, world, local_rank, forced=world <= 1)

    @property
    def active(self) -> bool:
        return self.world > 1 or self.forced

    @property
    def main(self) -> bool:
        """True on the one process that writes shared outputs (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def shard(self, batch: int) -> slice:
        """This rank's rows of a global batch of ``batch`` rows."""
        if batch % self.world:
            raise ConfigError(f"the batch size {batch} is not divisible by the {self.world} "
                              f"processes; pass a batch size that is a multiple of "
                              f"{self.world}")
        per = batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x (equal shapes) concatenated along dim 0 in rank order; no gradient."""
        if not self.active:
            return x.detach()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.detach().contiguous())
        return torch.cat(parts, dim=0)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of x over ranks (a detached copy)."""
        if not self.active:
            return x.detach()
        y = x.detach().clone()
        dist.all_reduce(y)
        return y / self.world

    def global_extreme(self, values: torch.Tensor, largest: bool) -> torch.Tensor:
        """Per-class extremes over ranks: values (C,) this rank's extremes (with gradient).

        Returns (C,) the global extremes: this rank's own (gradient kept) where it holds the
        global extreme, the winning rank's value (a constant) elsewhere. Ties go to the first
        rank, which holds the earlier samples of the global batch.
        """
        if not self.active:
            return values
        gathered = self.all_gather(values.unsqueeze(0))  # (R, C)
        winner = gathered.argmax(0) if largest else gathered.argmin(0)  # (C,) first on ties
        best = gathered.gather(0, winner.unsqueeze(0)).squeeze(0)  # (C,)
        return torch.where(winner == self.rank, values, best)

    def agree_max(self, value: int, device: torch.device | str = "cpu") -> int:
        """The largest ``value`` over ranks, on every rank (one small all-reduce)."""
        if not self.active:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
