"""Cluster addressing: resolution, fail-fast on unreachable heads, storage warnings (no Ray start)."""
from __future__ import annotations

import socket
import sys
import time

import pytest

from orchestrator.cluster import (
    ClusterError,
    check_reachable,
    connect,
    is_remote_storage,
    resolve_address,
    split_host_port,
    storage_notes,
)
from orchestrator.resources import NodeInfo


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_resolution_order(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == (None, "embedded")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert resolve_address(None) == ("10.0.0.5:6379", "RAY_ADDRESS")
    assert resolve_address("auto") == ("auto", "--address")


@pytest.mark.parametrize("address,expected", [
    ("10.0.0.5:6379", ("10.0.0.5", 6379, False)),
    ("head", ("head", 6379, False)),
    ("ray://head:10001", ("head", 10001, True)),
    ("ray://head", ("head", 10001, True)),
    ("[::1]:6380", ("::1", 6380, False)),
])
def test_split_host_port(address, expected):
    assert split_host_port(address) == expected


def test_unreachable_address_fails_fast_naming_the_flag():
    port = _closed_port()
    t0 = time.time()
    with pytest.raises(ClusterError, match=rf"--address: cannot reach a Ray head at 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(ClusterError, match="RAY_ADDRESS"):
        check_reachable(f"ray://127.0.0.1:{port}", source="RAY_ADDRESS")
    with pytest.raises(ClusterError, match="bad port"):
        check_reachable("127.0.0.1:http")
    assert time.time() - t0 < 5


def test_connect_to_unreachable_head_fails_before_ray_starts(monkeypatch):
    import ray

    if ray.is_initialized():
        pytest.skip("Ray already initialised in this process")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    t0 = time.time()
    with pytest.raises(ClusterError, match="RAY_ADDRESS"):
        connect(None)
    assert not ray.is_initialized() and time.time() - t0 < 5


def test_connect_rejects_sizing_an_existing_cluster(monkeypatch):
    import ray

    if ray.is_initialized():
        pytest.skip("Ray already initialised in this process")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="--num-cpus/--num-gpus size an embedded Ray only"):
        connect("auto", num_cpus=2)


def test_auto_without_a_local_head_is_a_clear_error(monkeypatch, tmp_path):
    import ray

    if ray.is_initialized():
        pytest.skip("Ray already initialised in this process")
    # point Ray's lookup of running local clusters at an empty temp dir
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import subprocess

    code = ("from orchestrator.cluster import connect, ClusterError\n"
            "try:\n    connect('auto')\nexcept ClusterError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "RAY_ADDRESS": ""})
    assert "ERR --address auto" in out.stdout, out.stdout + out.stderr


def _node(ip):
    return NodeInfo(node_id=ip * 3, address=ip, cpus=4)


def test_storage_must_be_shared_on_multi_machine_clusters():
    assert is_remote_storage("s3://bucket/sweeps") and not is_remote_storage("/nfs/sweeps")
    assert storage_notes("/tmp/sweeps", [_node("10.0.0.1")]) == []
    assert storage_notes("/tmp/sweeps", [_node("10.0.0.1"), _node("10.0.0.1")]) == []  # one machine
    notes = storage_notes("/tmp/sweeps", [_node("10.0.0.1"), _node("10.0.0.2")])
    assert len(notes) == 1 and "--storage /tmp/sweeps" in notes[0] and "shared" in notes[0]
    assert storage_notes("s3://b/sweeps", [_node("10.0.0.1"), _node("10.0.0.2")]) == []
