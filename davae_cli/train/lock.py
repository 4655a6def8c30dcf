"""The run-folder lock: one process at a time trains (or renders) in a folder.

`RUN/.lock` is held with an exclusive `flock`, which the kernel drops when its process dies (SIGKILL
included). Where `flock` fails (a Lustre or NFS mount without it), the lock is the file itself: created with
`O_EXCL`, holding the holder's pid, host and start, removed when the run ends. A file whose holder is gone
(same host, that pid no longer running) is stale and taken over; one from another host cannot be judged from
here and is refused, naming the file to remove. Either way the file records the holder, so a refusal names it.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import DavaeError, first_line

LOCK_FILE = ".lock"
FLOCK, FILE = "flock", "file"  # the record's "lock": how its holder holds it
_READ_TRIES = 10  # an O_EXCL holder writes its record right after creating the file: wait up to ~1 s for it


@dataclass
class _Held:
    path: Path
    fd: Optional[int]  # the flock'ed descriptor; None for a lock file
    raw: bytes = b""  # a lock file's record as written (released only while it still reads so)


_HELD: dict[str, _Held] = {}  # run folders this process holds the lock of (resolved path -> how)


def _proc_start(pid: int) -> Optional[str]:
    """When process `pid` started (clock ticks since boot, from /proc), to tell a reused pid; None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _record(kind: str) -> bytes:
    return json.dumps({"lock": kind, "pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pid_start": _proc_start(os.getpid()),
                       "command": " ".join(["davae", *sys.argv[1:]])[:200], "token": uuid.uuid4().hex}).encode()


def _parse(raw: bytes) -> Optional[dict]:
    try:
        rec = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _holder_alive(rec: dict) -> Optional[bool]:
    """Whether the process a record names still runs: None where that cannot be seen (another host)."""
    if rec.get("host") != socket.gethostname():
        return None
    try:
        pid = int(rec["pid"])
        os.kill(pid, 0)
    except (KeyError, TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process: it exists
        pass
    started = rec.get("pid_start")
    return started is None or _proc_start(pid) in (None, started)


def _who(rec: dict) -> str:
    return f"process {rec.get('pid')} on {rec.get('host')} since {rec.get('started')} ({rec.get('command')})"


def _refuse(run_dir: Path, path: Path, rec: Optional[dict]) -> DavaeError:
    """The one-line refusal for a held lock, or one whose holder cannot be judged from this host."""
    if rec is None:
        return DavaeError(f"{path} holds no readable lock record, and this filesystem has no flock to tell whether "
                          f"a run still holds it; if no run uses {run_dir}, remove {path} and rerun")
    if _holder_alive(rec) is None:
        return DavaeError(f"{path} is held by {_who(rec)}; from {socket.gethostname()} it cannot be seen whether "
                          f"that process still runs: if it has ended, remove {path} and rerun")
    return DavaeError(f"{run_dir} is in use by {_who(rec)}; wait for it to end or stop it")


def _read(path: Path) -> Optional[bytes]:
    """The lock file's bytes (an empty file is read again for a moment: its O_EXCL creator writes next); None
    when it is gone."""
    raw = b""
    for i in range(_READ_TRIES):
        if i:
            time.sleep(0.1)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        if raw.strip():
            break
    return raw


def _create(path: Path) -> Optional[int]:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None


def _take_over(path: Path, raw: bytes) -> bool:
    """Remove a stale (or released, empty) lock file that still reads `raw`. The file is first renamed aside
    and read there, so a lock another process took in the meantime is put back, not removed."""
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        if aside.read_bytes() == raw:
            os.unlink(aside)
            return True
        os.link(aside, path)
        os.unlink(aside)
    except (FileNotFoundError, FileExistsError):  # removed meanwhile (a holder clears `.*.tmp`), or retaken
        aside.unlink(missing_ok=True)
    return False


def _write(fd: int, raw: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, raw, 0)
    os.fsync(fd)


def _lock_file(run_dir: Path, path: Path, fd: Optional[int], say: Callable[[str], None]) -> bytes:
    """Hold `path` as a lock file (no flock here). `fd`: the file this process just created with O_EXCL, or
    None when it existed. Returns the record written."""
    for _ in range(5):
        if fd is None:
            raw = _read(path)
            if raw is not None:
                rec = _parse(raw) if raw.strip() else {}
                if rec is None or (rec and _holder_alive(rec) is not False):
                    raise _refuse(run_dir, path, rec)
                if not _take_over(path, raw):
                    continue
                if rec:
                    say(f"warning: {path} was left by {_who(rec)}, which has ended: taking it over")
            fd = _create(path)
            if fd is None:
                continue  # another process created it first: judge its record
        mine = _record(FILE)
        try:
            _write(fd, mine)
        finally:
            os.close(fd)
        return mine
    raise DavaeError(f"{path} keeps changing hands; if no run uses {run_dir}, remove {path} and rerun")


def _open(path: Path) -> tuple[int, bool]:
    """(descriptor, created by this call) of the lock file, created if absent."""
    for _ in range(5):
        fd = _create(path)
        if fd is not None:
            return fd, True
        try:
            return os.open(path, os.O_RDWR), False
        except FileNotFoundError:  # a lock file's holder removed it just now
            continue
    raise DavaeError(f"{path} keeps changing hands; if no run uses {path.parent}, remove {path} and rerun")


def _warn(text: str) -> None:
    warnings.warn(text.removeprefix("warning: "), RuntimeWarning, stacklevel=4)


def lock_run(run_dir: Path, on_message: Optional[Callable[[str], None]] = None) -> None:
    """Hold `run_dir/.lock` for as long as this process works there (see the module doc); a second process is
    refused in one line naming the holder (pid, host, start, command). Where `flock` fails, the lock file
    itself is the lock, with a one-line warning through `on_message` (else the `warnings` module).
    Re-entrant within a process."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        fcntl = None
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd, created = _open(path)
    try:
        if fcntl is None:
            raise OSError("no fcntl on this platform")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        rec = _parse(os.pread(fd, 4096, 0))
        os.close(fd)
        who = _who(rec) if rec else "another process"
        raise DavaeError(f"{run_dir} is in use by {who}; wait for it to end or stop it") from None
    except OSError as e:
        say = on_message or _warn
        if not created:
            os.close(fd)
        raw = _lock_file(run_dir, path, fd if created else None, say)
        say(f"warning: {path}: this filesystem has no flock ({first_line(e, 80)}); the run is locked by the lock "
            f"file itself (pid {os.getpid()} on {socket.gethostname()}), removed when it ends")
        _HELD[key] = _Held(path, None, raw)
        return
    rec = _parse(os.pread(fd, 4096, 0))
    if rec and rec.get("lock") == FILE and _holder_alive(rec) is not False:  # a holder whose host has no flock
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        raise _refuse(run_dir, path, rec)
    _write(fd, _record(FLOCK))
    _HELD[key] = _Held(path, fd)


def unlock_run(run_dir: Path) -> None:
    """Give back the lock `lock_run` took (the trainers call it when they end). A flock'ed file is emptied (an
    empty file is a free lock); a lock file is removed while it still holds this process's record."""
    held = _HELD.pop(str(Path(run_dir).resolve()), None)
    if held is None:
        return
    if held.fd is not None:
        import fcntl

        os.ftruncate(held.fd, 0)
        fcntl.flock(held.fd, fcntl.LOCK_UN)
        os.close(held.fd)
        return
    try:
        if held.path.read_bytes() == held.raw:
            held.path.unlink()
    except FileNotFoundError:
        pass


@atexit.register
def _release_lock_files() -> None:
    """A lock file is removed at a normal exit too (a DavaeError included); the kernel frees a flock itself."""
    for key in [k for k, h in _HELD.items() if h.fd is None]:
        unlock_run(key)
