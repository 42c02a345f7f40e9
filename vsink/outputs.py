"""Where runs write.

* The preflight: before any work starts, where a run writes is checked — the target is a
  directory (or can be created), it is writable, it is not a dangling symbolic link, its name fits
  the file system, a file target is not a directory, and names derived from input file names stay
  inside the output directory without colliding. Nothing is created by the checks.
* :class:`OutputSet`: a run's outputs are written into a staging folder inside the output folder
  and swapped in as one set when the run succeeds (the entries of the earlier set, listed in its
  ``vsink-run.json``, are moved out in the same swap), so an interrupted or failed run — a kill, a
  full disk, a file-size limit — leaves the earlier set as it was. The swap is journalled: a swap
  cut short by a hard kill is completed by the next writer, and readers refuse the folder until
  then (:func:`check_complete`).
* :class:`RunLock`: one writer per folder (a ``.vsink.lock`` file made with ``O_EXCL``, naming the
  holder's pid, host, command and start time); a lock left by a dead process on this host is taken
  over with a warning.
* Temporary files of vsink's own naming pattern (:func:`vsink.io.atomic_path`) that a killed run
  left behind are removed when a run starts writing.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .errors import VsinkError, VsinkWarning
from .io import NAME_MAX, atomic_path, fit_bytes
from .targets import output_dir_problem, output_file_problem

PathLike = Union[str, os.PathLike]

#: ``atomic_path``'s temporary files: ``.<target name>.<8 random characters>.tmp``
TEMP_FILE = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
#: temporary directories vsink makes inside its outputs (checkpoints, ``save_pretrained``)
TEMP_DIR = re.compile(r"\.(step_\d+\.|save-)[a-z0-9_]{8}")
#: the record of a run folder: what determined its results and which entries form its set
MANIFEST = "vsink-run.json"
#: pages made later from a set (``vsink view``'s default output): they go with the set they show
DERIVED = ("viewer.html",)
#: the one-writer lock of a folder
LOCK = ".vsink.lock"
#: the journal of a set swap in progress
JOURNAL = ".vsink-swap.json"
#: staging folders of :class:`OutputSet` (the new set) and the earlier set moved out during a swap
STAGE_DIR = re.compile(r"\.vsink-(stage|old)-[a-z0-9_]{8}")
#: errors of a full disk, a quota or a file-size limit (``ulimit -f``; SIGXFSZ ignored, see :func:`ignore_file_size_signal`)
SPACE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class OutputError(VsinkError):
    """An output location that cannot be written; the message names it and why."""


def check_output_dir(path: PathLike, name: str = "--out") -> Path:
    """``path`` as a :class:`Path`, or an :class:`OutputError` naming it and the problem."""
    problem = output_dir_problem(path)
    if problem:
        raise OutputError(f"{name} {path}: {problem}")
    return Path(path)


def check_output_file(path: PathLike, name: str = "--out") -> Path:
    problem = output_file_problem(path)
    if problem:
        raise OutputError(f"{name} {path}: {problem}")
    return Path(path)


def safe_component(name: str, fallback: str = "image") -> str:
    """A file-name component derived from an input name: no path separators, no NUL, no leading
    dots (so never ``.``, ``..`` or hidden), not empty (``fallback``)."""
    cleaned = re.sub(r"[/\\\x00]", "_", name).strip().lstrip(".").strip()
    return cleaned or fallback


def _fitted(base: str, suffix: str, entries: Sequence[str]) -> str:
    """``base`` + ``suffix``, ``base`` cut so that every entry it makes fits in a file name."""
    room = NAME_MAX - max(len(os.fsencode(e.format(suffix))) for e in entries)
    return fit_bytes(base, room) + suffix


def derived_names(names: Sequence[str], out_dir: PathLike, entries: Sequence[str] = ("{}",),
                  reserved: Iterable[str] = ()) -> list[str]:
    """One distinct component per input ``names`` entry (see :func:`safe_component`), cut so that
    each entry fits in a file name (255 bytes), numbered ``-2``, ``-3``, ... on a clash, such that the directory entries each one makes
    (``entries``: patterns such as ``"{}"`` and ``"{}.npz"``) never coincide — case-insensitively,
    for case-insensitive file systems — with each other's or with ``reserved`` names, and
    resolve to direct children of ``out_dir``."""
    out = Path(os.path.abspath(out_dir))
    taken = {r.casefold() for r in (*reserved, MANIFEST)}
    result = []
    for name in names:
        base = safe_component(name)
        stem, n = _fitted(base, "", entries), 1
        while any(e.format(stem).casefold() in taken for e in entries):
            n += 1
            stem = _fitted(base, f"-{n}", entries)
        for e in entries:
            target = out / e.format(stem)
            if target.parent != out or target.name != e.format(stem):
                raise OutputError(f"{name!r}: the derived name {e.format(stem)!r} would leave {out}")
            taken.add(e.format(stem).casefold())
        result.append(stem)
    return result


def clean_stale_temps(directory: PathLike, targets: Optional[Iterable[str]] = None) -> list[Path]:
    """Remove what killed runs left in ``directory``: temporary files of :func:`vsink.io.atomic_path`
    (only those for ``targets``, when given) and, without ``targets``, vsink's temporary
    directories (unfinished checkpoints, ``save_pretrained`` staging). Returns what was removed;
    a directory that does not exist is left alone. Call it while holding the folder's
    :class:`RunLock` (a concurrent writer's temporary files look the same)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    wanted = set(targets) if targets is not None else None
    removed = []
    for entry in d.iterdir():
        match = TEMP_FILE.fullmatch(entry.name)
        if match and entry.is_file() and not entry.is_symlink() and (wanted is None or match["target"] in wanted):
            entry.unlink(missing_ok=True)
            removed.append(entry)
        elif wanted is None and TEMP_DIR.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def ignore_file_size_signal() -> None:
    """Ignore SIGXFSZ (sent when a write passes ``ulimit -f``; its default action kills Python with
    no message), so the write raises ``OSError(EFBIG)`` and the run stops with one line, leaving the
    earlier outputs as they were. For the main thread of a command-line run."""
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def space_error(error: OSError, where: Optional[PathLike] = None) -> Optional[OutputError]:
    """``error`` as a one-line :class:`OutputError` when it is a full disk, a quota or a file-size
    limit (``where``: the output folder whose earlier set stays); None for any other error."""
    if error.errno not in SPACE_ERRORS:
        return None
    what = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "a file grew past the file-size limit",
            errno.EDQUOT: "the disk quota is exceeded"}[error.errno]
    if where is None:
        return OutputError(f"{what} while writing {error.filename or 'the outputs'}")
    return OutputError(f"{where}: {what} while writing its outputs; nothing was replaced")


# ---------------------------------------------------------------------------------------------- one writer

#: locks this process holds: resolved lock path -> depth (a run that writes sets inside its own lock)
_HELD: dict[str, int] = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_text(holder: Mapping[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')!r}, "
            f"since {holder.get('started')})")


class RunLock:
    """One writer per folder: ``DIR/.vsink.lock`` made with ``O_EXCL`` and holding the writer's
    pid, host, command and start time. A second writer gets one line naming the holder; a lock whose
    process is gone (same host, pid not running) is taken over with a warning. Re-entrant within a
    process; removed on exit."""

    def __init__(self, directory: PathLike, command: str):
        self.directory, self.command = Path(directory), command
        self.path = self.directory / LOCK
        self._key = ""

    def __enter__(self) -> "RunLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = str(self.path.resolve())
        if self._key in _HELD:
            _HELD[self._key] += 1
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            _HELD[self._key] = 1
            return self
        raise OutputError(f"{self.directory}: could not take the lock {self.path}")

    def _take_over_if_stale(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
            if not text:  # a writer between creating its lock and filling it in
                raise OutputError(f"{self.directory} is being written by another process (its lock {self.path} "
                                  "is being made); wait for it, or remove the lock if no vsink process is running")
            holder = json.loads(text)
            pid = int(holder["pid"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            raise OutputError(f"{self.directory} is locked by {self.path}, which cannot be read; if no vsink "
                              "process is writing there, remove the file") from None
        if holder.get("host") == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
            warnings.warn(f"{self.directory}: taking over the lock of {_holder_text(holder)}, which is no longer "
                          "running", VsinkWarning, stacklevel=3)
            self.path.unlink(missing_ok=True)
            return
        raise OutputError(f"{self.directory} is being written by {_holder_text(holder)}; wait for it or use "
                          f"another output folder (remove {self.path} if that process is gone)")

    def __exit__(self, *exc: Any) -> None:
        if self._key not in _HELD:
            return
        _HELD[self._key] -= 1
        if not _HELD[self._key]:
            del _HELD[self._key]
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- one set

def _plain_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and name not in (LOCK, JOURNAL) and not STAGE_DIR.fullmatch(name))


def read_manifest(directory: PathLike) -> Optional[dict[str, Any]]:
    """``DIR/vsink-run.json`` as a dict, None when there is none; a file that is not a JSON object
    is a one-line error naming it."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=lambda c: None)
    except (OSError, ValueError) as e:
        raise OutputError(f"{path}: not a readable run record ({type(e).__name__}); it was not written by vsink, "
                          "or was damaged") from None
    if not isinstance(data, dict):
        raise OutputError(f"{path}: not a JSON object; it is not a vsink run record")
    return data


def _dump(path: Path, obj: Any) -> None:
    """JSON written atomically by :func:`vsink.io.atomic_path` (so with the permissions of every
    other output, not the temporary file's owner-only ones)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _set_entries(directory: Path) -> list[str]:
    """The entries of the set the folder's manifest lists (none without a readable manifest)."""
    try:
        manifest = read_manifest(directory)
    except VsinkError:
        return []
    files = (manifest or {}).get("files")
    return [f for f in files if _plain_name(f)] if isinstance(files, list) else []


class _Signals:
    """Interrupts held back while a swap moves entries (delivered when it is done)."""

    SIGNALS = {s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None}

    def __enter__(self) -> None:
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS) if hasattr(signal, "pthread_sigmask") else None

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old)


def _finish_swap(directory: Path) -> None:
    """Complete the swap the folder's journal describes (one in progress, or one a hard kill cut
    short): move what is left of the earlier set out and the staged set in, then drop the journal."""
    journal = directory / JOURNAL
    if journal.is_file():
        try:
            record = json.loads(journal.read_text(encoding="utf-8"))
            stage, old = directory / record["stage"], directory / record["old"]
            entries, replaced = list(record["entries"]), list(record["replaced"])
            if not all(_plain_name(n) for n in entries + replaced) or not all(
                    STAGE_DIR.fullmatch(p.name) and p.parent == directory for p in (stage, old)):
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError):
            raise OutputError(f"{journal}: an unreadable swap journal; the folder may mix two runs: remove it and "
                              "write the outputs again") from None
        old.mkdir(exist_ok=True)
        for name in replaced:
            current = directory / name
            if (current.exists() or current.is_symlink()) and not (old / name).exists() and (
                    name not in entries or (stage / name).exists() or (stage / name).is_symlink()):
                os.rename(current, old / name)
        for name in entries:
            if (stage / name).exists() or (stage / name).is_symlink():
                os.rename(stage / name, directory / name)
        journal.unlink()


def _remove_stages(directory: Path) -> None:
    """Remove staging folders no journal refers to (a finished swap's, a failed or killed run's)."""
    for entry in directory.iterdir():
        if STAGE_DIR.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def check_complete(directory: PathLike) -> None:
    """Refuse to read a folder whose last swap was cut short (by a hard kill) before the next
    writer completed it: it may hold entries of two runs."""
    if (Path(directory) / JOURNAL).exists():
        raise OutputError(f"{directory}: its outputs were being replaced when the writing process was killed; "
                          "run the command that writes it again (it completes or redoes the swap)")


class OutputSet:
    """A run's outputs written as one set (see the module docstring)::

        with OutputSet(out, "vsink scan", manifest={...}) as stage:
            write_text(stage / "scan.json", ...)      # everything the run writes goes under ``stage``
        # now OUT holds the new set, or (on any error) still the earlier one

    The lock is taken on entry (before work starts, when the block wraps the work). On success
    ``vsink-run.json`` is written into the set, listing its entries and the ``manifest`` fields;
    the entries the earlier set listed and those the new set replaces are moved out, the new ones
    moved in (a journalled swap with interrupts held back), and the earlier entries deleted.
    Entries of the folder that belong to neither set are left alone. A full disk or file-size limit
    is one :class:`OutputError` line."""

    def __init__(self, out: PathLike, command: str, manifest: Optional[Mapping[str, Any]] = None,
                 name: str = "out_dir"):
        self.out, self.command, self.manifest, self.name = Path(out), command, dict(manifest or {}), name
        self.stage: Optional[Path] = None
        self._lock: Optional[RunLock] = None

    def final(self, path: PathLike) -> Path:
        """Where a path under the stage will be once the set is swapped in."""
        return self.out / Path(path).relative_to(self.stage)

    def __enter__(self) -> Path:
        check_output_dir(self.out, self.name)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = RunLock(self.out, self.command).__enter__()
            try:
                _finish_swap(self.out)
                _remove_stages(self.out)
                clean_stale_temps(self.out)
                self.stage = Path(tempfile.mkdtemp(prefix=".vsink-stage-", dir=self.out))
            except BaseException:
                self._lock.__exit__(None, None, None)
                raise
        except OSError as e:
            raise space_error(e, self.out) or OutputError(f"{self.name} {self.out}: {e.strerror or e}") from None
        return self.stage

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        try:
            if kind is None:
                self._commit()
            else:
                shutil.rmtree(self.stage, ignore_errors=True)
        except OSError as e:
            shutil.rmtree(self.stage, ignore_errors=True)
            raise space_error(e, self.out) or OutputError(f"{self.out}: {e.strerror or e} while replacing the "
                                                          "outputs") from None
        finally:
            self._lock.__exit__(None, None, None)
        if isinstance(error, OSError) and space_error(error, self.out):
            raise space_error(error, self.out) from None

    def _commit(self) -> None:
        from .version import __version__

        entries = sorted(e for e in os.listdir(self.stage) if e != MANIFEST)
        _dump(self.stage / MANIFEST, {"command": self.command, "vsink_version": __version__,
                                           "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                           **self.manifest, "files": entries + [MANIFEST]})
        entries.append(MANIFEST)
        replaced = sorted(n for n in set(entries) | set(_set_entries(self.out)) | set(DERIVED)
                          if (self.out / n).exists() or (self.out / n).is_symlink())
        old = Path(tempfile.mkdtemp(prefix=".vsink-old-", dir=self.out))
        _dump(self.out / JOURNAL, {"stage": self.stage.name, "old": old.name, "entries": entries,
                                        "replaced": replaced})
        with _Signals():
            _finish_swap(self.out)
        _remove_stages(self.out)
