"""Several gateway processes on one port (``gateway.processes``): connections spread over
them, and the death of one leaves the others serving."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import numpy as np
import redis

from ppml_serve.client.http import encode_inputs
from ppml_serve.engines import load_engine
from ppml_serve.models import demo_model_path, demo_samples
from ppml_serve.state import read_api_key

from .conftest import running_stack, stack_settings


def test_gateway_processes_share_the_port_and_survive_one_death(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path, gateway={"port": 0, "processes": 2,
                                                 "request_timeout_s": 20})
    images, _ = demo_samples()
    expected = load_engine("demo", demo_model_path().read_bytes()).infer(
        {"image": images[:4]})["probabilities"].argmax(axis=1)
    body, headers = encode_inputs({"image": images[:4]})
    with running_stack(settings, workers=1) as local:
        assert len(local.gateways) == 2 and all(g.alive() for g in local.gateways)
        headers = {**headers, "Authorization": f"Bearer {read_api_key(settings.state_dir)}"}

        def call_on_new_connections(count: int) -> list[int]:
            statuses = []
            for _ in range(count):  # a new connection each: the kernel picks a process
                with httpx.Client(base_url=local.url, verify=str(settings.ca_file),
                                  timeout=20) as http:
                    response = http.post("/v2/models/demo/infer", content=body,
                                         headers=headers)
                statuses.append(response.status_code)
                if response.status_code == 200:
                    header = int(response.headers["Inference-Header-Content-Length"])
                    scores = np.frombuffer(response.content[header:], np.float32)
                    assert (scores.reshape(4, 10).argmax(axis=1) == expected).all()
            return statuses

        assert call_on_new_connections(30) == [200] * 30
        admin = redis.Redis.from_url(local.redis.admin_url.get_secret_value(),
                                     ssl_ca_certs=str(settings.ca_file),
                                     ssl_cert_reqs="required")
        reply_streams = admin.keys("ppml:{demo}:reply:*")
        # one gateway id per process (its native path's streams end in "n"; a request
        # answered before the front's routes were installed took the app's stream)
        served = {stream.decode().rsplit(":", 1)[1].removesuffix("n") for stream in reply_streams}
        assert len(served) == 2, "both gateway processes must have served"

        victim = local.gateways[1]
        assert victim.process is not None
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        time.sleep(0.2)
        assert call_on_new_connections(20) == [200] * 20, "the other process serves on"
