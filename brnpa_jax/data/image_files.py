"""Reading image files: the one decoder of the project.

Training folders (``image_folder``, ``fewshot``), re-identification data,
evaluation on folders and ``predict`` list and decode files only here, so an
image gives the same pixels wherever it is read (the user's view:
docs/datasets.md#reading-image-files).

What a file becomes (uint8 ``(H, W, 3)`` RGB):

- Pillow opens it; of an animation (GIF, WebP, APNG, multi-page TIFF) the
  first frame is read.
- 8-bit modes (``1``, ``L``, ``P``, ``LA``, ``PA``, ``RGB``, ``RGBA``,
  ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) are converted by Pillow's
  ``convert('RGB')``: bilevel to 0/255, palettes expanded, grey replicated,
  CMYK, YCbCr, LAB and HSV converted to RGB. The 16-bit colour PNGs (48 and
  64 bits) and 16-bit grey with alpha Pillow reads as ``RGB``/``RGBA`` from
  their high bytes.
- 16-bit integers (``I;16`` PNG, PGM and TIFF; signed 16-bit TIFF) keep their
  high byte: ``x >> 8`` of the unsigned value (signed: ``(x + 32768) >> 8``),
  i.e. the type's range cut into 256 equal bins. This is what libpng,
  TensorFlow's ``decode_png`` and Pillow do for 16-bit colour, so every
  16-bit PNG gives the same pixels whichever decoder reads it.
- 32-bit integers (``I``) have no usable declared range (the type's range
  would turn almost every real image black): the image's own minimum ..
  maximum is cut into 256 equal bins.
- Floats (``F``, TIFF): values within [0, 1], the usual convention, become
  ``round(255 x)``; an image with values outside [0, 1] has its own minimum ..
  maximum stretched to 0 .. 255. NaN or infinite pixels make the file corrupt.
- Alpha is dropped, never composited: the colour stored under a transparent
  pixel is kept, as torchvision's loader and ``decode_png(channels=3)`` do.
- EXIF orientation (tag 274, also read from XMP) is applied, as image
  viewers apply it, so the model sees a photo upright. It is read from the
  header; a PNG's ``eXIf`` chunk after the pixel data is not read.
- An image of more than ``max_pixels`` pixels (``MAX_PIXELS`` unless a
  caller passes another limit: ``data.folder.max_pixels``, ``predict
  --max_pixels``), checked from the header before any pixel is decoded, is
  corrupt, like a truncated file: ``CorruptImageError``, which the readers
  report or, asked to, skip. Pillow's own guard is process-wide; it is
  lifted only when a caller's limit is larger than it.

Two paths give these pixels. ``read_image`` is plain Python (Pillow and
numpy). In tf.data, ``decode_file`` decodes with TensorFlow's native ops the
files that ``inspect_image`` finds they decode to exactly the same pixels
(``NATIVE_JPEG``: greyscale and RGB JPEGs; ``NATIVE_PNG``: every PNG mode;
neither with an EXIF orientation or an animation), and calls ``read_image``
through ``tf.py_function`` for the rest (``PILLOW``). ``tests/test_decode.py``
checks that both paths agree pixel for pixel.

Names: file names are whatever bytes the file system holds. Paths stay
``str`` (``os.fsdecode``: bytes that are not UTF-8 become surrogate escapes)
in Python and bytes (``os.fsencode``) in tf.data; ``display_name`` is how a
name is written to CSV files and ``.npz`` files: bytes that are not UTF-8
appear as ``\\xNN`` escapes (a name that holds a literal ``\\x`` and a name
with that byte are then written alike); ``message_name``, how it is written
in a message, also escapes control characters (``\\n``), so that a name with
a newline keeps a message on its lines.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Iterator

import numpy as np
from PIL import ExifTags, Image

from brnpa_jax import quiet
from brnpa_jax.errors import BadInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm",
                    ".tif", ".tiff", ".webp")
# Pillow's default limit (about a quarter of a GiB of RGB pixels; 9,459 x
# 9,459), so that Pillow's own warning never fires below ours.
MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
# What the readers do with a corrupt file: stop with its path, or warn and
# leave it out (data.folder.on_corrupt, predict --on_corrupt).
ON_CORRUPT = ("error", "skip")

# How ``decode_file`` decodes a file (see the module docstring).
NATIVE_JPEG, NATIVE_PNG, PILLOW = 0, 1, 2
_NATIVE_MODES = {
    "JPEG": (NATIVE_JPEG, ("L", "RGB")),
    "PNG": (NATIVE_PNG, ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16",
                         "I;16B", "I;16L"))}
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_OPEN_LOCK = threading.Lock()


class CorruptImageError(BadInputError):
  """An image file cannot be read (damaged, not an image, over the pixel
  limit); the message starts with the file's name."""


def display_name(name: str | bytes) -> str:
  """``name`` as written to CSV and npz files: bytes that are not UTF-8
  as ``\\xNN`` escapes (``os.fsencode(name).decode('utf-8',
  'backslashreplace')``)."""
  return os.fsencode(name).decode("utf-8", "backslashreplace")


# Control characters as escapes (a file name may hold a newline).
_CONTROL = {**{c: f"\\x{c:02x}" for c in (*range(32), 127)},
            ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def message_name(name: str | bytes) -> str:
  """``name`` as written in a message: ``display_name`` with control
  characters escaped too (``\\n``, ``\\x1b``), so that a file name with a
  newline cannot break a one-line message into several."""
  return display_name(name).translate(_CONTROL)


def list_folders(folder: str) -> list[str]:
  """The names of ``folder``'s sub-folders (links to folders included),
  sorted, hidden ones (``.name``) left out: the class folders."""
  return sorted(e.name for e in os.scandir(folder)
                if e.is_dir() and not e.name.startswith("."))


def list_images(folder: str) -> list[str]:
  """Image files under ``folder``, recursively: relative paths, sorted.

  A file counts by its extension (``IMAGE_EXTENSIONS``, any case). Hidden
  files and folders (name starting with ``.``) are left out, as
  torchvision's ``ImageFolder`` does. Links to files and folders are
  followed; a folder reached twice (a link to a folder already read, or to
  one of its parents) is read once, real folders before links at each
  level. A broken link with an image's extension is listed and then fails
  to decode, like a corrupt file. A folder that cannot be read is an
  ``OSError`` naming it.
  """
  def fail(error: OSError):
    raise error
  found, seen = [], set()
  for root, dirs, files in os.walk(folder, onerror=fail, followlinks=True):
    st = os.stat(root)
    if (st.st_dev, st.st_ino) in seen:
      dirs[:] = []
      continue
    seen.add((st.st_dev, st.st_ino))
    dirs[:] = sorted((d for d in dirs if not d.startswith(".")),
                     key=lambda d: (os.path.islink(os.path.join(root, d)), d))
    found += [os.path.relpath(os.path.join(root, f), folder) for f in files
              if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
  return sorted(found)


def _allow(max_pixels: int) -> None:
  # Pillow refuses, before we see the size, any image over twice its global
  # limit; the caller's limit is the one that counts, so lift Pillow's to it
  # when it is larger (never lower it: other code in the process relies on it).
  if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = max_pixels


@contextlib.contextmanager
def _opened(path, max_pixels: int) -> Iterator[Image.Image]:
  """The open image, its size checked; any failure inside is corrupt."""
  name = message_name(path)
  try:
    _allow(max_pixels)
    # An image over our limit is reported by us: Pillow's warning would only
    # repeat it. catch_warnings is process-wide state, hence the lock.
    with _OPEN_LOCK, warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      im = Image.open(os.fsdecode(path))
  except Image.DecompressionBombError as e:
    raise CorruptImageError(f"{name}: more than {max_pixels:,} pixels, over "
                            "the max_pixels limit (a decompression bomb?)") from e
  except Exception as e:  # Pillow raises many types for bad files
    raise CorruptImageError(f"{name}: {type(e).__name__}: {e}") from e
  with im:
    w, h = im.size
    if w * h > max_pixels:
      raise CorruptImageError(f"{name}: {w}x{h} is {w * h:,} pixels, over the "
                              f"max_pixels limit of {max_pixels:,}")
    try:
      yield im
    except CorruptImageError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptImageError(f"{name}: {type(e).__name__}: {e}") from e


def _orientation(im: Image.Image) -> int:
  """The EXIF orientation the header gives (1: as stored)."""
  if im.format == "PNG" and "exif" not in im.info:
    return 1  # a later eXIf chunk would only be found by decoding the image
  try:
    value = im.getexif().get(ExifTags.Base.Orientation, 1)
  except Exception:  # pylint: disable=broad-except  # a malformed EXIF block
    return 1  # viewers then show the pixels as stored
  return value if value in _TRANSPOSE else 1


def _declared_range(im: Image.Image) -> tuple[int, int] | None:
  """``(lo, hi)`` of an integer image's type, or None where not usable."""
  if im.format == "TIFF":
    bits, fmt = im.tag_v2.get(258, (16,)), im.tag_v2.get(339, 1)
    bits = bits[0] if isinstance(bits, tuple) else bits
    signed = (fmt[0] if isinstance(fmt, tuple) else fmt) == 2
  elif im.mode.startswith("I;16") or im.format in ("PNG", "PPM"):
    bits, signed = 16, False  # Pillow reads 16-bit PNG and PNM into 0..65535
  else:
    return None
  if bits > 16:
    return None
  if signed:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  return 0, (1 << bits) - 1


def _grey8(im: Image.Image) -> np.ndarray:
  """uint8 (H, W) of a one-channel integer or float image, by its range."""
  if im.mode == "F":
    x = np.asarray(im, np.float64)
    if not np.isfinite(x).all():
      raise ValueError("NaN or infinite pixel values")
    lo, hi = (0.0, 1.0) if x.min() >= 0 and x.max() <= 1 else (x.min(), x.max())
    return np.rint((x - lo) * (255 / max(hi - lo, 1e-30))).astype(np.uint8)
  x = np.asarray(im).astype(np.int64)
  declared = _declared_range(im)
  lo, hi = declared or (x.min(), x.max())
  if x.min() < lo or x.max() > hi:
    lo, hi = x.min(), x.max()
  return ((x - lo) * 256 // (hi - lo + 1)).astype(np.uint8)


def _rgb(im: Image.Image, orientation: int) -> np.ndarray:
  if im.mode == "F" or im.mode == "I" or im.mode.startswith("I;16"):
    pixels = np.repeat(_grey8(im)[..., None], 3, axis=-1)
  else:
    im.info.pop("transparency", None)  # alpha is dropped (Pillow would warn)
    pixels = np.asarray(im.convert("RGB"))
  if orientation != 1:
    pixels = np.asarray(Image.fromarray(pixels).transpose(_TRANSPOSE[orientation]))
  return pixels


def read_image(path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """The RGB pixels of an image file, as the module docstring says.

  Args:
    path: ``str``, ``bytes`` or ``os.PathLike``.
    max_pixels: larger images are corrupt (checked from the header).

  Returns:
    uint8 (H, W, 3).

  Raises:
    CorruptImageError: naming the file, when it cannot be read.
  """
  with _opened(path, max_pixels) as im:
    return _rgb(im, _orientation(im))


def inspect_image(path, *, verify: bool = False,
                  max_pixels: int = MAX_PIXELS) -> int:
  """How ``decode_file`` will decode ``path``: ``NATIVE_JPEG``,
  ``NATIVE_PNG`` or ``PILLOW``.

  Args:
    path: an image file.
    verify: also decode the whole image (catches truncated files and NaN
      pixels); otherwise only the header is read.
    max_pixels: larger images are corrupt.

  Raises:
    CorruptImageError: naming ``path`` when it cannot be read.
  """
  with _opened(path, max_pixels) as im:
    kind, modes = _NATIVE_MODES.get(im.format, (PILLOW, ()))
    orientation = _orientation(im)
    if (im.mode not in modes or orientation != 1
        or getattr(im, "is_animated", False)):
      kind = PILLOW
    if verify and kind == PILLOW:
      _rgb(im, orientation)  # what can fail beyond the decode: NaN, modes
    elif verify:
      im.load()
  return kind


def decode_file(path, kind, *, max_pixels: int = MAX_PIXELS):
  """Reads and decodes one file inside tf.data: uint8 (H, W, 3).

  Args:
    path: a scalar string tensor, the file's bytes path (``os.fsencode``).
    kind: a scalar int tensor, ``inspect_image``'s answer for the file.
    max_pixels: the limit for files decoded by Pillow (native ones were
      checked by ``inspect_image``).

  Returns:
    The same pixels as ``read_image(path)``.
  """
  tf = quiet.tensorflow()  # tf.data only

  def pillow():
    image = tf.py_function(lambda p: read_image(p.numpy(), max_pixels=max_pixels),
                           [path], tf.uint8)
    return tf.ensure_shape(image, (None, None, 3))
  image = tf.switch_case(kind, [
      lambda: tf.io.decode_jpeg(tf.io.read_file(path), channels=3,
                                dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_png(tf.io.read_file(path), channels=3),
      pillow])
  return tf.ensure_shape(image, (None, None, 3))
