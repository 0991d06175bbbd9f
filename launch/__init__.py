"""TorchX components and the entry points they run (the only code that owns process groups).

Importing this package filters, in this one place, the upstream notices that a user of
these entry points cannot act on; each is named, nothing else is silenced.
"""

import logging
import os
import sys
import warnings
from typing import Callable

# Deprecation notices of the libraries (ShardedTensor -> DTensor in DCP, planner storage
# reservation, fbgemm invokers).
for _category in (FutureWarning, DeprecationWarning):
    warnings.filterwarnings("ignore", category=_category, module=r"(torch|torchrec|fbgemm_gpu)(\.|$)")

# Notices raised from inside the libraries about their own internals.
UPSTREAM_WARNINGS = (
    # FBGEMM's dense (data-parallel) kernel registers its backward outside autograd's key.
    r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered",
    # torchmetrics' own gather indexes with a list.
    r"Using a non-tuple sequence for multidimensional indexing is deprecated",
    # DCP loading a checkpoint without a process group (evaluation in one process).
    r"torch.distributed is disabled, unavailable or uninitialized",
    # Every read of a ShardedTensor table (TorchRec's CPU sharding still produces them).
    r"Please use DTensor instead and we are deprecating ShardedTensor",
)
for _message in UPSTREAM_WARNINGS:
    warnings.filterwarnings("ignore", message=_message)

# Log lines of TorchRec and torch that describe their own defaults, not the user's job,
# by the logger that emits them ("root": TorchRec logs some through logging.warning).
UPSTREAM_LOG_NOTICES = {
    "torchrec.distributed.planner.types": ("The topology was constructed directly rather than via TopologyFactory",),
    "torchrec.distributed.planner.storage_reservations": ("There is a known issue with TorchRec's dense tensor size",),
    "root": ("Sharding spec not found for",),
    "torchrec.distributed.utils": ("Sharding Type is data_parallel, caching params will be ignored",),
    "torch.fx._symbolic_trace": ("is_fx_tracing will return true for both",),
}


class _DropNotices(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


for _name, _prefixes in UPSTREAM_LOG_NOTICES.items():
    logging.getLogger(None if _name == "root" else _name).addFilter(_DropNotices(_prefixes))


def run_as_process(main: Callable[[], object]) -> None:
    """Run a stage's ``main`` as the whole process; once it returned, leave without the
    interpreter's teardown.

    Every output is written (atomically) and every collective finished by then. Left to
    the teardown, a rank sometimes aborted after finishing its work, under load, with
    "terminate called without an active exception" (a joinable C++ thread destroyed with
    its static owner; seen in 2-rank search, structured and fine-grained prune runs, with
    or without the process group destroyed first), failing a job that had succeeded.
    Failures (exceptions, ``SystemExit`` with a message) still exit the usual way,
    except a ``ConfigError`` (a config key or override, or data too small for it) or a
    ``CheckpointMismatch`` (a checkpoint of another model): the user's to fix, so one
    line ``dnis <stage>: <message>`` and exit 2, no traceback.
    """
    from pipeline.config import ConfigError
    from sharding.checkpoint import CheckpointMismatch

    try:
        main()
    except (ConfigError, CheckpointMismatch) as error:
        raise SystemExit(f"{_command(main)}: {error}") from None
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _command(main: Callable[[], object]) -> str:
    """``dnis <stage>`` for the stage ``main`` runs, as the user started it."""
    if sys.argv and sys.argv[0].startswith("dnis "):  # set by the `dnis` command (launch.cli)
        return sys.argv[0]
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # `python -m launch.<stage>`
    module = spec.name if main.__module__ == "__main__" and spec else main.__module__
    return "dnis " + module.rsplit(".", 1)[-1]
