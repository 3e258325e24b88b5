"""Artifact I/O in one place: hashes, strict JSON, atomic files and atomic run folders.

Every artifact refusaldir writes (directions, selection, guard, evaluation, audit, exported
models) goes through these helpers, so a crash, a signal or a full disk never leaves a
half-written file behind and two writers never interleave.

- :func:`atomic_write_files` (and ``atomic_write_text/json/bytes`` for one file): temporary
  files in the same folder, ``fsync``, then ``os.replace`` of all of them or none.
- :func:`staged_dir`: write a whole folder into a temporary sibling and swap it in at the end
  (under :func:`folder_lock`, atomically where the OS can exchange two paths); the next writer
  removes what a killed one left (:func:`remove_stale`).
- :func:`to_jsonable` / :func:`dumps`: strict JSON (NaN/inf become ``null``, tensors lists);
  :func:`read_json` / :func:`loads_strict` read it back, rejecting ``NaN``/``Infinity``.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = atomic_write_json(d / "x.json", {"a": float("nan")})
    >>> (d / "x.json").read_text()
    '{\\n  "a": null\\n}'
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from refusaldir.errors import ArtifactError

__all__ = [
    "expand_user", "atomic_write_bytes", "atomic_write_files", "atomic_write_json", "atomic_write_text",
    "commit_dir", "dumps", "ensure_writable", "field_error", "folder_lock", "loads_strict",
    "make_tmp_dir", "prepare_out", "read_json", "remove_stale", "sha256_bytes", "sha256_file",
    "staged_dir", "tmp_file_in", "to_jsonable", "versions",
]

VERSIONED_PACKAGES = ("refusaldir", "torch", "transformers", "transformer-lens", "safetensors")


# ----------------------------------------------------------------------------- hashes
def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes | str) -> str:
    """Hex sha256 of bytes (a ``str`` is UTF-8 encoded first)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape refusaldir's numbers."""
    return {pkg: _version(pkg) for pkg in VERSIONED_PACKAGES}


def expand_user(path: str | os.PathLike[str]) -> Path:
    """``Path(path).expanduser()``, with ``~unknown_user/...`` an ArtifactError instead of
    Python's RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError as exc:
        raise ArtifactError(
            f"path {os.fspath(path)!r} starts with '~' but that home folder cannot be found; "
            "write the path out in full"
        ) from exc


# ----------------------------------------------------------------------------- JSON
def to_jsonable(o: Any) -> Any:
    """JSON-safe copy: NaN/inf → ``None``, tensors and arrays → lists, paths → strings."""
    if isinstance(o, bool) or o is None or isinstance(o, (int, str)):
        return o
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if hasattr(o, "tolist") and callable(o.tolist):  # torch tensors, numpy arrays and scalars
        return to_jsonable(o.tolist())
    if isinstance(o, dict):
        return {str(k): to_jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in o]
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    return o


def dumps(o: Any, *, indent: int | None = 2, **kwargs: Any) -> str:
    """Strict JSON text (never ``NaN``/``Infinity``)."""
    return json.dumps(to_jsonable(o), indent=indent, allow_nan=False, **kwargs)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token} (strict JSON has none)")


def loads_strict(text: str, source: str | os.PathLike[str], fix: str) -> Any:
    """Parse strict JSON (``NaN``/``Infinity`` rejected); errors name ``source`` and ``fix``."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise ArtifactError(f"{source} is not valid JSON ({exc}); {fix}") from exc


def read_json(path: str | os.PathLike[str], fix: str) -> Any:
    """Read a strict JSON file; a missing, unreadable or invalid file is an :class:`ArtifactError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} could not be read ({exc}); {fix}") from exc
    return loads_strict(text, path, fix)


def field_error(source: str | os.PathLike[str], name: str, got: Any, expected: str, fix: str) -> ArtifactError:
    """The error for a saved field: the file, the field, the value found, what was expected."""
    shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
    return ArtifactError(f"{source}: {name} is {shown}, expected {expected}; {fix}")


# ----------------------------------------------------------------------------- files
def ensure_writable(folder: str | os.PathLike[str]) -> None:
    """Create ``folder`` if needed and check that files can be written into it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.", delete=True)
        probe.close()
    except OSError as exc:
        raise ArtifactError(
            f"cannot write to {folder}: the folder is not writable ({exc.strerror or exc}); "
            "choose another --out"
        ) from exc


def tmp_file_in(folder: str | os.PathLike[str], name: str) -> Path:
    """An empty hidden temporary file in ``folder`` (same filesystem as the target)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _disk_error(path: Path, exc: OSError) -> ArtifactError:
    why = (exc.strerror or str(exc)) + (": the disk is full" if exc.errno == errno.ENOSPC else "")
    return ArtifactError(f"could not write {path} ({why}); its previous contents are unchanged — "
                         "free space or choose another --out")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None] | bytes) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``path`` (or write those bytes), then rename
    it into place (see :func:`atomic_write_files`)."""
    path = Path(path)
    atomic_write_files(path.parent, {path.name: write}, lock=False)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write strict JSON (see :func:`dumps`) to ``path`` atomically."""
    return atomic_write_text(path, dumps(obj))


def atomic_write_files(folder: str | os.PathLike[str],
                       files: Mapping[str, bytes | Callable[[Path], None]], *, lock: bool = True) -> Path:
    """Write several files (bytes, or ``write(tmp_path)`` functions) into ``folder`` as one unit:
    each goes to a flushed temporary sibling; only when all are complete are they renamed into
    place, in the order given. On any error, full disk or signal nothing is renamed and no
    temporary file is left. Other files are untouched. ``lock=False``: the caller holds
    :func:`folder_lock`."""
    out = Path(folder)
    tmps: dict[str, Path] = {}
    with folder_lock(out) if lock else contextlib.nullcontext():
        ensure_writable(out)
        name = ""
        try:
            for name, body in files.items():
                tmp = tmps[name] = tmp_file_in(out, name)
                if callable(body):
                    body(tmp)
                else:
                    tmp.write_bytes(body)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                _open_mode(tmp)
            with _signals_deferred():
                for name, tmp in tmps.items():
                    os.replace(tmp, out / name)
        except OSError as exc:
            raise _disk_error(out / name, exc) from exc
        finally:
            for tmp in tmps.values():
                tmp.unlink(missing_ok=True)
    return out


def _umask() -> int:
    """The process umask, read without setting it (``os.umask`` would, for every thread)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_mode(path: Path) -> None:
    """Temporary files and folders are private (0600/0700); give results the usual modes."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


# ----------------------------------------------------------------------------- folders
def prepare_out(out: str | os.PathLike[str], force: bool) -> None:
    """Refuse to overwrite: ``out`` must be absent, an empty folder, or ``force`` must be set."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ArtifactError(f"output folder {out} already exists; pass --force (force=True) to "
                            "replace it, or choose another --out (an empty folder is fine)")


def make_tmp_dir(parent: str | os.PathLike[str], name: str) -> Path:
    """A hidden temporary folder in ``parent`` (same filesystem, so it can be renamed)."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent))
    except OSError as exc:
        raise ArtifactError(f"cannot write to {parent} ({exc.strerror or exc}); choose a writable "
                            "--out folder") from exc


def _claim(folder: Path) -> int | None:
    """Lock ``folder`` (an open descriptor holding ``flock``) to mark it as a live writer's;
    ``None`` when another process holds it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary siblings of ``target`` (``.NAME.*.partial`` / ``.NAME.*.old``) that
    no live writer holds: what a writer killed mid-way left. Call under :func:`folder_lock`
    (writers create and claim theirs under it). Returns the folders removed."""
    target = _norm(target)
    removed: list[Path] = []
    for path in [*target.parent.glob(f".{target.name}.*.partial"), *target.parent.glob(f".{target.name}.*.old")]:
        fd = _claim(path) if path.is_dir() and not path.is_symlink() else None
        if fd is not None:  # no live writer holds it
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            os.close(fd)
    return removed


@contextlib.contextmanager
def folder_lock(target: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive advisory lock for writing ``target`` (a ``.<name>.lock`` file beside it).

    A second writer waits. The lock file is removed on release (a waiter that locked the
    removed file notices and locks the new one), and a crash never leaves a lock held.
    """
    target = _norm(target)
    ensure_writable(target.parent)
    lock = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile: try again
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder before us removed this file: lock the current one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM arriving in the block are re-raised when it ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    saved: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
        yield
    finally:
        for num, handler in saved.items():
            signal.signal(num, handler if handler is not None else signal.SIG_DFL)
        for num in dict.fromkeys(caught):
            signal.raise_signal(num)


@functools.cache
def _renameat2() -> Any:
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``RENAME_EXCHANGE``); ``False`` where unsupported."""
    fn = _renameat2()
    if fn is not None and fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD
        return True
    code = ctypes.get_errno() if fn is not None else errno.ENOSYS
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def commit_dir(tmp: Path, target: Path, *, replace: bool = True) -> None:
    """Move the finished folder ``tmp`` to ``target`` (signals wait until it is done).

    ``replace=False``: an existing ``target`` (another process won) is kept, ``tmp`` dropped.
    Otherwise an existing ``target`` is swapped with ``tmp`` in one atomic step, or, where the
    OS cannot, moved aside first and restored if the final rename fails."""
    for path in [tmp, *tmp.rglob("*")]:
        _open_mode(path)
    with _signals_deferred():
        if not target.exists():
            try:
                os.replace(tmp, target)
                return
            except OSError:
                if not target.exists():
                    raise
        if not replace:  # another writer got there first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old contents
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        try:
            os.replace(target, trash / "old")
            os.replace(tmp, target)
        except BaseException:
            if (trash / "old").exists() and not target.exists():
                os.replace(trash / "old", target)
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(
    target: str | os.PathLike[str], *, force: bool = False, keep: tuple[str, ...] = (),
    locked: bool = False,
) -> Iterator[Path]:
    """Write a run folder into a temporary sibling and swap it in whole when the block ends.

    ``target`` is checked (:func:`prepare_out`) before the block and again under
    :func:`folder_lock` just before the swap, so writers never interleave and one that
    finished meanwhile is not clobbered without ``force``. Files in ``keep`` that exist in
    ``target`` and not in the new folder are copied over. On any error, signal or full disk
    ``target`` keeps its previous contents. ``locked=True``: the caller holds the lock and
    has decided to replace ``target`` (no checks).

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> with staged_dir(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("hi")
        >>> (out / "a.txt").read_text()
        'hi'
    """
    target = _norm(target)
    if not locked:
        prepare_out(target, force)
    with contextlib.nullcontext() if locked else folder_lock(target):
        remove_stale(target)  # an interrupted writer's leftovers (its lock file goes with the lock)
        tmp = make_tmp_dir(target.parent, target.name)
        claim = _claim(tmp)
    try:
        yield tmp
        with contextlib.nullcontext() if locked else folder_lock(target):
            if not locked:
                prepare_out(target, force)
            for name in keep:
                if (target / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(target / name, tmp / name)
            commit_dir(tmp, target)
    except OSError as exc:
        raise _disk_error(target, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if claim is not None:
            os.close(claim)


def _norm(target: str | os.PathLike[str]) -> Path:
    """``target`` as a path with a real last component (``.``/``..`` resolved)."""
    path = Path(target).expanduser()
    return path.resolve() if path.name in ("", ".", "..") else path
