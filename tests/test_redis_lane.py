"""Lean Redis connections (``queue/redis_lane.py``) against a real redis-server over TLS
with its ACL users: pipelining, errors, a Redis that dies or freezes, and the brokers' hot
path (queue, take, answer, read the answer) going through them."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis
from pydantic import SecretStr

from ppml_serve.queue.contract import Reply
from ppml_serve.queue.redis_common import Keys, connect, connect_async
from ppml_serve.queue.redis_gateway import RedisGatewayBroker
from ppml_serve.queue.redis_lane import BlockingRedisLane, RedisLane
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


def test_many_tasks_share_one_pipelined_tls_connection(server: ManagedRedis,
                                                       admin: redis.Redis) -> None:
    async def scenario() -> None:
        lane, reader = RedisLane(server.url, server.ca_file), RedisLane(server.url,
                                                                        server.ca_file)
        try:
            ids = await asyncio.gather(*(
                lane.call("XADD", "ppml:{lane}:s", "*", "n", index, "body", os.urandom(300))
                for index in range(300)))
            assert len(set(ids)) == 300
            assert await lane.call("XLEN", "ppml:{lane}:s") == 300
            entries = await reader.call("XREAD", "COUNT", 1000, "STREAMS", "ppml:{lane}:s",
                                        "0-0")
            [(key, rows)] = entries
            assert key == b"ppml:{lane}:s"
            assert [int(fields[1]) for _, fields in rows] == list(range(300)), "in order"
            # a blocking read on its own lane does not hold up the shared one
            waiting = asyncio.ensure_future(reader.call(
                "XREAD", "BLOCK", 2000, "STREAMS", "ppml:{lane}:s", ids[-1], block_s=2))
            await asyncio.sleep(0.1)
            assert await lane.call("PING") == b"PONG"
            new_id = await lane.call("XADD", "ppml:{lane}:s", "*", "n", "last")
            [(_, [(entry_id, fields)])] = await asyncio.wait_for(waiting, 2)
            assert entry_id == new_id and fields == [b"n", b"last"]
        finally:
            await lane.close()
            await reader.close()

    asyncio.run(scenario())
    admin.delete("ppml:{lane}:s")


def test_command_errors_are_redis_errors_and_keep_the_connection(
        server: ManagedRedis, admin: redis.Redis) -> None:
    admin.set("ppml:{lane}:text", "x")

    async def scenario() -> None:
        lane = RedisLane(server.url, server.ca_file)
        failing = asyncio.ensure_future(lane.call("XLEN", "ppml:{lane}:text"))
        following = asyncio.ensure_future(lane.call("GET", "ppml:{lane}:text"))
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            await failing
        assert await following == b"x", "the next pipelined command still gets its reply"
        with pytest.raises(redis.ResponseError, match="NOPERM"):
            await lane.call("FLUSHALL")  # the service user's ACL holds
        assert await lane.call("GET", "ppml:{lane}:text") == b"x"
        await lane.close()

    asyncio.run(scenario())
    blocking = BlockingRedisLane(server.url, server.ca_file)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        blocking.call("XLEN", "ppml:{lane}:text")
    assert blocking.call("GET", "ppml:{lane}:text") == b"x"
    blocking.close()


def test_a_wrong_password_is_refused_without_being_shown(server: ManagedRedis) -> None:
    wrong = _wrong_password(server.url)
    with pytest.raises(redis.ResponseError, match="WRONGPASS") as caught:
        BlockingRedisLane(wrong, server.ca_file).call("PING")
    assert "not-the-password" not in str(caught.value)
    lane = RedisLane(wrong, server.ca_file)
    assert "not-the-password" not in repr(lane) and "@" not in repr(lane)

    async def scenario() -> None:
        with pytest.raises(redis.ResponseError, match="WRONGPASS"):
            await lane.call("PING")

    asyncio.run(scenario())


def test_unix_socket_and_tls_reach_the_same_redis(server: ManagedRedis) -> None:
    assert server.socket_url is not None
    over_tls = BlockingRedisLane(server.url, server.ca_file)
    over_socket = BlockingRedisLane(server.socket_url, None)
    over_tls.call("SET", "ppml:{lane}:where", "both")
    assert over_socket.call("GET", "ppml:{lane}:where") == b"both"
    over_tls.close()
    over_socket.close()


def test_lanes_fail_fast_while_redis_is_down_and_reconnect_after(
        server: ManagedRedis) -> None:
    blocking = BlockingRedisLane(server.url, server.ca_file)

    async def scenario() -> None:
        lane = RedisLane(server.url, server.ca_file)
        assert await lane.call("PING") == b"PONG"
        assert blocking.call("PING") == b"PONG"
        waiting = asyncio.ensure_future(lane.call("BLPOP", "ppml:{lane}:never", 5,
                                                  block_s=5))
        await asyncio.sleep(0.1)
        server.stop()
        with pytest.raises(redis.ConnectionError):
            await asyncio.wait_for(waiting, 2)
        with pytest.raises(redis.ConnectionError, match="cannot reach Redis"):
            await lane.call("PING")
        with pytest.raises(redis.ConnectionError):
            blocking.call("PING")
        server.start()
        assert await lane.call("PING") == b"PONG"
        assert blocking.call("PING") == b"PONG"
        await lane.close()

    asyncio.run(scenario())
    blocking.close()


def test_a_frozen_redis_is_a_timeout_not_a_hang(server: ManagedRedis) -> None:
    assert server.process is not None
    blocking = BlockingRedisLane(server.url, server.ca_file, timeout_s=0.5)

    async def scenario() -> None:
        lane = RedisLane(server.url, server.ca_file, timeout_s=0.5)
        assert await lane.call("PING") == b"PONG"
        assert blocking.call("PING") == b"PONG"
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                await asyncio.wait_for(lane.call("PING"), 5)
            with pytest.raises(redis.TimeoutError):
                blocking.call("PING")
            assert time.monotonic() - started < 4
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert await lane.call("PING") == b"PONG"
        assert blocking.call("PING") == b"PONG"
        await lane.close()

    asyncio.run(scenario())
    blocking.close()


def test_request_taken_answered_and_read_through_lanes(server: ManagedRedis,
                                                       admin: redis.Redis) -> None:
    """The brokers' per-request commands over lanes, including posting answers after Redis
    forgot the answering script (a restart does that): EVAL takes over from EVALSHA."""
    keys = Keys("ppml")
    worker = RedisWorkerBroker(connect(server.url, server.ca_file), keys, "lanes", "w1",
                               lane=BlockingRedisLane(server.url, server.ca_file))
    worker.ensure_group()

    async def scenario() -> None:
        gateway = RedisGatewayBroker(
            connect_async(server.url, server.ca_file), connect_async(server.url,
                                                                     server.ca_file),
            keys, "g1", lanes=lambda: RedisLane(server.url, server.ca_file))
        try:
            for round_ in range(2):
                bodies = [os.urandom(100 + index) for index in range(5)]
                await asyncio.gather(*(
                    gateway.enqueue("lanes", f"r{round_}-{index}", body, 2**40)
                    for index, body in enumerate(bodies)))
                taken = worker.read(count=10, block_ms=1000)
                assert [d.body for d in taken] == bodies
                assert all(d.reply_to == gateway.reply_stream("lanes") for d in taken)
                if round_:
                    admin.script_flush()
                assert worker.finish([Reply(d, True, d.body[::-1], len(taken), 0.001, 0.002)
                                      for d in taken]) == 5
                messages = await gateway.read_replies("lanes", block_ms=1000)
                assert {m.request_id: m.body for m in messages} == {
                    f"r{round_}-{i}": body[::-1] for i, body in enumerate(bodies)}
                assert all(m.ok and m.batch_size == 5 for m in messages)
                assert messages[0].engine_s == pytest.approx(0.002)
            assert admin.xlen(keys.requests("lanes")) == 0, "acked and deleted"
        finally:
            await gateway.close()

    asyncio.run(scenario())
