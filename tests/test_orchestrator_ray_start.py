"""Attaching to a head started the way users start one: `ray start --head`, not `cluster_utils.Cluster`.

A real head enables Ray's token authentication when a token exists (any earlier
embedded Ray writes ~/.ray/auth_token); a host:port attach must then authenticate
too. The head gets its own HOME (so its token is this test's), --temp-dir and
port, and only its own processes are ended, by id.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(temp_dir: str) -> list[int]:
    """Ids of the processes whose command line names this head's own temp dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if temp_dir.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def ray_head():
    home = Path(tempfile.mkdtemp(prefix="mdh"))
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    temp_dir = tempfile.mkdtemp(prefix="mdr")  # short: Ray's socket paths live under it
    port = _free_port()
    env = {**os.environ, "HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    proc = subprocess.run([str(RAY), "start", "--head", "--port", str(port), "--temp-dir", temp_dir, "--num-cpus", "2",
                           "--include-dashboard=false", "--disable-usage-stats"],
                          capture_output=True, text=True, timeout=180, env=env)
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Token authentication is enabled" in proc.stderr + proc.stdout
        yield env, f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _processes_of(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def mdsweep(*args: str, env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**env, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))


def test_address_flag_attaches_with_the_heads_token(ray_head, captcha_parquet, tmp_path):
    env, address = ray_head
    proc = mdsweep("run", "--address", address, "--dry-run", "--train-data", str(captcha_parquet),
                   "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "token authentication" in proc.stderr and "1 node(s)" in proc.stderr


def test_ray_address_variable_attaches_and_a_trial_runs(ray_head, captcha_parquet, tmp_path):
    env, address = ray_head
    proc = mdsweep("run", "--name", "attached", "--num-samples", "1", "--space", "smoke:space",
                   "--train-data", str(captcha_parquet), "--max-steps", "2", "--eval-every", "2",
                   "--batch-size", "4", "--max-val-samples", "4", "--set", "max_new_tokens=5",
                   "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"), "--quiet",
                   env={**env, "RAY_ADDRESS": address})
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "r" / "trials").to_pylist()
    assert [r["outcome"] for r in rows] == ["ok"]


def test_explicit_auth_mode_is_respected(ray_head, captcha_parquet, tmp_path):
    env, address = ray_head
    proc = mdsweep("run", "--address", address, "--dry-run", "--train-data", str(captcha_parquet),
                   "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"),
                   env={**env, "RAY_AUTH_MODE": "disabled"}, timeout=120)
    assert proc.returncode == 2 and "token authentication" not in proc.stderr


def test_trials_run_the_code_the_driver_ships_not_an_install_on_the_node(ray_head, tmp_path):
    env, address = ray_head
    code = (
        "import ray\n"
        "from orchestrator.cluster import connect\n"
        f"with connect({address!r}):\n"
        "    @ray.remote\n"
        "    def where():\n"
        "        import trainer, trainer.config\n"
        "        return trainer.__file__, trainer.config.shipped_models()\n"
        "    print(*ray.get(where.remote()))\n")
    # the driver runs from elsewhere with no PYTHONPATH of ours: the head's workers get the code from Ray
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=str(tmp_path),
                          env={**{k: v for k, v in env.items() if k != "PYTHONPATH"}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, models = proc.stdout.strip().rsplit(" ", 1)
    assert "runtime_resources" in path and not path.startswith(str(ROOT)), path
    assert "tiny-reader" in models


def test_auto_finds_the_head_started_on_this_machine(ray_head, captcha_parquet, tmp_path):
    env, address = ray_head
    proc = mdsweep("run", "--address", "auto", "--dry-run", "--train-data", str(captcha_parquet),
                   "--storage", str(tmp_path / "s"), "--results", str(tmp_path / "r"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = address.rsplit(":", 1)[1]
    assert f":{port}" in proc.stderr and "1 node(s)" in proc.stderr  # this test's head, not another Ray
