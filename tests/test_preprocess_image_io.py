"""Reading photographs in many formats, and listing a run's inputs."""

import hashlib
import warnings

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from jflame import sources
from jflame.errors import ImageReadError, InputError
from jflame.preprocess.align import block_average
from jflame.preprocess.image_io import (apply_exif_orientation, decode_image,
                                        read_image, read_source)

_ORIENTATION_TAG = 0x0112


@pytest.fixture(scope="module")
def astronaut():
  return skimage.data.astronaut()


def _save_with_orientation(pixels, path, orientation, **save_options):
  image = Image.fromarray(pixels)
  exif = image.getexif()
  exif[_ORIENTATION_TAG] = orientation
  image.save(path, exif=exif, **save_options)


def test_lossless_formats_read_back_exactly(astronaut, tmp_path):
  for suffix, options in ((".png", {}), (".webp", {"lossless": True}), (".bmp", {}),
                          (".tif", {})):
    path = tmp_path / f"astronaut{suffix}"
    Image.fromarray(astronaut).save(path, **options)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (512, 512, 3), suffix
    np.testing.assert_array_equal(image, astronaut, err_msg=suffix)


def test_lossy_formats_read_back_within_compression_error(astronaut, tmp_path):
  for suffix, options in ((".jpg", {"quality": 95}), (".webp", {"quality": 95})):
    path = tmp_path / f"astronaut{suffix}"
    Image.fromarray(astronaut).save(path, **options)
    image = read_image(path)
    assert image.shape == (512, 512, 3)
    assert np.abs(image.astype(float) - astronaut).mean() < 3.0, suffix


def test_greyscale_becomes_three_equal_channels(astronaut, tmp_path):
  grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
  path = tmp_path / "grey.png"
  Image.fromarray(grey).save(path)
  image = read_image(path)
  assert image.shape == (512, 512, 3)
  for channel in range(3):
    np.testing.assert_array_equal(image[..., channel], grey)


def test_rgba_is_composited_over_white(astronaut, tmp_path):
  alpha = np.full((512, 512), 255, np.uint8)
  alpha[:100] = 0        # fully transparent band -> white
  alpha[100:200] = 128   # half transparent band -> halfway to white
  path = tmp_path / "rgba.png"
  Image.fromarray(np.dstack([astronaut, alpha])).save(path)
  image = read_image(path).astype(float)
  np.testing.assert_array_equal(image[200:], astronaut[200:])
  np.testing.assert_array_equal(image[:100], 255.0)
  expected = astronaut[100:200] * (128 / 255) + 255 * (1 - 128 / 255)
  assert np.abs(image[100:200] - expected).max() <= 0.5 + 1e-6


def test_palette_image_with_transparency(tmp_path):
  palette_image = Image.new("P", (8, 4))
  palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
  pixels = np.zeros((4, 8), np.uint8)
  pixels[:, 4:] = 1
  palette_image.putdata(pixels.ravel().tolist())
  path = tmp_path / "palette.png"
  palette_image.save(path, transparency=1)
  image = read_image(path)
  np.testing.assert_array_equal(image[:, :4], np.broadcast_to([255, 0, 0], (4, 4, 3)))
  np.testing.assert_array_equal(image[:, 4:], 255)   # transparent index -> white


def test_16_bit_colour_png_and_tiff_scale_by_rounding(astronaut, tmp_path):
  rng = np.random.default_rng(0)
  sixteen = rng.integers(0, 65536, size=(64, 48, 3)).astype(np.uint16)
  expected = np.rint(sixteen / 257.0).astype(np.uint8)
  for suffix in (".png", ".tif"):
    path = tmp_path / f"deep{suffix}"
    cv2.imwrite(str(path), sixteen[..., ::-1])   # OpenCV writes BGR
    np.testing.assert_array_equal(read_image(path), expected, err_msg=suffix)
  # The astronaut at 16 bits (v * 257) comes back exactly.
  path = tmp_path / "astronaut16.png"
  cv2.imwrite(str(path), (astronaut[..., ::-1].astype(np.uint16) * 257))
  np.testing.assert_array_equal(read_image(path), astronaut)


def test_16_bit_rgba_and_greyscale(tmp_path):
  rng = np.random.default_rng(1)
  grey = rng.integers(0, 65536, size=(20, 30)).astype(np.uint16)
  path = tmp_path / "grey16.png"
  Image.fromarray(grey).save(path)
  np.testing.assert_array_equal(read_image(path)[..., 1], np.rint(grey / 257.0))
  rgba = rng.integers(0, 65536, size=(20, 30, 4)).astype(np.uint16)
  rgba[..., 3] = 65535
  path = tmp_path / "rgba16.png"
  cv2.imwrite(str(path), rgba[..., [2, 1, 0, 3]])
  np.testing.assert_array_equal(read_image(path), np.rint(rgba[..., :3] / 257.0))


def test_exif_orientation_matches_pillow_for_all_eight_values(tmp_path):
  rng = np.random.default_rng(2)
  stored = rng.integers(0, 256, size=(6, 10, 3)).astype(np.uint8)   # non-square: axes matter
  for orientation in range(1, 9):
    path = tmp_path / f"oriented{orientation}.png"
    _save_with_orientation(stored, path, orientation)
    with Image.open(path) as image:
      expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    np.testing.assert_array_equal(read_image(path), expected, err_msg=f"orientation {orientation}")
    np.testing.assert_array_equal(apply_exif_orientation(stored, orientation), expected)


def test_phone_photo_stored_sideways_comes_out_upright(astronaut, tmp_path):
  # A phone held upright stores the sensor image rotated and tags Orientation 6 (rotate 90 CW
  # to display): store the upright astronaut rotated 90 degrees counter-clockwise.
  path = tmp_path / "phone.jpg"
  _save_with_orientation(np.ascontiguousarray(np.rot90(astronaut, k=1)), path, 6, quality=95)
  image = read_image(path)
  assert image.shape == (512, 512, 3)
  assert np.abs(image.astype(float) - astronaut).mean() < 3.0
  non_square = astronaut[:, :300]
  path = tmp_path / "phone_narrow.jpg"
  _save_with_orientation(np.ascontiguousarray(np.rot90(non_square, k=1)), path, 6, quality=95)
  image = read_image(path)
  assert image.shape == (512, 300, 3)
  assert np.abs(image.astype(float) - non_square).mean() < 3.0


def test_broken_files_raise_image_read_error_naming_file(astronaut, tmp_path):
  good = tmp_path / "good.jpg"
  Image.fromarray(astronaut).save(good, quality=90)
  data = good.read_bytes()
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(data[: len(data) // 3])
  corrupt = tmp_path / "corrupt.png"
  Image.fromarray(astronaut).save(tmp_path / "ok.png")
  png = bytearray((tmp_path / "ok.png").read_bytes())
  png[200:4000] = bytes(3800)   # zeroed compressed data: CRC and zlib errors
  corrupt.write_bytes(bytes(png))
  empty = tmp_path / "empty.jpg"
  empty.write_bytes(b"")
  text = tmp_path / "notes.png"
  text.write_text("these are not pixels\n")
  cases = {truncated: "truncated", corrupt: "corrupt", empty: "empty",
           text: "not an image", tmp_path / "missing.jpg": "does not exist",
           tmp_path: "not a regular file"}
  for path, words in cases.items():
    with pytest.raises(ImageReadError) as raised:
      read_image(path)
    assert str(path) in str(raised.value)
    assert words in str(raised.value), str(raised.value)


def _listed(inputs, recursive=False):
  return [source.path.name for source in sources.list_sources(inputs, recursive)]


def test_folders_are_sorted_filtered_and_searched_recursively_only_when_asked(tmp_path):
  for name in ("b.JPG", "a.png", "c.webp", "notes.txt", ".hidden.jpg", "._a.jpg"):
    (tmp_path / name).write_bytes(b"x")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "d.jpg").write_bytes(b"x")
  assert _listed([str(tmp_path)]) == ["a.png", "b.JPG", "c.webp"]
  assert _listed([str(tmp_path)], recursive=True) == ["a.png", "b.JPG", "c.webp", "d.jpg"]


def test_files_globs_and_duplicates(tmp_path):
  for name in ("x1.png", "x2.png", "y.png", "x3.dat"):
    (tmp_path / name).write_bytes(b"x")
  assert _listed([str(tmp_path / "x*")]) == ["x1.png", "x2.png"]
  # A named file is taken whatever its extension; a path met twice is listed once.
  assert _listed([str(tmp_path / "x3.dat"), str(tmp_path / "y.png"),
                  str(tmp_path / "y.png")]) == ["x3.dat", "y.png"]


def test_empty_inputs_raise_input_error(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(InputError, match=f"No image files found; searched folder {empty}"):
    sources.list_sources([str(empty)])
  (tmp_path / "readme.txt").write_text("no images here")
  with pytest.raises(InputError, match="No image files found.*folder"):
    sources.list_sources([str(tmp_path)])
  with pytest.raises(InputError, match="pattern"):
    sources.list_sources([str(tmp_path / "*.jpg")])
  with pytest.raises(InputError, match="no such file or folder"):
    sources.list_sources([str(tmp_path / "absent")])


def test_the_library_names_a_photo_as_the_commands_do(tmp_path):
  """One naming scheme: a photo passed to the library by path gets the id a command gives it
  (whichever way its folder is spelt, through a link too), photos with one name in two folders
  or with two extensions stay apart, and arrays are told apart by their position."""
  from jflame.preprocess import Preprocessor
  blank = np.zeros((64, 64, 3), np.uint8)
  for relative in ("a/face.png", "b/face.png", "a/face.jpg"):
    (tmp_path / relative).parent.mkdir(exist_ok=True)
    cv2.imwrite(str(tmp_path / relative), blank)
  (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
  paths = [tmp_path / "a" / "face.png", tmp_path / "b" / "face.png", tmp_path / "a" / "face.jpg"]
  by_command = [sources.list_sources([str(path)])[0].name for path in paths]
  assert len(set(by_command)) == 3
  assert [sources.file_id(path) for path in paths] == by_command
  assert sources.file_id(tmp_path / "link" / "face.png") == by_command[0]
  assert sources.file_id(tmp_path / "b" / ".." / "a" / "face.png") == by_command[0]
  with Preprocessor(128, landmarks_only=True) as preprocessor:
    records = preprocessor.prepare([*paths, blank, blank])
  assert [record.name for record in records] == [*by_command, "image~3", "image~4"]


def test_corrupt_file_that_fails_while_opening_is_an_image_read_error(tmp_path):
  """A JPEG signature followed by junk makes Pillow fail inside open(), before the format is
  known: still a clear ImageReadError, not an internal error."""
  path = tmp_path / "header_only.jpg"
  path.write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
  with pytest.raises(ImageReadError, match="header_only.jpg"):
    read_image(path)


def test_read_source_records_size_mtime_and_content_hash(astronaut, tmp_path):
  path = tmp_path / "astronaut.jpg"
  Image.fromarray(astronaut).save(path, quality=90)
  source = read_source(path)
  data = path.read_bytes()
  assert source.data == data and source.size == len(data) == path.stat().st_size
  assert source.mtime_ns == path.stat().st_mtime_ns
  assert source.content_hash == hashlib.sha256(data).hexdigest()
  with pytest.raises(ImageReadError, match="does not exist"):
    read_source(tmp_path / "missing.jpg")


def test_opencv_jpeg_decode_equals_pillow_and_reduces_in_whole_blocks(astronaut, tmp_path):
  path = tmp_path / "odd.jpg"
  odd = np.ascontiguousarray(astronaut[:301, :203])   # odd sizes: reduced sides round up
  Image.fromarray(odd).save(path, quality=90)
  data = path.read_bytes()
  with Image.open(path) as image:
    pillow = np.asarray(image.convert("RGB"))
  full = decode_image(data, str(path))
  assert full.reduction == 1 and (full.width, full.height) == (203, 301)
  np.testing.assert_array_equal(full.pixels, pillow)
  for reduction in (2, 4, 8):
    decoded = decode_image(data, str(path), max_reduction=reduction)
    assert decoded.reduction == reduction and (decoded.width, decoded.height) == (203, 301)
    expected = block_average(pillow, reduction)
    assert decoded.pixels.shape == expected.shape
    # Interior blocks only: the ragged last block is zero-padded by block_average.
    interior = (slice(0, 301 // reduction), slice(0, 203 // reduction))
    assert np.abs(decoded.pixels[interior].astype(float) - expected[interior]).mean() < 2.0


def test_reduction_keeps_the_longer_side_and_skips_formats_opencv_does_not_take(astronaut,
                                                                               tmp_path):
  large = cv2.resize(astronaut, (1100, 700), interpolation=cv2.INTER_LINEAR)
  for suffix, expected in ((".jpg", 2), (".png", 1)):   # 1100 / 4 < 512 <= 1100 / 2
    path = tmp_path / f"large{suffix}"
    Image.fromarray(large).save(path)
    decoded = decode_image(path.read_bytes(), str(path), max_reduction=8, min_side=512)
    assert decoded.reduction == expected, suffix
    assert decoded.pixels.shape == (700 // expected, 1100 // expected, 3)
  # CMYK JPEG goes through Pillow (full size), which converts it to RGB.
  path = tmp_path / "cmyk.jpg"
  Image.fromarray(astronaut).convert("CMYK").save(path, quality=95)
  decoded = decode_image(path.read_bytes(), str(path), max_reduction=8)
  assert decoded.reduction == 1 and decoded.pixels.shape == (512, 512, 3)
  assert np.abs(decoded.pixels.astype(float) - astronaut).mean() < 6.0


def test_reduced_jpeg_decode_applies_all_eight_exif_orientations(tmp_path):
  # A smooth non-square picture with one bright corner, so every flip and turn shows.
  rows, cols = np.mgrid[0:96, 0:160]
  stored = np.stack([rows * 2, cols, 255 - cols], axis=-1).astype(np.uint8)
  stored[:24, :24] = 255
  for orientation in range(1, 9):
    path = tmp_path / f"oriented{orientation}.jpg"
    _save_with_orientation(stored, path, orientation, quality=95)
    with Image.open(path) as image:
      upright = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    np.testing.assert_array_equal(read_image(path), upright, err_msg=f"{orientation}")
    decoded = decode_image(path.read_bytes(), str(path), max_reduction=2)
    assert (decoded.width, decoded.height) == upright.shape[1::-1]
    assert decoded.reduction == 2
    difference = np.abs(decoded.pixels.astype(float) - block_average(upright, 2))
    assert difference.mean() < 2.0, orientation


def test_decompression_bomb_warning_becomes_a_note(astronaut, tmp_path, monkeypatch):
  path = tmp_path / "big.png"
  Image.fromarray(astronaut).save(path)
  # 512 x 512 is over a limit of 200,000 pixels but under twice it (where Pillow refuses).
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # any warning reaching the caller fails the test
    decoded = decode_image(path.read_bytes(), str(path))
    np.testing.assert_array_equal(read_image(path), astronaut)
  np.testing.assert_array_equal(decoded.pixels, astronaut)
  assert len(decoded.notes) == 1 and "decompression-bomb" in decoded.notes[0]
  assert str(path) in decoded.notes[0] and "512 x 512" in decoded.notes[0]
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
  with pytest.raises(ImageReadError, match="too large to decode safely"):
    read_image(path)
