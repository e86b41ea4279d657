"""Ray's own log lines (runtime-env packaging, token-auth notices, Tune's warnings) go to a file, not the terminal.

A sweep's terminal is for its own lines: the settings it checked, the progress table, the leaderboard. Ray
writes INFO lines while it ships the code and a token-authentication warning even for an embedded cluster
that has nothing to authenticate; they are kept whole in the log file, where a user who needs them looks.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path


class LogFile(logging.FileHandler):
    """A log file that goes quiet when its disk fails (full, read-only), rather than print a traceback per line:
    the sweep's own lines say what the disk did."""

    def handleError(self, record: logging.LogRecord) -> None:
        logging.getLogger("ray").removeHandler(self)
        stream, self.stream = self.stream, None
        with contextlib.suppress(Exception):  # closing flushes, which fails as the write did
            stream.close()


def route_ray_logs(log_file: Path) -> None:
    """Replace the terminal handlers of the `ray` logger (and so of every `ray.*` logger) with `log_file`."""
    import ray  # noqa: F401  (Ray installs its terminal handler when imported; replace it after)

    logger = logging.getLogger("ray")
    for handler in list(logger.handlers):
        # the terminal's, and an earlier sweep's file in this process: its lines are this sweep's no more
        if isinstance(handler, LogFile) or not isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            if isinstance(handler, LogFile):
                handler.close()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logger.addHandler(LogFile(log_file, encoding="utf-8"))  # ray.init gives it Ray's own format
