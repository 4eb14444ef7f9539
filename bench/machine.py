"""What a benchmark ran on (written beside every result, so that figures are only compared like with like),
and the clock every benchmark times with."""
import os
import platform
import time
from pathlib import Path

import torch


def machine_info(device: str, **extra) -> dict:
    """torch/python versions, device, threads, CPU (and GPU) names, transformers' version if installed."""
    info = dict(torch=torch.__version__, python=platform.python_version(), device=device, **extra,
                threads=torch.get_num_threads(), cpu_cores=os.cpu_count(), cpu=cpu_name())
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: str):
    """Wait for queued GPU work, so the clock measures the work and not just its launch."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    """Seconds one call of fn takes (GPU work included)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0
