"""Progress bars for rank 0: live on a terminal, a line every 30 s in logs.

Under ``torchx``/``torchrun`` stderr is a pipe that prefixes and keeps every refresh as
a line, so bars there refresh rarely.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(*args, **kwargs) -> tqdm:
    """``tqdm(*args, **kwargs)`` with a refresh interval that suits where stderr goes."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 30.0)
    return tqdm(*args, **kwargs)
