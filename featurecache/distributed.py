"""The world an extraction runs in: one process, or the ranks of a ``torchrun`` launch.

``torchrun`` starts N copies of ``python -m pipelines.extract`` with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and a rendezvous in the environment. Only the entry point joins the process group (library code never
reads the environment on import); the library then sees a :class:`World` and shards its work by rank.

Control messages (the extraction plan, counts, barriers) go over a gloo group even when the features are
computed with NCCL on GPUs: they are small Python objects, and gloo handles them on the CPU without
choosing a CUDA device for each message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from featurecache.devices import resolve_device
from featurecache.errors import FeaturecacheError

log = logging.getLogger(__name__)

# Ranks wait at a barrier while rank 0 assembles each split's HDF5 file: on an ImageNet-size split that is
# a few GB of copying, so the default 30-minute collective timeout is too tight.
DEFAULT_TIMEOUT = timedelta(hours=3)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (``size == 1``: a plain single-process run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: Any = None  # the gloo process group for control messages; None in a single-process world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (what other ranks pass is ignored)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: str = "auto", *, timeout: timedelta = DEFAULT_TIMEOUT) -> World:
    """Join the process group described by torchrun's environment; a single-process World otherwise.

    The feature backend is NCCL when the ranks compute on CUDA and gloo on the CPU.
    """
    if not launched_by_torchrun():
        return World()
    import torch
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = resolve_device(device).startswith("cuda")
    if on_cuda:
        if local_rank >= torch.cuda.device_count():
            raise FeaturecacheError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) on this node; "
                f"set --nproc-per-node to at most the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # torchrun --max-restarts relaunches the ranks against the same agent-hosted store; without a per-attempt
        # prefix the new ranks read the dead ranks' addresses and gloo fails with "connection refused".
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=size, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            "nccl" if on_cuda else "gloo",
            store=dist.PrefixStore(f"featurecache/attempt_{attempt}", store),
            rank=rank,
            world_size=size,
            timeout=timeout,
        )
    group = dist.new_group(backend="gloo", timeout=timeout) if on_cuda else dist.group.WORLD
    log.info("rank %d of %d (local rank %d) joined the %s group", rank, size, local_rank, dist.get_backend())
    return World(rank=rank, size=size, local_rank=local_rank, group=group)


def shutdown(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def exit_rank(code: int) -> None:
    """End a torchrun rank with ``code`` without finalizing the interpreter; a no-op outside torchrun.

    ``destroy_process_group`` leaves gloo's worker threads running. If one of them drops the last reference to a
    finished collective while the interpreter finalizes, freeing its tensors needs the GIL, the thread is told to
    exit inside a C++ destructor, and the process aborts ("terminate called without an active exception"): a
    rank that wrote its cache exited with SIGABRT and torchrun failed the job (1 launch in ~25 after a restart
    here; the core showed ``ProcessGroupGloo::runLoop`` freeing an ``AsyncBroadcastWork`` under
    ``Py_FinalizeEx``). Every file is closed by then, so the rank flushes its streams and leaves at once.
    """
    if not launched_by_torchrun():
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away, a closed stream: exit all the same
            stream.flush()
    os._exit(code)
