"""``ppml-serve up``: the local stack in the foreground, stopped together on Ctrl-C/SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from ppml_serve.client import Client, ClientError
from ppml_serve.errors import NotReady
from ppml_serve.local_stack import LocalStack
from ppml_serve.models import DEMO_NAME, demo_samples
from ppml_serve.settings import Settings
from ppml_serve.state import read_api_key


def self_check(url: str, settings: Settings) -> str:
    images, labels = demo_samples()
    with Client(url, api_key=read_api_key(settings.state_dir), ca_file=settings.ca_file) as client:
        probabilities = client.infer(DEMO_NAME, images[:8])["probabilities"]
    predicted = probabilities.argmax(axis=1)
    correct = int((predicted == labels[:8]).sum())
    return (f"self-check: model 'demo' classified 8 held-out digits {predicted.tolist()}, "
            f"{correct}/8 correct")


def run_up(settings: Settings, workers: int, log_level: str,
           worker_metrics_port: int | None = None) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stack = LocalStack(settings, workers, log_level, worker_metrics_port=worker_metrics_port)
    state = settings.state_dir
    code = 0
    try:
        stack.start()
        grpc_scheme = "grpc" if settings.gateway.plaintext_http else "grpcs"
        print(f"ready {stack.url} {grpc_scheme}://{stack.grpc_address}", flush=True)
        for address in stack.worker_metrics:
            print(f"worker metrics: {address}", flush=True)
        for problem in stack.repository_problems():
            print(f"warning: not served: {problem}", file=sys.stderr, flush=True)
        print(f"example: curl --cacert {settings.ca_file} -H \"Authorization: Bearer "
              f"$(cat {state / 'api-key'})\" {stack.url}/v2/models/{DEMO_NAME}", flush=True)
        if DEMO_NAME in settings.models:
            print(self_check(stack.url, settings), flush=True)
        while not stop.wait(0.2):
            stack.supervise()
    except (NotReady, ClientError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        print("stopping", flush=True)
        stack.stop()
        print("stopped", flush=True)
    return code


def exit_when_orphaned() -> None:
    """Children of ``up`` stop if the supervisor disappears (e.g. SIGKILL)."""
    supervisor = os.environ.get("PPML_SUPERVISOR_PID")
    if not supervisor:
        return

    def watch() -> None:
        while os.getppid() == int(supervisor):
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
