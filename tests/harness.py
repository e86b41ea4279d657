"""The tests' one harness for driving `mdsweep` as a user does: a command run to its end, a driver started in its
own session and always ended with its whole process group, and a wait for a condition that fails with the
driver's own words.

A test must never attach to a cluster the machine happens to have (`RAY_ADDRESS` is dropped unless the test gives
it) and must run this checkout's code (`PYTHONPATH` is the checkout, which is what `bench/mutations.py` relies on
when it runs the tests of a mutated copy)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nothing listens on now, for a test's own Ray head or server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def short_temp_dir(prefix: str) -> Iterator[Path]:
    """A fresh folder under the system's temporary folder, removed afterwards. Short on purpose: Ray puts its
    session's Unix sockets under TMPDIR, and a socket's path must fit in 107 bytes, which pytest's tmp_path
    does not."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def mdsweep_env(extra: Optional[dict] = None, base: Optional[dict] = None) -> dict:
    """`base` (this process's environment by default) without RAY_ADDRESS, with the checkout on PYTHONPATH,
    then `extra` over it."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


def mdsweep(*args: str, env: Optional[dict] = None, base_env: Optional[dict] = None, timeout: int = 600,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`mdsweep ARGS` to its end, its output captured."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=mdsweep_env(env, base_env), cwd=str(cwd))


def mdsweep_here(capsys, *args: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """`mdsweep ARGS` through its entry point in this process, its output as `capsys` caught it, returned as
    `mdsweep` returns a subprocess's: for a test whose promise is what the command does, not its process (a new
    interpreter imports torch, pyarrow and the rest again: seconds a call). An exception the command lets out is
    raised here, where a subprocess would have printed a traceback. `cwd`: the folder it runs in, as a user's
    shell would be, and back afterwards."""
    from orchestrator.cli.main import main

    capsys.readouterr()  # what came before is not the command's
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        code = main(list(args))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        os.chdir(here)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["mdsweep", *args], code, out, err)


def job_flags(data: Path, max_steps: int = 4, val_samples: int = 4) -> list[str]:
    """The job of a test sweep: the toy model, evaluated every 2 steps on a few samples, short answers, and a
    trial whose loss turns non-finite ends as diverged after 2 steps, within the shortest run."""
    return ["--train-data", str(data), "--max-steps", str(max_steps), "--eval-every", "2", "--batch-size", "2",
            "--max-val-samples", str(val_samples), "--set", "max_new_tokens=5", "--set", "diverge_patience=2"]


def wait_until(ready: Callable[[], object], what: str, deadline_s: float = 240,
               driver: Optional[subprocess.Popen] = None, interval_s: float = 0.1) -> object:
    """Poll `ready()` until it returns something true, and return that; fail naming `what` when the deadline
    passes, or at once, with the driver's last output, when the driver ends first."""
    deadline = time.monotonic() + deadline_s
    while not (value := ready()):
        if driver is not None and driver.poll() is not None:
            raise AssertionError(f"the driver ended ({driver.returncode}) before {what}: {_last_words(driver)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {deadline_s} s")
        time.sleep(interval_s)
    return value


def _last_words(driver: subprocess.Popen) -> str:
    """The end of a finished driver's output: its log file's, or what it piped."""
    log_path = getattr(driver, "log_path", None)
    if log_path is not None:
        return Path(log_path).read_text()[-3000:]
    with contextlib.suppress(ValueError, OSError):
        out, err = driver.communicate(timeout=10)
        return ((out or "") + (err or ""))[-3000:]
    return "(output unreadable)"


def _as_from_a_terminal() -> None:
    """SIGINT with its default disposition, as a shell gives a command it starts: a test runner started in the
    background inherits SIGINT ignored, and Python would keep ignoring a Ctrl-C the test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def running_driver(argv: list[str], env: Optional[dict] = None, base_env: Optional[dict] = None,
                   log_path: Optional[Path] = None, cwd: Path = ROOT) -> Iterator[subprocess.Popen]:
    """`mdsweep ARGV` started in a session of its own (its output piped, or into `log_path`, which the process
    then carries as `log_path` for `wait_until`'s message); whatever happens in the block, its whole process
    group is gone afterwards, so a test that fails half-way never leaves a Ray head running on the machine."""
    log = open(log_path, "w") if log_path is not None else None
    out = log if log is not None else subprocess.PIPE
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *argv], stdout=out,
                              stderr=subprocess.STDOUT if log is not None else subprocess.PIPE, text=True,
                              env=mdsweep_env(env, base_env), cwd=str(cwd), start_new_session=True,
                              preexec_fn=_as_from_a_terminal)
    driver.log_path = log_path
    try:
        yield driver
    finally:
        if driver.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=60)
        if log is not None:
            log.close()


def signal_driver_when(argv: list[str], ready: Callable[[], object], log_path: Path, env: Optional[dict] = None,
                       how: str = "kill", deadline_s: float = 300, cwd: Path = ROOT) -> int:
    """Run a driver, signal it once `ready()` holds, and return its exit code.

    `how` is what a user does: "kill" sends SIGTERM to the driver alone (`kill PID`, a batch scheduler); "ctrl-c"
    sends SIGINT to its whole process group, as a terminal does, so an embedded cluster's processes get it too."""
    with running_driver(argv, env=env, log_path=log_path, cwd=cwd) as driver:
        wait_until(ready, "ready", deadline_s, driver, interval_s=0.25)
        if how == "ctrl-c":
            os.killpg(driver.pid, signal.SIGINT)
        else:
            assert how == "kill", how
            driver.send_signal(signal.SIGTERM)
        return driver.wait(timeout=120)
