"""What a benchmark ran on (written beside every result, so that figures are only compared like with like),
the clock every benchmark times with, and the record every run leaves in bench/results/."""
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the project, for runtime.py
from runtime import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


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


def synchronize(device: str):
    """Wait for queued GPU work, so the clock measures the work and not just its launch."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    """Seconds one call of fn takes (GPU work included)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def alternate(fns: dict, rounds: int, device: str, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every round of each named no-argument function, timed A, B, A, B, ... after
    `warmup` untimed calls each, so that a busy moment of the machine hits all of them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    seconds = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            seconds[name].append(timed(fn, device))
    return seconds


def spread(values, digits: int = 1) -> dict:
    """Median, min and max of the rounds of one measurement (the rounds kept as well)."""
    r = lambda v: round(v, digits)   # noqa: E731
    return dict(median=r(statistics.median(values)), min=r(min(values)), max=r(max(values)),
                rounds=[r(v) for v in values])


def ratios(a: list[float], b: list[float], digits: int = 2) -> dict:
    """A / B round by round (the rounds were alternated, so each pair saw the same moment)."""
    return spread([x / y for x, y in zip(a, b)], digits)


def show(s: dict, fmt: str = ",.1f", unit: str = "") -> str:
    """'1,234.5 (1,200.0-1,300.0)': the median, then min-max over the rounds."""
    return f"{s['median']:{fmt}}{unit} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def write_record(name: str, record: dict) -> Path:
    """bench/results/<name>-YYYYMMDD-HHMM.json: the date and the commit ("-dirty": with uncommitted
    changes), then the record (which carries machine_info: torch version, device, threads, CPU/GPU)."""
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=RESULTS.parent,
                                text=True, capture_output=True).stdout.strip() or None
    except OSError:
        commit = None
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps(dict(date=time.strftime("%Y-%m-%d %H:%M %Z"), commit=commit, **record), indent=1) + "\n")
    return out
