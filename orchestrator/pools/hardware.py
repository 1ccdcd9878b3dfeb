"""What the local host has: GPUs through NVML, RAM and CPU through psutil.

Each source sits behind a small Protocol with one real implementation here; tests
use fakes. Without a GPU or a driver, NVML reports nothing and the local pool uses
the GPUs declared in the config, marked measured=false.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import psutil

from orchestrator.domain.context import HostReading
from orchestrator.support.log import get_logger

log = get_logger("hardware")


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    name: str
    compute_capability: str
    memory_total: int
    memory_used: int
    memory_free: int
    utilization_percent: float
    temperature_celsius: float
    power_watts: float


class GpuProbe(Protocol):
    def available(self) -> bool:
        """Whether GPUs can be measured at all (decided once, at start)."""

    def read(self) -> list[GpuReading]: ...


class HostProbe(Protocol):
    def read(self) -> HostReading: ...


class NvmlProbe:
    """GPUs through pynvml. Never raises: no driver means no GPUs, said once in the log."""

    def __init__(self) -> None:
        self._nvml = None
        self.reason = ""
        try:
            import pynvml  # noqa: PLC0415 - the import itself may fail without a driver

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
            self.reason = f"{type(exc).__name__}: {exc}"

    def available(self) -> bool:
        return self._nvml is not None

    def read(self) -> list[GpuReading]:
        nvml = self._nvml
        if nvml is None:
            return []
        readings = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                temperature = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                try:
                    power = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # milliwatts
                except nvml.NVMLError:
                    power = 0.0  # not every board reports power
                readings.append(
                    GpuReading(
                        index=index,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        compute_capability=f"{major}.{minor}",
                        memory_total=int(memory.total),
                        memory_used=int(memory.used),
                        memory_free=int(memory.free),
                        utilization_percent=float(util.gpu),
                        temperature_celsius=float(temperature),
                        power_watts=power,
                    )
                )
        except nvml.NVMLError as exc:
            log.warning("hardware.nvml_read_failed", error=str(exc))
            return []
        return readings


class PsutilProbe:
    def read(self) -> HostReading:
        memory = psutil.virtual_memory()
        return HostReading(
            ram_total=int(memory.total),
            ram_available=int(memory.available),
            cpu_percent=float(psutil.cpu_percent(interval=None)),
            cpu_count=psutil.cpu_count() or 1,
        )
