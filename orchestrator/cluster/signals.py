"""SIGTERM (what `kill`, systemd, Kubernetes and batch schedulers send) ends a sweep the way Ctrl-C does.

When the driver connects, Ray's core installs a native handler for SIGTERM that dumps a stack and aborts
(exit 134), leaving the sweep marked running and its state unsaved. Installed after connecting, the handler
here asks Ray Tune to stop through the handler Tune keeps for SIGUSR1 (the same as its Ctrl-C handler: save
the experiment state, end the trials), so the sweep ends `interrupted` and `mdsweep resume` continues it.
Before Tune runs, SIGTERM interrupts like Ctrl-C (KeyboardInterrupt).
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

# the exit statuses of a command ended by a signal, as shells report them
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


@dataclass
class Terminated:
    received: bool = False


@contextmanager
def sigterm_as_interrupt() -> Iterator[Terminated]:
    state = Terminated()

    def on_sigterm(signum: int, frame: Any) -> None:
        state.received = True
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if callable(tune_handler):
            tune_handler(signal.SIGUSR1, frame)
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)
