"""Atomic file writes: write under a temporary name in the same folder, then rename.

An interrupted run therefore never leaves a half-written file that looks finished, and a
finished file is only ever replaced by another complete one. Temporary files carry
`TEMP_MARKER` in their names, so a later run in the same folder can recognise and remove what a
killed run left behind (`remove_stale_temporaries`). Files get the permissions of an ordinary
file under the process's umask (0644 usually), not mkstemp's 0600.
"""

import contextlib
import os
import tempfile
from pathlib import Path

TEMP_MARKER = ".jflame-tmp-"


def _file_mode() -> int:
  # The umask can only be read by setting it; do it once, at import, on the importing thread.
  umask = os.umask(0o022)
  os.umask(umask)
  return 0o666 & ~umask


FILE_MODE = _file_mode()


def _fsync_folder(folder: Path) -> None:
  try:
    descriptor = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(descriptor)
  except OSError:
    pass
  finally:
    os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path, suffix=None, durable: bool = False):
  """Yields a temporary path next to `path`; renames it onto `path` when the block succeeds.

  `suffix` (default: the target's own suffix) matters for writers that pick a format from
  the file name (np.savez appends .npz, OpenCV and trimesh read the extension). `durable`
  also flushes the file and the folder entry to the disk (fsync) before and after the rename,
  for files whose loss after a power cut would cost more than the fsync (dataset shards, their
  index); a killed process never needs it.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARKER}",
                                  suffix=suffix or path.suffix, dir=path.parent)
  os.close(fd)
  try:
    yield Path(tmp_name)
    os.chmod(tmp_name, FILE_MODE)
    if durable:
      with open(tmp_name, "rb+") as written:
        os.fsync(written.fileno())
    os.replace(tmp_name, path)
    if durable:
      _fsync_folder(path.parent)
  finally:
    if os.path.exists(tmp_name):
      os.unlink(tmp_name)


def write_bytes(path, data: bytes, durable: bool = False):
  with atomic_path(path, durable=durable) as tmp:
    tmp.write_bytes(data)


def write_text(path, text: str, durable: bool = False):
  write_bytes(path, text.encode("utf-8"), durable=durable)


def remove_stale_temporaries(folder) -> int:
  """Removes the temporary files of jflame's own naming in `folder` and its subfolders (what a
  killed run left). Call it only while holding the folder's lock. Returns how many."""
  removed = 0
  for root, _, names in os.walk(folder):
    for name in names:
      if name.startswith(".") and TEMP_MARKER in name:
        try:
          os.unlink(os.path.join(root, name))
          removed += 1
        except OSError:
          pass
  return removed
