"""Atomic file output and run folders.

Every file ddfast writes goes to a temporary name in the same folder and is renamed into place, so
a killed run never leaves a partial file under a final name. Tensors are stored with safetensors
only: nothing ddfast reads back is unpickled.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ddfast.config import LATER_KEYS, NON_RESULT_KEYS
from ddfast.errors import OutputError


def _file_mode() -> int:
    """The mode a plain open() would give a new file: 0o666 less the process umask (mkstemp
    makes its files 0o600, which would leave every output readable by its owner alone)."""
    global _MODE
    if _MODE is None:
        umask = os.umask(0o022)
        os.umask(umask)
        _MODE = 0o666 & ~umask
    return _MODE


_MODE: int | None = None


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write into {path.parent} ({exc.strerror or exc}); choose a "
                          f"writable output folder with --out") from exc
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"writing {path} failed ({exc.strerror or exc}); nothing was replaced: "
                          f"free disk space or choose another --out, then resume") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    _atomic(path, write)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line; a line is written whole or (if killed mid-write) ignored on reading."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return out


def drop_logged_after(path: Path, stage: str, step: int) -> None:
    """Delete the log lines of ``stage`` written after optimiser step ``step`` (all of them at
    0): a stage resumed from step ``step`` logs those steps again, and each step is kept once.
    The file is rewritten (atomically) only when a line goes."""
    rows = read_jsonl(path)
    kept = [r for r in rows if r.get("stage") != stage or r.get("step", 0) <= step]
    if len(kept) != len(rows):
        write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] to an (H, W) or (H, W, C) uint8 array (round half to even)."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    arr = arr.permute(1, 2, 0).numpy()  # (H, W, C)
    return arr[:, :, 0] if arr.shape[2] == 1 else arr


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, arr: np.ndarray) -> None:
    write_bytes(path, png_bytes(arr))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors file, atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


# Settings that do not change results, so a resumed run may use other values.
RESUME_MAY_CHANGE = set(NON_RESULT_KEYS)


def _is_tmp(path: Path) -> bool:
    """A file ``_atomic`` was writing (``.<name>.<random>.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def prepare_run_dir(out: Path, *, config_json: str, resume: bool, overwrite: bool,
                    write: bool = True) -> bool:
    """Create or reopen a run folder. Returns True when an earlier run's state is reused.

    An existing run folder is never replaced silently: resuming needs --resume (and the same
    configuration), starting over needs --overwrite. With ``write=False`` only the checks run,
    so a job can refuse early and still write nothing until its inputs have been read.
    """
    out = Path(out)
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and write:
        # Half-written files of a killed run: never visible under a final name, now removed.
        for stale in out.rglob(".*.tmp"):
            stale.unlink(missing_ok=True)
    if cfg_path.is_file() and not overwrite:
        if not resume:
            raise OutputError(
                f"{out} already holds a run; pass --resume to continue it, --overwrite to "
                f"delete it and start over, or choose another --out")
        old = _with_later_keys(json.loads(cfg_path.read_text()))
        new = json.loads(config_json)
        changed = sorted(k for k in _diff(old, new) if k not in RESUME_MAY_CHANGE)
        if changed:
            raise OutputError(
                f"cannot resume {out}: its configuration differs in {', '.join(changed)}; "
                f"resume with the same settings, or pass --overwrite to start over")
        return True
    if out.is_dir() and any(not _is_tmp(p) for p in out.iterdir()):
        if not cfg_path.is_file():
            raise OutputError(f"{out} is not empty and holds no ddfast run; choose another --out")
        if write:
            shutil.rmtree(out)  # --overwrite of an earlier ddfast run, asked for explicitly
    if write:
        write_text(cfg_path, config_json)
    return False


def _with_later_keys(config: dict) -> dict:
    """A config written before some settings existed, with them at the value that reproduces
    what it did then (``LATER_KEYS``), as JSON writes it (a tuple as a list): a run of an older
    version resumes."""
    for key, neutral in LATER_KEYS.items():
        section, name = key.split(".")
        if isinstance(config.get(section), dict):
            config[section].setdefault(name, json.loads(json.dumps(neutral)))
    return config


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
