"""Every process of DESIGN.md's table on this machine, for the demo, the tests and benchmarks.

The commands are the production ones; only the environment differs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from worker import connections as redis_connections
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

#: The process table of DESIGN.md (workers log at INFO so readiness can be seen).
COMMANDS: dict[str, list[str]] = {
    "gpu": ["celery", "-A", "tasks", "worker", "-Q", "gpu", "-P", "prefork", "-c", "1",
            "-n", "gpu@%h", "-l", "INFO"],
    "enhance": ["celery", "-A", "tasks", "worker", "-Q", "enhance", "-P", "prefork", "-c", "1",
                "-n", "enhance@%h", "-l", "INFO"],
    "cpu": ["celery", "-A", "tasks", "worker", "-Q", "cpu", "-n", "cpu@%h", "-l", "INFO"],
    "bridge": ["python", "-m", "worker", "bridge"],
    "api": ["python", "-m", "worker", "api"],
    # Address, port and auth come from FLOWER_ADDRESS, FLOWER_PORT, FLOWER_BASIC_AUTH.
    "flower": ["celery", "-A", "tasks", "flower"],
    # A small box: one worker holds WAN and Qwen (README, "One worker for a small box").
    "gpu+enhance": ["celery", "-A", "tasks", "worker", "-Q", "gpu,enhance", "-P", "prefork",
                    "-c", "1", "-n", "gpu@%h", "-l", "INFO"],
}  # fmt: skip
#: What jobs from the platform list need: one worker per queue and the bridge.
WORKERS_AND_BRIDGE = ("gpu", "enhance", "cpu", "bridge")
#: DESIGN.md's whole process table (Flower aside).
FULL_STACK = (*WORKERS_AND_BRIDGE, "api")
#: The log line that says a process is ready to take work.
READY_MARKERS = {
    "gpu": " ready.",
    "enhance": " ready.",
    "cpu": " ready.",
    "bridge": "bridge serving",
    "api": "Uvicorn running on",  # after the bind: "startup complete" comes before it
    "flower": "Visit me at",
    "gpu+enhance": " ready.",
}


#: The kernel's range of ports for outgoing connections (Linux).
EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: How many ports below that range `free_port` draws from.
FREE_PORT_SPAN = 12_000


def free_port() -> int:
    """A port nothing listens on, drawn at random from below the kernel's ephemeral range.

    A port from that range (what binding port 0 gives) can be taken by any outgoing
    connection on the machine, the other test runs' included, between this check and the
    server's own bind; below it, only another caller of this function could take it.
    """
    try:
        low = int(EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    first = max(1024, low - FREE_PORT_SPAN)
    for _ in range(100):
        port = first + secrets.randbelow(low - first)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every draw taken: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """Where `redis-server` is (it runs the sentinels too); a clear error if nowhere."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    return binary


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def wait_until(
    condition: Callable[[], bool], *, timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    """Poll `condition` until true; a clear TimeoutError names what never happened."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(interval_s)


class RedisServer:
    """A private `redis-server` on a free port; can be killed and restarted on that port.

    By default it keeps nothing on disk. With `aof=True` it keeps an append-only file in
    `workdir` (`appendfsync everysec`, as docker-compose.yml runs it), so a restart after
    `kill()` finds the data of all but the last second again. `password`: its `requirepass`
    (and `masterauth`, for a replica); `args`: more of redis-server's options, e.g.
    `("--replicaof", "127.0.0.1", "6380")`.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aof: bool = False,
        password: str | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.aof = aof
        self.password = password
        self.args = args
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        #: Once it has run, a restart must come back on the same port (clients know it).
        self._port_fixed = False

    @property
    def url(self) -> str:
        """The URL of database 0, with the password if there is one."""
        return self.db_url(0)

    def db_url(self, db: int) -> str:
        """The URL of database `db` of this server (`url` is database 0's)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        binary = redis_server_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.aof
            else ["--appendonly", "no"]
        )
        if self.password:
            persistence += ["--requirepass", self.password, "--masterauth", self.password]
        for _ in range(3):
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 *persistence, "--dir", str(self.workdir), *self.args],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            )  # fmt: skip
            wait_until(self._serving_or_exited, timeout_s=10, what="redis-server start")
            if self.process.poll() is None:
                self._port_fixed = True
                return self
            if self._port_fixed:
                break
            # Another process took the port after free_port() saw it free: draw again.
            self.port = free_port()
        raise RuntimeError(f"redis-server could not listen on 127.0.0.1:{self.port}")

    def _serving_or_exited(self) -> bool:
        """True once this server answers, or once it has exited (its port was taken). A Redis
        of another test run that holds the port answers too: its process id tells it apart."""
        assert self.process is not None
        if self.process.poll() is not None:
            return True
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:  # PING: refused while an append-only file is still loading
            return bool(client.ping()) and client.info("server")["process_id"] == self.process.pid
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no last write, no goodbye to clients."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def _connections(pids: list[int]) -> set[tuple[int, int]]:
    """(local port, remote port) of each TCP connection these processes hold (Linux /proc)."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # it has exited: it holds nothing
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    connections = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
                connections.add((local, remote))
    return connections


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _client_ids(client: redis.Redis) -> set[int]:
    """The ids of the clients connected to this Redis; none while it is down."""
    try:
        return {int(c["id"]) for c in client.client_list()}
    except redis.RedisError:
        return set()


class LocalStack:
    """The workers and the bridge as real subprocesses, or the processes `names` lists."""

    def __init__(self, env: dict[str, str], *, log_dir: Path, names: tuple[str, ...] = ()) -> None:
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self.log_dir = log_dir
        self.names = names or WORKERS_AND_BRIDGE
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, *, timeout_s: float = 120) -> LocalStack:
        """Start every process and wait until each is ready; if one never is, stop the
        others before raising (a `with` block whose start fails never reaches `__exit__`)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.names:
                self.processes[name] = self._spawn(name)
            for name in self.names:
                wait_until(
                    lambda name=name: self._ready(name),
                    timeout_s=timeout_s,
                    what=f"{name} start",
                    interval_s=0.1,
                )
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _spawn(self, name: str, *, env: dict[str, str] | None = None) -> subprocess.Popen:
        command = COMMANDS[name]
        executable = (
            [sys.executable, "-m", command[0]] if command[0] == "celery" else [sys.executable]
        )
        log = (self.log_dir / f"{name}.log").open("ab")
        return subprocess.Popen(
            [*executable, *command[1:]], cwd=ROOT, env={**self.env, **(env or {})}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def _ready(self, name: str, *, after: int = 0) -> bool:
        process = self.processes[name]
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {process.returncode}:\n{self.log(name)[-3000:]}"
            )
        return READY_MARKERS[name] in self.log(name)[after:]

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pids(self, name: str) -> list[int]:
        """The process and its children (a Celery worker's pool)."""
        pid = self.processes[name].pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [pid, *map(int, children)]

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal the process and all of its group (a worker and its pool). SIGKILL also
        reaps it and waits until Redis has seen its connections close: until then Redis can
        still hand a message to a blocking pop of the dead process, lost with it."""
        process = self.processes[name]
        held = self._redis_clients(name) if sig == signal.SIGKILL else []
        os.killpg(process.pid, sig)
        if sig == signal.SIGKILL:
            process.wait(timeout=30)
            for client, ids in held:
                wait_until(
                    lambda client=client, ids=ids: not ids & _client_ids(client),
                    timeout_s=30,
                    what=f"Redis closing the connections of {name}",
                )
                client.close()

    def _redis_clients(self, name: str) -> list[tuple[redis.Redis, set[int]]]:
        """Per Redis server of this stack, the ids of the clients that are `name`'s
        connections (its pool's included)."""
        try:
            connections = _connections(self.pids(name))
        except OSError:  # it has exited already
            return []
        settings = self.settings()
        servers: dict[int, redis.Redis] = {}
        for target in (
            redis_connections.records_target(settings),
            redis_connections.platform_target(settings),
        ):
            client = redis_connections.client(target, timeout_s=10)
            where = redis_connections.master_address(client)
            if where is None and target.is_sentinel:
                continue  # no master known: none of its connections outlives the kill
            port = _port(where) if where else client.get_connection_kwargs()["port"]
            servers.setdefault(port, client)
        held = []
        for server_port, client in servers.items():
            ports = {local for local, remote in connections if remote == server_port}
            try:
                listed = client.client_list()
            except redis.RedisError:  # Redis is down: no connection of it outlives the kill
                continue
            held.append((client, {int(c["id"]) for c in listed if _port(c["addr"]) in ports}))
        return held

    def settings(self) -> Settings:
        """The settings the stack's processes read from their environment."""
        fields = Settings.model_fields
        return Settings(_env_file=None, **{k.lower(): v for k, v in self.env.items()
                                           if k.lower() in fields})  # fmt: skip

    def restart(
        self, name: str, *, env: dict[str, str] | None = None, timeout_s: float = 120
    ) -> None:
        """Start `name` again (after `kill`), with `env` overriding the stack's environment,
        and wait until it is ready."""
        old = self.processes[name]
        if old.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {old.pid}); kill it first")
        offset = len(self.log(name))  # the log file is appended to: look past the old run
        self.processes[name] = self._spawn(name, env=env)
        wait_until(lambda: self._ready(name, after=offset),
                   timeout_s=timeout_s, what=f"{name} restart", interval_s=0.1)  # fmt: skip

    def stop(self, *, timeout_s: float = 30) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL whatever is left of each group."""
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
