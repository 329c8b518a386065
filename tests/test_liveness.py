"""Liveness across a Redis stall, on injected clocks: a stall ends with a grace period in
which the workers that were alive when it began still count; a dead one does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppml_serve.queue.liveness import StallWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _watch() -> tuple[StallWatch, Clock]:
    clock = Clock()
    return StallWatch(clock=clock, wall=clock), clock


def test_without_a_stall_a_heartbeat_older_than_max_age_is_dead() -> None:
    watch, clock = _watch()
    watch.answered(0.001)
    assert watch.live_since(3.0) == clock.now - 3.0


def test_after_a_stall_the_workers_alive_when_it_began_get_time_to_beat_again() -> None:
    watch, clock = _watch()
    last_beat = clock.now - 0.9  # a healthy worker beat just before Redis froze
    clock.now += 5.0  # a command sent at the freeze is answered 5 s late
    watch.answered(5.0)
    assert last_beat >= watch.live_since(3.0)
    clock.now += 2.9  # still inside the grace period
    assert last_beat >= watch.live_since(3.0)
    clock.now += 0.2  # grace over: it had every chance to beat again
    assert last_beat < watch.live_since(3.0)


def test_a_worker_dead_before_the_stall_stays_dead() -> None:
    watch, clock = _watch()
    died = clock.now - 4.0
    clock.now += 5.0
    watch.answered(5.0)
    assert died < watch.live_since(3.0)


def test_while_redis_does_not_answer_the_stall_is_open_from_its_first_timeout() -> None:
    watch, clock = _watch()
    last_beat = clock.now - 0.5
    clock.now += 1.0
    watch.unanswered(1.0)  # a command deadline expired
    clock.now += 10.0
    watch.unanswered(1.0)  # and again, much later: the stall began at the first
    assert last_beat >= watch.live_since(3.0)
    watch.answered(0.001)  # back
    clock.now += 3.1
    assert last_beat < watch.live_since(3.0)


def test_small_delays_are_not_stalls() -> None:
    watch, clock = _watch()
    watch.answered(0.2)
    assert watch.live_since(3.0) == clock.now - 3.0


def test_the_worker_readiness_endpoint_follows_its_check() -> None:
    """``/ready`` on the metrics port: 200 while the host's check holds, 503 with a reason
    otherwise; ``/metrics`` unchanged beside it."""
    import httpx

    from ppml_serve.queue.redis_server import free_port
    from ppml_serve.worker.metrics import WorkerMetrics

    state = {"ready": False}
    port = free_port()
    server = WorkerMetrics().serve(port, "127.0.0.1", lambda: state["ready"])
    try:
        base = f"http://127.0.0.1:{port}"
        refused = httpx.get(f"{base}/ready", timeout=5)
        assert refused.status_code == 503 and "not ready" in refused.text
        state["ready"] = True
        assert httpx.get(f"{base}/ready", timeout=5).status_code == 200
        assert "ppml_build_info" in httpx.get(f"{base}/metrics", timeout=5).text
    finally:
        server.shutdown()
        server.server_close()


def test_worker_metrics_behind_tls_and_the_metrics_scope(tmp_path: Path) -> None:
    """``worker.metrics_tls`` and ``metrics_auth``: HTTPS with the host's certificate, and
    the gateway's rule for /metrics (a key with the metrics scope); /ready stays open."""
    import httpx

    from ppml_serve.crypto.tls import ensure_dev_pki, server_context
    from ppml_serve.gateway.auth import add_api_key, metrics_authorizer
    from ppml_serve.queue.redis_server import free_port
    from ppml_serve.worker.metrics import WorkerMetrics

    pki = ensure_dev_pki(tmp_path)
    keys = tmp_path / "api-keys.json"
    scraper = add_api_key(keys, "prometheus", ["*"], ("metrics",))
    client = add_api_key(keys, "client", ["*"], ("infer",))
    port = free_port()
    server = WorkerMetrics().serve(port, "127.0.0.1", lambda: True,
                                   server_context(pki.cert_file, pki.key_file),
                                   metrics_authorizer(keys))
    base = f"https://127.0.0.1:{port}"
    try:
        with httpx.Client(verify=str(pki.ca_file), timeout=5) as https:
            assert https.get(f"{base}/metrics").status_code == 401
            bad = https.get(f"{base}/metrics", headers={"Authorization": f"Bearer {client}"})
            assert bad.status_code == 403 and "metrics" in bad.text
            good = https.get(f"{base}/metrics", headers={"Authorization": f"Bearer {scraper}"})
            assert good.status_code == 200 and "ppml_build_info" in good.text
            assert https.get(f"{base}/ready").status_code == 200
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on a TLS port
            httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
