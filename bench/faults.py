"""Fault table: run each fault against a supervised local stack at a steady load.

    python bench/faults.py --workers 2 --concurrency 16 --after 10 --out bench/results
    sudo python bench/faults.py --small-volume 64 --faults state-disk-full,redis-stall
    python bench/faults.py --faults up-output-stalled,up-stdout-closed,up-kill-9

``state-disk-full`` fills the state directory's volume to the last byte, so it runs only with
``--small-volume MiB`` (the state directory on a tmpfs of that size; mounting needs root).
The ``up-*`` faults start ``ppml-serve up`` itself (a fresh state directory each) and break
its output or kill it; their rows count requests sent before and after the fault.

Writes faults.json and faults.md (sent / ok / errors by status / refused / lost / wrong /
seconds to recovery per fault). Every part runs on this machine, as under ``ppml-serve up``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from ppml_serve.bench.faults import (
    FAULTS,
    FaultReport,
    Supervisor,
    markdown_table,
    run_fault,
    wait_ready,
)
from ppml_serve.bench.up_faults import UP_FAULTS, run_up_fault
from ppml_serve.local_stack import LocalStack
from ppml_serve.models import DEMO_NAME, demo_model_path
from ppml_serve.settings import load_settings


@contextlib.contextmanager
def _volume(directory: Path, size_mib: int | None) -> Iterator[Path]:
    """``directory`` itself, or a tmpfs of ``size_mib`` mounted on it (unmounted after)."""
    if size_mib is None:
        yield directory
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs",
                    str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def _stack_faults(args: argparse.Namespace, faults: list[str]) -> list[FaultReport]:
    """Each fault in turn against one supervised stack (``up``'s parts, in-process supervisor)."""
    reports: list[FaultReport] = []
    with tempfile.TemporaryDirectory(prefix="ppml-faults-") as state, \
            _volume(Path(state), args.small_volume) as volume:
        settings = load_settings(state_dir=volume / "state",
                                 models={DEMO_NAME: demo_model_path()}, gateway={"port": 0},
                                 redis={"min_free_disk_mb": 8, "aof_rewrite_min_mb": 4}
                                 if args.small_volume else {})
        stack = LocalStack(settings, workers=args.workers, log_level="ERROR")
        try:
            stack.start()
            with Supervisor(stack) as supervisor:
                for fault in tqdm(faults, unit="fault", file=sys.stderr):
                    reports.append(run_fault(stack, fault, args.concurrency, args.before,
                                             args.after, args.freeze))
                    if not wait_ready(stack, 60):
                        print(f"error: the stack did not recover after {fault}",
                              file=sys.stderr)
                        break
            if supervisor.error is not None:
                print(f"error: {supervisor.error}", file=sys.stderr)
        finally:
            stack.stop()
    return reports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    everyday = [fault for fault in FAULTS if fault != "state-disk-full"]
    parser.add_argument("--faults", default=",".join(everyday),
                        help=f"comma list of faults, of {', '.join(FAULTS + UP_FAULTS)}")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=16, help="steady clients")
    parser.add_argument("--before", type=float, default=3.0, help="seconds of load before")
    parser.add_argument("--after", type=float, default=10.0,
                        help="seconds of load after recovery")
    parser.add_argument("--freeze", type=float, default=5.0, help="seconds a worker is frozen")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--small-volume", type=int, metavar="MIB",
                        help="put the state directory on a tmpfs of this size (root only)")
    args = parser.parse_args()
    faults = [fault.strip() for fault in args.faults.split(",") if fault.strip()]
    unknown = sorted(set(faults) - set(FAULTS) - set(UP_FAULTS))
    if unknown:
        parser.error(f"unknown fault(s) {unknown}; choose from "
                     f"{', '.join(FAULTS + UP_FAULTS)}")
    if "state-disk-full" in faults and args.small_volume is None:
        parser.error("state-disk-full needs --small-volume MIB (it fills the whole volume)")
    args.out.mkdir(parents=True, exist_ok=True)
    stack_faults = [fault for fault in faults if fault in FAULTS]
    reports = _stack_faults(args, stack_faults) if stack_faults else []
    for fault in (fault for fault in faults if fault in UP_FAULTS):
        with tempfile.TemporaryDirectory(prefix="ppml-up-fault-") as directory:
            run = run_up_fault(fault, Path(directory))
        if run.exit_code != 0 or run.left_running:
            print(f"error: after {fault}, 'up' exited with {run.exit_code} and left "
                  f"{run.left_running} running", file=sys.stderr)
        reports.append(run.report)
    table = markdown_table(reports)
    (args.out / "faults.json").write_text(
        json.dumps([report.as_json() for report in reports], indent=2) + "\n")
    (args.out / "faults.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
