"""The run lock where `flock` fails (a Lustre or NFS mount without it), forced here by making `fcntl.flock`
raise: the lock file itself is the lock (its holder's pid, host and start in it), with a one-line warning; a
second process is refused; a lock left by a dead process on this host is taken over; one from another host is
refused naming the file, the host and the pid; and the file goes when the run ends."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import warnings

import pytest

from davae_cli import DavaeError
from davae_cli.train.loop import LOCK_FILE, lock_run, unlock_run
from conftest import run_cli, write_preset

# a process whose filesystem has no flock: the import line every child below starts with
NO_FLOCK = ("import errno, fcntl, os\n"
            "def no_flock(*a):\n"
            "    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))\n"
            "fcntl.flock = no_flock\n"
            "from davae_cli.train.loop import lock_run\n")


@pytest.fixture
def no_flock(monkeypatch):
    import fcntl

    def refuse(*a):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)


def _lock(run) -> list[str]:
    """lock_run(run) without a message callback: the warnings it gives, as text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lock_run(run)
    return [str(w.message) for w in caught]


def _holder(run, flock: bool = False) -> subprocess.Popen:
    """Another process holding `run`'s lock (by the lock file unless `flock`) until it is killed."""
    code = ("from davae_cli.train.loop import lock_run\n" if flock else NO_FLOCK) + \
        f"lock_run({str(run)!r})\nprint('held', flush=True)\nimport time; time.sleep(120)\n"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_without_flock_the_lock_file_holds_pid_host_and_start_warns_once_and_goes_at_the_end(tmp_path, no_flock):
    run = tmp_path / "run"
    said = _lock(run)
    rec = json.loads((run / LOCK_FILE).read_text())
    assert rec["lock"] == "file" and rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
    assert rec["started"] and rec["command"].startswith("davae")
    assert len(said) == 1 and "\n" not in said[0], said
    assert "no flock" in said[0] and "locked by the lock file itself" in said[0] and str(run / LOCK_FILE) in said[0]
    unlock_run(run)
    assert not (run / LOCK_FILE).exists()  # released: the next run may create it


def test_without_flock_a_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, no_flock):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(DavaeError, match=f"is in use by process {holder.pid} on {socket.gethostname()}") as e:
            _lock(run)
        assert "\n" not in str(e.value)
        # a process whose filesystem has flock respects the lock file too
        r = subprocess.run([sys.executable, "-c", f"from davae_cli.train.loop import lock_run; lock_run({str(run)!r})"],
                           capture_output=True, text=True)
        assert r.returncode == 1 and f"is in use by process {holder.pid}" in r.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL leaves the file (no kernel lock to drop), but its pid is gone from this host: stale
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid
    said = _lock(run)
    assert any(f"left by process {holder.pid}" in s and "taking it over" in s for s in said), said
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    unlock_run(run)


def test_a_reused_pid_does_not_keep_a_dead_holders_lock(tmp_path, no_flock):
    """The pid lives again (here: this process's own), but it started at another time: another process."""
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"lock": "file", "pid": os.getpid(), "host": socket.gethostname(),
                                             "started": "2020-01-01 00:00:00", "pid_start": "1", "command": "davae"}))
    said = _lock(run)
    assert any("taking it over" in s for s in said), said
    unlock_run(run)


@pytest.mark.parametrize("content, words", [
    (json.dumps({"lock": "file", "pid": 4242, "host": "node-17", "started": "2024-05-01 10:00:00",
                 "command": "davae train-vae"}), ["process 4242 on node-17", "cannot be seen", "remove"]),
    ("not json", ["no readable lock record", "remove"]),
])
def test_a_lock_that_cannot_be_judged_from_here_is_refused_naming_the_file(tmp_path, no_flock, content, words):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(content)
    with pytest.raises(DavaeError) as e:
        _lock(run)
    msg = str(e.value)
    assert "\n" not in msg and str(run / LOCK_FILE) in msg and all(w in msg for w in words), msg
    assert (run / LOCK_FILE).read_text() == content  # left as it was


def test_a_lock_file_goes_when_its_process_exits_without_unlocking(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", NO_FLOCK + f"lock_run({str(run)!r})\n"
                        f"assert os.path.exists({str(run / LOCK_FILE)!r})\nraise SystemExit(1)"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (run / LOCK_FILE).exists()


def test_train_vae_without_flock_warns_in_one_line_and_releases_the_lock_at_the_end(tmp_path, tae_base, images_dir,
                                                                                   no_flock):
    preset = write_preset(tmp_path / "p.yaml", tae_base, "residual")
    run = tmp_path / "run"
    r = run_cli("train-vae", "--preset", preset, "--data", images_dir, "--out", run, "--steps", "2")
    lines = [x for x in r.stderr.splitlines() if "no flock" in x]
    assert len(lines) == 1 and "locked by the lock file itself" in lines[0], r.stderr
    assert (run / "final").is_dir() and not (run / LOCK_FILE).exists()
