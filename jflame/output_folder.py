"""The output folder of a run: checked before any work, held by one run at a time.

`claim_output_folder` makes sure the folder exists and can be written (a clear `OutputError`
otherwise, before a model is loaded or an image read), takes its lock, and removes temporary
files that a killed run left behind. The lock is an advisory `flock` on `.jflame.lock`, which the
kernel releases when the owning process ends however it ends, so a stale lock never blocks; the
file also records the owner's pid, host and start time for the message a second run prints.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from jflame.atomic import remove_stale_temporaries
from jflame.errors import OutputError

LOCK_NAME = ".jflame.lock"


def check_writable(folder) -> Path:
  """Creates `folder` if needed and proves it writable by writing a file there.

  Raises:
    OutputError: naming the folder and the problem.
  """
  folder = Path(folder).expanduser()
  if folder.exists() and not folder.is_dir():
    raise OutputError(f"--output {folder} exists and is not a folder; name a folder (it is "
                      "created if missing).")
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise OutputError(f"--output {folder}: cannot create the folder ({error.strerror or error})."
                      ) from None
  probe = folder / f".jflame-write-test-{os.getpid()}"
  try:
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as error:
    raise OutputError(f"--output {folder}: cannot write there ({error.strerror or error}); "
                      "choose a folder you can write to.") from None
  return folder


def _owner_description(lock_path: Path) -> str:
  try:
    owner = json.loads(lock_path.read_text())
    return (f"pid {owner.get('pid')} on host {owner.get('host')}, started "
            f"{owner.get('started')}")
  except (OSError, ValueError):
    return "owner unknown"


@contextlib.contextmanager
def claim_output_folder(folder):
  """Checks the folder, takes its lock for the duration of the block, and removes the
  temporary files a killed run left. Yields the folder's Path.

  Raises:
    OutputError: the folder cannot be written, or another run holds it.
  """
  folder = check_writable(folder)
  lock_path = folder / LOCK_NAME
  try:
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as error:
    raise OutputError(f"--output {folder}: cannot create its lock file ({error.strerror})."
                      ) from None
  try:
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise OutputError(
          f"another jflame run is writing to {folder} ({_owner_description(lock_path)}); wait "
          "for it to finish, or choose another --output.") from None
    owner = dict(pid=os.getpid(), host=socket.gethostname(),
                 started=datetime.datetime.now(datetime.timezone.utc).isoformat())
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(owner).encode(), 0)
    remove_stale_temporaries(folder)
    yield folder
  finally:
    os.close(descriptor)  # releases the lock
