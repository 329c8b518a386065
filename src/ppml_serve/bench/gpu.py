"""GPU utilisation while a benchmark runs, read through NVML (``nvidia-ml-py``, present on
GPU machines with the driver); ``None`` where there is no NVIDIA GPU to read."""

from __future__ import annotations

import threading
from typing import Any


class GpuSampler:
    """Samples one GPU's utilisation every ``interval_s`` between ``start`` and ``stop``."""

    def __init__(self, device_index: int = 0, interval_s: float = 0.2) -> None:
        self._index = device_index
        self._interval_s = interval_s
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None

    def start(self) -> GpuSampler:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self._index)
        except Exception:  # no NVML, no driver, no such GPU: nothing to report
            return self
        self._nvml = pynvml

        def sample() -> None:
            while not self._stop.wait(self._interval_s):
                self._samples.append(int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

        self._thread = threading.Thread(target=sample, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float | None:
        """Mean utilisation in percent over the samples, or ``None`` without a GPU."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._nvml.nvmlShutdown()
        return round(sum(self._samples) / len(self._samples), 1) if self._samples else None


def cores_per_1000_rps(cpu_ms_per_request: dict[str, float]) -> float | None:
    """Host cores the pipeline needs per 1,000 requests/s: its CPU milliseconds per request,
    every part together (1 ms of CPU per request at 1,000 req/s keeps one core busy)."""
    from ppml_serve.bench.cpu import PARTS

    if not cpu_ms_per_request:
        return None
    return round(sum(cpu_ms_per_request.get(part, 0.0) for part in PARTS), 3)
