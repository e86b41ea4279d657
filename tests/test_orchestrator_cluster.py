"""Cluster addressing: resolution, fail-fast on unreachable heads, storage warnings (no Ray start)."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from orchestrator.cluster.connect import (
    ClusterError,
    check_reachable,
    connect,
    is_remote_storage,
    resolve_address,
    split_host_port,
    storage_notes,
)
from orchestrator.cluster.resources import NodeInfo


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
    with pytest.raises(ClusterError, match=rf"--address: cannot reach a Ray head at 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(ClusterError, match="RAY_ADDRESS"):
        check_reachable(f"ray://127.0.0.1:{port}", source="RAY_ADDRESS")
    with pytest.raises(ClusterError, match="bad port"):
        check_reachable("127.0.0.1:http")


def test_connect_to_unreachable_head_fails_before_ray_starts(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `mdsweep` process
    started = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.append(kwargs))
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    with pytest.raises(ClusterError, match="RAY_ADDRESS"):
        connect(None)
    assert not started  # refused before Ray was asked: not after its 20 s of retries


def test_connect_rejects_sizing_an_existing_cluster(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `mdsweep` process
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="--num-cpus/--num-gpus size an embedded Ray only"):
        connect("auto", num_cpus=2)


def test_auto_without_a_local_head_is_a_clear_error(monkeypatch):
    # Whether a head runs on this machine is not ours to decide in a test: stand in for
    # what ray.init says when none does.
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `mdsweep` process

    def no_head(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "init", no_head)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="--address auto: Could not find any running Ray instance"):
        connect("auto")


def test_embedded_ray_never_joins_a_running_cluster(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `mdsweep` process
    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    handle = connect(None, num_cpus=2)
    assert handle.embedded and handle.owned
    assert seen["address"] == "local" and seen["num_cpus"] == 2 and seen["include_dashboard"] is False


def _node(ip):
    return NodeInfo(node_id=ip * 3, address=ip, cpus=4)


def test_storage_must_be_shared_on_multi_machine_clusters():
    assert is_remote_storage("s3://bucket/sweeps") and not is_remote_storage("/nfs/sweeps")
    assert storage_notes("/tmp/sweeps", [_node("10.0.0.1")]) == []
    assert storage_notes("/tmp/sweeps", [_node("10.0.0.1"), _node("10.0.0.1")]) == []  # one machine
    notes = storage_notes("/tmp/sweeps", [_node("10.0.0.1"), _node("10.0.0.2")])
    assert len(notes) == 1 and "--storage /tmp/sweeps" in notes[0] and "shared" in notes[0]
    assert storage_notes("s3://b/sweeps", [_node("10.0.0.1"), _node("10.0.0.2")]) == []


def test_rays_log_file_goes_quiet_on_a_full_disk_instead_of_printing_tracebacks(tmp_path, capfd):
    """Ray's lines go to RESULTS/logs/NAME.log; when that disk fills, the lines stop there, and nothing is printed."""
    import logging

    from orchestrator.cluster.ray_logs import route_ray_logs

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    ray_logger = logging.getLogger("ray")
    saved = list(ray_logger.handlers)
    try:
        route_ray_logs(tmp_path / "logs" / "demo.log")
        logging.getLogger("ray.tune").warning("a line for the file")
        assert (tmp_path / "logs" / "demo.log").read_text() == "a line for the file\n"
        assert not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                       for h in ray_logger.handlers)  # none left on the terminal
        route_ray_logs(tmp_path / "logs" / "next.log")  # a second sweep in this process: its own file only
        logging.getLogger("ray.tune").warning("a line for the next sweep")
        assert (tmp_path / "logs" / "demo.log").read_text() == "a line for the file\n"
        assert (tmp_path / "logs" / "next.log").read_text() == "a line for the next sweep\n"
        route_ray_logs(Path("/dev/full"))  # every write: ENOSPC
        logging.getLogger("ray.tune").warning("a line for a full disk")
        assert Path("/dev/full") not in [Path(h.baseFilename) for h in ray_logger.handlers
                                         if isinstance(h, logging.FileHandler)]
        assert capfd.readouterr().err == ""
    finally:
        for handler in list(ray_logger.handlers):
            ray_logger.removeHandler(handler)
        for handler in saved:
            ray_logger.addHandler(handler)


def test_localhost_is_checked_like_any_other_host():
    """`localhost:PORT` began with "local" (the embedded address Ray answers at once), so it skipped the check and
    Ray retried the dead address for minutes."""
    port = _closed_port()
    with pytest.raises(ClusterError, match=rf"--address: cannot reach a Ray head at localhost:{port}"):
        check_reachable(f"localhost:{port}")


@pytest.mark.parametrize("address", ["localhost:99999", "10.0.0.5:0", "ray://head:70000", "[::1]:65536"])
def test_a_port_outside_1_65535_is_refused(address):
    with pytest.raises(ValueError, match=r"port \d+ .*outside 1-65535"):
        split_host_port(address)
    with pytest.raises(ClusterError, match="RAY_ADDRESS: port"):
        check_reachable(address, source="RAY_ADDRESS")


@pytest.mark.parametrize("command", [["run", "--train-data", "x.parquet"], ["resume", "demo"], ["plan"]])
def test_every_address_flag_refuses_a_bad_port_at_parse_time(command, capsys):
    from orchestrator.cli.main import build_parser

    for address in ("localhost:99999", "head:0", "head:http"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*command, "--address", address])
        assert exit_.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"mdsweep {command[0]}: error: argument --address: ") and address in error
    for address in ("auto", "head:6379", "ray://head", "[::1]:6380"):
        assert build_parser().parse_args([*command, "--address", address]).address == address


def test_an_open_port_that_is_not_a_ray_head_fails_in_seconds():
    """A port that accepts connections but does not speak gRPC (here a plain HTTP server) passed the reachability
    check, then Ray retried it for minutes (and Ctrl-C took 19 s to act): now it is one line, in seconds."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(ClusterError, match=rf"--address: 127.0.0.1:{server.server_port} answers, but not as a "
                                               "Ray head"):
            check_reachable(f"127.0.0.1:{server.server_port}", timeout_s=2.0)
        assert time.monotonic() - started < 5
    finally:
        server.shutdown()
        server.server_close()
