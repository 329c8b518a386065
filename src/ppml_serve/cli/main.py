"""The ``ppml-serve`` command."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from ppml_serve import __version__
from ppml_serve.errors import PPMLError
from ppml_serve.settings import Settings, load_settings

DESCRIPTION = """Privacy-preserving model serving: an HTTPS gateway (KServe v2), an encrypted
Redis Streams queue and inference workers. Start with 'ppml-serve up'."""


def _model_pair(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings file")
    parser.add_argument("--state-dir", type=Path,
                        help="dev CA, keys, managed Redis data (default ./.ppml-serve)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _redis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url-file", type=Path,
                        help="file holding the rediss:// URL (or set PPML_REDIS__URL)")
    parser.add_argument("--redis-ca", type=Path, help="CA bundle for the Redis certificate")


def _worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-batch-size", type=int, help="most requests per engine call")
    parser.add_argument("--max-batch-delay-ms", type=float,
                        help="longest wait for a batch to fill")
    parser.add_argument("--threads", type=int, help="engine threads (0 = all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppml-serve", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"ppml-serve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run everything on this machine (embedded default)",
                             description="Create the state directory if needed (dev CA, API "
                             "key, local KMS), start a managed TLS Redis, workers and the HTTPS "
                             "gateway serving the demo model; Ctrl-C stops them all.")
    _common(up)
    up.add_argument("--host", help="gateway interface (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="gateway port (default 8443; 0 = any free port)")
    up.add_argument("--workers", type=int, default=1, help="worker processes per model")
    up.add_argument("--model", action="append", type=_model_pair, default=[],
                    metavar="NAME=PATH", help="also serve this ONNX model (repeatable)")
    up.add_argument("--no-demo", action="store_true", help="do not serve the demo model")
    _worker_options(up)

    gateway = commands.add_parser("gateway", help="run the HTTPS gateway against a Redis URL")
    _common(gateway)
    _redis_options(gateway)
    gateway.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port (default 8443)")

    worker = commands.add_parser("worker", help="run one inference worker against a Redis URL")
    _common(worker)
    _redis_options(worker)
    worker.add_argument("--model", type=_model_pair, required=True, metavar="NAME=PATH",
                        help="model to serve")
    _worker_options(worker)

    redis = commands.add_parser("redis", help="run a managed TLS redis-server in the foreground",
                                description="Writes STATE_DIR/redis.url (0600) for gateways "
                                "and workers; Ctrl-C stops it.")
    _common(redis)
    redis.add_argument("--port", type=int, default=6380, help="TLS port (default 6380)")

    init = commands.add_parser("init", help="create the state directory without starting")
    _common(init)

    keys = commands.add_parser("keys", help="API keys and data keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = key_commands.add_parser("add-api-key", help="create an API key; prints it once")
    _common(add)
    add.add_argument("--name", required=True, help="who the key is for")
    add.add_argument("--models", nargs="+", default=["*"], help="models it may use (* = all)")
    rotate = key_commands.add_parser("rotate", help="new active data key; old ones still open")
    _common(rotate)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {"gateway": {}, "worker": {}, "redis": {}}
    if args.state_dir is not None:
        values["state_dir"] = args.state_dir
    for flag, section, name in [
        ("host", "gateway", "host"), ("port", "gateway", "port"),
        ("max_batch_size", "worker", "max_batch_size"),
        ("max_batch_delay_ms", "worker", "max_batch_delay_ms"),
        ("threads", "worker", "engine_threads"),
        ("redis_url_file", "redis", "url_file"), ("redis_ca", "redis", "ca_file"),
    ]:
        value = getattr(args, flag, None)
        if value is not None:
            sections[section][name] = value
    for section, items in sections.items():
        if items:
            values[section] = items
    return values


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = _overrides(args)
    base = load_settings(args.config, **overrides)
    if not extra:
        return base
    return load_settings(args.config, **overrides, **extra)


def _stop_on_signals(stop: Any) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop())


def run(args: argparse.Namespace) -> int:
    from ppml_serve.cli.supervisor import exit_when_orphaned

    if args.command == "up":
        from ppml_serve.cli.supervisor import run_up
        from ppml_serve.models import DEMO_NAME, demo_model_path

        base = _settings(args)
        models = {} if args.no_demo else {DEMO_NAME: demo_model_path()}
        models.update(base.models)
        models.update(dict(args.model))
        return run_up(_settings(args, models=models), args.workers, args.config)

    if args.command == "init":
        from ppml_serve.cli.state import prepare_state

        settings = _settings(args)
        prepare_state(settings)
        print(f"state directory ready: {settings.state_dir}")
        return 0

    if args.command == "gateway":
        from ppml_serve.gateway.server import build_gateway

        exit_when_orphaned()
        server = build_gateway(_settings(args))
        server.run()
        return 0

    if args.command == "worker":
        from ppml_serve.worker.runner import build_worker

        exit_when_orphaned()
        name, path = args.model
        worker = build_worker(_settings(args), name, path)
        _stop_on_signals(worker.stop)
        worker.run()
        return 0

    if args.command == "redis":
        import threading

        from ppml_serve.cli.state import prepare_state
        from ppml_serve.crypto.kms.local import write_private
        from ppml_serve.queue.redis_server import ManagedRedis

        settings = _settings(args)
        prepare_state(settings)
        redis = ManagedRedis(settings.state_dir / "redis", args.port, settings.server_cert_file,
                             settings.server_key_file, settings.ca_file, settings.redis.prefix)
        stopped = threading.Event()
        _stop_on_signals(stopped.set)
        redis.start()
        write_private(settings.redis_url_file, redis.url.get_secret_value().encode() + b"\n")
        print(f"redis ready on 127.0.0.1:{args.port} (TLS); URL in {settings.redis_url_file}",
              flush=True)
        try:
            while not stopped.wait(0.5):
                if redis.process is not None and redis.process.poll() is not None:
                    print("error: redis-server exited", file=sys.stderr)
                    return 1
        finally:
            redis.stop()
        return 0

    if args.command == "keys":
        settings = _settings(args)
        if args.keys_command == "add-api-key":
            from ppml_serve.gateway.auth import add_api_key

            token = add_api_key(settings.api_keys_file, args.name, args.models)
            print(token)
            print(f"stored its hash in {settings.api_keys_file}; the key is not kept anywhere",
                  file=sys.stderr)
            return 0
        from ppml_serve.crypto.kms.local import LocalKMS

        key_id = LocalKMS(settings.kms_dir).rotate()
        print(f"active data key is now {key_id}; restart gateways and workers to use it")
        return 0
    raise AssertionError(args.command)  # argparse rejects unknown commands


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        code = run(args)
    except PPMLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
