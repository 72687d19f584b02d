"""Writing files so that an interruption never leaves a half-written one under the final name.

Every writer of a checkpoint, a converted model, an export, a statistics cache or a manifest goes through
:func:`atomic_file` (one file), :func:`write_text_atomic` (a text file) or :func:`replaced_folder` (a folder): the new
contents go to a temporary sibling first (same file system, so the rename is atomic), are synced to disk, and are
renamed over the old ones only when complete. Readers see the old version or the whole new one; a failure leaves the
old one and removes the temporary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write (by name: ``torch.save``, ``np.savez``, ...); renamed onto ``path``
    when the block ends without an error. It ends with ``path``'s suffix (``np.savez`` appends ``.npz`` otherwise)
    and is unique per process and call (several processes may write the same file, the last rename wins)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield temporary
        with open(temporary, "rb+") as handle:  # the rename must never expose bytes that are not on disk yet
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """``path.write_text(text)`` (UTF-8), atomically."""
    path = Path(path)
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def replaced_folder(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a folder's new contents into a temporary sibling, then swap it in with renames: readers see the old
    folder or the complete new one, never a half-written mix; if the writing fails, the old folder stays."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    temporary.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the folder gets the user's usual permissions
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.rename(folder, old)
    os.rename(temporary, folder)
    shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    """The process umask (read by setting it, so set it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
