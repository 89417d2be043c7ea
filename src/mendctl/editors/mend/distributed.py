"""Data-parallel editor training: which process this is, the few collectives the trainer needs,
and a launcher for N local processes.

This module owns the process group and nothing else: it knows tensors and ranks, not edits.
- `Replicas` says which of the processes this is (each holds a full copy of the base model and
  of the editor) and wraps the collectives. `Replicas()` is the single process: every method is
  the identity and no process group exists, so one-process training runs exactly as before.
- `join(device)` joins the group the environment describes, whichever launcher set it
  (`mendctl train --num-processes`, `accelerate launch`, `torchrun`, mpirun), through
  accelerate's `PartialState` (gloo on CPU).
- `launch(fn, args, n)` starts n fresh local processes (spawn, not fork: torch's thread pools
  do not survive a fork), joins them in one group, runs fn(*args) in each and returns what the
  main process returned; an exception in any process is raised in the caller.

How `Trainer` uses it (see editors/mend/trainer.py): every process draws the whole step with
the same RNG and takes a contiguous share of the edits, so the step's edits are the
single-process ones. The expensive passes (gradient capture, the edited forward on equivalent
and locality sequences, their backward) run on the share only. The training edit is ONE
batched edit of all the step's edits (W̃ sums δ̃ũᵀ over all of them), so the (u, δ) pairs are
gathered to every process (a small matrix: edit tokens × Σ(d_in + d_out)) and every process
maps all of them through the editor. The normalisers therefore observe the same tokens in the
same order in every process and their statistics stay identical: exactly what a parallel
Welford (Chan) merge of per-process moments would give, without a separate merge. Each
process's loss is its share of the step's mean (divided by the step's total counts), so the
sum of the processes' gradients is the single-process gradient.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# Validation and checkpoint writing run in the main process while the others wait in a
# collective; the default 30-minute timeout could cut a long validation of a large model short.
TIMEOUT = timedelta(hours=2)

# Environment variables through which launchers describe the group (torchrun and accelerate
# set WORLD_SIZE; MPI launchers their own).
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class Replicas:
    """This process among `world` processes that each hold a copy of the editor."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def part(self, n: int) -> tuple[int, int]:
        """This process's share [lo, hi) of n items: contiguous (so that shares gathered in rank
        order are in the single-process order), sizes differing by at most one."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's rows of x (same trailing shape and dtype), concatenated in rank order.
        The processes may have different numbers of rows (all_gather needs equal shapes, so the
        rows are padded to the longest and cut back)."""
        if not self.parallel:
            return x
        n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the processes, in place, in one collective (one flat buffer:
        one message instead of one per parameter). All tensors must share a dtype."""
        if not self.parallel or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        at = 0
        for t in tensors:
            t.copy_(flat[at: at + t.numel()].view_as(t))
            at += t.numel()

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite the tensors with the main process's values."""
        if self.parallel:
            for t in tensors:
                dist.broadcast(t, src=0)

    def broadcast(self, obj):
        """The main process's `obj` (any picklable value; the others pass anything)."""
        if not self.parallel:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        """[obj of process 0, obj of process 1, ...] in every process."""
        if not self.parallel:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()


def digest(tensors) -> str:
    """A hash of tensors' exact bytes (to check that replicas are still bit-identical)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _env_world() -> int:
    for k in _WORLD_VARS:
        if os.environ.get(k):
            return int(os.environ[k])
    return 1


def join(device: str = "cpu") -> Replicas:
    """The process group this process belongs to: an existing one, the one the environment
    describes (joined here), or none (a single process, the default)."""
    if dist.is_available() and dist.is_initialized():
        return Replicas(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    if _env_world() <= 1:
        return Replicas()
    from accelerate import PartialState

    # cpu=True is what makes accelerate treat a CPU-only launch as multi-process (MULTI_CPU);
    # gloo is named so an MPI-enabled torch does not pick mpi instead
    cpu = str(device).startswith("cpu")
    kwargs = {"cpu": True, "backend": "gloo"} if cpu else {}
    state = PartialState(timeout=TIMEOUT, **kwargs)
    return Replicas(state.process_index, state.num_processes, state.local_process_index)


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it), for the group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, threads: int, device: str, fn, args, out: str) -> None:
    """Body of each launched process: describe the group in the environment (as torchrun
    would), join it, run fn, hand back the main process's result or any process's error."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(threads)})
    torch.set_num_threads(threads)
    try:
        join(device)
        result = fn(*args)
        if rank == 0:
            # JSON, not pickle: nothing executable crosses between processes (the result is
            # the editor's JSON document)
            Path(out, "result.json").write_text(json.dumps(result))
    except BaseException as e:
        # the exception's class and message, so the caller can raise what the user should see
        Path(out, f"error-{rank}.json").write_text(json.dumps(
            {"module": type(e).__module__, "type": type(e).__qualname__, "message": str(e)}))
        raise
    finally:
        leave()


def launch(fn, args: tuple = (), num_processes: int = 2, threads: int | None = None,
           device: str = "cpu"):
    """Run fn(*args) in `num_processes` new local processes joined in one group; return the
    main process's result. `fn` must be importable (a module-level function).

    Each process gets `threads` intra-op threads (default: this process's threads split
    evenly), so N processes do not oversubscribe the cores one process would use."""
    import torch.multiprocessing as mp

    if num_processes < 1:
        raise ValueError("num_processes must be ≥ 1")
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("already in a process group; launch from a single process")
    if threads is None:
        threads = max(1, torch.get_num_threads() // num_processes)
    with tempfile.TemporaryDirectory(prefix="mend-launch-") as out:
        try:
            mp.start_processes(_entry, nprocs=num_processes, join=True, start_method="spawn",
                               args=(num_processes, free_port(), threads, device, fn, args, out))
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            # when one process fails torch stops the others; raise the failing process's own
            # exception (e.g. an input error the CLI prints as one line) where there is one,
            # chained to torch's report, which carries that process's traceback
            first = getattr(e, "error_index", 0)
            for rank in [first] + [r for r in range(num_processes) if r != first]:
                p = Path(out, f"error-{rank}.json")
                if not p.is_file():
                    continue
                err = _rebuild_error(json.loads(p.read_text()))
                if err is not None:
                    raise err from e
                break
            raise
        result = Path(out, "result.json")
        return json.loads(result.read_text()) if result.is_file() else None


def _rebuild_error(doc: dict) -> Exception | None:
    """The worker's exception as its own class with its message (None: not rebuildable, and
    torch's report, which carries the worker's traceback, is raised instead)."""
    try:
        cls = getattr(importlib.import_module(doc["module"]), doc["type"])
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(doc["message"])
    except Exception:  # noqa: BLE001 - a class that cannot be found or built from a message
        pass
    return None
