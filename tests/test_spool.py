"""Payloads beside the queue (``redis.payload_spool``): kept out of Redis, removed once
answered, still answered after a worker froze, refused clearly when missing.

The end-to-end tests run a real stack whose spool takes every payload (min 1 byte); the
fault tests (``test_faults.py``) run theirs the same way.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from ppml_serve.client import Client, ClientError
from ppml_serve.errors import ConfigError
from ppml_serve.local_stack import LocalStack
from ppml_serve.models import demo_samples
from ppml_serve.queue.spool import RESCAN_S, PayloadSpool
from ppml_serve.state import read_api_key

from .conftest import running_stack, stack_settings


def test_spool_round_trip_names_and_sweep(tmp_path: Path) -> None:
    spool = PayloadSpool.configured(tmp_path / "spool")
    assert spool is not None
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    name = spool.put(b"sealed record")
    assert stat.S_IMODE((tmp_path / "spool" / name).stat().st_mode) == 0o600
    assert spool.take(name) == b"sealed record"
    for hostile in ("../spool/" + name, "/etc/passwd", "", name.upper(), name + "x"):
        assert spool.take(hostile) is None, hostile
    old, fresh = spool.put(b"old"), spool.put(b"new")
    long_ago = time.time() - 3600
    os.utime(tmp_path / "spool" / old, (long_ago, long_ago))
    (tmp_path / "spool" / "not-ours").write_bytes(b"kept")
    assert spool.sweep(older_than_s=600) == 1
    assert spool.take(old) is None and spool.take(fresh) == b"new"
    assert (tmp_path / "spool" / "not-ours").exists(), "only names the spool makes are swept"
    spool.release(name)
    spool.release(name)  # twice: already gone is fine
    assert spool.take(name) is None


def _payloads(spool_dir: Path) -> list[str]:
    """The payload files in a spool (not its free/ pool)."""
    return sorted(name for name in os.listdir(spool_dir) if (spool_dir / name).is_file())


def test_a_released_file_is_reused_whole_and_never_shared(tmp_path: Path) -> None:
    spool = PayloadSpool.configured(tmp_path / "spool")
    assert spool is not None
    assert stat.S_IMODE((tmp_path / "spool" / "free").stat().st_mode) == 0o700
    first = spool.put(b"x" * 100_000)
    inode = (tmp_path / "spool" / first).stat().st_ino
    spool.release(first)
    assert spool.take(first) is None and _payloads(tmp_path / "spool") == []
    time.sleep(RESCAN_S)  # the first put found free/ empty: it looks again after this
    second = spool.put(b"short")
    assert (tmp_path / "spool" / second).stat().st_ino == inode  # its pages, reused
    assert spool.take(second) == b"short"  # nothing of the longer payload is left
    assert os.listdir(tmp_path / "spool" / "free") == []
    # a free file another writer claims (or a sweep deletes) after this one listed it
    spool.release(second)
    spool.release(spool.put(b"other"))  # reuses second's file: one free file again...
    spool.release(spool.put(b"and another"))  # ...and a new one: two
    time.sleep(RESCAN_S)
    third = spool.put(b"third")  # lists both free files, claims one
    for name in os.listdir(tmp_path / "spool" / "free"):
        (tmp_path / "spool" / "free" / name).unlink()  # the other is taken meanwhile
    fourth = spool.put(b"fourth")  # its listed name is gone: a new file instead
    assert spool.take(third) == b"third" and spool.take(fourth) == b"fourth"
    assert _payloads(tmp_path / "spool") == sorted([third, fourth])
    assert all(stat.S_IMODE((tmp_path / "spool" / n).stat().st_mode) == 0o600
               for n in (third, fourth))


def test_sweep_trims_idle_free_files_and_dead_writers_leftovers(tmp_path: Path) -> None:
    spool = PayloadSpool.configured(tmp_path / "spool")
    assert spool is not None
    kept = spool.put(b"kept")
    spool.release(spool.put(b"released"))
    (tmp_path / "spool" / f"{'a' * 32}.w").write_bytes(b"half")  # a writer died here
    assert spool.sweep(older_than_s=600) == 0
    assert len(os.listdir(tmp_path / "spool" / "free")) == 1, "not idle long enough yet"
    assert (tmp_path / "spool" / f"{'a' * 32}.w").exists(), "not old enough yet"
    assert spool.sweep(older_than_s=600, free_idle_s=0) == 0
    assert os.listdir(tmp_path / "spool" / "free") == []
    time.sleep(0.05)
    assert spool.sweep(older_than_s=0.01) == 1  # the payload, now stale
    assert not (tmp_path / "spool" / f"{'a' * 32}.w").exists()
    assert spool.take(kept) is None


def test_spool_open_to_others_is_refused(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)  # noqa: S103 - the case under test
    with pytest.raises(ConfigError, match="open to other users"):
        PayloadSpool.configured(tmp_path / "open")
    assert PayloadSpool.configured(None) is None


@pytest.fixture(scope="module")
def spooled(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # a worker is frozen here for a few seconds on purpose: not yet declared dead
    settings = stack_settings(tmp_path_factory.mktemp("spool"),
                              redis={"payload_spool_min_bytes": 1},
                              worker={"heartbeat_s": 3.0,
                                      "max_batch_delay_ms": 5, "engine_threads": 1})
    with running_stack(settings, workers=1) as local:
        yield local


def _client(local: LocalStack) -> Client:
    return Client(local.url, read_api_key(local.settings.state_dir), local.settings.ca_file,
                  timeout_s=30)


def _admin(local: LocalStack) -> redis.Redis:
    return redis.Redis.from_url(local.redis.admin_url.get_secret_value(),
                                ssl_ca_certs=str(local.settings.ca_file),
                                ssl_cert_reqs="required")


def _worker_pid(local: LocalStack) -> int:
    worker = next(c for c in local.children if c.name.startswith("worker"))
    assert worker.process is not None
    return worker.process.pid


def test_payloads_skip_redis_and_are_removed_once_answered(spooled: LocalStack) -> None:
    spool_dir = spooled.settings.state_dir / "spool"
    images, labels = demo_samples()
    with _client(spooled) as client:
        client.infer("demo", images[:1])  # the worker is up and holds its keys
        pid = _worker_pid(spooled)
        with ThreadPoolExecutor(4) as pool:
            os.kill(pid, signal.SIGSTOP)
            try:
                answers = [pool.submit(client.infer, "demo", images[i:i + 2]) for i in range(4)]
                deadline = time.monotonic() + 10
                while len(_payloads(spool_dir)) < 4 and time.monotonic() < deadline:
                    time.sleep(0.05)
                files = _payloads(spool_dir)
                assert len(files) == 4, files
                for name in files:
                    assert stat.S_IMODE((spool_dir / name).stat().st_mode) == 0o600
                entries = _admin(spooled).xrange("ppml:{demo}:req")
                assert len(entries) == 4
                for _, fields in entries:
                    assert b"body" not in fields, "the payload went through Redis"
                    assert fields[b"file"].decode() in files
            finally:
                os.kill(pid, signal.SIGCONT)
            for i, future in enumerate(answers):  # answered once the worker runs again
                probabilities = future.result(timeout=30)["probabilities"]
                assert probabilities.shape == (2, 10)
                assert (probabilities.argmax(axis=1) == labels[i:i + 2]).mean() >= 0.5
    deadline = time.monotonic() + 5
    while _payloads(spool_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _payloads(spool_dir) == [], "answered payloads must be released"
    assert len(os.listdir(spool_dir / "free")) >= 1, "released files are kept for reuse"


def test_a_payload_missing_from_the_spool_is_a_clear_error(spooled: LocalStack) -> None:
    spool_dir = spooled.settings.state_dir / "spool"
    images, _ = demo_samples()
    with _client(spooled) as client:
        client.infer("demo", images[:1])
        pid = _worker_pid(spooled)
        with ThreadPoolExecutor(1) as pool:
            os.kill(pid, signal.SIGSTOP)
            try:
                answer = pool.submit(client.infer, "demo", images[:1])
                deadline = time.monotonic() + 10
                while not _payloads(spool_dir) and time.monotonic() < deadline:
                    time.sleep(0.05)
                for name in _payloads(spool_dir):
                    (spool_dir / name).unlink()  # e.g. a worker on another host
            finally:
                os.kill(pid, signal.SIGCONT)
            with pytest.raises(ClientError) as refused:
                answer.result(timeout=30)
        assert refused.value.status == 500
        assert "payload spool" in str(refused.value)
        # the worker carries on
        assert client.infer("demo", images[:1])["probabilities"].shape == (1, 10)


def test_spool_that_is_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not a directory owned by this user"):
        PayloadSpool.configured(tmp_path / "link")


def test_an_unusable_spool_falls_back_to_redis(spooled: LocalStack) -> None:
    spool_dir = spooled.settings.state_dir / "spool"
    aside = spool_dir.with_name("spool-aside")
    images, labels = demo_samples()
    with _client(spooled) as client:
        spool_dir.rename(aside)
        spool_dir.write_bytes(b"")  # writing a payload now fails (not a directory)
        try:
            probabilities = client.infer("demo", images[:3])["probabilities"]
        finally:
            spool_dir.unlink()
            aside.rename(spool_dir)
        assert probabilities.shape == (3, 10)
        assert (probabilities.argmax(axis=1) == labels[:3]).mean() >= 0.5
        assert client.infer("demo", images[:1])["probabilities"].shape == (1, 10)
