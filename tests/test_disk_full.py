"""The state directory on a small volume, for real: a 64 MiB tmpfs (needs root to mount; CI
runs as root). Its AOF is compacted by itself, and a volume filled to the last byte under
load costs 503s while it is full, loses and corrupts nothing, and heals once space is back."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from ppml_serve.bench.faults import run_fault_detailed, wait_until
from ppml_serve.local_stack import LocalStack
from ppml_serve.state import read_api_key

from .conftest import Stack, stack_settings, supervised_stack


@pytest.fixture(scope="module")
def small_volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mount = tmp_path_factory.mktemp("volume")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mounting a 64 MiB tmpfs needs root ({done.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def on_small_volume(small_volume: Path) -> Iterator[LocalStack]:
    settings = stack_settings(small_volume / "state",
                              gateway={"port": 0, "request_timeout_s": 10},
                              redis={"aof_rewrite_min_mb": 1, "min_free_disk_mb": 8})
    with supervised_stack(settings) as local:
        yield local


def _admin(stack: LocalStack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis.admin_url.get_secret_value(),
                                ssl_ca_certs=str(stack.settings.ca_file))


def _aof_bytes(stack: LocalStack) -> int:
    return sum(path.stat().st_size for path in (stack.redis.directory / "appendonlydir").iterdir())


def test_the_aof_is_compacted_by_itself(on_small_volume: LocalStack) -> None:
    """Finding 5: with Redis's default 64 MB rewrite threshold the AOF alone filled a 64 MB
    volume; the managed Redis now compacts it past redis.aof_rewrite_min_mb."""
    admin = _admin(on_small_volume)
    rewrites = int(admin.info("persistence")["aof_rewrites"])
    # 256 KB written then deleted per step: only the AOF remembers it. Writing stops once the
    # AOF passes the 1 MB threshold, so the rewrite Redis starts on its own compacts all of it
    # (what is written while a rewrite runs stays in the AOF and sets the next threshold).
    for index in range(12):
        admin.set(f"ppml:filler:{index}", os.urandom(256 * 1024))
        admin.delete(f"ppml:filler:{index}")
        if _aof_bytes(on_small_volume) > 1 << 20:
            break
    else:
        pytest.fail(f"3 MB of writes left the AOF at {_aof_bytes(on_small_volume)} bytes")
    assert wait_until(lambda: int(admin.info("persistence")["aof_rewrites"]) > rewrites, 30)
    assert wait_until(lambda: _aof_bytes(on_small_volume) < 1 << 20, 10), \
        _aof_bytes(on_small_volume)


def test_a_full_state_volume_costs_503s_loses_nothing_and_heals(
        on_small_volume: LocalStack) -> None:
    run = run_fault_detailed(on_small_volume, "state-disk-full", freeze_s=3.0, after_s=3.0)
    report = run.report
    assert report.sent > 20 and report.wrong == 0 and report.lost == 0, report
    assert report.without_retry_after == 0 and report.early_504 == 0, report
    assert set(report.errors) <= {"503", "504"}, report
    assert report.errors.get("503", 0) > 0, f"nothing was refused while full: {report}"
    healed = [o for o in run.outcomes if o.status == 200 and o.started > run.over + 3]
    assert healed, f"no request served after space came back: {report}"
    assert report.recovery_s < 10, report
    assert _admin(on_small_volume).info("persistence")["aof_last_write_status"] == "ok"
    # readiness and the gauge say it too
    stack = on_small_volume
    key = read_api_key(stack.settings.state_dir)
    metrics = httpx.get(f"{stack.url}/metrics", verify=str(stack.settings.ca_file),
                        headers={"Authorization": f"Bearer {key}"}, timeout=5).text
    assert f'ppml_state_disk_free_bytes{{path="{stack.settings.state_dir}"}}' in metrics


def test_below_the_floor_the_gateway_is_not_ready(on_small_volume: LocalStack) -> None:
    stack = on_small_volume
    status = os.statvfs(stack.settings.state_dir)
    room = status.f_bavail * status.f_frsize - (4 << 20)  # leave 4 MiB: under the 8 MiB floor
    filler = stack.settings.state_dir / "floor-filler"
    key = read_api_key(stack.settings.state_dir)
    ca = str(stack.settings.ca_file)

    def ready() -> int:
        return httpx.get(f"{stack.url}/v2/health/ready", verify=ca, timeout=5,
                         headers={"Authorization": f"Bearer {key}"}).status_code

    try:
        with filler.open("wb") as handle:
            handle.truncate(0)
            os.posix_fallocate(handle.fileno(), 0, room)
        assert wait_until(lambda: ready() == 503, 5)
        body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8],
                            "data": [0] * 64}]}
        def infer() -> httpx.Response:
            return httpx.post(f"{stack.url}/v2/models/demo/infer", json=body, verify=ca,
                              headers={"Authorization": f"Bearer {key}"}, timeout=5)

        # the native front takes the change with its next routes (every 0.1 s): within a
        # moment of readiness, inference is refused too
        assert wait_until(lambda: infer().status_code == 503, 2)
        before = Stack(stack).native_answers()
        refused = infer()
        assert refused.status_code == 503 and "min_free_disk_mb" in refused.text
        assert refused.headers.get("retry-after")
        assert Stack(stack).native_answers() == before + 1  # refused by the front itself
    finally:
        filler.unlink(missing_ok=True)
    assert wait_until(lambda: ready() == 200, 10)
