"""Where jflame looks for model files: an explicit path (a flag), then $JFLAME_HOME, then
~/.cache/jflame. WORKSPACE.md documents every file, its licence and how to obtain it."""

import os
from pathlib import Path
from typing import Optional, Sequence

from jflame.errors import ModelFileError

WORKSPACE_HINT = "See WORKSPACE.md in the jflame repository for where to get it and where to put it."


def search_folders() -> list:
  """The folders searched for model files, in order."""
  folders = []
  if os.environ.get("JFLAME_HOME"):
    folders.append(Path(os.environ["JFLAME_HOME"]).expanduser())
  folders.append(Path.home() / ".cache" / "jflame")
  return folders


def find_asset(explicit: Optional[str], default_names: Sequence[str], what: str) -> Optional[Path]:
  """Resolves a model file.

  Args:
    explicit: a path the user gave (flag); when set it must exist.
    default_names: file names to look for in the search folders, in order of preference.
    what: a short description for error messages ("FLAME model", "landmark embedding").
  Returns:
    The path found, or None when nothing was given and nothing is in the search folders.
  Raises:
    ModelFileError: an explicit path that does not exist.
  """
  if explicit:
    path = Path(explicit).expanduser()
    if not path.is_file():
      raise ModelFileError(f"{what} file not found: {path}. {WORKSPACE_HINT}")
    return path
  for folder in search_folders():
    for name in default_names:
      if (folder / name).is_file():
        return folder / name
  return None
