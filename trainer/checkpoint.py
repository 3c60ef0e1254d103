"""Run-directory files: atomic writes (a killed process never leaves a half-written file), checkpoints
read back as tensors and plain data only, and a metrics log whose torn last line (a kill during
the append) is dropped."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from quorum.trainer.errors import RunDirError

__all__ = ["append_jsonl", "atomic_torch_save", "atomic_write_text", "load_checkpoint", "read_jsonl"]

log = logging.getLogger(__name__)


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; results and checkpoints are for everyone to read
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by the trainer, on the CPU. Only tensors and plain data are read
    (`weights_only`): a file that holds anything else, or cannot be read, is a RunDirError."""
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunDirError(f"cannot read {path} ({str(e)[:300]}); delete it, or train the run again") from e
    return state


def atomic_write_text(text: str, path: Path) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def append_jsonl(record: dict[str, Any], path: Path) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    """Replace `path` with these records, atomically."""
    atomic_write_text("".join(json.dumps(r) + "\n" for r in records), path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A last line that is not whole (a kill during an append)
    is dropped; a damaged line before it is a RunDirError."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                log.warning("%s: dropped a torn last line (%d characters)", path, len(line))
                break
            raise RunDirError(f"{path}: line {i + 1} is not JSON; the file is damaged") from None
    return records
