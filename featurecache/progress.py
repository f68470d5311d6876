"""Progress bars: tqdm's on a terminal; where stderr is a log file or a pipe (``make demo > log``, CI), an update
every 30 seconds rather than ten a second, so the log holds a few updates instead of a flood of carriage returns.
"""

from __future__ import annotations

import sys
from typing import Any

LOG_INTERVAL_S = 30.0  # between updates where nobody watches the bar redraw


def progress_bar(**kwargs: Any) -> Any:
    """A ``tqdm.auto.tqdm`` bar with ``kwargs``, slowed down where stderr is not a terminal."""
    from tqdm.auto import tqdm

    if not _stderr_is_terminal():  # tqdm's monitor thread would force a redraw every maxinterval (10 s) otherwise
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)
    return tqdm(**kwargs)


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())
