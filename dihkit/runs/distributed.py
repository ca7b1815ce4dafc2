"""The process group a run belongs to: a single process, or one rank of a torchrun launch.

torchrun starts one process per GPU and tells each its place through environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). ``from_env`` reads them,
``process_group`` joins the group for the length of a run, and ``Dist`` offers the few collective
operations the console and the training loop need; in a single process every one of them is a no-op.

Rules the rest of the code keeps: only rank 0 writes files and prints; every decision that changes
control flow (stop, skip a batch, fail) is taken by all ranks together, because a rank that leaves a
loop early leaves the others waiting in a collective.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from itertools import chain

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dih_utils import digest_tensors
from dihkit.foundations.errors import UserError


class SharedUserError(UserError):
    """A UserError raised on every rank at once; rank 0 alone reports it."""


@dataclass(frozen=True)
class Dist:
    """Rank, world size and local placement of this process (0, 1, 0, 1 outside torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and draws progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    def _flag_device(self) -> torch.device:
        """Where small control tensors live: on the GPU for NCCL (it moves nothing else), else on the CPU."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (a no-op in a single process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maximum of ``tensor`` over ranks, in place (a no-op in a single process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        """Minimum of ``tensor`` over ranks, in place (a no-op in a single process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def any_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one."""
        if not self.enabled:
            return flag
        return bool(self.all_reduce_max(torch.tensor([int(flag)], device=self._flag_device())).item())

    def all_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on all of them."""
        return not self.any_true(not flag)

    def barrier(self) -> None:
        """Wait until every rank arrives (after rank 0 wrote something the others read)."""
        if self.enabled:
            dist.barrier()

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (picklable objects; ``[obj]`` in a single process)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def check_together(self, check):
        """Run ``check()`` on every rank; a UserError on any rank is raised on all of them.

        Call it before the first collective of a phase: a rank that failed alone would otherwise exit
        and leave the others waiting for it until the timeout.
        """
        try:
            value, error = check(), None
        except UserError as e:
            value, error = None, str(e)
        first = next((e for e in self.gather(error) if e is not None), None)
        if first is not None:
            raise SharedUserError(first)
        return value

    def rank_seed(self, seed: int) -> int:
        """A seed of this rank's own random stream (dropout, sampling in losses), derived from the run seed."""
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])

    def sync_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (batch-norm running statistics) to every rank.

        DDP hands rank 0's buffers to all ranks at the start of each forward, but each rank then updates
        them with its own batch: without this, ranks would evaluate (and rank 0 export) different models.
        """
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def check_replicas(self, module: nn.Module) -> str:
        """Digest of ``module``'s parameters and buffers, checked equal on every rank (a bug otherwise).

        Extra state (e.g. a per-rank sampler's random state) may rightly differ and is not compared.
        """
        digests = self.gather(digest_tensors(chain(module.named_parameters(), module.named_buffers())))
        if len(set(digests)) > 1:
            raise RuntimeError(f"ranks hold different weights after training ({', '.join(digests)}); "
                               f"the replicas diverged, which is a bug")
        return digests[0]

    def wrap(self, module: nn.Module, device: torch.device, sync_bn: bool = False,
             find_unused: bool = False) -> nn.Module:
        """DistributedDataParallel around ``module`` when distributed, else ``module`` itself.

        With ``sync_bn`` the module's batch norms become SyncBatchNorm first (in place: the parameter and
        buffer tensors are kept, so optimizers and state dicts built before stay valid).
        """
        if not self.enabled or not any(p.requires_grad for p in module.parameters()):
            return module
        if sync_bn:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def _env_int(name: str, default: str | None = None) -> int:
    """An integer torchrun variable; a missing or malformed one means the launch is broken."""
    text = os.environ.get(name, default)
    if text is None:
        raise UserError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set; start "
                        f"multi-process runs with torchrun")
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer, got '{text}'") from None


def from_env() -> Dist:
    """Read torchrun's environment variables (a single process when WORLD_SIZE is unset or 1)."""
    world = _env_int("WORLD_SIZE", "1")
    if world <= 1:
        return Dist()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", "0")
    local_world = _env_int("LOCAL_WORLD_SIZE", str(world))
    if not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise UserError(f"RANK {rank} / LOCAL_RANK {local_rank} do not fit WORLD_SIZE {world} / "
                        f"LOCAL_WORLD_SIZE {local_world}")
    return Dist(rank, world, local_rank, local_world)


def check_devices(d: Dist, gpu_id: str | None) -> None:
    """Under torchrun on CUDA every process of a node needs its own GPU, cuda:<LOCAL_RANK>."""
    if not d.enabled:
        return
    try:
        wanted = torch.device("cuda" if gpu_id is None and torch.cuda.is_available() else gpu_id or "cpu")
    except RuntimeError:
        return  # not a device name: resolve_device says so
    count = torch.cuda.device_count() if wanted.type == "cuda" else 0
    if count == 0:
        return  # no CUDA wanted, or none there (resolve_device says so)
    if count < d.local_world_size:
        raise UserError(f"torchrun started {d.local_world_size} processes on this node but it has only {count} "
                        f"CUDA device(s); use --nproc_per_node {count} or fewer (or --gpu_id cpu)")
    # Refused on every rank alike (rank 0 alone going on would wait for the others at the rendezvous).
    if wanted.index is not None and d.local_world_size > 1:
        raise UserError(f"--gpu_id {gpu_id} would put several torchrun processes on one GPU; leave --gpu_id "
                        f"out (or pass cuda) so that each process uses cuda:<LOCAL_RANK>")


def check_world(d: Dist, data, batch_size: int, device: torch.device, sync_bn: bool) -> None:
    """Refuse a world size the data cannot feed, and SyncBatchNorm where it cannot run."""
    if not d.enabled:
        return
    if sync_bn and device.type != "cuda":
        raise UserError("--sync_bn needs CUDA: SyncBatchNorm does not run on the CPU")
    per_rank = len(data.train) // d.world_size
    if per_rank < batch_size:
        raise UserError(f"{len(data.train)} training images over {d.world_size} processes leave {per_rank} per "
                        f"process, fewer than one batch of {batch_size} (--batch_size is per process); "
                        f"use fewer processes or a smaller --batch_size")
    for name, split in (("validation", data.val), ("test", data.test)):
        if split is not None and len(split) < d.world_size:
            raise UserError(f"the {name} split has {len(split)} images, fewer than the {d.world_size} processes")


@contextmanager
def process_group(d: Dist, device: torch.device, timeout_s: float):
    """Join the process group (NCCL on CUDA, gloo on the CPU) for the ``with`` block, then leave it."""
    if not d.enabled:
        yield
        return
    endpoint = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=d.rank, world_size=d.world_size,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    except (dist.DistError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"rank {d.rank} could not join the process group at {endpoint} within {timeout_s:g} s "
                        f"(--dist_timeout): {first}") from None
    try:
        yield
    finally:
        dist.destroy_process_group()
