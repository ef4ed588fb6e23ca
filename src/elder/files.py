"""Writing files so that a crash leaves the old content or the new, never a mix, and reading JSON lines back."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from elder.errors import ElderError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int = 0o644) -> Path:
    """Have `write(tmp_path)` fill a temp file beside `path`, fsync it, then move it over `path` in one step."""
    path = Path(path)
    # the temp file lives beside the target so os.replace stays on one filesystem
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, mode)  # mkstemp makes owner-only files; these are ordinary data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)
    return path


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's content to disk."""
    with open(path, "rb+") as written:
        os.fsync(written.fileno())


class FolderError(ElderError, OSError):
    """A folder to write is a file, or another process holds its write lock."""


class FolderBusyError(FolderError):
    """Another process holds a folder's write lock."""


@contextmanager
def folder_lock(directory: str | os.PathLike, lock_name: str = ".elder.lock") -> Iterator[Path]:
    """Hold the write lock of a folder (created if missing) for the block; a second writer is refused at once.
    Once the lock is held, temporary files a killed writer left behind are removed."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FolderError(f"{directory} is a file, not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / lock_name, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderBusyError(f"{directory} is being written by another elder process (it holds {lock_name}); "
                              "wait for that one to finish") from None
    try:
        for stale in directory.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        yield directory
    finally:
        lock.release()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace `path` atomically with `text` (UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, value) -> Path:
    """Replace `path` atomically with `value` as indented JSON."""
    return write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_lines(path: str | os.PathLike, lines: Iterable[dict]) -> Path:
    """Replace `path` atomically with one JSON object per line."""
    return write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


def append_lines(path: str | os.PathLike, lines: Iterable[dict]) -> None:
    """Append JSON lines and fsync them: a crash can cut only the last line short."""
    with open(path, "a", encoding="utf-8") as out:
        out.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        out.flush()
        os.fsync(out.fileno())


def read_lines(path: str | os.PathLike, error: type[Exception] = ValueError) -> list[dict]:
    """The JSON lines of a file written by `append_lines`; a last line cut short by a crash is dropped, a bad line
    before it raises `error` naming it."""
    path = Path(path)
    texts = path.read_text(encoding="utf-8").split("\n")
    last = max((i for i, t in enumerate(texts) if t.strip()), default=-1)
    lines = []
    for i, text in enumerate(texts):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            if i != last:
                raise error(f"{path} line {i + 1} is not valid JSON") from None
    return lines


def sync_folder(folder: Path) -> None:
    """Make the entries of a folder (a rename into it) durable."""
    # the rename itself is durable only once the folder's entry is on disk (POSIX; Windows has no folder handles)
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
