"""The inputs of a run as a stream of `Source`s: files, folders (optionally recursive), glob
patterns and list files (one path per line, read line by line so a list of 10^7 paths is never
held whole).

A source is identified by its absolute path with its input root resolved (`Source.path`): the
same folder typed as a relative path, an absolute path or through a symbolic link gives the same
sources. Its id (`Source.name`, also the stem of its output files) is its file name made safe,
then "~" and a short hash of that absolute path ("a.jpg~3f2a1c9b"). The hash is always there,
so two inputs never share an id whatever their names (a newline and an underscore, "sub/x.jpg"
and "sub__x.jpg", Unicode NFC/NFD or case-only twins), without looking ahead in a stream, and
the id depends on the file alone: not on the order of the inputs nor on which folder above it
was the input. It is a plain file name: no path separator, no leading dot, at most
`_NAME_LIMIT` bytes, and it cannot climb out of the output folder. `Source.relpath` keeps the
path under the input root for people.

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
_HASH_CHARS = 8  # hex digits of the path hash that ends every id
_READABLE_LIMIT = _NAME_LIMIT - _HASH_CHARS - 1
_UNSAFE = re.compile(r"[^\w.\-+=,@~ ()\[\]]", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class Source:
  """One input image of a run.

  Attributes:
    path: the file, absolute, under its input root with the root's links resolved (the file
      itself may be a symbolic link, possibly broken): what identifies the source.
    name: its id: stable, unique, safe as a file name (see the module docstring).
    root: the resolved folder it was found under (the folder, the glob's base, the list
      file's folder, or the folder of a file named directly).
    relpath: `path` relative to `root`, "/"-separated: the source as people name it.
  """
  path: Path
  name: str
  root: str = ""
  relpath: str = ""


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


# The content hash of a source file, hex. SHA-256 is faster than BLAKE2b here (hashlib's OpenSSL
# SHA-256 uses the CPU's SHA extensions; docs/BENCHMARKS.md).
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


def readable_name(parts: Sequence[str]) -> str:
  """A safe file name from the components of a relative path: folders joined by "__",
  characters unsafe in file names replaced by "_", ".." by "up", at most `_READABLE_LIMIT`
  bytes. Not unique on its own: `source_id` adds the hash that makes it so."""
  cleaned = []
  for part in parts:
    if part in ("", "."):
      continue
    part = "up" if part == ".." else _UNSAFE.sub("_", part)
    cleaned.append(part)
  name = "__".join(cleaned) or "image"
  if name.startswith("."):
    name = "_" + name
  encoded = name.encode("utf-8", "surrogateescape")
  if len(encoded) > _READABLE_LIMIT:
    name = encoded[:_READABLE_LIMIT].decode("utf-8", "ignore")
  return name


def path_hash(path) -> str:
  """`_HASH_CHARS` hex digits of a hash of a path's bytes (as the file system has them)."""
  return hashlib.blake2b(os.fsencode(str(path)), digest_size=_HASH_CHARS // 2).hexdigest()


def source_id(path) -> str:
  """The id of the source at absolute `path` (see the module docstring)."""
  return f"{readable_name([os.path.basename(path)])}~{path_hash(path)}"


def file_id(path) -> str:
  """The id a command gives the file `path` named as an input of its own (its folder is its
  root): what the library names a photo passed by path, so one photo has one id everywhere."""
  absolute = os.path.abspath(os.path.expanduser(str(path)))
  folder = os.path.dirname(absolute)
  return _located(Path(absolute), folder, os.path.realpath(folder)).name


def _located(path: Path, root: str, real_root: str) -> Source:
  """The Source of `path` found under the absolute folder `root` (resolved: `real_root`), made
  absolute under the resolved root; the file's own link is not followed (two links are two
  inputs). String operations: this runs once per input of a dataset."""
  absolute = os.path.abspath(path)
  if absolute.startswith(root + os.sep):
    relative = absolute[len(root) + 1:]
  else:
    try:
      relative = os.path.relpath(absolute, root)
    except ValueError:  # another drive (Windows): the file's folder is its root
      real_root, relative = os.path.dirname(absolute), os.path.basename(absolute)
  located = os.path.normpath(os.path.join(real_root, relative))
  return Source(path=Path(located), name=source_id(located), root=real_root,
                relpath=relative.replace(os.sep, "/"))


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
  """Streams the sources of `inputs` in input order, each group sorted, each file once (the
  same file reached through two spellings of its folder is one source).

  Files inside `exclude_folder` (the run's own output folder) are never inputs.

  Raises:
    InputError: an input names nothing that exists.
  """
  seen_paths = set()
  real_roots = {}  # a root is resolved once, not once per file
  exclude = exclude_folder.resolve() if exclude_folder is not None else None
  for entry in inputs:
    pairs, _ = _expand(str(entry), recursive)
    for path, root in pairs:
      if root not in real_roots:
        real_roots[root] = (os.path.abspath(root), os.path.realpath(root))
      source = _located(path, *real_roots[root])
      if source.path in seen_paths:
        continue
      seen_paths.add(source.path)
      if exclude is not None and _inside(source.path, exclude):
        continue
      yield source


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


def list_sources(inputs: Sequence[str], recursive: bool = False,
                 exclude_folder: Optional[Path] = None) -> List[Source]:
  """All sources of a finite input set (`iter_sources` as a list).

  Raises:
    InputError: an input names nothing that exists, or nothing was found at all.
  """
  descriptions = []
  for entry in inputs:
    descriptions.append(_expand(str(entry), recursive)[1])
  sources = list(iter_sources(inputs, recursive, exclude_folder))
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
