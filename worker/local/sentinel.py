"""A Redis Sentinel set on this machine: a master, replicas and three sentinels, for the
tests and the failover benchmark. Real `redis-server` processes on free loopback ports.

Failover is the sentinels' own: `kill_master` SIGKILLs the master, `wait_for_promotion`
waits until every sentinel names a replica as the new master and that replica says it is
one; `restart` brings a killed node back as it was started, and `wait_for_replica` waits
until the sentinels have made it a replica of the master of the day.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis

from worker.local.stack import RedisServer, free_port, redis_server_binary, wait_until

MASTER_NAME = "mymaster"
#: How long a master may not answer before a sentinel thinks it down, milliseconds: short,
#: so a test's failover takes a few seconds (Redis's default is 30 s).
DOWN_AFTER_MS = 1000
#: Sentinel's failover timeout, milliseconds: a failover that stalls is tried again after
#: twice this.
FAILOVER_TIMEOUT_MS = 4000
#: Every data node: a replica's full sync starts at once (Redis waits 5 s for more replicas
#: to share a diskless transfer).
NODE_ARGS = ("--repl-diskless-sync-delay", "0")
SENTINELS = 3
QUORUM = 2
#: Sentinel's own timers, milliseconds (`SENTINEL DEBUG`), shortened from 10 s and 2 s so
#: the sentinels meet within a second or two and make a restarted old master a replica
#: within a few seconds (after 4 publish periods up and one INFO of it); the failover
#: itself runs on DOWN_AFTER_MS and FAILOVER_TIMEOUT_MS as it would in production.
INFO_PERIOD_MS = 1000
PUBLISH_PERIOD_MS = 500


class SentinelProcess:
    """One `redis-server --sentinel` with its own config file (Sentinel rewrites it)."""

    def __init__(self, workdir: Path, *, index: int) -> None:
        self.workdir = workdir
        self.index = index
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(
        self, master: RedisServer, *, password: str | None, sentinel_password: str | None
    ) -> SentinelProcess:
        binary = redis_server_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.workdir}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master.port} {QUORUM}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        if password:
            lines.append(f"sentinel auth-pass {MASTER_NAME} {password}")
        if sentinel_password:
            lines += [
                f"requirepass {sentinel_password}",
                f"sentinel sentinel-pass {sentinel_password}",
            ]
        config = self.workdir / f"sentinel-{self.index}.conf"
        config.write_text("\n".join(lines) + "\n")
        log = (self.workdir / f"sentinel-{self.index}.log").open("ab")
        self.process = subprocess.Popen(
            [binary, str(config), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
        )
        client = redis.Redis("127.0.0.1", self.port, password=sentinel_password,
                             socket_timeout=2, socket_connect_timeout=2)  # fmt: skip
        try:
            wait_until(lambda: self._answers(client), timeout_s=10, what="sentinel start")
            client.execute_command("SENTINEL", "DEBUG", "info-period", INFO_PERIOD_MS,
                                   "publish-period", PUBLISH_PERIOD_MS)  # fmt: skip
        finally:
            client.close()
        return self

    def _answers(self, client: redis.Redis) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"sentinel {self.index} exited: see {self.workdir}")
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class SentinelSet:
    """A master, `replicas` replicas and three sentinels watching them, all on loopback.

    `password` is every data node's (`requirepass`, `masterauth`); `sentinel_password` the
    sentinels' own. The nodes keep nothing on disk: a restarted node starts empty and takes
    the master's data when the sentinels make it a replica.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        replicas: int = 1,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.password = password
        self.sentinel_password = sentinel_password
        self.master = RedisServer(workdir / "node-0", password=password, args=NODE_ARGS)
        self.nodes = [self.master]
        self.replica_count = replicas
        self.sentinels = [SentinelProcess(workdir / "sentinels", index=i) for i in range(SENTINELS)]

    @property
    def addresses(self) -> str:
        """The sentinels as REDIS_SENTINELS lists them."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    @property
    def sentinel_url(self) -> str:
        """The sentinels as `sentinel://` URLs (REDIS_URL's other form), database 0."""
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{s.port}/0" for s in self.sentinels)

    def start(self) -> SentinelSet:
        self.master.start()
        for i in range(1, self.replica_count + 1):
            replica = RedisServer(
                self.workdir / f"node-{i}",
                password=self.password,
                args=(*NODE_ARGS, "--replicaof", "127.0.0.1", str(self.master.port)),
            )
            self.nodes.append(replica.start())
        for node in self.nodes[1:]:
            self.wait_for_replica(node, of=self.master, sentinels=False)
        for sentinel in self.sentinels:
            sentinel.start(self.master, password=self.password,
                           sentinel_password=self.sentinel_password)  # fmt: skip
        wait_until(self._all_see_each_other, timeout_s=30, what="the sentinels meeting")
        return self

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()

    def sentinel_client(self, index: int) -> redis.Redis:
        return redis.Redis(
            "127.0.0.1", self.sentinels[index].port, password=self.sentinel_password,
            socket_timeout=2, socket_connect_timeout=2,
        )  # fmt: skip

    def node_client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis.from_url(node.url, socket_timeout=2, socket_connect_timeout=2)

    def _ask_each(self, question: str) -> list:
        """Each sentinel's answer to a question about the master (redis-py's method
        `sentinel_<question>`); None for one that does not answer."""
        answers = []
        for i in range(len(self.sentinels)):
            client = self.sentinel_client(i)
            try:
                answers.append(getattr(client, f"sentinel_{question}")(MASTER_NAME))
            except redis.RedisError:
                answers.append(None)
            finally:
                client.close()
        return answers

    def _all_see_each_other(self) -> bool:
        for answer in self._ask_each("master"):
            if answer is None:
                return False
            others, replicas = answer["num-other-sentinels"], answer["num-slaves"]
            if others < SENTINELS - 1 or replicas < self.replica_count:
                return False
        return True

    def named_master(self) -> set[int | None]:
        """The master's port as each sentinel names it (None: one that names none)."""
        ports = set()
        for answer in self._ask_each("get_master_addr_by_name"):
            ports.add(None if not answer else int(answer[1]))
        return ports

    def replicas(self) -> list[RedisServer]:
        """The nodes other than the master of the day."""
        return [node for node in self.nodes if node is not self.master]

    def node_at(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def role(self, node: RedisServer) -> list | None:
        client = self.node_client(node)
        try:
            return client.execute_command("ROLE")
        except redis.RedisError:
            return None
        finally:
            client.close()

    def kill_master(self) -> RedisServer:
        """SIGKILL the master, as a crash of its machine would; it is returned."""
        killed = self.master
        killed.kill()
        return killed

    def wait_for_promotion(self, *, timeout_s: float = 60) -> RedisServer:
        """Wait until every sentinel names another node as master and that node says it is
        the master; it becomes `master`, and is returned."""
        old = self.master.port

        def promoted() -> bool:
            ports = self.named_master()
            if len(ports) != 1 or None in ports or old in ports:
                return False
            node = self.node_at(ports.pop())
            role = self.role(node)
            if role is None or role[0] != b"master":
                return False
            self.master = node
            return True

        wait_until(promoted, timeout_s=timeout_s, what="the sentinels' promotion of a replica",
                   interval_s=0.1)  # fmt: skip
        return self.master

    def restart(self, node: RedisServer) -> RedisServer:
        """Start a killed node again as it first started (a master that was failed over
        comes back believing it is still one, until the sentinels say otherwise)."""
        return node.start()

    def wait_for_replica(
        self, node: RedisServer, *, of: RedisServer | None = None, sentinels: bool = True,
        timeout_s: float = 60,
    ) -> None:  # fmt: skip
        """Wait until `node` replicates the master (`of`, by default the master of the day)
        with its link up; with `sentinels`, until they list it as that master's replica too."""
        master = of or self.master

        def replicating() -> bool:
            role = self.role(node)
            if role is None or role[0] != b"slave" or int(role[2]) != master.port:
                return False
            if role[3] != b"connected":
                return False
            if not sentinels:
                return True
            for answer in self._ask_each("slaves"):
                ok = any(r["port"] == node.port and not r["is_sdown"] for r in answer or [])
                if not ok:
                    return False
            return True

        wait_until(replicating, timeout_s=timeout_s, what=f"{node.port} replicating {master.port}",
                   interval_s=0.1)  # fmt: skip
