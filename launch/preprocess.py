"""Distributed ``dnis-preprocess``: the same stages on every rank of a torchrun job.

Ranks split the chunk list (``assign_chunks``, deterministic), count their chunks,
barrier, rank 0 merges the counts into the vocabulary, barrier, every rank writes its
chunks' shards, barrier, rank 0 writes ``metadata.json``. Shard names depend only on the
chunk, so the output equals a one-process ``dnis-preprocess`` run's.

Run through TorchX::

    torchx run -s local_cwd launch/components.py:preprocess --nproc 2 \\
        --output data/kaggle --inputs train.txt

or directly: ``python -m launch.preprocess --output O --dataset D INPUT...`` (one rank).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from pipeline.data.preprocess import PreprocessError, parse_args, run


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Imported here, not at the top: the spawned chunk workers re-import this module and
    # must not pay for (or start) torch.distributed.
    from sharding.dmp import barrier, init_distributed

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    opts = parse_args(argv, default_workers=max(1, (os.cpu_count() or 1) // local_ranks),
                      prog="python -m launch.preprocess")
    env = init_distributed(keep_freed=False)  # its workers hand freed memory back
    try:
        run(opts, env.rank, env.world_size, barrier)
    except (PreprocessError, ValueError) as err:
        raise SystemExit(f"launch.preprocess (rank {env.rank}): error: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
