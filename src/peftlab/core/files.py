"""The file-system side of adapter folders and run directories: bounded reads, safetensors
headers without their data, whole-folder swaps, and locks.

Reading (inert):

* :func:`open_files` opens a folder once and its files relative to it, so the files come from
  one version of the folder even while a writer swaps a new one in; each must be a regular
  file (checked with ``stat`` before it is opened and ``fstat`` after: no FIFO, device,
  directory, or link to one) of bounded size.
* :func:`parse_json` refuses non-UTF-8 text, JSON that is not an object, and nesting deeper
  than :data:`JSON_DEPTH`. :func:`safetensors_header` reads the 8-byte length and the header
  only (bounded by :data:`HEADER_LIMIT`) and checks that the file is exactly header plus the
  declared tensor bytes, so a caller can compare shapes before reading or allocating anything.

Writing (atomic as a folder), :func:`replace_folder`:

1. take an exclusive ``flock`` on the parent directory (one peftlab writer per parent);
2. build the complete new folder next to the target (``.<name>.peftlab-tmp-<pid>-<token>``),
   carry over what the old folder holds that the new one does not write (hard links), fsync
   every file and directory;
3. swap it in with one ``renameat2(RENAME_EXCHANGE)`` (Linux), so the target path always
   names a complete folder, the old one or the new one; where the exchange is not available:
   rename the temporary to ``.<name>.peftlab-new-...`` (complete), the old folder aside, the new
   one in. A reader that finds the target missing in that instant waits for the writer's lock
   and, if the writer died there, renames the complete new folder into place;
4. fsync the parent and delete the old folder.

A crash at any instant leaves the target as the old or the new folder (plus, at worst, a
leftover sibling that the next save or load into that parent removes); a caught failure before
the swap leaves the target untouched and no temporary behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.core.errors import AdapterFileError, PeftlabError

JSON_LIMIT = 1 << 20
"""Largest JSON file read (1 MiB): an adapter config is a few KB."""
HEADER_LIMIT = 16 << 20
"""Largest safetensors header read (16 MiB: ~100 bytes per tensor, so ~100k tensors)."""
JSON_DEPTH = 32
"""Deepest nesting accepted in JSON (configs nest 3 levels)."""
MARK = ".peftlab-"
"""Infix of every temporary or leftover sibling a writer makes: ``.<name>.peftlab-<kind>-...``."""
WAIT_SECONDS = 5.0
"""How long a reader waits for a writer that holds the folder's lock."""

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
"""safetensors dtype names -> torch dtypes."""


# ----------------------------------------------------------------------------- reading
def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _check_regular(st: os.stat_result, path: Path, limit: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise AdapterFileError(f"{path} is {_kind(st.st_mode)}, not a regular file; peftlab reads adapter files "
                               "only from regular files (replace it by the real file)")
    if limit is not None and st.st_size > limit:
        raise AdapterFileError(f"{path} is {st.st_size:,} bytes, more than the {limit:,} bytes a file of its "
                               "kind may have; it is not an adapter file peftlab wrote or reads")


def open_regular(name: str, dir_fd: int, where: Path, limit: int | None) -> int | None:
    """Open ``name`` in the directory ``dir_fd`` for reading; None when it does not exist.

    It must be a regular file (a link to one is followed) of at most ``limit`` bytes: checked
    before opening (nothing else is ever opened) and again on the open descriptor.
    """
    path = where / name
    try:
        _check_regular(os.stat(name, dir_fd=dir_fd), path, limit)
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0), dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AdapterFileError(f"{path} cannot be opened ({e.strerror}); check its permissions") from None
    try:
        _check_regular(os.fstat(fd), path, limit)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, size: int, offset: int = 0) -> bytearray:
    """Exactly ``size`` bytes at ``offset``; a file that ends early is an OSError."""
    out = bytearray(size)
    view = memoryview(out)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"file ended after {offset + done} bytes")
        done += n
    return out


@contextlib.contextmanager
def open_files(directory: Path, names: tuple[str, ...], limits: dict[str, int | None]) -> Iterator[dict[str, int | None]]:
    """Open ``names`` of one version of ``directory``: ``{name: fd or None (absent)}``.

    The folder is opened once and the files relative to it; if the folder was replaced in the
    meantime (a writer's swap), everything is opened again, so the files always belong together.
    A folder that is missing while a writer holds its parent's lock is waited for.
    """
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        settle(directory)
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            if (leftovers(directory) or os.path.lexists(directory)) and time.monotonic() < deadline:
                continue  # a live writer swapped it after settle looked (or is swapping): settle waits for it
            raise AdapterFileError(f"{directory} does not exist; pass the folder that holds the adapter") from None
        except NotADirectoryError:
            raise AdapterFileError(f"{directory} is not a directory; pass the folder that holds the adapter "
                                   "files") from None
        except OSError as e:
            raise AdapterFileError(f"{directory} cannot be opened ({e.strerror})") from None
        fds: dict[str, int | None] = {}
        try:
            for name in names:
                fds[name] = open_regular(name, dir_fd, directory, limits.get(name))
            try:
                same = os.stat(directory).st_ino == os.fstat(dir_fd).st_ino
            except FileNotFoundError:
                same = False
            if same or time.monotonic() > deadline:
                break
        except BaseException:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            os.close(dir_fd)
        for fd in fds.values():  # the folder was swapped while we opened it: again
            if fd is not None:
                os.close(fd)
    try:
        yield fds
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ())]
    return depth


def parse_json(data: bytes | bytearray, where: str) -> dict[str, Any]:
    """A JSON object from ``data``; anything else is an AdapterFileError naming ``where``."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{where} is not UTF-8 text (byte {e.start}: {e.reason}); it is not a JSON file "
                               "peftlab or peft wrote") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{where} is not valid JSON ({e})") from None
    except RecursionError:
        value = None
        too_deep = True
    else:
        too_deep = _depth(value) > JSON_DEPTH
    if too_deep:
        raise AdapterFileError(f"{where} nests JSON deeper than {JSON_DEPTH} levels; an adapter config is flat")
    if not isinstance(value, dict):
        raise AdapterFileError(f"{where} holds a JSON {type(value).__name__}, not an object "
                               "({\"peft_type\": ..., ...})")
    return value


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, from its header."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def safetensors_header(fd: int, where: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """The tensors and metadata that the header of the safetensors file ``fd`` declares, and
    where its data begins. Reads the header only; the file's size must be exactly the header
    plus the declared tensors (no more, no less), and every tensor's byte range must fit its
    shape and dtype, with the ranges back to back."""
    size = os.fstat(fd).st_size

    def bad(what: str) -> AdapterFileError:
        return AdapterFileError(f"{where} is not a readable safetensors file ({what}); it was not loaded "
                                "(peftlab never unpickles adapter files)")

    if size < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", bytes(read_fd(fd, 8)))
    if not 2 <= length <= HEADER_LIMIT:
        raise bad(f"its header length is {length:,} bytes; at most {HEADER_LIMIT:,} are accepted")
    if 8 + length > size:
        raise bad(f"its header length {length:,} runs past the end of the {size:,}-byte file (truncated?)")
    try:
        header = parse_json(read_fd(fd, length, 8), f"the header of {where}")
    except AdapterFileError as e:
        raise bad(str(e)) from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {key!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise bad(f"tensor {key!r} has dtype {dtype!r}; known: {sorted(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > 8 or \
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise bad(f"tensor {key!r} has shape {shape!r}; a shape is a list of at most 8 sizes >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or \
                not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets):
            raise bad(f"tensor {key!r} has data_offsets {offsets!r}; expected [begin, end]")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {key!r} of shape {shape} {dtype} needs {nbytes:,} bytes, its data_offsets "
                      f"{offsets} give {offsets[1] - offsets[0]:,}")
        tensors[key] = TensorInfo(DTYPES[dtype], tuple(shape), offsets[0], offsets[1])
    position = 0
    for key, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != position:
            raise bad(f"tensor {key!r} starts at byte {info.begin} of the data, expected {position} "
                      "(the tensors' bytes must follow each other)")
        position = info.end
    if 8 + length + position != size:
        raise bad(f"the header declares {position:,} bytes of tensors after {8 + length:,} bytes of header, "
                  f"but the file has {size:,} bytes (truncated or padded)")
    return tensors, metadata, 8 + length


def read_tensor(fd: int, info: TensorInfo, data_start: int) -> tuple[torch.Tensor, bytearray]:
    """The tensor ``info`` describes (its own memory) and its raw little-endian bytes."""
    raw = read_fd(fd, info.end - info.begin, data_start + info.begin)
    if sys.byteorder != "little":  # pragma: no cover (safetensors is little-endian)
        raise PeftlabError("reading safetensors files needs a little-endian machine")
    if not raw:
        return torch.empty(info.shape, dtype=info.dtype), raw
    return torch.frombuffer(raw, dtype=info.dtype).reshape(info.shape), raw


# ----------------------------------------------------------------------------- locks
@contextlib.contextmanager
def locked_dir(directory: Path, *, wait: float | None = None) -> Iterator[bool]:
    """An exclusive ``flock`` on ``directory`` itself (no lock file). Yields whether it was
    taken: blocking when ``wait`` is None, else trying for ``wait`` seconds."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        taken = False
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                taken = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:  # type: ignore[operator]
                    break
                time.sleep(0.005)
        yield taken
    finally:
        os.close(fd)  # releases the lock


class FileLock:
    """An exclusive, non-blocking ``flock`` on a file, held until :meth:`release` (or the
    process ends: the kernel releases it, so a killed holder never leaves a stale lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        with contextlib.suppress(OSError):
            return self.path.read_text().strip() or "unknown"
        return "unknown"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------- writing
def write_bytes(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for current, dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = Path(current) / name
            if p.is_file() and not p.is_symlink():
                fsync_path(p)
        fsync_path(Path(current))


def _is_leftover(name: str) -> bool:
    return MARK in name and name.startswith(".")


def _carry_over(old: Path, new: Path) -> None:
    """Give ``new`` what ``old`` holds and ``new`` does not (hard links; copies where links fail)."""
    for entry in os.scandir(old):
        src, dst = Path(entry.path), new / entry.name
        if _is_leftover(entry.name) or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        if entry.is_symlink():
            if not os.path.lexists(dst):
                os.symlink(os.readlink(src), dst)
        elif entry.is_dir():
            if not os.path.lexists(dst):
                dst.mkdir()
            if dst.is_dir() and not dst.is_symlink():
                _carry_over(src, dst)
        elif entry.is_file() and not os.path.lexists(dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def _drain(old: Path, new: Path) -> None:
    """Move into ``new`` what appeared in ``old`` after it was carried over (another program's
    file), then delete ``old``."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(old):
            dst = new / entry.name
            if not os.path.lexists(dst):
                with contextlib.suppress(OSError):
                    os.rename(entry.path, dst)
            elif entry.is_dir(follow_symlinks=False) and dst.is_dir() and not dst.is_symlink():
                _drain(Path(entry.path), dst)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


EXCHANGE: Callable[[Path, Path], bool] = _exchange
"""The one-step swap; tests replace it by ``lambda a, b: False`` to exercise the fallback."""


def leftovers(target: Path) -> list[Path]:
    """Siblings a writer of ``target`` made and did not remove (it died or is still writing)."""
    prefix = f".{target.name}{MARK}"
    try:
        return [target.parent / n for n in os.listdir(target.parent) if n.startswith(prefix)]
    except OSError:
        return []


def _recover(target: Path) -> None:
    """With the parent locked (no live writer): finish or undo what a dead writer left."""
    found = leftovers(target)
    complete = sorted(p for p in found if p.name.startswith(f".{target.name}{MARK}new-"))
    if complete and not os.path.lexists(target):  # it died between moving the old one aside and the new one in
        os.rename(complete[-1], target)
        fsync_path(target.parent)
        found.remove(complete[-1])
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def settle(path: Path) -> None:
    """Before reading ``path`` (or a folder inside a swapped one): clean up after dead writers,
    and wait (up to :data:`WAIT_SECONDS`) while a live one has the folder out of place."""
    for target in (path, path.parent):
        parent = target.parent
        if target == parent or not parent.is_dir() or not (leftovers(target) or not os.path.lexists(target)):
            continue
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            with contextlib.suppress(OSError), locked_dir(parent, wait=0) as taken:
                if taken:  # no writer is alive in this parent: finish what a dead one left
                    _recover(target)
                    break
            if os.path.lexists(target) or time.monotonic() > deadline:
                break  # a live writer that has put the folder in place again (or no one comes)
            time.sleep(0.002)


def _no_space(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def replace_folder(directory: str | os.PathLike[str], what: str = "the adapter") -> Iterator[Path]:
    """Yield an empty folder to write into; on a normal exit it replaces ``directory`` as a whole
    (see the module's docstring), on an exception it is removed and ``directory`` is untouched.

    Raises:
        PeftlabError: Writing failed (the message says what ``directory`` holds now).
    """
    target = Path(os.path.realpath(directory))  # a link to a folder: replace the folder it names
    if os.path.lexists(target) and not target.is_dir():
        raise PeftlabError(f"{directory} is a file; pass a directory to save {what} into")
    if target.is_dir() and os.path.ismount(target):
        raise PeftlabError(f"{directory} is a mount point: peftlab replaces a folder as a whole, which needs its "
                           f"parent on the same file system; save into a folder inside it, e.g. {Path(directory) / 'adapter'}")
    existed = target.is_dir()
    state = "still holds the previous version, unchanged" if existed else "was not created"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = locked_dir(target.parent)
        lock.__enter__()
    except OSError as e:
        raise PeftlabError(f"could not write {what} to {directory}: {e}. {directory} {state}.") from e
    tmp = target.parent / f".{target.name}{MARK}tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        try:
            _recover(target)
            tmp.mkdir()
            yield tmp
            if target.is_dir():
                _carry_over(target, tmp)
            _fsync_tree(tmp)
        except OSError as e:
            hint = "free some disk space or choose another directory" if _no_space(e) else \
                "check the directory's permissions and free space"
            raise PeftlabError(f"could not write {what} to {directory}: {e}. {directory} {state}; {hint}.") from e
        _swap(tmp, target, state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.__exit__(None, None, None)


def _swap(tmp: Path, target: Path, state: str) -> None:
    """Put the complete folder ``tmp`` at ``target`` (see the module's docstring); ``state``
    says what ``target`` holds if this fails."""
    try:
        if not target.is_dir():
            os.rename(tmp, target)
            fsync_path(target.parent)
            return
        if EXCHANGE(tmp, target):  # target: new; tmp: old
            fsync_path(target.parent)
            _drain(tmp, target)
            return
        token = "-".join(tmp.name.rsplit("-", 2)[-2:])
        new = target.parent / f".{target.name}{MARK}new-{token}"
        old = target.parent / f".{target.name}{MARK}old-{token}"
        os.rename(tmp, new)  # complete: a reader that finds the target missing puts this in place
        try:
            os.rename(target, old)
        except OSError:
            shutil.rmtree(new, ignore_errors=True)
            raise
        try:
            os.rename(new, target)
        except OSError:
            os.rename(old, target)
            shutil.rmtree(new, ignore_errors=True)
            raise
        fsync_path(target.parent)
        _drain(old, target)
    except OSError as e:
        raise PeftlabError(f"could not swap the new folder into {target}: {e}. {target} {state}.") from e
