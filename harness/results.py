"""The run record: one JSON per grid point, written atomically; all of them as one pandas table."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch

RECORD_COLUMNS = ("run_id", "status", "method", "bits", "group_size", "sym", "model", "params", "source_format",
                  "dtype", "device", "started_at", "duration_s")


def config_hash(point: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:10]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same folder, then rename: a dying run leaves no half file."""
    write_atomic(path, lambda f: json.dump(data, f, indent=1, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def write_atomic(path: Path, write, binary: bool = False) -> None:
    """`write(file)` into a temporary file of the same folder (unique per writer), then renamed over `path`:
    readers see the old file or the new one, never a half; files get the user's usual permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        full = not isinstance(e, OSError) and isinstance(e, Exception) and _disk_full(path.parent)  # before the
        Path(tmp).unlink(missing_ok=True)  # temporary file that filled the disk is gone
        if full:
            # torch.save reports a full disk as "unexpected pos": say what happened
            raise OSError(errno.ENOSPC, f"No space left on device while writing {path.name}", str(path)) from e
        raise


def _disk_full(folder: Path, margin_bytes: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(folder).free < margin_bytes
    except OSError:
        return False


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it: once, at import, before any thread starts
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def runs_dir(out_dir: Path) -> Path:
    return out_dir / "runs"


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at `path`, or None if it is missing or damaged (see record_problem)."""
    return None if record_problem(path) else json.loads(path.read_text())


def record_problem(path: Path) -> str | None:
    """Why the record at `path` cannot be used (unreadable, not JSON, not a record), or None."""
    try:
        record = json.loads(path.read_text())
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"not valid JSON ({e})"
    if not isinstance(record, dict) or not {"run_id", "status"} <= set(record):
        return "not a run record (no run_id and status)"
    if record["status"] == "ok" and not isinstance(record.get("metrics"), dict):
        return "a record marked ok without metrics"
    return None


def load_records(out_dir: Path) -> list[dict[str, Any]]:
    return [r for p in sorted(runs_dir(out_dir).glob("*.json")) if (r := read_record(p)) is not None]


def damaged_records(out_dir: Path) -> list[str]:
    """One line per record file of `out_dir` that cannot be used, naming the file and why."""
    return [f"{p.name}: {why}" for p in sorted(runs_dir(out_dir).glob("*.json")) if (why := record_problem(p))]


def records_to_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: identity columns, then every metric (keys like ppl/pydoc) as a column."""
    rows = []
    for r in records:
        quant, model = r.get("quant", {}), r.get("model", {})
        row = {
            "run_id": r["run_id"], "status": r["status"], "method": quant.get("method"),
            "bits": quant.get("bits"), "group_size": quant.get("group_size"), "sym": quant.get("sym"),
            "model": model.get("name"), "params": model.get("params"), "source_format": model.get("source_format"),
            "dtype": model.get("dtype"), "device": r.get("env", {}).get("device"),
            "started_at": r.get("started_at"), "duration_s": r.get("duration_s"), "speed_note": r.get("speed_note"),
        }
        row.update({f"time_{name}_s": v for name, v in (r.get("phases_s") or {}).items()})
        row.update(r.get("metrics", {}))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else list(RECORD_COLUMNS))
    return frame.astype({"bits": "Int64", "group_size": "Int64"}) if rows else frame


def write_tables(out_dir: Path, frame: pd.DataFrame) -> None:
    write_atomic(out_dir / "results.parquet", lambda f: frame.to_parquet(f, index=False), binary=True)
    write_atomic(out_dir / "results.csv", lambda f: frame.to_csv(f, index=False))


def environment(device: str) -> dict[str, Any]:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "lm_eval": _version("lm_eval"), "platform": platform.platform(),
           "device": device, "device_name": _device_name(device), "git_sha": _git_sha(),
           "code_version": code_version()}
    return env


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The harness's version: the package's, plus the git commit (and `.dirty` for uncommitted changes) when it
    runs from a checkout. Resume redoes points whose records another code version made."""
    sha = _git_sha()
    version = _version("quantbench")
    if sha is None:
        return version
    return f"{version}+g{sha[:10]}{'.dirty' if _git_dirty() else ''}"


def _version(distribution: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(distribution)
    except md.PackageNotFoundError:
        return "unknown"


def _git_dirty() -> bool:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
        return bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return False


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _git_sha() -> str | None:
    """The commit of the checkout the harness runs from; None when installed (a site-packages folder may sit
    inside some other repository)."""
    if not (Path(__file__).resolve().parents[1] / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
