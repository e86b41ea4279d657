"""Attaching to a head started the way users start one: `ray start --head`, not `cluster_utils.Cluster`.

A real head enables Ray's token authentication when a token exists (any earlier
embedded Ray writes ~/.ray/auth_token); a host:port attach must then authenticate
too. The head gets its own HOME (so its token is this test's), --temp-dir and
ports, and only its own processes (found by that HOME) are ended, by id.
"""
from __future__ import annotations

import ast
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import ROOT, free_port, mdsweep

pytestmark = pytest.mark.slow  # real Ray heads and sweeps: the fast lane (-m "not slow") leaves them out

RAY = Path(sys.executable).with_name("ray")


def _processes_of(home: Path, temp_dir: str) -> list[int]:
    """Ids of the processes of this test's nodes: started with its HOME, or holding a file in its temp dir.
    Both, because Ray's agents rename themselves (`ray::DashboardAgent`), which blanks their command line and
    environment; missed, they outlive the teardown and hold ports the next head then cannot bind."""
    marker = f"HOME={home}".encode() + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes() or any(
                    os.readlink(fd).startswith(temp_dir) for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _end_processes_of(home: Path, temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _processes_of(home, temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(1)


def _agent_ports() -> list[str]:
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]


@dataclass
class Head:
    env: dict  # HOME with the head's token, the venv's bin first on PATH (as an activated venv would)
    address: str  # HOST:GCS_PORT
    dashboard: str  # the job server's URL


@pytest.fixture(scope="module")
def ray_head():
    """A head (1 CPU, job server on) plus a second node joined with `ray start --address`, as on a real
    cluster: both raylets share the head's --temp-dir, which is how their processes are found and ended."""
    home = Path(tempfile.mkdtemp(prefix="mdh"))
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    temp_dir = tempfile.mkdtemp(prefix="mdr")  # short: Ray's socket paths live under it
    port, dashboard_port = free_port(), free_port()
    env = {**os.environ, "HOME": str(home), "PATH": f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "PYTHONPATH"):
        env.pop(key, None)
    try:
        # every port our own: two nodes on one machine would otherwise both want the agents' default ports
        head = subprocess.run([str(RAY), "start", "--head", "--port", str(port), "--temp-dir", temp_dir,
                               "--num-cpus", "1", "--dashboard-port", str(dashboard_port),
                               "--ray-client-server-port", str(free_port()), *_agent_ports(),
                               "--disable-usage-stats"], capture_output=True, text=True, timeout=180, env=env)
        assert head.returncode == 0, head.stderr[-3000:]
        assert "Token authentication is enabled" in head.stderr + head.stdout
        # a joining node needs token mode said explicitly (Ray only infers it for the head)
        node = subprocess.run([str(RAY), "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1",
                               *_agent_ports(), "--disable-usage-stats"], capture_output=True, text=True, timeout=180,
                              env={**env, "RAY_AUTH_MODE": "token"})
        assert node.returncode == 0, node.stderr[-3000:]
        head_info = Head(env, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}")
        _wait_for_job_server(head_info)
        yield head_info
    finally:
        _end_processes_of(home, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def submit_job(head: Head, entrypoint: list[str], cwd: Path, working_dir: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), "job", "submit", "--address", head.dashboard, "--working-dir", str(working_dir),
                           "--", *entrypoint], capture_output=True, text=True, timeout=300, cwd=str(cwd),
                          env={**head.env, "RAY_AUTH_MODE": "token"})


def _empty_dir(head: Head) -> Path:
    """A working dir with nothing to ship, inside the head's HOME, which the fixture removes."""
    empty = Path(head.env["HOME"]) / "empty-working-dir"
    empty.mkdir(exist_ok=True)
    return empty


def _wait_for_job_server(head: Head) -> None:
    """A fresh cluster's job agents take seconds to register; until then a submit is refused with "No
    available agent". One job that imports torch shows the job server can run a driver."""
    for _ in range(30):
        proc = submit_job(head, ["python", "-c", "import torch"], cwd=Path(tempfile.gettempdir()),
                          working_dir=_empty_dir(head))
        if "No available agent" not in proc.stderr:
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
            return
        time.sleep(2)
    raise AssertionError(f"the job server never took a job: {proc.stderr[-2000:]}")


def test_address_flag_attaches_with_the_heads_token(ray_head, captcha_parquet, tmp_path):
    env, address = ray_head.env, ray_head.address
    proc = mdsweep("run", "--address", address, "--dry-run", "--train-data", str(captcha_parquet),
                   "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"), base_env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "token authentication" in proc.stderr and "2 node(s)" in proc.stderr


def test_mfu_is_refused_as_the_objective_once_the_cluster_shows_no_gpu(ray_head, captcha_parquet, tmp_path):
    proc = mdsweep("run", "--address", ray_head.address, "--dry-run", "--train-data", str(captcha_parquet),
                   "--metric", "mfu", "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"),
                   base_env=ray_head.env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "mdsweep run: error: --metric mfu: the trials train on CPU (the cluster has no GPUs), where mfu is null; "
        "rank by achieved_tflops instead, or give the CPU's peak with --set peak_tflops=N")


def test_ray_address_variable_attaches_and_a_trial_runs(ray_head, captcha_parquet, tmp_path):
    env, address = ray_head.env, ray_head.address
    proc = mdsweep("run", "--name", "attached", "--num-samples", "1", "--space", "smoke:space",
                   "--train-data", str(captcha_parquet), "--max-steps", "2", "--eval-every", "2",
                   "--batch-size", "4", "--max-val-samples", "4", "--set", "max_new_tokens=5",
                   "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"),
                   base_env=env, env={"RAY_ADDRESS": address})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # attached to this test's head (its port, from RAY_ADDRESS), not an embedded Ray of its own
    port = address.rsplit(":", 1)[1]
    assert re.search(rf"attached to the Ray cluster at [0-9.]+:{port} \(RAY_ADDRESS {address}\)", proc.stderr)
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "r" / "trials").to_pylist()
    assert [r["outcome"] for r in rows] == ["ok"]


def test_explicit_auth_mode_is_respected(ray_head, captcha_parquet, tmp_path):
    env, address = ray_head.env, ray_head.address
    proc = mdsweep("run", "--address", address, "--dry-run", "--train-data", str(captcha_parquet),
                   "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"),
                   base_env=env, env={"RAY_AUTH_MODE": "disabled"}, timeout=120)
    # respected, not overridden: the attach is refused at once, saying why and what to change
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mdsweep run: error: --address {address}: the head requires Ray token authentication, but "
        "RAY_AUTH_MODE=disabled here turns it off; unset RAY_AUTH_MODE or set it to token")


def test_trials_run_the_code_the_driver_ships_not_an_install_on_the_node(ray_head, tmp_path):
    """Workers import the tree the driver shipped, which leaves out what .gitignore lists (a run's outputs)."""
    env, address = ray_head.env, ray_head.address
    ignored = ROOT / "runs" / "shipping-probe"  # /runs/ is in .gitignore
    fresh = not ignored.parent.exists()
    ignored.parent.mkdir(exist_ok=True)
    ignored.write_text("must not be shipped")
    code = (
        "import os, ray\n"
        "from orchestrator.cluster.connect import connect\n"
        f"with connect({address!r}):\n"
        "    @ray.remote\n"
        "    def where():\n"
        "        import trainer, trainer.model.config\n"
        "        shipped = os.path.dirname(os.path.dirname(trainer.__file__))\n"
        "        return trainer.__file__, trainer.model.config.shipped_models(), sorted(os.listdir(shipped))\n"
        "    print(repr(ray.get(where.remote())))\n")
    try:
        # the driver runs from elsewhere with no PYTHONPATH of ours: the head's workers get the code from Ray
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                              cwd=str(tmp_path), env={**{k: v for k, v in env.items() if k != "PYTHONPATH"}})
    finally:
        ignored.unlink()
        if fresh:
            ignored.parent.rmdir()
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, models, listing = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert "runtime_resources" in path and not path.startswith(str(ROOT)), path
    assert "tiny-reader" in models
    assert {"orchestrator", "trainer", "search_spaces", "models"} <= set(listing)
    assert "runs" not in listing and ".git" not in listing and ".venv" not in listing


def test_auto_finds_the_head_started_on_this_machine(ray_head, captcha_parquet, tmp_path):
    env, address = ray_head.env, ray_head.address
    proc = mdsweep("run", "--address", "auto", "--dry-run", "--train-data", str(captcha_parquet),
                   "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"), base_env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # this test's head, not another Ray
    port = address.rsplit(":", 1)[1]
    assert re.search(rf"attached to the Ray cluster at [0-9.]+:{port} \(--address auto\)", proc.stderr)
    assert "2 node(s)" in proc.stderr


@pytest.mark.parametrize("token", [None, "0" * 64], ids=["no-token", "wrong-token"])
def test_a_missing_or_wrong_token_is_one_line_saying_how_to_get_it(ray_head, captcha_parquet, tmp_path, token):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    if token:
        (home / ".ray" / "auth_token").write_text(token)
    proc = mdsweep("run", "--address", ray_head.address, "--dry-run", "--train-data", str(captcha_parquet),
                   "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"),
                   base_env=ray_head.env, env={"HOME": str(home)}, timeout=120)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("mdsweep run: error:")]
    assert len(error) == 1 and "ray get-auth-token" in error[0], proc.stderr[-2000:]
    assert ("rejects this machine's Ray token" if token else "has no token") in error[0]


def test_ray_job_submit_runs_a_sweep_on_both_nodes(ray_head, captcha_parquet, tmp_path):
    """The README's remote path: the driver runs on the cluster as a Ray job, with the code shipped as the
    job's working_dir (so mdsweep must not ship a second one), and the two trials land on the two nodes."""
    sweep = ["python", "-m", "orchestrator.cli", "run", "--name", "job", "--num-samples", "2",
             "--space", "smoke:space", "--train-data", str(captcha_parquet), "--max-steps", "2",
             "--eval-every", "2", "--batch-size", "4", "--max-val-samples", "4", "--set", "max_new_tokens=5",
             "--quiet"]
    def submit(*extra: str) -> subprocess.CompletedProcess:
        return submit_job(ray_head, [*sweep, "--storage", str(tmp_path / "s"), *extra], cwd=tmp_path)

    relative = submit("--results", "results")
    assert relative.returncode != 0
    assert "--results results: relative, and this driver runs in Ray's temporary copy" in relative.stdout
    proc = submit("--results", str(tmp_path / "r"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "r" / "trials").to_pylist()
    assert [r["outcome"] for r in rows] == ["ok", "ok"]
    assert len({r["node_id"] for r in rows}) == 2  # one CPU per node: the second trial ran on the joined node
