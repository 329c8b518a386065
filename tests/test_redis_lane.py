"""The worker's lean Redis connection (``queue/redis_lane.py``) against a real redis-server
over TLS with its ACL users: errors, a Redis that dies or freezes, and the worker's hot path
(take a batch, post its answers) going through it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis
from pydantic import SecretStr

from ppml_serve.queue.contract import Reply
from ppml_serve.queue.redis_common import Keys, connect
from ppml_serve.queue.redis_lane import BlockingRedisLane
from ppml_serve.queue.redis_server import ManagedRedis, free_port
from ppml_serve.queue.redis_worker import RedisWorkerBroker
from ppml_serve.settings import load_settings
from ppml_serve.state import prepare_state


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedRedis]:
    state = tmp_path_factory.mktemp("lane")
    settings = load_settings(state_dir=state)
    prepare_state(settings)
    managed = ManagedRedis(state / "redis",
                           free_port(), settings.server_cert_file, settings.server_key_file,
                           settings.ca_file, persistence="none", unix_socket=True)
    managed.start()
    yield managed
    managed.stop()


@pytest.fixture()
def admin(server: ManagedRedis) -> redis.Redis:
    if not server.alive():
        server.start()
    return redis.Redis.from_url(server.admin_url.get_secret_value(),
                                ssl_ca_certs=str(server.ca_file))


def _wrong_password(url: SecretStr) -> SecretStr:
    user, _, rest = url.get_secret_value().partition("@")
    return SecretStr(user.rsplit(":", 1)[0] + ":not-the-password@" + rest)


def test_command_errors_are_redis_errors_and_keep_the_connection(
        server: ManagedRedis, admin: redis.Redis) -> None:
    admin.set("ppml:{lane}:text", "x")
    blocking = BlockingRedisLane(server.url, server.ca_file)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        blocking.call("XLEN", "ppml:{lane}:text")
    assert blocking.call("GET", "ppml:{lane}:text") == b"x", "the connection serves on"
    with pytest.raises(redis.ResponseError, match="NOPERM"):
        blocking.call("FLUSHALL")  # the service user's ACL holds
    assert blocking.call("GET", "ppml:{lane}:text") == b"x"
    blocking.close()


def test_a_wrong_password_is_refused_without_being_shown(server: ManagedRedis) -> None:
    wrong = _wrong_password(server.url)
    lane = BlockingRedisLane(wrong, server.ca_file)
    with pytest.raises(redis.ResponseError, match="WRONGPASS") as caught:
        lane.call("PING")
    assert "not-the-password" not in str(caught.value)
    assert "not-the-password" not in repr(lane) and "@" not in repr(lane)


def test_unix_socket_and_tls_reach_the_same_redis(server: ManagedRedis) -> None:
    assert server.socket_url is not None
    over_tls = BlockingRedisLane(server.url, server.ca_file)
    over_socket = BlockingRedisLane(server.socket_url, None)
    over_tls.call("SET", "ppml:{lane}:where", "both")
    assert over_socket.call("GET", "ppml:{lane}:where") == b"both"
    over_tls.close()
    over_socket.close()


def test_a_lane_fails_fast_while_redis_is_down_and_reconnects_after(
        server: ManagedRedis) -> None:
    blocking = BlockingRedisLane(server.url, server.ca_file)
    assert blocking.call("PING") == b"PONG"
    server.stop()
    with pytest.raises(redis.ConnectionError):
        blocking.call("PING")
    server.start()
    assert blocking.call("PING") == b"PONG"
    blocking.close()


def test_a_frozen_redis_is_a_timeout_not_a_hang(server: ManagedRedis) -> None:
    assert server.process is not None
    blocking = BlockingRedisLane(server.url, server.ca_file, timeout_s=0.5)
    assert blocking.call("PING") == b"PONG"
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            blocking.call("PING")
        assert time.monotonic() - started < 4
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert blocking.call("PING") == b"PONG"
    blocking.close()


def test_requests_taken_and_answered_through_the_workers_lane(server: ManagedRedis,
                                                              admin: redis.Redis) -> None:
    """The worker's per-batch commands over its lane, including posting answers after Redis
    forgot the answering script (a restart does that): EVAL takes over from EVALSHA. The
    records are queued as the native front queues them."""
    keys = Keys("ppml")
    worker = RedisWorkerBroker(connect(server.url, server.ca_file), keys, "lanes", "w1",
                               lane=BlockingRedisLane(server.url, server.ca_file))
    worker.ensure_group()
    replies = keys.replies("lanes", "g1")
    last = "0-0"
    for round_ in range(2):
        bodies = [os.urandom(100 + index) for index in range(5)]
        for index, body in enumerate(bodies):
            admin.xadd(keys.requests("lanes"), {"id": f"r{round_}-{index}",
                                                "deadline": str(2**40), "reply": replies,
                                                "body": body})
        taken = worker.read(count=10, block_ms=1000)
        assert [d.body for d in taken] == bodies
        assert all(d.reply_to == replies for d in taken)
        if round_:
            admin.script_flush()
        assert worker.finish([Reply(d, True, d.body[::-1], len(taken), 0.001, 0.002)
                              for d in taken]) == 5
        [(_, entries)] = admin.xread({replies: last}, count=10, block=1000)
        last = entries[-1][0]
        answered = {fields[b"id"].decode(): fields for _, fields in entries}
        assert {rid: fields[b"body"] for rid, fields in answered.items()} == {
            f"r{round_}-{i}": body[::-1] for i, body in enumerate(bodies)}
        assert all(f[b"ok"] == b"1" and f[b"bs"] == b"5" for f in answered.values())
    assert admin.xlen(keys.requests("lanes")) == 0, "acked and deleted"
