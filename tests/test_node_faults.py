"""A real cluster's faults: a node that dies while a trial runs on it.

The cluster is started the way users start one (`ray start --head`, then `ray start --address` for a second
node), with its own HOME, --temp-dir and ports; the dying node is ended by the process ids of its raylet and
everything under it, and the whole cluster by its own processes at the end (never `ray stop`).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from harness import free_port, running_driver, wait_until
from orchestrator.results.store import read_partition
from test_orchestrator_ray_start import RAY, _agent_ports, _end_processes_of

pytestmark = pytest.mark.slow  # real Ray heads and sweeps: the fast lane (-m "not slow") leaves them out


@pytest.fixture
def two_nodes():
    """(env, head address): a head and a joined node, 1 CPU each."""
    home = Path(tempfile.mkdtemp(prefix="mdf"))
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    temp_dir = tempfile.mkdtemp(prefix="mdq")
    port = free_port()
    env = {**os.environ, "HOME": str(home), "PATH": f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "PYTHONPATH"):
        env.pop(key, None)
    try:
        for args, extra in (
                (["--head", "--port", str(port), "--temp-dir", temp_dir, "--include-dashboard", "false",
                  "--ray-client-server-port", str(free_port())], {}),
                (["--address", f"127.0.0.1:{port}"], {"RAY_AUTH_MODE": "token"})):
            started = subprocess.run([str(RAY), "start", *args, "--num-cpus", "1", *_agent_ports(),
                                      "--disable-usage-stats"], capture_output=True, text=True, timeout=180,
                                     env={**env, **extra})
            assert started.returncode == 0, started.stderr[-3000:]
        yield env, f"127.0.0.1:{port}"
    finally:
        _end_processes_of(home, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def _joined_node(env: dict, address: str) -> tuple[str, str]:
    """(node id, raylet socket) of the node that is not the head."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); print(json.dumps([(n['NodeID'], "
            "n['RayletSocketName']) for n in ray.nodes() if n['Alive'] and "
            "'node:__internal_head__' not in n['Resources']]))" % address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "RAY_AUTH_MODE": "token"})
    import json

    (node,) = json.loads(out.stdout.strip().splitlines()[-1])
    return node[0], node[1]


def _kill_node(raylet_socket: str) -> int:
    """SIGKILL the raylet serving `raylet_socket` and everything under it (its workers and agents)."""
    (raylet,) = [p for p in psutil.process_iter(["cmdline"])
                 if any(f"--raylet_socket_name={raylet_socket}" == arg for arg in p.info["cmdline"] or [])]
    victims = [raylet, *raylet.children(recursive=True)]
    for process in victims:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    return len(victims)


def _sweep(env: dict, address: str, tmp_path: Path, data: Path, name: str, *flags: str):
    """A sweep on the cluster at `address`, running for the block: `smoke` space, CPU trials evaluated every 2
    steps, results under tmp_path/results; `flags` add its size."""
    return running_driver(
        ["run", "--name", name, "--address", address, "--space", "smoke", "--gpus-per-trial", "0", "--storage",
         str(tmp_path / "sweeps"), "--results", str(tmp_path / "results"), "--quiet", "--train-data", str(data),
         "--eval-every", "2", "--batch-size", "2", "--max-val-samples", "4", "--set", "max_new_tokens=5", *flags],
        base_env=env, env={"RAY_AUTH_MODE": "token"})


def test_a_node_dying_mid_trial_is_survived_with_every_row_once(two_nodes, tmp_path, captcha_parquet):
    env, address = two_nodes
    node_id, raylet_socket = _joined_node(env, address)
    results = tmp_path / "results"
    sweep = _sweep(env, address, tmp_path, captcha_parquet, "nodefault", "--num-samples", "2", "--max-concurrent",
                   "2", "--max-failures", "2", "--max-steps", "24")

    def victim() -> str | None:
        """The trial running on the joined node, once it has a checkpoint to be retried from, and far from its
        end: the trials file, which says where a trial runs, follows its steps by up to a second."""
        on_node = {t["trial_id"] for t in read_partition(results, "trials", "nodefault") if t.get("node_id") == node_id}
        last: dict[str, int] = {}
        for s in read_partition(results, "steps", "nodefault"):
            last[s["trial_id"]] = max(last.get(s["trial_id"], 0), s["step"])
        return next((t for t, step in last.items() if t in on_node and 2 <= step <= 12), None)

    with sweep as driver:
        trial = wait_until(victim, "a trial on the joined node with a checkpoint", 300, driver, 0.2)
        assert _kill_node(raylet_socket) >= 2
        out, err = driver.communicate(timeout=400)
    assert driver.returncode == 0, err[-3000:]
    trials = {t["trial_id"]: t for t in read_partition(results, "trials", "nodefault")}
    assert len(trials) == 2 and all(t["outcome"] == "ok" for t in trials.values()), \
        [(t["outcome"], t["num_failures"], t["error"]) for t in trials.values()]
    assert trials[trial]["num_failures"] >= 1 and trials[trial]["restored_from_step"] >= 2  # from its checkpoint
    assert trials[trial]["node_id"] != node_id  # finished on the node that survived
    steps = [(s["trial_id"], s["step"]) for s in read_partition(results, "steps", "nodefault")]
    assert sorted(steps) == sorted((tid, s) for tid in trials for s in range(2, 25, 2))


SEAT_ON_THE_HEAD = """
import sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], logging_level="ERROR")
head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])

@ray.remote(num_cpus=1)
class Seat:
    def ready(self):
        return True

seat = Seat.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
ray.get(seat.ready.remote())
print("seated", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def _head_taken(env: dict, address: str) -> Iterator[Callable[[], None]]:
    """The head's one CPU held by an actor, so trials can only start on the joined node; yields the function that
    frees it. Ray would otherwise place every trial of a sequential sweep on whichever of two equal nodes it
    ranks first, which may be the head: the node killed would then never have run a trial."""
    seat = subprocess.Popen([sys.executable, "-c", SEAT_ON_THE_HEAD, address], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**env, "RAY_AUTH_MODE": "token"})

    def free() -> None:
        if seat.poll() is None:
            seat.stdin.close()  # its driver ends, and its actor with it
            seat.wait(timeout=60)

    try:
        assert seat.stdout.readline().strip() == "seated"
        yield free
    finally:
        free()
        seat.stdout.close()


def test_a_node_lost_between_trials_leaves_the_rest_of_the_sweep_to_the_others(two_nodes, tmp_path, captcha_parquet):
    """The joined node runs the first trial to its end (the head is held meanwhile), then dies: the sweep's other
    trial runs on the head."""
    env, address = two_nodes
    node_id, raylet_socket = _joined_node(env, address)
    results = tmp_path / "results"
    with _head_taken(env, address) as free_the_head, \
            _sweep(env, address, tmp_path, captcha_parquet, "between", "--num-samples", "2", "--max-concurrent", "1",
                   "--max-steps", "4") as driver:
        done = wait_until(lambda: [t for t in read_partition(results, "trials", "between") if t["outcome"] == "ok"],
                          "the first trial done", 300, driver, 0.2)
        _kill_node(raylet_socket)
        free_the_head()
        out, err = driver.communicate(timeout=400)
    assert driver.returncode == 0, err[-3000:]
    (first,) = done
    assert first["node_id"] == node_id  # the node killed had run a trial
    trials = read_partition(results, "trials", "between")
    assert len(trials) == 2 and all(t["outcome"] == "ok" for t in trials)
    assert all(t["node_id"] != node_id for t in trials if t["trial_id"] != first["trial_id"])  # the other: the head
    steps = [(s["trial_id"], s["step"]) for s in read_partition(results, "steps", "between")]
    assert sorted(steps) == sorted((t["trial_id"], s) for t in trials for s in (2, 4))
