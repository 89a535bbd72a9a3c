"""A Kafka cluster of three brokers for the tests of broker loss (``test_cluster.py``).

KRaft, from the same jars as the local stack (``tools/stack.py`` fetches them once into
``~/.cache/webhook-dispatcher/``): one dedicated controller (node 0) and three brokers
(nodes 1 to 3), replication factor 3 and ``min.insync.replicas=2`` for every topic, on
free ports and in a directory of their own, never the stack's. The controller runs apart
from the brokers, as in a production cluster whose controllers are separate: it keeps
its quorum through a two-broker outage, fences the lost brokers and moves leadership to
the survivor, which is how clients come to learn a one-broker layout (issue 19). The
tests kill (SIGKILL) and restart brokers; the controller is never killed.

Tuned to start fast on two cores: small heaps, C1 only, few threads and partitions for
the internal topics, and a controller that fences a silent broker after 3 s (Kafka's
default is 9 s: the failover the daemon has to ride out is that much shorter).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from tests.integration.support import free_port
from tools.stack import KAFKA_LOG4J, Config, Kafka, kafka_cluster_id, run

HOST = "127.0.0.1"
CONTROLLER_ID = 0
BROKER_IDS = (1, 2, 3)
START_TIMEOUT = 90.0  # seconds for the cluster, or one broker, to be ready
POLL = 0.25  # seconds between two probes
_PR_SET_PDEATHSIG = 1


class ClusterError(Exception):
    """A node did not start, or the cluster did not reach the state waited for."""


@dataclass
class Node:
    """One JVM of the cluster: its id, roles, port, directory and process."""

    node_id: int
    port: int  # PLAINTEXT for a broker, CONTROLLER for the controller
    home: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def is_controller(self) -> bool:
        return self.node_id == CONTROLLER_ID

    @property
    def properties(self) -> Path:
        return self.home / "server.properties"

    @property
    def log(self) -> Path:
        return self.home / "kafka.log"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class KafkaCluster:
    """Three brokers and a controller; :meth:`start`, :meth:`kill`, :meth:`restart`."""

    root: Path
    jars: Path
    nodes: dict[int, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node_id in (CONTROLLER_ID, *BROKER_IDS):
            self.nodes[node_id] = Node(node_id, free_port(), self.root / f"node-{node_id}")

    @classmethod
    async def create(cls, root: Path) -> KafkaCluster:
        """A cluster in ``root`` from the stack's cached jars (fetched once if missing)."""
        stack_kafka = Kafka(Config.from_env())
        await stack_kafka.fetch_jars()
        return cls(root, stack_kafka.cfg.kafka_jars)

    # --- addresses ------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """Every broker's address, as a daemon would be configured."""
        return ",".join(self.nodes[b].address for b in BROKER_IDS)

    def live_bootstrap(self) -> str:
        """The addresses of the brokers running now (for the harness's own probes)."""
        return ",".join(self.nodes[b].address for b in BROKER_IDS if self.nodes[b].running)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Format every node's directory, start them all, wait until three brokers serve."""
        cluster_id = kafka_cluster_id()
        for node in self.nodes.values():
            node.home.mkdir(parents=True, exist_ok=True)
            node.properties.write_text(self._properties(node))
        await asyncio.gather(*(self._format(node, cluster_id) for node in self.nodes.values()))
        for node in self.nodes.values():
            self._spawn(node)
        try:
            await self.wait_brokers(set(BROKER_IDS))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill every node (their data is thrown away with ``root``)."""
        for node in self.nodes.values():
            if node.popen is not None and node.popen.poll() is None:
                node.popen.kill()
                node.popen.wait()

    async def kill(self, *broker_ids: int) -> None:
        """SIGKILL these brokers and wait until their processes are gone."""
        for broker_id in broker_ids:
            node = self._broker(broker_id)
            assert node.popen is not None and node.running, f"broker {broker_id} is not running"
            node.popen.send_signal(signal.SIGKILL)
        for broker_id in broker_ids:
            popen = self._broker(broker_id).popen
            assert popen is not None
            await asyncio.to_thread(popen.wait, 10)

    async def restart(self, *broker_ids: int) -> None:
        """Start these (killed) brokers again on their data; wait until they serve."""
        for broker_id in broker_ids:
            node = self._broker(broker_id)
            assert not node.running, f"broker {broker_id} still runs"
            self._spawn(node)
        await self.wait_brokers(self.running_brokers())

    def running_brokers(self) -> set[int]:
        return {b for b in BROKER_IDS if self.nodes[b].running}

    # --- what the cluster looks like --------------------------------------------------------

    async def wait_brokers(self, expected: set[int], timeout: float = START_TIMEOUT) -> None:
        """Wait until exactly ``expected`` are the brokers the cluster serves (registered
        and not fenced); fail fast when one of our JVMs died."""
        deadline = time.monotonic() + timeout
        while True:
            dead = [n.node_id for n in self.nodes.values() if n.popen is not None and not n.running]
            unexpected = [d for d in dead if d in expected or d == CONTROLLER_ID]
            if unexpected:
                node = self.nodes[unexpected[0]]
                raise ClusterError(f"node {node.node_id} exited; log {node.log}:\n{_tail(node)}")
            with contextlib.suppress(Exception):  # not ready yet
                if await self.served_brokers() == expected:
                    return
            if time.monotonic() >= deadline:
                raise ClusterError(f"brokers {sorted(expected)} not served after {timeout:.0f}s")
            await asyncio.sleep(POLL)  # polling the cluster with a deadline

    async def served_brokers(self) -> set[int]:
        """The ids of the brokers the cluster's metadata lists now."""
        async with self.admin() as admin:
            cluster = await admin.describe_cluster()
        return {int(b["node_id"]) for b in cluster["brokers"]}

    async def partitions(self, topics: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Every partition of ``topics`` (all topics by default): topic, partition, leader,
        replicas and in-sync replicas, as the cluster's metadata says now."""
        async with self.admin() as admin:
            described = await admin.describe_topics(None if topics is None else list(topics))
        return [
            {
                "topic": t["topic"],
                "partition": p["partition"],
                "leader": p["leader"],
                "replicas": sorted(p["replicas"]),
                "isr": sorted(p["isr"]),
            }
            for t in described
            for p in t["partitions"]
        ]

    async def wait_healed(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until all three brokers serve and every partition of every topic has all
        its replicas in sync."""
        await self.wait_brokers(set(BROKER_IDS), timeout)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):  # a probe during a change
                lagging = [p for p in await self.partitions() if p["isr"] != p["replicas"]]
                if not lagging:
                    return
            if time.monotonic() >= deadline:
                raise ClusterError(f"partitions not in sync after {timeout:.0f}s: {lagging[:5]}")
            await asyncio.sleep(POLL)  # polling the cluster with a deadline

    async def wait_leaders(self, leader: int, topics: Iterable[str] | None = None) -> None:
        """Wait until ``leader`` leads every partition of ``topics`` (all by default)."""
        deadline = time.monotonic() + START_TIMEOUT
        wanted = None if topics is None else list(topics)
        while True:
            with contextlib.suppress(Exception):
                others = [p for p in await self.partitions(wanted) if p["leader"] != leader]
                if not others:
                    return
            if time.monotonic() >= deadline:
                raise ClusterError(f"broker {leader} does not lead: {others[:5]}")
            await asyncio.sleep(POLL)  # polling the cluster with a deadline

    @contextlib.asynccontextmanager
    async def admin(self) -> Any:
        """A fresh admin client on the brokers running now (a fresh one each time: the
        harness must not depend on the metadata handling under test)."""
        client = AIOKafkaAdminClient(
            bootstrap_servers=self.live_bootstrap(), request_timeout_ms=5000
        )
        await client.start()
        try:
            yield client
        finally:
            await client.close()

    # --- internals ------------------------------------------------------------------------

    def _broker(self, broker_id: int) -> Node:
        assert broker_id in BROKER_IDS, f"{broker_id} is not a broker id"
        return self.nodes[broker_id]

    def _properties(self, node: Node) -> str:
        controller = self.nodes[CONTROLLER_ID]
        common = {
            "node.id": str(node.node_id),
            "controller.quorum.voters": f"{CONTROLLER_ID}@{controller.address}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(node.home / "data"),
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
        }
        if node.is_controller:
            roles = {
                "process.roles": "controller",
                "listeners": f"CONTROLLER://{controller.address}",
                # fence a broker that stopped heartbeating after 3 s (default 9 s)
                "broker.session.timeout.ms": "3000",
            }
        else:
            roles = {
                "process.roles": "broker",
                "listeners": f"PLAINTEXT://{node.address}",
                "advertised.listeners": f"PLAINTEXT://{node.address}",
                "inter.broker.listener.name": "PLAINTEXT",
                "broker.heartbeat.interval.ms": "500",
                "num.partitions": "1",
                "default.replication.factor": "3",
                "min.insync.replicas": "2",
                "offsets.topic.replication.factor": "3",
                "offsets.topic.num.partitions": "3",
                "transaction.state.log.replication.factor": "3",
                "transaction.state.log.min.isr": "2",
                "transaction.state.log.num.partitions": "1",
                "auto.create.topics.enable": "true",
                "delete.topic.enable": "true",
                "unclean.leader.election.enable": "false",
                # leadership stays where failover put it: the tests kill "the broker that
                # leads everything", which a preferred-leader election would move
                "auto.leader.rebalance.enable": "false",
                "group.initial.rebalance.delay.ms": "0",
                "group.min.session.timeout.ms": "1000",
                "num.replica.fetchers": "1",
                "log.cleaner.threads": "1",
                "log.cleaner.dedupe.buffer.size": "16777216",
            }
        lines = [f"{k}={v}" for k, v in {**common, **roles}.items()]
        return "# generated by tests/integration/kafka_cluster.py\n" + "\n".join(lines) + "\n"

    def _java(self, node: Node, main_class: str, *args: str) -> list[str]:
        heap = "-Xmx256m" if node.is_controller else "-Xmx384m"
        return [
            "java", "-Xms64m", heap, "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-Xss512k", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{KAFKA_LOG4J}", "-cp", f"{self.jars}/*",
            main_class, *args,
        ]  # fmt: skip

    async def _format(self, node: Node, cluster_id: str) -> None:
        cmd = self._java(
            node, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(node.properties)
        )
        await run(cmd, what=f"StorageTool format of node {node.node_id}", limit=120, cwd=node.home)

    def _spawn(self, node: Node) -> None:
        with node.log.open("ab") as out:
            node.popen = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self._java(node, "kafka.Kafka", str(node.properties)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=node.home,
                preexec_fn=_die_with_parent,  # the JVMs die with the test process
            )


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills this JVM when the test process dies, so
    an interrupted run leaves no broker behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)


def _tail(node: Node, lines: int = 30) -> str:
    try:
        return "\n".join(node.log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {node.log}: {exc.strerror})"


def remove(root: Path) -> None:
    """Delete the cluster's directory."""
    shutil.rmtree(root, ignore_errors=True)
