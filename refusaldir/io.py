"""Artifact I/O in one place: hashes, strict JSON, atomic files and atomic run folders.

Every artifact refusaldir writes (directions, selection, guard, evaluation, audit, exported
models) goes through these helpers, so a crash or a full disk never leaves a half-written
file behind and two writers never interleave.

- :func:`atomic_write_text` / :func:`atomic_write_json` / :func:`atomic_write_bytes`: a
  temporary file in the same folder, ``fsync``, then ``os.replace``.
- :func:`staged_dir`: write a whole folder into a temporary sibling and swap it in at the end
  (under :func:`folder_lock`), keeping the previous contents when anything fails.
- :func:`to_jsonable` / :func:`dumps`: strict JSON (NaN/inf become ``null``, tensors lists).

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = atomic_write_json(d / "x.json", {"a": float("nan")})
    >>> (d / "x.json").read_text()
    '{\\n  "a": null\\n}'
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from refusaldir.errors import ArtifactError

__all__ = [
    "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "commit_dir", "dumps",
    "ensure_writable", "folder_lock", "make_tmp_dir", "prepare_out", "sha256_bytes",
    "sha256_file", "staged_dir", "tmp_file_in", "to_jsonable", "versions",
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


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape refusaldir's numbers."""
    out = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


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
            f"output folder {folder} is not writable ({exc.strerror or exc}); choose another --out"
        ) from exc


def tmp_file_in(folder: str | os.PathLike[str], name: str) -> Path:
    """An empty hidden temporary file in ``folder`` (same filesystem as the target)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _disk_error(path: Path, exc: OSError) -> ArtifactError:
    why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return ArtifactError(f"could not write {path} ({why}); free space or choose another --out")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place."""
    path = Path(path)
    ensure_writable(path.parent)
    tmp = tmp_file_in(path.parent, path.name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _open_mode(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write strict JSON (see :func:`dumps`) to ``path`` atomically."""
    return atomic_write_text(path, dumps(obj))


def _open_mode(path: Path) -> None:
    """Temporary files and folders are private (0600/0700); give results the usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


# ----------------------------------------------------------------------------- folders
def prepare_out(out: str | os.PathLike[str], force: bool) -> None:
    """Refuse to overwrite: ``out`` must be absent, an empty folder, or ``force`` must be set."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ArtifactError(
            f"output folder {out} already exists; pass --force (force=True) to replace it, or "
            "choose another --out (an empty folder is fine)"
        )


def make_tmp_dir(parent: str | os.PathLike[str], name: str) -> Path:
    """A hidden temporary folder in ``parent`` (same filesystem, so it can be renamed)."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent))
    except OSError as exc:
        raise ArtifactError(
            f"cannot write to {parent} ({exc.strerror or exc}); choose a writable --out folder"
        ) from exc


@contextlib.contextmanager
def folder_lock(target: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive advisory lock for writing ``target`` (a ``.<name>.lock`` file beside it).

    A second writer waits. The lock file is removed on release (a waiter that locked the
    removed file notices and locks the new one), and a crash never leaves a lock held.
    """
    target = Path(target)
    ensure_writable(target.parent)
    lock = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.exists(lock) and os.path.samestat(os.fstat(fd), os.stat(lock)):
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


def commit_dir(tmp: Path, target: Path, *, replace: bool = True) -> None:
    """Move the finished folder ``tmp`` to ``target``.

    ``replace=False``: when ``target`` already exists (another process won) ``tmp`` is
    discarded. Otherwise the old ``target`` is moved aside first and restored if the final
    rename fails.
    """
    for path in [tmp, *tmp.rglob("*")]:
        _open_mode(path)
    if target.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    trash = None
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, trash / "old")
    try:
        os.replace(tmp, target)
    except OSError:
        if trash is not None and not target.exists():
            os.replace(trash / "old", target)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(
    target: str | os.PathLike[str], *, force: bool = False, keep: tuple[str, ...] = ()
) -> Iterator[Path]:
    """Write a run folder into a temporary sibling and swap it in whole when the block ends.

    The block gets the temporary folder. Files named in ``keep`` that already exist in
    ``target`` are copied into it first (e.g. the directions beside a new ``selection.json``).
    On any error, signal or full disk the temporary folder is removed and ``target`` keeps
    its previous contents. Writers of the same ``target`` are serialised by a lock file.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> with staged_dir(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("hi")
        >>> (out / "a.txt").read_text()
        'hi'
    """
    target = Path(target)
    with folder_lock(target):
        prepare_out(target, force)
        tmp = make_tmp_dir(target.parent, target.name)
        try:
            for name in keep:
                if (target / name).is_file():
                    shutil.copy2(target / name, tmp / name)
            yield tmp
            commit_dir(tmp, target)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _disk_error(target, exc) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
