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

Speed. A file is read once (`read_source`: its bytes, size, mtime and content hash) and decoded
from those bytes (`decode_image`). 8-bit colour and greyscale JPEG, the bulk of any photo
collection, is decoded by OpenCV's libjpeg-turbo, which can also decode at 1/2, 1/4 or 1/8 of the
size in the DCT domain for a fraction of the cost (a half-size decode of a 1024-pixel JPEG costs
about half a full one); everything else (PNG, CMYK JPEG, alpha, 16 bits...) goes through Pillow
at full size. Both give the same pixels for the same JPEG. The EXIF orientation always comes from
Pillow's parser, so both paths turn images upright the same way.

Very large images: Pillow warns (DecompressionBombWarning) above `Image.MAX_IMAGE_PIXELS`; that
warning becomes a note on the decoded image instead of reaching the terminal. Above twice the
limit Pillow refuses, and so does `decode_image`.
"""

import dataclasses
import io
import os
import warnings
from pathlib import Path
from typing import Tuple, Union

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from jflame.errors import ImageReadError
from jflame.sources import IMAGE_EXTENSIONS, hash_bytes

PathLike = Union[str, os.PathLike]

# Lower-case suffixes that folder and glob listings pick up.

_EXIF_ORIENTATION_TAG = 0x0112
_FULL_SCALE_16_BIT = 65535.0
# Reductions OpenCV's JPEG decoder offers (IMREAD_REDUCED_COLOR_<r>), finest first.
_OPENCV_REDUCTIONS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
                      4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
MAX_REDUCTION = max(_OPENCV_REDUCTIONS)
# Pillow's names of the formats OpenCV decodes instead (MPO: a camera JPEG with more pictures
# after the first, which both decoders take).
_OPENCV_FORMATS = ("JPEG", "MPO")


@dataclasses.dataclass(frozen=True, eq=False)
class SourceFile:
  """An image file's bytes, read once, and the facts that say which bytes they were.

  Attributes:
    path: the file.
    data: its whole content.
    size: len(data) in bytes.
    mtime_ns: modification time (ns since the epoch) of the file that was read.
    content_hash: `jflame.sources.hash_bytes` of `data`.
  """
  path: Path
  data: bytes
  size: int
  mtime_ns: int
  content_hash: str


@dataclasses.dataclass(frozen=True, eq=False)
class DecodedImage:
  """Pixels of a photograph, possibly decoded at a reduced size.

  Attributes:
    pixels: (h, w, 3) uint8 RGB, upright; h = ceil(height / reduction), w likewise.
    reduction: original pixels per decoded pixel (1, 2, 4 or 8); a point x in `pixels` (pixel
      centres at +0.5) is at reduction * x in the original.
    width, height: size of the upright original in pixels.
    notes: things worth telling the user that did not stop the decode (a huge image).
  """
  pixels: np.ndarray
  reduction: int
  width: int
  height: int
  notes: Tuple[str, ...] = ()


def read_source(path: PathLike) -> SourceFile:
  """Reads an image file's bytes once, with its size, mtime and content hash.

  Raises:
    ImageReadError: the file is missing, not a regular file, or cannot be read.
  """
  path = Path(path)
  if path.is_symlink() and not path.exists():
    try:
      target = os.readlink(path)
    except OSError:
      target = "?"
    raise ImageReadError(f"{path}: broken symbolic link (to {target}, which does not exist, or a "
                         "link loop).")
  if not path.exists():
    raise ImageReadError(f"{path}: file does not exist.")
  if not path.is_file():
    raise ImageReadError(f"{path}: is not a regular file (a folder?); pass an image file.")
  try:
    with open(path, "rb") as file:
      # fstat of the open file: the size and mtime of exactly what is read.
      stat = os.fstat(file.fileno())
      data = file.read()
  except OSError as error:
    raise ImageReadError(f"{path}: could not read the file ({error}).") from None
  return SourceFile(path=path, data=data, size=len(data), mtime_ns=stat.st_mtime_ns,
                    content_hash=hash_bytes(data))


def read_image(path: PathLike) -> np.ndarray:
  """Reads one photograph as an upright RGB uint8 (H, W, 3) array, at full size.

  Args:
    path: the image file (JPEG, PNG, WebP, BMP or TIFF; anything Pillow decodes).

  Returns:
    (H, W, 3) uint8 RGB, EXIF orientation applied, alpha composited over white. A very large
    image's decompression-bomb note (see `decode_image`) is dropped: callers that keep records
    use `decode_image`.

  Raises:
    ImageReadError: the file is missing, empty, not an image, truncated or corrupt.
  """
  path = Path(path)
  return decode_image(read_source(path).data, str(path)).pixels


def decode_image(data: bytes, label: str, max_reduction: int = 1,
                 min_side: int = 0) -> DecodedImage:
  """Decodes an image file's bytes into upright RGB uint8, reduced in size where asked and cheap.

  With `max_reduction` > 1, an image that OpenCV decodes (8-bit colour or greyscale JPEG) comes
  at the coarsest reduction r in 1, 2, 4, 8 with r <= max_reduction whose longer side still has
  `min_side` pixels; any other image comes at full size (reduction 1).

  Args:
    data: the file's bytes.
    label: names the image in messages (its path).
    max_reduction: the coarsest reduction allowed (1: full size).
    min_side: fewest pixels the reduced image's longer side may have.

  Raises:
    ImageReadError: the data is empty, not an image, truncated, corrupt or too large.
  """
  if not data:
    raise ImageReadError(f"{label}: file is empty (0 bytes); re-copy or re-export the image.")
  image_format = "image"  # until Pillow has recognised the format (opening can fail first)
  try:
    image, notes = _open_with_notes(data, label)
    with image:
      image_format = image.format or "unknown format"
      if image.format in _OPENCV_FORMATS and image.mode in ("RGB", "L"):
        reduction = _coarsest_reduction(max(image.size), min_side, max_reduction)
        pixels = _decode_jpeg_with_opencv(data, reduction)
        if pixels is not None:   # else Pillow says what is wrong with the data, below
          return _upright(pixels, reduction, _exif_orientation(image), image.size, notes)
      sixteen_bit_colour = image.mode in ("RGB", "RGBA") and _has_16_bit_samples(image)
      # Decode now so that truncated or corrupt data fails here, inside this try.
      image.load()
      orientation = _exif_orientation(image)
      if sixteen_bit_colour:
        channels, full_scale = _decode_16_bit_colour(data, label), _FULL_SCALE_16_BIT
      else:
        channels, full_scale = _pillow_channels(image)
      size = image.size
  except ImageReadError:
    raise
  except UnidentifiedImageError:
    raise ImageReadError(
        f"{label}: not an image file that can be decoded ({len(data)} bytes, format not "
        f"recognised); supported: {', '.join(IMAGE_EXTENSIONS)}.") from None
  except Image.DecompressionBombError as error:
    raise ImageReadError(f"{label}: image is too large to decode safely ({error}); "
                         "downscale it first.") from None
  except (OSError, SyntaxError, ValueError, EOFError) as error:
    raise ImageReadError(f"{label}: could not decode the {image_format} data ({error}); the "
                         "file is probably truncated or corrupt.") from None
  return _upright(_to_rgb_uint8(channels, full_scale), 1, orientation, size, notes)


def _open_with_notes(data: bytes, label: str) -> Tuple[Image.Image, Tuple[str, ...]]:
  """Pillow's lazy open (header only), with a decompression-bomb warning turned into a note.

  The warning is raised as an error inside a `catch_warnings` that touches only its category,
  then the image is opened again with it ignored: other warnings keep their usual route.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      return Image.open(io.BytesIO(data)), ()
  except Image.DecompressionBombWarning:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
  width, height = image.size
  note = (f"{label}: very large image ({width} x {height} = {width * height / 1e6:.0f} "
          f"megapixels, over Pillow's decompression-bomb warning limit of "
          f"{Image.MAX_IMAGE_PIXELS / 1e6:.0f}); decoded anyway, check it is a real photograph")
  return image, (note,)


def _coarsest_reduction(longer_side: int, min_side: int, max_reduction: int) -> int:
  """The largest r in `_OPENCV_REDUCTIONS`, r <= max_reduction, with longer_side / r >= min_side."""
  candidates = [r for r in _OPENCV_REDUCTIONS
                if r <= max_reduction and (r == 1 or longer_side / r >= min_side)]
  return max(candidates)


def _decode_jpeg_with_opencv(data: bytes, reduction: int):
  """(h, w, 3) uint8 RGB as stored (orientation not applied), or None where OpenCV fails."""
  flags = _OPENCV_REDUCTIONS[reduction] | cv2.IMREAD_IGNORE_ORIENTATION
  try:
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
  except cv2.error:
    return None
  if decoded is None or decoded.ndim != 3 or decoded.shape[2] != 3:
    return None
  return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _upright(pixels: np.ndarray, reduction: int, orientation: int, stored_size: Tuple[int, int],
             notes: Tuple[str, ...]) -> DecodedImage:
  """A `DecodedImage` from pixels as stored, with the EXIF orientation applied."""
  width, height = stored_size
  if orientation in (5, 6, 7, 8):   # these swap the axes
    width, height = height, width
  return DecodedImage(pixels=np.ascontiguousarray(apply_exif_orientation(pixels, orientation)),
                      reduction=reduction, width=width, height=height, notes=notes)


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


def _decode_16_bit_colour(data: bytes, label: str) -> np.ndarray:
  """Decodes a 16-bit RGB(A) PNG/TIFF at full depth with OpenCV -> (H, W, 3|4) uint16 RGB(A)."""
  decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if decoded is None or decoded.ndim != 3 or decoded.shape[2] not in (3, 4):
    raise ImageReadError(f"{label}: OpenCV could not decode this 16-bit colour image.")
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
