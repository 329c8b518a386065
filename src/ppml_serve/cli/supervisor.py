"""``ppml-serve up``: the local stack in the foreground, stopped together on Ctrl-C/SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import TextIO

from ppml_serve.client import Client, ClientError
from ppml_serve.errors import NotReady
from ppml_serve.local_stack import LocalStack
from ppml_serve.log_relay import DroppingOutput
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


def _output(stream: TextIO | None, name: str, where_logs_are: str = "") -> DroppingOutput:
    """``up``'s stdout or stderr, never waited for (a closed one: a null device)."""
    try:
        if stream is None:
            raise ValueError("no stream")
        target = os.dup(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not backed by a descriptor
        target = os.open(os.devnull, os.O_WRONLY)
    return DroppingOutput(target, name=name, where_logs_are=where_logs_are)


def _log_to(output: DroppingOutput) -> None:
    """The supervisor's own log lines go through ``output`` too (never blocking its loop)."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setStream(output)


def run_up(settings: Settings, workers: int, log_level: str,
           worker_metrics_port: int | None = None) -> int:
    """Serve until Ctrl-C, SIGTERM or SIGHUP (its terminal closed), then stop everything it
    started, whatever became of its stdout and stderr: output nobody reads (a stopped pipe,
    a closed one) costs printed lines, never requests, and never skips the shutdown."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    state = settings.state_dir
    out = _output(sys.stdout, "stdout")
    err = _output(sys.stderr, "stderr", str(state / "logs"))
    _log_to(err)
    stack = LocalStack(settings, workers, log_level, worker_metrics_port=worker_metrics_port,
                       output=err)
    code = 0

    def say(text: str, to: DroppingOutput = out) -> None:
        to.write(text + "\n")

    try:
        stack.start()
        grpc_scheme = "grpc" if settings.gateway.plaintext_http else "grpcs"
        say(f"ready {stack.url} {grpc_scheme}://{stack.grpc_address}")
        for address in stack.worker_metrics:
            say(f"worker metrics: {address}")
        for problem in stack.repository_problems():
            say(f"warning: not served: {problem}", err)
        say(f"logs: {stack.log_dir}/")
        say(f"example: curl --cacert {settings.ca_file} -H \"Authorization: Bearer "
            f"$(cat {state / 'api-key'})\" {stack.url}/v2/models/{DEMO_NAME}")
        if DEMO_NAME in settings.models:
            say(self_check(stack.url, settings))
        while not stop.wait(0.2):
            stack.supervise()
    except (NotReady, ClientError) as exc:
        say(f"error: {exc}", err)
        code = 1
    finally:
        say("stopping")
        stack.stop()
        say("stopped")
        out.close()
        err.close()
        if out.broken or err.broken:
            # Nothing more can be shown; the interpreter's own flush at exit must not fail.
            devnull = os.open(os.devnull, os.O_WRONLY)
            for descriptor in (1, 2):
                os.dup2(devnull, descriptor)
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
