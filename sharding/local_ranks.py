"""Run a function on several local CPU ranks (gloo), as TorchRec's
``test_utils/multi_process``; the multi-rank tests and benchmarks use it.

Each spawn costs seconds, so tests run many cases inside one call.

Example:
    >>> results = run_ranks(check_something, 2, "arg")   # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600) -> list[Any]:
    """Call ``fn(env, *args)`` on ``world_size`` spawned ranks; return each rank's result.

    ``env`` is ``sharding.dmp.DistEnv``. A failure on any rank raises with its traceback.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_worker, args=(fn, rank, world_size, port, tmp, args))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        errors = [Path(tmp, f"{r}.err") for r in range(world_size)]
        failed = [e.read_text() for e in errors if e.exists()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if failed:
            raise AssertionError("rank failed:\n" + "\n".join(failed))
        if any(p.exitcode != 0 for p in procs):
            raise AssertionError(f"rank exit codes {[p.exitcode for p in procs]}")
        return [torch.load(Path(tmp, f"{r}.pt"), weights_only=False) for r in range(world_size)]


def _worker(fn, rank, world_size, port, tmp, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from sharding.dmp import init_distributed

    try:
        env = init_distributed(timeout_minutes=5)
        result = fn(env, *args)
        torch.save(result, Path(tmp, f"{rank}.pt"))
    except BaseException:
        Path(tmp, f"{rank}.err").write_text(f"rank {rank}:\n{traceback.format_exc()}")
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
