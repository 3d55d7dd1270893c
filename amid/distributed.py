"""Data-parallel ranks for `amid train` under torchrun (or a launcher that sets torchrun's
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT).

One process per device; every rank holds the whole student. A step takes grad_accum × W
consecutive batches of the one seeded stream and rank r trains on batches r, r + W, ... of
them, so W ranks with `grad_accum` A compute the step of one process with A × W: the losses
are divided by the step's global number of target positions and the gradients are summed, not
averaged, across ranks. After the sum every rank holds the same gradient, clips it the same way
and takes the same optimizer step, so the weights stay equal without being sent again. (Equal
to one process exactly for a student without dropout: dropout masks are drawn per rank.)
Every rank reads the cache and the run directory: on several nodes both must be on a shared
file system.

The gradients are summed once per step, after the last backward, in flat buckets (plain
`torch.distributed` collectives, no DDP wrapper: the trainer calls the model's body and its LM
head separately, which DDP's forward hooks do not follow). That costs one exchange of the
gradients per step, not overlapped with the backward.

`Ranks()` is the single process: every method is then a no-op and nothing is initialised.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

__all__ = ["Ranks", "start_ranks", "world_from_env"]

_BUCKET_BYTES = 64 << 20  # gradients summed in flat buckets of at most this size
# Rank 0 writes checkpoints alone while the others wait in their next collective: a large
# student on a slow disk can take longer than NCCL's default 10 minutes.
TIMEOUT = datetime.timedelta(hours=1)


def world_from_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the launcher's environment; (0, 0, 1) without one."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel ranks, and the collectives the trainer uses."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where the collectives' tensors live (NCCL: the GPU)
    owns_group: bool = False  # start_ranks created the process group (and close() destroys it)

    @property
    def main(self) -> bool:
        """Rank 0 writes the run directory, the metrics and the progress bar."""
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks, in place (every rank gets the sum)."""
        if self.world > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def sum_numbers(self, values: list[float], dtype: torch.dtype = torch.float64) -> list[float]:
        """Python numbers summed over the ranks (one collective for the list); int64 for counts."""
        if self.world == 1:
            return list(values)
        return self.sum(torch.tensor(values, dtype=dtype, device=self.device)).tolist()

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the ranks, in place.

        A parameter that no rank's batches reached keeps `grad` None (the optimizer skips it,
        as in one process); one that some rank's did gets zeros on the others first. A rank
        without batches in a step (the stream ended mid-step) still takes part."""
        if self.world == 1:
            return
        reached = self.sum_numbers([p.grad is not None for p in params], torch.int32)
        grads = []
        for p, n in zip(params, reached):
            if n:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        for bucket in _buckets(grads):
            flat = self.sum(torch.cat([g.reshape(-1) for g in bucket]))
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g))

    def broadcast_params(self, params: Iterable[torch.Tensor]) -> None:
        """Rank 0's values of `params` on every rank (a student with freshly initialised parts,
        from an unseeded `from_pretrained`, would otherwise start different on each rank)."""
        if self.world > 1:
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _buckets(grads: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if bucket and (size + nbytes > _BUCKET_BYTES or g.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    if bucket:
        yield bucket


def start_ranks(device: torch.device) -> Ranks:
    """Join the launcher's process group (NCCL on CUDA, Gloo on the CPU), or use the caller's if
    one is initialised already; `Ranks()` alone. ValueError if the launcher asks for several
    ranks and this torch build has no torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:
            return Ranks()
        return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), device=device)
    rank, _, world = world_from_env()
    if world == 1:
        return Ranks()
    if not dist.is_available():
        # ValueError: the CLI reports it in one line, like any other refused setting
        raise ValueError(f"WORLD_SIZE={world} is set (a launcher such as torchrun) but this torch build has no "
                         "torch.distributed: run one process, or install a torch build with distributed support")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return Ranks(rank=rank, world=world, device=device, owns_group=True)
