"""The inputs of a run as a stream of `Source`s: files, folders (optionally recursive), glob
patterns and list files (one path per line, read line by line so a list of 10^7 paths is never
held whole).

Every source gets a stable name derived from its path relative to the input root it was found
under, with folders joined by "__" ("sub/a.jpg" -> "sub__a.jpg"; a named file -> its file name;
a list file's entries relative to the list's folder). The name does not depend on the order of
the inputs, and it is a plain file name: it never contains a path separator, never starts with
a dot, and cannot climb out of the output folder. Where two sources of one run would get the
same name (two input folders both holding a.jpg), each of them gets a short hash of its full
path appended ("a.jpg~3f2a1c9b"), so neither depends on which came first.

Nothing here reads image data: decoding and hashing the contents happen in the preprocessing
workers. A broken symbolic link is a source like any other (its preprocessing fails with a
clear message), not a silent omission.
"""

import dataclasses
import glob
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from jflame.errors import InputError

# Lower-case suffixes that folder and glob listings pick up.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
COUNT_SECONDS = 2.0  # the most a progress bar's total may cost (see `cheap_count`)
_NAME_LIMIT = 180  # bytes; leaves room for suffixes such as "_overlay.png" under 255
_UNSAFE = re.compile(r"[^\w.\-+=,@~ ()\[\]]", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class Source:
  """One input image of a run.

  Attributes:
    path: the file as given or found (may be a symbolic link, possibly broken).
    name: stable, unique within the run, safe as a file name (see the module docstring).
    root: the folder, glob base or list file it came from ("" for a file named directly).
  """
  path: Path
  name: str
  root: str = ""


@dataclasses.dataclass(frozen=True)
class SourceFacts:
  """What the file system says about a source (no content read): enough to tell that a
  source is unchanged since it was fitted without reading it again."""
  size: int
  mtime_ns: int

  @classmethod
  def of(cls, path) -> Optional["SourceFacts"]:
    try:
      stat = os.stat(path)
    except OSError:
      return None
    return cls(size=stat.st_size, mtime_ns=stat.st_mtime_ns)


# The content hash of a source file, hex. SHA-256 measured faster here than BLAKE2b (hashlib's
# OpenSSL SHA-256 uses the CPU's SHA extensions): 0.08 vs 0.43 ms for a 140 KB JPEG.
SOURCE_HASH = "sha256"


def hash_bytes(data: bytes) -> str:
  """The content hash jflame records for a source (`SOURCE_HASH`, hex)."""
  return hashlib.new(SOURCE_HASH, data).hexdigest()


def content_hash(path) -> Optional[str]:
  """`hash_bytes` of a file's contents, None when it cannot be read."""
  digest = hashlib.new(SOURCE_HASH)
  try:
    with open(path, "rb") as stream:
      for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
  except OSError:
    return None
  return digest.hexdigest()


def _is_image_name(path: Path) -> bool:
  # Names starting with '.' are hidden or macOS '._x.jpg' resource forks, not photographs.
  return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def name_from_parts(parts: Sequence[str]) -> str:
  """A safe file name from the components of a relative path (see the module docstring)."""
  cleaned = []
  for part in parts:
    if part in ("", "."):
      continue
    part = "up" if part == ".." else _UNSAFE.sub("_", part)
    cleaned.append(part)
  name = "__".join(cleaned) or "image"
  if name.startswith("."):
    name = "_" + name
  encoded = name.encode("utf-8")
  if len(encoded) > _NAME_LIMIT:
    digest = hashlib.blake2b(encoded, digest_size=6).hexdigest()
    name = encoded[:_NAME_LIMIT - 13].decode("utf-8", "ignore") + "~" + digest
  return name


def _relative_parts(path: Path, root: Path) -> Tuple[str, ...]:
  try:
    return Path(os.path.relpath(path, root)).parts
  except ValueError:  # another drive (Windows): fall back to the absolute path
    return Path(path).parts


def _walk_images(folder: Path, recursive: bool) -> Iterator[Path]:
  """Image files (and broken links with image names) under a folder, sorted per folder.
  Folder links are followed once: a link loop or a second way to reach a folder is skipped."""
  seen = set()

  def walk(current: Path):
    try:
      real = current.resolve(strict=True)
    except (OSError, RuntimeError):
      return
    if real in seen:
      return
    seen.add(real)
    try:
      entries = sorted(os.scandir(current), key=lambda entry: entry.name)
    except OSError:
      return
    folders = []
    for entry in entries:
      path = Path(entry.path)
      try:
        is_dir = entry.is_dir()
      except OSError:
        is_dir = False
      if is_dir:
        if recursive and not entry.name.startswith("."):
          folders.append(path)
      elif _is_image_name(path):
        yield path
    for sub in folders:
      yield from walk(sub)

  yield from walk(folder)


def _list_file_entries(list_file: Path) -> Iterator[Path]:
  """Paths in a list file, one per line (blank lines and '#' comments skipped), relative ones
  taken relative to the list's folder. Read line by line."""
  with open(list_file, "r", encoding="utf-8", errors="surrogateescape") as lines:
    for line in lines:
      entry = line.strip()
      if not entry or entry.startswith("#"):
        continue
      path = Path(entry).expanduser()
      yield path if path.is_absolute() else list_file.parent / path


def _is_list_file(path: Path) -> bool:
  return path.suffix.lower() in LIST_EXTENSIONS


def _glob_images(pattern: str, recursive: bool) -> Iterator[Tuple[Path, Path]]:
  """Matches of a glob pattern with image names, sorted; named relative to the folder part of
  the pattern before its first wildcard."""
  prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
  base = Path(prefix) if prefix.endswith(os.sep) or Path(prefix).is_dir() else Path(prefix).parent
  for match in sorted(Path(m) for m in glob.iglob(pattern, recursive=recursive)):
    if _is_image_name(match) and (match.is_file() or match.is_symlink()):
      yield match, base


def _expand(entry: str, recursive: bool) -> Tuple[Iterator[Tuple[Path, Path]], str]:
  """(path, naming root) pairs for one input entry, and a description for messages."""
  path = Path(entry).expanduser()
  if path.is_dir():
    return ((found, path) for found in _walk_images(path, recursive)), f"folder {path}"
  if _is_list_file(path) and path.is_file():
    return ((found, path.parent) for found in _list_file_entries(path)), f"list file {path}"
  if path.is_file() or path.is_symlink():
    return iter([(path, path.parent)]), f"file {path}"
  if glob.has_magic(entry):
    return _glob_images(entry, recursive), f"pattern {entry}"
  raise InputError(f"{entry}: no such file or folder (and not a glob pattern); check the path.")


def iter_sources(inputs: Sequence[str], recursive: bool = False,
                 exclude_folder: Optional[Path] = None) -> Iterator[Source]:
  """Streams the sources of `inputs` in input order, each group sorted, each path once.

  Names are made unique without looking ahead: a name is claimed by the first source that
  takes it; see `list_sources` for the order-independent naming of a finite input set.
  Files inside `exclude_folder` (the run's own output folder) are never inputs.

  Raises:
    InputError: an input names nothing that exists.
  """
  seen_paths = set()
  exclude = exclude_folder.resolve() if exclude_folder is not None else None
  for entry in inputs:
    pairs, _ = _expand(str(entry), recursive)
    for path, root in pairs:
      key = os.path.abspath(path)
      if key in seen_paths:
        continue
      seen_paths.add(key)
      if exclude is not None and _inside(Path(key), exclude):
        continue
      yield Source(path=path, name=name_from_parts(_relative_parts(path, root)),
                   root=str(root))


def is_list_input(entry) -> bool:
  """Whether an input entry is a list file (read as a stream), as `iter_sources` takes it."""
  path = Path(entry).expanduser()
  return not path.is_dir() and _is_list_file(path) and path.is_file()


def cheap_count(inputs: Sequence[str], stream: Iterable, seconds: float = COUNT_SECONDS
                ) -> Optional[int]:
  """How many items `stream` (a fresh stream of the sources of `inputs`) yields, when that is
  cheap to know: for a progress bar's total and ETA.

  None when an input is a list file (a list of 10^7 paths is read once, as the run goes, not
  twice) or when the listing takes longer than `seconds` (a huge folder tree or a slow network
  file system; the bar then shows the rate without a total). Folders and patterns are listed
  by names only, which for ordinary folders costs far less than the run.
  """
  if any(is_list_input(entry) for entry in inputs):
    return None
  deadline = time.monotonic() + seconds
  total = 0
  for total, _ in enumerate(stream, 1):
    if total % 256 == 0 and time.monotonic() > deadline:
      return None
  return total


def _inside(path: Path, folder: Path) -> bool:
  try:
    Path(os.path.realpath(path)).relative_to(folder)
    return True
  except ValueError:
    return False


def disambiguate(sources: Iterable[Source]) -> List[Source]:
  """Sources whose names collide get a short hash of their full path appended, all of them,
  so the result does not depend on the order of the inputs."""
  sources = list(sources)
  counts = {}
  for source in sources:
    counts[source.name] = counts.get(source.name, 0) + 1
  unique = []
  for source in sources:
    if counts[source.name] > 1:
      digest = hashlib.blake2b(os.path.abspath(source.path).encode("utf-8", "surrogateescape"),
                               digest_size=4).hexdigest()
      source = dataclasses.replace(source, name=f"{source.name}~{digest}")
    unique.append(source)
  return unique


def list_sources(inputs: Sequence[str], recursive: bool = False,
                 exclude_folder: Optional[Path] = None) -> List[Source]:
  """All sources of a finite input set, named independently of the input order.

  Raises:
    InputError: an input names nothing that exists, or nothing was found at all.
  """
  descriptions = []
  for entry in inputs:
    descriptions.append(_expand(str(entry), recursive)[1])
  sources = disambiguate(iter_sources(inputs, recursive, exclude_folder))
  if not sources:
    raise InputError(f"No image files found; searched {', '.join(descriptions) or 'nothing'} "
                     f"for {', '.join(IMAGE_EXTENSIONS)} files (case-insensitive).")
  return sources


def check_output_not_an_input(inputs: Sequence[str], output: Path, recursive: bool) -> None:
  """jflame's own outputs must never become inputs: refuse an output folder that is an input
  folder, or lies inside one that is searched recursively.

  Raises:
    InputError: naming the folders.
  """
  output = Path(os.path.realpath(output))
  for entry in inputs:
    path = Path(entry).expanduser()
    if not path.is_dir():
      continue
    folder = Path(os.path.realpath(path))
    if output == folder or (recursive and _inside(output, folder)):
      raise InputError(
          f"the output folder {output} is {'the' if output == folder else 'inside the'} input "
          f"folder {entry}{' (searched recursively)' if output != folder else ''}: the next run "
          "would read jflame's own pictures as photographs. Choose an --output outside it.")
