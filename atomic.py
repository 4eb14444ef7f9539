"""
atomic.py -- write a file all at once, or not at all.

Every file the project writes (weights, configs, tokenizers, token .bin files, data,
plots, reports) goes through `atomic_path`: the content is written to a temp file in
the same folder, and only a complete file is renamed over the real name. A crash or a
Ctrl-C mid-write leaves the old file as it was, never half a new one. (A rename within
one folder is atomic on every operating system Python runs on.)

    with atomic_path("weight/sft/model.pt") as tmp:
        torch.save(state, tmp)
    atomic_write_text("weight/sft/metrics.json", text)
    with atomic_folder("/tmp/sft-hf") as tmp:      # a whole folder: written aside, then swapped in
        export_files(tmp)

This module imports nothing from the project, so every layer can use it.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path(path: str | Path) -> Path:
    """The temp name beside `path`: `name.<process id>.tmp`, so two processes never share one."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write to; when the block ends without an error, rename it to `path`.

    On an error the temp file is removed and `path` is left untouched. The folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp files (`name.<process id>.tmp`) of other processes from `folder`, and return them.

    A process killed mid-write (kill -9, out of memory, power cut) runs no cleanup, so its temp file
    stays beside the complete old file forever, and every later kill adds one more. The next run
    that owns the folder (a training run's out_dir: one process writes there at a time) clears them.
    This process's own temp files are kept."""
    folder, stale = Path(folder), []
    if folder.is_dir():
        for path in folder.iterdir():
            match = re.search(r"\.(\d+)\.tmp$", path.name)
            if match and int(match.group(1)) != os.getpid() and path.is_file():
                path.unlink(missing_ok=True)
                stale.append(path)
    return stale


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text (UTF-8) to path, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; when the block ends without an error, it replaces
    `path` as a whole (no file of the old folder is left among the new ones) and the old folder is
    removed. On an error the temp folder is removed and `path` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = temp_path(path), path.with_name(f"{path.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)          # two renames: the old folder steps aside, the new one steps in
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
