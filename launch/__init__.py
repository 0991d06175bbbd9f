"""TorchX components and the entry points they run (the only code that owns process groups)."""

import warnings

# Upstream deprecation notices (ShardedTensor -> DTensor in DCP, planner storage
# reservation, fbgemm invokers) that a user of these entry points cannot act on.
for _category in (FutureWarning, DeprecationWarning):
    warnings.filterwarnings("ignore", category=_category, module=r"(torch|torchrec|fbgemm_gpu)(\.|$)")
