"""Atomic file writes: write under a temporary name in the same folder, then rename.

An interrupted run therefore never leaves a half-written file that looks finished, and a
finished file is only ever replaced by another complete one.
"""

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, suffix=None):
  """Yields a temporary path next to `path`; renames it onto `path` when the block succeeds.

  `suffix` (default: the target's own suffix) matters for writers that pick a format from
  the file name (np.savez appends .npz, OpenCV and trimesh read the extension).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix,
                                  dir=path.parent)
  os.close(fd)
  try:
    yield Path(tmp_name)
    os.replace(tmp_name, path)
  finally:
    if os.path.exists(tmp_name):
      os.unlink(tmp_name)


def write_bytes(path, data: bytes):
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def write_text(path, text: str):
  write_bytes(path, text.encode("utf-8"))
