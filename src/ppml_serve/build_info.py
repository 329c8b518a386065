"""What every part's metrics carry beside its own: the process's resources (``process_*``:
CPU, memory, file descriptors) and which build and part it is (``ppml_build_info``)."""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Info, ProcessCollector

from ppml_serve import __version__


def register_process_metrics(registry: CollectorRegistry, part: str) -> None:
    """Add ``process_*`` and ``ppml_build_info{version, part, python}`` to ``registry``."""
    ProcessCollector(registry=registry)
    Info("ppml_build", "This part's build", registry=registry).info(
        {"version": __version__, "part": part, "python": platform.python_version()})
