"""The embedded Tansu broker and redis-server start, answer, stop and restart."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from fogline.daemon.embedded import (
    EmbeddedError,
    EmbeddedKafka,
    EmbeddedRedis,
    free_port,
    redis_ping,
    redis_server_binary,
    tansu_binary,
    tcp_open,
)
from fogline.daemon.stream.source import create_topic, list_topics, wait_for_broker


def _send_redis(port: int, *parts: bytes) -> bytes:
    cmd = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(cmd)
        return s.recv(256)


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie still answers kill(0); look at its state
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_binaries_are_found() -> None:
    assert os.access(tansu_binary(), os.X_OK)
    assert os.access(redis_server_binary(), os.X_OK)


def test_redis_starts_stops_and_restarts_on_the_same_port() -> None:
    with EmbeddedRedis() as server:
        port = server.port
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert redis_ping("127.0.0.1", port)
        assert _send_redis(port, b"SET", b"k", b"v").startswith(b"+OK")
        server.stop()
        assert not server.running
        assert not redis_ping("127.0.0.1", port)
        server.start()
        assert server.port == port and redis_ping("127.0.0.1", port)
        # no persistence: the restarted server is empty
        assert _send_redis(port, b"GET", b"k").startswith(b"$-1")
        server.kill()
        assert not server.running
        server.kill()  # idempotent
        server.start()
        assert redis_ping("127.0.0.1", port)
    assert not tcp_open("127.0.0.1", port)


def test_kafka_starts_answers_and_stops() -> None:
    with EmbeddedKafka() as broker:
        host, port = broker.bootstrap_servers.split(":")
        assert host == "127.0.0.1"
        assert wait_for_broker(broker.bootstrap_servers)
        create_topic(broker.bootstrap_servers, "embedded-topic", 2)
        assert "embedded-topic" in list_topics(broker.bootstrap_servers)
        pid = broker.pid
        assert pid is not None
        # own process group: a terminal Ctrl-C reaches only the parent
        assert os.getpgid(pid) == pid != os.getpgrp()
        broker.kill()
        assert _gone(pid)
        assert not tcp_open("127.0.0.1", int(port))


def test_fixed_port_in_use_fails_with_the_log_tail() -> None:
    port = free_port()
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        server = EmbeddedRedis(port=port, startup_timeout_s=5)
        with pytest.raises(EmbeddedError):
            server.start()
        server.close()
        assert not server.running


def test_children_die_with_the_parent() -> None:
    """A parent killed with SIGKILL takes its broker and redis-server along (PDEATHSIG)."""
    script = textwrap.dedent(
        """
        import sys, time
        from fogline.daemon.embedded import EmbeddedKafka, EmbeddedRedis
        k = EmbeddedKafka().start()
        r = EmbeddedRedis().start()
        print(k.pid, r.pid, flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        kafka_pid, redis_pid = (int(v) for v in line.split())
        proc.kill()
        proc.wait(timeout=10)
        assert _gone(kafka_pid)
        assert _gone(redis_pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_session_fixtures_answer(kafka_bootstrap: str, redis_url: str, fresh_topic: str) -> None:
    assert wait_for_broker(kafka_bootstrap)
    assert fresh_topic in list_topics(kafka_bootstrap)
    host_port = redis_url.removeprefix("redis://").split("/")[0]
    host, port = host_port.rsplit(":", 1)
    assert redis_ping(host, int(port))


@pytest.mark.container
def test_testcontainers_services_answer() -> None:
    """With a Docker engine: the containers the session fixtures would use start and answer."""
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.redis import RedisContainer

    with KafkaContainer() as kafka:
        bootstrap = kafka.get_bootstrap_server()
        create_topic(bootstrap, "container-topic", 1)
        assert "container-topic" in list_topics(bootstrap)
    with RedisContainer() as redis:
        host = redis.get_container_host_ip()
        assert redis_ping(host, int(redis.get_exposed_port(redis.port)))
