"""What this machine can run studies on: its NVIDIA GPUs (through NVML) and its CPUs (through psutil).

Read by the app every few seconds, so every function here is quick and never raises: a machine
without GPUs, without nvidia-ml-py or without a driver is a normal answer (an empty list and the
reason), not an error. Nothing here imports torch: NVML answers in milliseconds, where
`torch.cuda` costs seconds to import and initialise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

MIB = 1024 * 1024


@dataclass(frozen=True)
class DeviceReport:
    gpus: list[dict]  # one dict per GPU: index, name, memory_used/total/free_mib, utilization_pct
    gpu_note: str | None  # why the list is empty (None when GPUs were read)
    cpu: dict = field(default_factory=dict)  # logical_cores, load_1/5/15, percent


def gpus() -> tuple[list[dict], str | None]:
    """The GPUs NVML sees, or ([], why there are none). NVML indices are physical ones; a
    CUDA_VISIBLE_DEVICES that reorders them also reorders torch's `cuda:N`."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no usable driver
        return [], f"no NVIDIA driver: {_one_line(e)}"
    try:
        found = [_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception as e:
        return [], f"NVML cannot list the GPUs: {_one_line(e)}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return found, (None if found else "the NVIDIA driver reports no GPU")


def _gpu(pynvml, index: int) -> dict:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(handle)
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        util = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # not supported on some boards (and under MIG)
        util = None
    return {"index": index, "name": name.decode() if isinstance(name, bytes) else str(name),
            "memory_used_mib": mem.used / MIB, "memory_total_mib": mem.total / MIB,
            "memory_free_mib": mem.free / MIB, "utilization_pct": util}


def cpu() -> dict:
    """Logical cores, load averages and current use. psutil's percent is measured since its
    previous call, so the first reading of a process says 0.0."""
    info: dict = {"logical_cores": os.cpu_count() or 1, "load_1": None, "load_5": None, "load_15": None,
                  "percent": None}
    try:
        info["load_1"], info["load_5"], info["load_15"] = os.getloadavg()
    except (OSError, AttributeError):  # not on every platform
        pass
    try:
        import psutil

        info["logical_cores"] = psutil.cpu_count(logical=True) or info["logical_cores"]
        info["percent"] = float(psutil.cpu_percent(interval=None))
    except Exception:
        pass
    return info


def probe_devices() -> DeviceReport:
    found, why = gpus()
    return DeviceReport(found, why, cpu())


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
