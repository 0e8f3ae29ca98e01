"""Reading photographs from disk and listing the inputs of a run (host side).

`read_image` turns any ordinary photograph into an upright RGB uint8 (H, W, 3) array:
* EXIF orientation is applied, so a phone photo stored sideways comes out upright.
* Greyscale, palette, bilevel and CMYK images become RGB.
* Transparency (RGBA, LA, palette with a transparent index) is composited over WHITE, the way
  image viewers show it, rather than dropped: dropping alpha would reveal whatever colours the
  encoder left under transparent pixels (often black or garbage).
* 16-bit PNG/TIFF is scaled to 8 bits by rounding v * 255 / 65535. Pillow decodes 16-bit
  colour images to 8 bits by truncation (v >> 8), so those are decoded again with OpenCV at
  full depth.
Every failure raises `ImageReadError` naming the file and what was wrong.
"""

import glob
import os
from pathlib import Path
from typing import List, Sequence, Union

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from jflame.errors import ImageReadError, InputError

PathLike = Union[str, os.PathLike]

# Lower-case suffixes that folder and glob listings pick up.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff")

_EXIF_ORIENTATION_TAG = 0x0112
_FULL_SCALE_16_BIT = 65535.0


def read_image(path: PathLike) -> np.ndarray:
  """Reads one photograph as an upright RGB uint8 (H, W, 3) array.

  Args:
    path: the image file (JPEG, PNG, WebP, BMP or TIFF; anything Pillow decodes).

  Returns:
    (H, W, 3) uint8 RGB, EXIF orientation applied, alpha composited over white.

  Raises:
    ImageReadError: the file is missing, empty, not an image, truncated or corrupt.
  """
  path = Path(path)
  if not path.exists():
    raise ImageReadError(f"{path}: file does not exist.")
  if not path.is_file():
    raise ImageReadError(f"{path}: is not a regular file (a folder?); pass an image file.")
  num_bytes = path.stat().st_size
  if num_bytes == 0:
    raise ImageReadError(f"{path}: file is empty (0 bytes); re-copy or re-export the image.")
  image_format = "image"  # until Pillow has recognised the format (opening can fail first)
  try:
    with Image.open(path) as image:
      image_format = image.format or "unknown format"
      sixteen_bit_colour = image.mode in ("RGB", "RGBA") and _has_16_bit_samples(image)
      # Decode now so that truncated or corrupt data fails here, inside this try.
      image.load()
      orientation = _exif_orientation(image)
      if sixteen_bit_colour:
        channels, full_scale = _decode_16_bit_colour(path), _FULL_SCALE_16_BIT
      else:
        channels, full_scale = _pillow_channels(image)
  except ImageReadError:
    raise
  except UnidentifiedImageError:
    raise ImageReadError(
        f"{path}: not an image file that can be decoded ({num_bytes} bytes, format not "
        f"recognised); supported: {', '.join(IMAGE_EXTENSIONS)}.") from None
  except Image.DecompressionBombError as error:
    raise ImageReadError(f"{path}: image is too large to decode safely ({error}); "
                         "downscale it first.") from None
  except (OSError, SyntaxError, ValueError, EOFError) as error:
    raise ImageReadError(f"{path}: could not decode the {image_format} data ({error}); the "
                         "file is probably truncated or corrupt.") from None
  rgb = _to_rgb_uint8(channels, full_scale)
  return np.ascontiguousarray(apply_exif_orientation(rgb, orientation))


def apply_exif_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
  """Turns an image stored with EXIF Orientation `orientation` (1..8) upright.

  The tag says how the stored pixels must be transformed for display: 2 mirror, 3 rotate 180,
  4 flip vertically, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90
  counter-clockwise. Unknown values leave the image as stored.
  """
  if orientation == 2:
    return image[:, ::-1]
  if orientation == 3:
    return image[::-1, ::-1]
  if orientation == 4:
    return image[::-1]
  if orientation == 5:
    return np.swapaxes(image, 0, 1)
  if orientation == 6:
    return np.rot90(image, k=-1)
  if orientation == 7:
    return np.rot90(image, k=2).swapaxes(0, 1)
  if orientation == 8:
    return np.rot90(image, k=1)
  return image


def _has_16_bit_samples(image: Image.Image) -> bool:
  """Whether Pillow's decoder for this file reads 16-bit colour samples (which it truncates)."""
  for tile in image.tile[:1]:
    raw_mode = tile.args[0] if isinstance(tile.args, tuple) else tile.args
    return isinstance(raw_mode, str) and ";16" in raw_mode
  return False


def _exif_orientation(image: Image.Image) -> int:
  """The EXIF Orientation tag (1 = upright) or 1 when absent or unreadable.

  A malformed EXIF block is not a reason to reject the pixels, so its errors give 1.
  """
  try:
    orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
  except (OSError, SyntaxError, ValueError, KeyError, TypeError):
    return 1
  return orientation if isinstance(orientation, int) else 1


def _decode_16_bit_colour(path: Path) -> np.ndarray:
  """Decodes a 16-bit RGB(A) PNG/TIFF at full depth with OpenCV -> (H, W, 3|4) uint16 RGB(A)."""
  encoded = np.fromfile(path, dtype=np.uint8)
  decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
  if decoded is None or decoded.ndim != 3 or decoded.shape[2] not in (3, 4):
    raise ImageReadError(f"{path}: OpenCV could not decode this 16-bit colour image.")
  if decoded.shape[2] == 4:
    return cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGBA)
  return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _pillow_channels(image: Image.Image):
  """Pixels of a decoded Pillow image as (H, W, C) with C in {1, 3, 4}, and their full scale."""
  if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
    return np.asarray(image).astype(np.uint16)[..., None], _FULL_SCALE_16_BIT
  if image.mode == "I":
    # 32-bit integer images come from 16-bit greyscale files in practice.
    return np.asarray(image)[..., None], _FULL_SCALE_16_BIT
  if image.mode == "F":
    return np.asarray(image, np.float32)[..., None], 1.0
  has_alpha = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
  target_mode = "RGBA" if has_alpha else "RGB"
  if image.mode != target_mode:
    image = image.convert(target_mode)
  return np.asarray(image), 255.0


def _to_rgb_uint8(channels: np.ndarray, full_scale: float) -> np.ndarray:
  """(H, W, C) samples with C in {1, 3, 4} -> (H, W, 3) uint8, alpha composited over white."""
  if channels.dtype == np.uint8 and channels.shape[2] == 3:
    return channels
  values = channels.astype(np.float32) / np.float32(full_scale)
  if values.shape[2] == 4:
    alpha = np.clip(values[..., 3:], 0.0, 1.0)
    values = values[..., :3] * alpha + (1.0 - alpha)
  elif values.shape[2] == 1:
    values = np.repeat(values, 3, axis=2)
  return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def list_images(inputs: Union[PathLike, Sequence[PathLike]], recursive: bool = False) -> List[Path]:
  """Expands files, folders and glob patterns into the list of image files to process.

  A named file is taken as it is (whatever its extension: a non-image then fails on reading, with
  a clear status). A folder gives its files with an image extension (case-insensitive, hidden
  files skipped), sorted by name, and only its own files unless `recursive`. A glob pattern gives
  its matches with an image extension, sorted. Paths met twice are listed once.

  Args:
    inputs: one path or pattern, or a sequence of them.
    recursive: descend into sub-folders of named folders; lets `**` in patterns match folders.

  Returns:
    The image paths, in the order of `inputs`, each group sorted.

  Raises:
    InputError: an input names nothing that exists, or nothing was found at all.
  """
  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  found: List[Path] = []
  searched = []
  for entry in inputs:
    path = Path(entry)
    if path.is_file():
      found.append(path)
      searched.append(f"file {path}")
    elif path.is_dir():
      candidates = path.rglob("*") if recursive else path.iterdir()
      found.extend(sorted(p for p in candidates if p.is_file() and _is_image_name(p)))
      searched.append(f"folder {path} ({'recursively' if recursive else 'not recursively'})")
    elif glob.has_magic(str(entry)):
      matches = (Path(match) for match in glob.glob(str(entry), recursive=recursive))
      found.extend(sorted(p for p in matches if p.is_file() and _is_image_name(p)))
      searched.append(f"pattern {entry}")
    else:
      raise InputError(f"{entry}: no such file or folder (and not a glob pattern); check the path.")
  unique = list(dict.fromkeys(found))
  if not unique:
    raise InputError(f"No image files found; searched {', '.join(searched) or 'nothing'} for "
                     f"{', '.join(IMAGE_EXTENSIONS)} files (case-insensitive).")
  return unique


def _is_image_name(path: Path) -> bool:
  # Names starting with '.' are hidden or macOS '._x.jpg' resource forks, not photographs.
  return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def unique_names(paths: Sequence[PathLike]) -> List[str]:
  """A name per path: its file stem, made unique within the run (see `deduplicate_names`)."""
  return deduplicate_names([Path(p).stem for p in paths])


def deduplicate_names(names: Sequence[str]) -> List[str]:
  """Makes names unique, keeping order: the first occurrence of a name keeps it, later ones get
  `-2`, `-3`, ... (skipping any name already in use), so output files never overwrite each other.
  """
  taken = set(names)
  seen = set()
  unique = []
  for name in names:
    if name in seen:
      counter = 2
      while f"{name}-{counter}" in taken:
        counter += 1
      unique.append(f"{name}-{counter}")
      taken.add(unique[-1])
    else:
      unique.append(name)
    seen.add(name)
  return unique
