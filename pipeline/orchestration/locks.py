"""One runner per stage, one writer per store: lock files (docs/stages.md, "Locks").

Two `hp-pipe features` on one store used to race: work done twice, tracebacks on each other's temporary files,
and with `--force` a chunk of zeros marked done. Now a stage takes `<stage dir>/stages/<stage>.lock` when it starts
(up-to-date check included) and a stage that writes a store also takes the store's lock: `<store>.lock` beside a
local store, `<stage dir>/stages/store-<hash>.lock` for a remote URL (an object store has no atomic create).

A lock file is created with O_CREAT|O_EXCL, so exactly one process gets it, and holds JSON: pid, host, start time,
command, a random token, and (Linux) the boot id and the process's start tick, so that a pid reused after a reboot or
by another process does not pass for the holder. It is removed when the stage ends, also on an exception or Ctrl-C;
a runner killed with SIGKILL leaves it behind, and the next runner on the same host sees that the holder is gone and
takes it over with a one-line message. A holder on another host cannot be checked from here: the message names it
and the file to delete if it is gone. A live lock is never broken, `--force` included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.log import log

UNREADABLE_GRACE_S = 30.0  # an empty or torn lock file this old is a runner killed between create and write


class LockHeld(RuntimeError):
    """Another live runner holds the lock: a runtime condition (exit 1), not bad input."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written in the lock file."""

    pid: int
    host: str
    since: str
    command: str
    token: str
    boot_id: str = ""
    proc_start: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} ({self.command})"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start tick) of a Linux process, None where /proc cannot say."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # after "pid (comm)": state is field 3, starttime field 22
    return (fields[0], fields[19]) if len(fields) > 19 else None


def me(what: str = "") -> Holder:
    """A holder record for this process."""
    stat = _proc_stat(os.getpid())
    command = what or " ".join(["hp-pipe", *sys.argv[1:]])
    return Holder(os.getpid(), socket.gethostname(), datetime.now(UTC).isoformat(timespec="seconds"), command,
                  uuid.uuid4().hex, _boot_id(), stat[1] if stat else "")


def read_holder(path: Path) -> Holder | None:
    """The lock file's holder; None when there is no lock file. A file that is not a lock record (empty: its
    writer was killed right after creating it) reads as a holder with pid 0."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return Holder(**{k: data[k] for k in Holder.__dataclass_fields__ if k in data})
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
        return Holder(0, "", "", "", "")


def alive(holder: Holder, path: Path | None = None) -> bool | None:
    """True: the holder runs; False: it is gone (stale lock); None: it runs on another host, which cannot be
    checked from here."""
    if holder.pid == 0:  # not a lock record: stale once older than a runner takes to write it
        try:
            age = time.time() - Path(path).stat().st_mtime if path else UNREADABLE_GRACE_S
        except FileNotFoundError:
            return False
        return age < UNREADABLE_GRACE_S
    if holder.host != socket.gethostname():
        return None
    if holder.boot_id and _boot_id() and holder.boot_id != _boot_id():
        return False  # written before this machine rebooted
    if holder.pid == os.getpid():
        return False  # this process holds no lock it did not write (a pid reused, e.g. in a new container)
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    stat = _proc_stat(holder.pid)
    if stat is not None:
        state, start = stat
        if state in ("Z", "X"):
            return False  # exited, not yet reaped
        if holder.proc_start and start != holder.proc_start:
            return False  # the pid now belongs to another process
    return True


def _create(path: Path, holder: Holder) -> bool:
    """Create the lock file holding `holder`; False if it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(asdict(holder)).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _remove_stale(path: Path, seen: Holder) -> None:
    """Move the stale lock `seen` out of the way, unless another runner replaced it meanwhile (then put theirs back).

    Moving aside (rename) and comparing, rather than deleting, keeps two runners that both found the same stale lock
    from deleting the lock the faster one has just created.
    """
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else moved it: try again
    if read_holder(aside) == seen:
        aside.unlink(missing_ok=True)
        return
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.link(aside, path)  # a live runner's lock: put it back
    aside.unlink(missing_ok=True)


def refusal(what: str, path: Path, holder: Holder, state: bool | None) -> str:
    """The one-line message naming the holder and what to do."""
    if state is None:
        return (f"{what} is locked by a runner on another host: {holder.describe()}, which cannot be checked from "
                f"here. Wait for it to finish; if that process is gone, delete {path} and rerun (--force does not "
                "break a lock)")
    if holder.pid == 0:
        return (f"{what} is locked ({path} is being written by another runner): rerun in a moment")
    return (f"{what} is locked by another runner: {holder.describe()}. Wait for it to finish or stop it "
            f"(kill {holder.pid}); --force does not break a live lock (lock file {path})")


def acquire(path: Path, what: str, log=None) -> Holder:
    """Take the lock at `path` for `what` (a stage or store, named in messages) or raise LockHeld; a stale lock (its
    holder gone) is taken over with one line through `log` (default: stderr)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = me()
    for _ in range(20):  # each turn either creates the lock, raises, or removes a stale one
        if _create(path, mine):
            return mine
        other = read_holder(path)
        if other is None:
            continue  # released meanwhile
        state = alive(other, path)
        if state is not False:
            raise LockHeld(refusal(what, path, other, state))
        _remove_stale(path, other)
        gone = f"pid {other.pid} on {other.host}, since {other.since}" if other.pid else "unreadable lock file"
        (log or _stderr)(f"taking over the lock of {what} from a runner that is gone ({gone}): {path}")
    raise LockHeld(f"{what}: could not take {path} (it keeps changing hands); rerun")


def release(path: Path, mine: Holder) -> None:
    """Remove the lock if it is still ours (never another runner's)."""
    if read_holder(path) == mine:
        Path(path).unlink(missing_ok=True)


def _stderr(message: str) -> None:
    log.warning(message)


@contextlib.contextmanager
def hold(locks: list[tuple[Path, str]], log=None) -> Iterator[None]:
    """Hold every (path, what) lock for the block, taken in order; all are released on the way out, also on an
    exception or Ctrl-C. A refused lock releases the ones already taken."""
    taken: list[tuple[Path, Holder]] = []
    try:
        for path, what in locks:
            taken.append((Path(path), acquire(path, what, log)))
        yield
    finally:
        for path, mine in reversed(taken):
            release(path, mine)


def stage_lock(stage_dir: Path, name: str) -> Path:
    return Path(stage_dir) / "stages" / f"{name}.lock"


def store_lock(stage_dir: Path, url: str) -> Path:
    """Beside a local store (keyed on the store, whichever work folder writes it); in the stage dir for a remote
    URL."""
    if "://" not in url or url.startswith("file://"):
        local = Path(url.removeprefix("file://")).expanduser().absolute()
        return local.with_name(local.name + ".lock")
    return Path(stage_dir) / "stages" / f"store-{hashlib.sha256(url.encode()).hexdigest()[:16]}.lock"


def current_holder(path: Path) -> Holder | None:
    """The live (or unverifiable) holder of a lock, None when free or stale; reads only (for `status`)."""
    holder = read_holder(path)
    if holder is None or alive(holder, path) is False:
        return None
    return holder
