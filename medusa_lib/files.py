"""Atomic file writes and small JSON helpers shared by every long job.

A long job (conversion, self-distillation, hidden-state caching, training) writes each finished
piece to a temporary name in the same folder and renames it into place, so an interrupt never
leaves a half-written file that a later run would trust.

    with atomic_path(out / "shard_00003.safetensors") as tmp: save_file(tensors, tmp)

And one writer at a time in a folder: a second process that starts writing the same folder (a
notebook beside `make run` on the same preset) is refused, naming the holder, instead of replacing
files the first one is still appending to.

    with folder_lock(data_dir / "prepared", "self-distillation"): ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def read_json(path: str | os.PathLike):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: run the notebook that writes it first.") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path} is a folder: give the JSON file inside it (such as trees/tree.json).") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 JSON (byte {err.start} cannot be read); delete it and rerun the step "
                         f"that writes it.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it and rerun the step that writes it.") from None


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (used to tie caches to the data and model)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


LOCK_FILE = ".writer.lock"
_held: dict[Path, int] = {}  # folders this process holds, and how deep (a writer that calls another writer)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold `folder` for writing while the block runs. A lock of a live process is refused with its
    pid, command and start time; one left by a process that has died (same host) is taken over."""
    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder: choose another output folder (nothing was written).")
    if folder in _held:  # this process already holds it
        _held[folder] += 1
        try:
            yield
        finally:
            _held[folder] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
          "command": " ".join(sys.argv)[:200], "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                pid, host = int(holder["pid"]), holder.get("host")
            except (OSError, ValueError, KeyError, TypeError):
                holder, pid, host = None, None, None  # unreadable: a lock whose writer died mid-write
            if holder is not None and (host != me["host"] or _alive(pid)):
                raise RuntimeError(
                    f"{folder} is being written by another process: pid {pid} on {host}, {holder.get('what')} "
                    f"({holder.get('command')}), since {holder.get('since')}. Wait for it to finish or stop it, then run "
                    f"this again; if that process no longer exists, delete {path}.")
            with contextlib.suppress(FileNotFoundError):  # its writer is gone: take the folder over
                os.unlink(path)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise RuntimeError(f"Could not take {path}: another process keeps taking it. Run this again.")
    _held[folder] = 1
    try:
        yield
    finally:
        del _held[folder]
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                os.unlink(path)
