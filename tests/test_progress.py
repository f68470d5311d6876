"""Progress bars redraw ten times a second on a terminal, and every 30 s in a log file (no flood of redraws)."""

from __future__ import annotations

import io
import sys

from featurecache.progress import LOG_INTERVAL_S, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_in_a_log_updates_every_30_seconds_and_on_a_terminal_as_tqdm_does(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(total=3) as logged:
        assert logged.mininterval == logged.maxinterval == LOG_INTERVAL_S == 30.0
    monkeypatch.setattr(sys, "stderr", Terminal())
    with progress_bar(total=3) as watched:
        assert watched.mininterval == 0.1  # tqdm's own
    with progress_bar(total=3, mininterval=2.0) as asked:
        assert asked.mininterval == 2.0
