"""An embedded Ray ends with its driver, however the driver ends.

`ray.init(address="local")` starts Ray's processes as children of the driver. When the driver exits normally
it shuts them down; when it is killed (`kill -9`, the kernel's OOM killer), the GCS and the raylet notice
and exit within seconds, but Ray's agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`) and a trial's worker
can stay alive for minutes, holding memory, a GPU and ports. The driver therefore starts this watchdog, a
small process of its own session (a Ctrl-C to the terminal's process group does not reach it): it watches
the driver, keeps the list of Ray's processes up to date (the driver's Ray children and everything under
them), and once the driver is gone, ends exactly those processes: SIGTERM, then SIGKILL after a grace period.

    python -m orchestrator.cluster.watchdog DRIVER_PID PID...
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional

import psutil

POLL_S = 0.5
GRACE_S = 3.0


def ray_children() -> list[int]:
    """This process's children that are Ray's (programs of the ray package: the GCS, the raylet, the monitors)."""
    import ray

    package = os.path.dirname(ray.__file__)
    found = []
    for child in psutil.Process().children():
        try:
            if any(arg.startswith(package) for arg in child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def start_watchdog(roots: list[int]) -> None:
    """Watch this process on behalf of Ray's processes `roots` (and their descendants)."""
    subprocess.Popen([sys.executable, "-m", "orchestrator.cluster.watchdog", str(os.getpid()), *map(str, roots)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)


def _process(pid: int) -> Optional[psutil.Process]:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(driver: psutil.Process, roots: list[psutil.Process]) -> list[psutil.Process]:
    """Wait for the driver to end; return Ray's processes still alive then (none when it shut Ray down)."""
    known: dict[int, psutil.Process] = {p.pid: p for p in roots}
    while _alive(driver):
        for root in roots:
            try:
                for child in root.children(recursive=True):
                    known.setdefault(child.pid, child)
            except psutil.Error:
                continue
        known = {pid: p for pid, p in known.items() if _alive(p)}
        if not known:
            return []  # Ray was shut down while the driver lives on: nothing left to guard
        time.sleep(POLL_S)
    return [p for p in known.values() if _alive(p)]  # is_running() also guards against a reused pid


def end(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(processes, timeout=GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


def main(argv: list[str]) -> int:
    driver = _process(int(argv[0]))
    roots = [p for p in map(_process, map(int, argv[1:])) if p is not None]
    if driver is None or not roots:
        return 0
    end(watch(driver, roots))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
