"""Attach to a Ray cluster, or start an embedded one.

Address forms: `auto` (a head started with `ray start --head` on this machine),
`host:port` (the head's GCS port, 6379 by default), `ray://host:port` (Ray
Client; Ray documents it as unreliable for Tune: for a remote cluster prefer
`ray job submit --working-dir . -- python -m orchestrator.cli run ...`, which runs the driver on the
cluster). No address and no RAY_ADDRESS: an embedded Ray on this machine.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import orchestrator
import search_spaces
import trainer
from orchestrator.cluster.ray_logs import route_ray_logs
from orchestrator.cluster.resources import NodeInfo, nodes_from_ray
from orchestrator.cluster.tune_internals import head_accepts, submitted_job_runtime_env, token_auth_enabler

DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001
CLOUD_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://", "r2://")


class ClusterError(RuntimeError):
    """The cluster cannot be reached or used; the message names the flag."""


def resolve_address(flag_value: Optional[str]) -> tuple[Optional[str], str]:
    """(address, where it came from): the flag, then RAY_ADDRESS, else None (embedded)."""
    if flag_value:
        return flag_value.strip(), "--address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env, "RAY_ADDRESS"
    return None, "embedded"


def split_host_port(address: str) -> tuple[str, int, bool]:
    """'ray://h:p' -> (h, p, True); 'h:p' -> (h, p, False); 'h' -> (h, default port)."""
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):  # [ipv6]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    if not host:
        raise ValueError(f"no host in address {address!r}")
    try:
        port_n = int(port) if port else (DEFAULT_CLIENT_PORT if client else DEFAULT_GCS_PORT)
    except ValueError:
        raise ValueError(f"bad port {port!r} in address {address!r}") from None
    if not 1 <= port_n <= 65535:  # the socket layer wraps such a port silently, and Ray retries it for minutes
        raise ValueError(f"port {port_n} in address {address!r} is outside 1-65535")
    return host, port_n, client


def check_reachable(address: str, source: str = "--address", timeout_s: float = 5.0) -> None:
    """Fail fast (seconds, not Ray's long reconnect loop) when nothing listens there."""
    if address in ("auto", "local"):
        return  # ray.init answers at once when no local head is running (never skip `localhost:PORT`)
    try:
        host, port, _ = split_host_port(address)
    except ValueError as e:
        raise ClusterError(f"{source}: {e}; use auto, host:port or ray://host:port") from None
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            speaks_grpc = _speaks_grpc(conn)
    except OSError as e:
        raise ClusterError(
            f"{source}: cannot reach a Ray head at {host}:{port} ({e.strerror or e}). Is the cluster "
            "running (`ray status`)? Start one with `ray start --head`, or leave out --address "
            "(and RAY_ADDRESS) to run an embedded Ray on this machine.") from None
    if not speaks_grpc:
        raise ClusterError(
            f"{source}: {host}:{port} answers, but not as a Ray head (no gRPC there); give the head's GCS port "
            f"(default {DEFAULT_GCS_PORT}, or ray://host:{DEFAULT_CLIENT_PORT} for Ray Client), as `ray status` "
            "on the head shows it")


# An HTTP/2 client's opening (the preface and an empty SETTINGS frame); a gRPC server, as Ray's GCS and Ray
# Client are, must answer with its own SETTINGS frame (RFC 9113, 3.4)
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HTTP2_SETTINGS = 4


def _speaks_grpc(conn: socket.socket) -> bool:
    """Whether the server on `conn` opens HTTP/2 as gRPC does. Ray retries any other open port for minutes
    (and Ctrl-C then takes seconds to act), so this is asked first, bounded by the socket's timeout. A cluster
    with TLS (RAY_USE_TLS) cannot be asked in clear text and is left to Ray."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return True
    conn.sendall(_HTTP2_PREFACE)
    header = b""
    while len(header) < 9:
        chunk = conn.recv(9 - len(header))
        if not chunk:
            return False
        header += chunk
    return header[3] == _HTTP2_SETTINGS


def _project_root() -> str:
    return str(Path(__file__).resolve().parents[2])


# not needed by a trial, and the bulk of the tree: reference fixtures, benchmarks, version control
SHIP_EXCLUDES = [".git", "tests/fixtures", "bench", "*.egg-info", "__pycache__"]


def project_runtime_env() -> dict[str, Any]:
    """Ship this project's code to every worker the Ray way, so a node needs Ray and the dependencies but not
    the project: from a source checkout, the tree as the job's working_dir (uploaded once to the cluster,
    unpacked on each node, on the workers' path; .gitignore'd files such as .venv, data and results stay
    behind); from an installed package, its three packages as py_modules."""
    if _submitted_job_ships_code():
        return {}
    root = Path(_project_root())
    if (root / "pyproject.toml").is_file():
        return {"working_dir": str(root), "excludes": list(SHIP_EXCLUDES)}
    return {"py_modules": [orchestrator, trainer, search_spaces]}


def _submitted_job_ships_code() -> bool:
    """True in a driver started by `ray job submit --working-dir ...` (or `--runtime-env` with py_modules):
    the job's runtime env already ships the code, and Ray refuses a second working_dir from ray.init."""
    runtime_env = submitted_job_runtime_env()
    return bool(runtime_env.get("working_dir") or runtime_env.get("py_modules"))


def leave_job_working_dir() -> None:
    """Move a submitted job's driver out of Ray's copy of its --working-dir, with every project module loaded.

    Ray re-extracts that copy in place when the first worker with the same runtime env starts on the node
    (Ray >= 2.41 replaces a cached working_dir rather than reuse it), which pulls the directory from under a
    driver standing in it: measured here, the first sweep on a fresh cluster then died in torch's MKL ("Cannot
    load libtorch_cpu.so"), in Tune (`os.getcwd()`: FileNotFoundError), or on a module the driver imports
    late (`No module named 'orchestrator.sweep.progress'`, read while the directory was being replaced). So
    the driver loads all of its own code first, while the copy is whole."""
    if submitted_job_runtime_env().get("working_dir"):
        import_project_modules()
        os.chdir(Path.home() if Path.home().is_dir() else tempfile.gettempdir())


def import_project_modules() -> None:
    """Import every module of the project's packages (the CLI and the layers under it import the modules that
    load torch, Ray, Optuna or pyarrow inside the functions that need them, to keep `mdsweep --help` fast)."""
    for package in (orchestrator, trainer, search_spaces):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)


def check_output_outlives_job(flag: str, path: str) -> None:
    """A driver started by `ray job submit --working-dir` runs in Ray's temporary copy of that directory,
    deleted with the Ray session: a relative output path there would lose the sweep's results."""
    if not Path(path).expanduser().is_absolute() and submitted_job_runtime_env().get("working_dir"):
        raise ClusterError(f"{flag} {path}: relative, and this driver runs in Ray's temporary copy of the job's "
                           "--working-dir, which Ray deletes; give an absolute path (shared storage on a "
                           "multi-node cluster)")


@dataclass
class ClusterHandle:
    address: Optional[str]
    source: str  # --address, RAY_ADDRESS, embedded, or existing
    owned: bool  # True when this process started or connected Ray and must shut it down
    notes: list[str] = field(default_factory=list)

    @property
    def embedded(self) -> bool:
        return self.source == "embedded"

    def nodes(self) -> list[NodeInfo]:
        import ray

        return nodes_from_ray(ray.nodes())

    def shutdown(self) -> None:
        import ray

        if self.owned and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "ClusterHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def connect(
    address: Optional[str] = None,
    *,
    num_cpus: Optional[int] = None,
    num_gpus: Optional[int] = None,
    log_to_driver: bool = False,
    reuse_existing: bool = True,
    ray_log_file: Optional[Path] = None,
) -> ClusterHandle:
    """Attach (address / RAY_ADDRESS) or start an embedded Ray; returns a handle to shut down.

    `num_cpus`/`num_gpus` size an embedded instance (logical resources) and are
    rejected when attaching, since an existing cluster's resources are its own.
    `ray_log_file` takes Ray's own log lines off the terminal (None: they stay there).
    """
    import ray

    if ray_log_file is not None:
        route_ray_logs(ray_log_file)

    if reuse_existing and ray.is_initialized():
        return ClusterHandle(address=None, source="existing", owned=False)

    resolved, source = resolve_address(address)
    leave_job_working_dir()
    runtime_env = project_runtime_env()
    notes: list[str] = []
    if resolved is None:
        return start_embedded(num_cpus=num_cpus, num_gpus=num_gpus, log_to_driver=log_to_driver,
                              runtime_env=runtime_env)

    if num_cpus is not None or num_gpus is not None:
        raise ClusterError(f"--num-cpus/--num-gpus size an embedded Ray only; {source} attaches to "
                           "an existing cluster, whose resources are its own")
    check_reachable(resolved, source)
    if resolved.startswith("ray://"):
        notes.append("Ray Client (ray://) is documented as unreliable for Ray Tune; for a remote cluster prefer "
                     "`ray job submit --working-dir . -- python -m orchestrator.cli run ...` (README)")
    if use_token_auth(resolved, source):
        notes.append("attaching with Ray token authentication (the token `ray start --head` saved)")
    try:
        ray.init(address=resolved, log_to_driver=log_to_driver, runtime_env=runtime_env)
    except ConnectionError as e:
        raise ClusterError(f"{source} {resolved}: {e}") from None
    except Exception as e:  # e.g. a port that is open but is not a Ray head
        raise ClusterError(f"{source} {resolved}: could not attach to Ray ({type(e).__name__}: {e})") from None
    notes.append(f"attached to the Ray cluster at {ray.get_runtime_context().gcs_address} ({source} {resolved})")
    return ClusterHandle(address=resolved, source=source, owned=True, notes=notes)


def start_embedded(*, num_cpus: Optional[int] = None, num_gpus: Optional[int] = None, log_to_driver: bool = False,
                   runtime_env: Optional[dict[str, Any]] = None, temp_dir: Optional[Path] = None) -> ClusterHandle:
    """A new Ray of this process's own on this machine, whose processes end with it however it ends (the
    watchdog). `temp_dir`: where its session lives (sockets, logs) instead of Ray's shared default, so that two
    commands on one machine never share a folder; its path must stay short (Unix sockets: 107 bytes)."""
    import ray

    from orchestrator.cluster.watchdog import ray_children, start_watchdog

    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=log_to_driver, runtime_env=runtime_env)
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    if temp_dir is not None:
        kwargs["_temp_dir"] = str(temp_dir)
    # "local": always a new instance of our own. ray.init() without an address would
    # join any cluster a `ray start` left running on this machine.
    ray.init(address="local", **kwargs)
    start_watchdog(ray_children())
    return ClusterHandle(address=None, source="embedded", owned=True)


TOKEN_HELP = ("run `ray get-auth-token` on the head and save its output here as ~/.ray/auth_token "
              "(or set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it)")


def use_token_auth(address: str, source: str = "--address") -> bool:
    """Turn on Ray's token authentication for a host:port attach to a head that requires it.

    `ray start --head` (Ray 2.5x+) enables token auth when a token exists (e.g. in
    ~/.ray/auth_token, which any earlier embedded Ray creates). A driver attaching
    with `address="auto"` switches token mode on by itself; one attaching by
    host:port does not, and fails after ~20 s with a misleading "previous Ray
    instance that has since crashed". So the head is asked first (one GCS read,
    well under a second): token mode on a head without it would start workers that
    cannot reach the driver, and a missing or wrong token is said in one line
    instead of after Ray's 20 s of retries. Ray's own helper does the switch (it
    also refreshes Ray's cached config); an explicit RAY_AUTH_MODE is respected.
    """
    if address == "auto" or address.startswith("ray://"):
        return False
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        if mode != "token" and head_accepts(address) is False:
            raise ClusterError(f"{source} {address}: the head requires Ray token authentication, but "
                               f"RAY_AUTH_MODE={mode} here turns it off; unset RAY_AUTH_MODE or set it to token")
        return False
    enable_token_auth = token_auth_enabler()
    if enable_token_auth is None:  # a Ray without token authentication
        return False
    if head_accepts(address) is not False:  # accepted, or unreachable / not a head: ray.init reports that
        return False
    if not enable_token_auth():
        raise ClusterError(f"{source} {address}: the head requires Ray token authentication and this machine "
                           f"has no token; {TOKEN_HELP}")
    if head_accepts(address) is False:
        raise ClusterError(f"{source} {address}: the head rejects this machine's Ray token (a token from "
                           f"another cluster?); {TOKEN_HELP}")
    return True


def is_remote_storage(storage: str) -> bool:
    return storage.startswith(CLOUD_SCHEMES)


def storage_filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local path or an s3://, gs://... URI."""
    import pyarrow.fs as pafs

    if is_remote_storage(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def write_file_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write to a hidden temporary name beside `path`, then move it there: a reader (or a kill) never meets a
    half-written file."""
    folder, _, name = path.rpartition("/")
    tmp = f"{folder}/.{name}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def storage_notes(storage: str, nodes: list[NodeInfo]) -> list[str]:
    """Warn when a local storage path is used on a multi-node cluster."""
    if is_remote_storage(storage) or len(nodes) <= 1:
        return []
    hosts = {n.address for n in nodes}
    if len(hosts) <= 1:
        return []  # several Ray nodes on one machine share its filesystem
    return [
        f"--storage {storage} is a local path but the cluster has {len(hosts)} machines: it must be a "
        "shared filesystem (e.g. NFS) mounted at the same path on every node, or a cloud URI "
        "(s3://..., gs://...); otherwise checkpoints of trials on other nodes cannot be saved or resumed"
    ]


