"""The one image decoder: every mode by its value range, both decoding paths,
pixel limits, names of any bytes, folders (empty classes, links, hidden)."""

import csv
import io
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import train
from brnpa_jax import cli, predict
from brnpa_jax.data import catalog, image_files, image_folder
from brnpa_jax.data.transforms import eval_transform

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOWRES = os.path.join(REPO, "configs", "cub_brnpa_lowres.py")
H, W = 6, 5
BOMB_SIDE = 20_000  # 400 M pixels: over twice Pillow's default limit
ODD_NAMES = [b"caf\xe9 latin-1.png", "naïve ünïcode.png".encode(), b"a,comma.png",
             b'say "cheese".png', b"new\nline.png", b"-leading dash.png",
             b" spaced .png"]


def _chunk(kind, data):
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data)))


def _png(samples, depth, colour_type, palette=None, trns=None, size=None):
  """A PNG written byte by byte (any bit depth; Pillow writes few)."""
  h, w, _ = samples.shape
  rows = []
  for row in samples:
    flat = row.reshape(-1)
    if depth < 8:
      bits = np.unpackbits(flat.astype(np.uint8)[:, None], axis=1)[:, 8 - depth:]
      rows.append(b"\0" + np.packbits(bits.reshape(-1)).tobytes())
    else:
      rows.append(b"\0" + flat.astype(">u2" if depth == 16 else "u1").tobytes())
  w, h = size or (w, h)
  out = b"\x89PNG\r\n\x1a\n" + _chunk(
      b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0))
  if palette is not None:
    out += _chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
  if trns is not None:
    out += _chunk(b"tRNS", trns)
  return out + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b"")


def _saved(image, fmt, **kw):
  buf = io.BytesIO()
  image.save(buf, fmt, **kw)
  return buf.getvalue()


def _grey(g):
  return np.repeat(np.asarray(g)[..., None], 3, axis=-1).astype(np.uint8)


ORIENT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
          4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
          6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1),
          7: lambda a: a[::-1, ::-1].transpose(1, 0, 2)}


def _mode_cases():
  """``(file name, bytes, expected RGB, atol)`` for every mode Pillow opens."""
  rng = np.random.default_rng(0)
  cases = []

  def add(name, data, want, atol=0):
    cases.append((name, data, np.asarray(want, np.uint8), atol))
  for depth in (1, 2, 4, 8, 16):  # grey, scaled to 0..255 / high byte
    x = rng.integers(0, 2 ** depth, (H, W, 1))
    scaled = x[..., 0] >> 8 if depth == 16 else x[..., 0] * 255 // (2 ** depth - 1)
    add(f"grey{depth}.png", _png(x, depth, 0), _grey(scaled))
  x = rng.integers(0, 65536, (H, W, 1))
  add("grey16_trns.png", _png(x, 16, 0, trns=struct.pack(">H", x[0, 0, 0])),
      _grey(x[..., 0] >> 8))
  for depth, ctype in ((16, 2), (16, 6), (16, 4), (8, 4), (8, 6)):  # alpha dropped
    x = rng.integers(0, 2 ** depth, (H, W, {2: 3, 4: 2, 6: 4}[ctype]))
    rgb = x[..., :3] if x.shape[-1] >= 3 else np.repeat(x[..., :1], 3, -1)
    add(f"c{ctype}_{depth}.png", _png(x, depth, ctype), rgb >> (depth - 8))
  for depth in (1, 4, 8):
    palette = rng.integers(0, 256, (2 ** depth, 3))
    x = rng.integers(0, 2 ** depth, (H, W, 1))
    for trns in (None, bytes(range(0, 256, 37))[:2 ** depth]):
      add(f"p{depth}{'_trns' if trns else ''}.png", _png(x, depth, 3, palette, trns),
          palette[x[..., 0]])
  u16 = rng.integers(0, 65536, (H, W)).astype(np.uint16)
  add("i16.tif", _saved(Image.fromarray(u16), "TIFF"), _grey(u16 >> 8))
  big_endian = Image.fromarray(u16).convert("I").convert("I;16B")
  add("i16b.tif", _saved(big_endian, "TIFF"), _grey(u16 >> 8))
  add("grey16.pgm", b"P5\n%d %d\n65535\n" % (W, H) + u16.astype(">u2").tobytes(),
      _grey(u16 >> 8))
  i32 = rng.integers(-70_000, 70_000, (H, W)).astype(np.int64)  # own range
  add("i32.tif", _saved(Image.fromarray(i32.astype(np.int32)), "TIFF"),
      _grey((i32 - i32.min()) * 256 // (i32.max() - i32.min() + 1)))
  f01 = rng.random((H, W)).astype(np.float32)  # [0, 1]: x 255
  add("f01.tif", _saved(Image.fromarray(f01), "TIFF"), _grey(np.rint(f01 * 255.0)))
  wide = (f01 * 1000 - 300).astype(np.float32)  # otherwise its own range
  add("fwide.tif", _saved(Image.fromarray(wide), "TIFF"),
      _grey(np.rint((wide - wide.min()) / (wide.max() - wide.min()) * 255)))
  src = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
  bilevel = Image.fromarray(src).convert("1")
  add("bilevel.tif", _saved(bilevel, "TIFF"), np.asarray(bilevel.convert("RGB")))
  cmyk = rng.integers(0, 256, (H, W, 4)).astype(np.uint8)
  add("cmyk.tif", _saved(Image.fromarray(cmyk, "CMYK"), "TIFF"),
      np.rint((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:].astype(float)) / 255), 1)
  smooth = np.clip(np.mgrid[0:16, 0:16, 0:3].sum(0) * 8, 0, 255).astype(np.uint8)
  add("cmyk.jpg", _saved(Image.fromarray(smooth).convert("CMYK"), "JPEG",
                         quality=95), smooth, 8)
  for mode, atol in (("YCbCr", 2), ("LAB", 8)):  # 8-bit LAB is coarse near black
    add(f"{mode}.tif", _saved(Image.fromarray(smooth).convert(mode), "TIFF"),
        smooth, atol)
  add("la.tif", _saved(Image.fromarray(src).convert("LA"), "TIFF"),
      _grey(np.asarray(Image.fromarray(src).convert("L"))))
  frames = [Image.fromarray(np.full((H, W, 3), v, np.uint8)) for v in (40, 200)]
  for fmt, kw in (("GIF", {}), ("WEBP", {"lossless": True})):  # the first frame
    add(f"anim.{fmt.lower()}", _saved(frames[0], fmt, save_all=True,
                                      append_images=frames[1:], **kw), frames[0])
  palette_bmp = Image.fromarray(src).convert("P")
  add("p.bmp", _saved(palette_bmp, "BMP"), np.asarray(palette_bmp.convert("RGB")))
  for o in range(1, 9):  # EXIF orientation, applied
    exif = Image.Exif()
    exif[274] = o
    add(f"orient{o}.png", _saved(Image.fromarray(src), "PNG", exif=exif),
        ORIENT[o](src))
  return cases


def _write(folder, name, data):
  path = os.path.join(os.fsencode(str(folder)), name if isinstance(name, bytes)
                      else name.encode())
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return os.fsdecode(path)


def _tf_path(paths, max_pixels=image_files.MAX_PIXELS):
  """Every file through tf.data, as the training pipeline decodes them."""
  kinds = [image_files.inspect_image(p, verify=True, max_pixels=max_pixels)
           for p in paths]
  ds = tf.data.Dataset.from_tensor_slices(([os.fsencode(p) for p in paths], kinds))
  ds = ds.map(lambda p, k: image_files.decode_file(p, k, max_pixels=max_pixels))
  return kinds, list(ds.as_numpy_iterator())


def test_every_mode_by_its_range_the_same_on_both_paths(tmp_path):
  cases = _mode_cases()
  paths = [_write(tmp_path, name, data) for name, data, _, _ in cases]
  kinds, decoded = _tf_path(paths)
  for (name, _, want, atol), path, kind, got in zip(cases, paths, kinds, decoded):
    plain = image_files.read_image(path)
    np.testing.assert_array_equal(got, plain, err_msg=name)  # tf.data == plain
    assert plain.dtype == np.uint8 and plain.shape == want.shape, name
    np.testing.assert_allclose(plain.astype(int), want.astype(int), atol=atol,
                               err_msg=name)
    native = name.endswith(".png") and name[:6] != "orient" or name == "orient1.png"
    assert (kind == image_files.NATIVE_PNG) == native, name
  # EXIF orientation on a JPEG: Pillow's path, same decode as without it.
  src = np.asarray(Image.open(io.BytesIO(cases[-1][1])).convert("RGB"))
  exif = Image.Exif()
  exif[274] = 6
  plain = _write(tmp_path, "up.jpg", _saved(Image.fromarray(src), "JPEG"))
  turned = _write(tmp_path, "turned.jpg", _saved(Image.fromarray(src), "JPEG",
                                                 exif=exif))
  (k_plain, k_turned), (d_plain, d_turned) = _tf_path([plain, turned])
  assert (k_plain, k_turned) == (image_files.NATIVE_JPEG, image_files.PILLOW)
  np.testing.assert_array_equal(d_turned, np.rot90(d_plain, -1))
  np.testing.assert_array_equal(image_files.read_image(turned), d_turned)


def test_nan_pixels_and_bombs_are_corrupt(tmp_path, monkeypatch):
  nan = np.zeros((H, W), np.float32)
  nan[1, 2] = np.nan
  path = _write(tmp_path, "nan.tif", _saved(Image.fromarray(nan), "TIFF"))
  with pytest.raises(image_files.CorruptImageError, match="nan.tif.*NaN"):
    image_files.read_image(path)
  bomb = _write(tmp_path, "bomb.png", _png(np.zeros((1, 1, 1)), 8, 0,
                                          size=(BOMB_SIDE, BOMB_SIDE)))
  for check in (image_files.read_image, image_files.inspect_image):
    with pytest.raises(image_files.CorruptImageError, match="bomb.png.*pixels"):
      check(bomb)
  small = _write(tmp_path, "small.png", _png(np.zeros((8, 8, 1)), 8, 0))
  assert image_files.read_image(small, max_pixels=64).shape == (8, 8, 3)
  with pytest.raises(image_files.CorruptImageError, match="8x8 is 64 pixels.*63"):
    image_files.inspect_image(small, max_pixels=63)
  # A limit over Pillow's own lifts it rather than failing at open.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
  wide = _write(tmp_path, "wide.png", _png(np.zeros((1, 1, 1)), 8, 0,
                                          size=(BOMB_SIDE, BOMB_SIDE)))
  assert image_files.inspect_image(wide, max_pixels=BOMB_SIDE ** 2) == \
      image_files.NATIVE_PNG


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
  """Odd names, a nested 16-bit PNG, hidden images, a folder link, a loop."""
  root = tmp_path_factory.mktemp("messy")
  rng = np.random.default_rng(1)
  for i, name in enumerate(ODD_NAMES):
    _write(root, name, _saved(Image.fromarray(
        rng.integers(0, 256, (8 + i, 9, 3)).astype(np.uint8)), "PNG"))
  deep = rng.integers(0, 65536, (12, 10, 1))
  _write(root, b"nested/deep16.png", _png(deep, 16, 0))
  tiny = _png(np.zeros((2, 2, 1)), 8, 0)
  _write(root, b".hidden.png", tiny)  # images, but hidden: not read
  _write(root, b".cache/x.png", tiny)
  os.symlink(root / "nested", root / "loop")            # the folder twice
  os.symlink(root / "nested" / "loop", root / "nested" / "loop")  # to itself
  return root, _grey(deep[..., 0] >> 8)


def test_predict_reads_a_sixteen_bit_png_by_its_range(messy):
  root, want = messy
  names, batch, _ = next(predict.folder_batches(str(root), 32, 0.875, 16))
  deep = eval_transform(want, {}, size=32)[0].numpy()
  np.testing.assert_allclose(batch[names.index("nested/deep16.png")], deep,
                             atol=1e-6)


def test_odd_names_round_trip_through_csv_and_npz(messy, tmp_path):
  names, _, _ = next(predict.folder_batches(str(messy[0]), 32, 0.875, 16))
  preds = predict.Predictions(names, None, {
      "probs": np.full((len(names), 3), 1 / 3, np.float32),
      "maps": np.zeros((len(names), 2, 2, 2), np.float32),
      "norms": np.zeros((len(names), 2, 2), np.float32)}, 0.0, 0.0, 0.0)
  predict.write_outputs(str(tmp_path), preds, 2)
  with open(tmp_path / "predictions.csv", newline="", encoding="utf-8") as f:
    assert [r[0] for r in csv.reader(f)][1:] == names
  with np.load(tmp_path / "maps.npz") as z:
    assert list(z["files"]) == names
  # Names as they are, bytes that are not UTF-8 as \xNN; each folder once.
  assert names == sorted([image_files.display_name(n) for n in ODD_NAMES]
                         + ["nested/deep16.png"])
  assert "caf\\xe9 latin-1.png" in names and "new\nline.png" in names


def test_predict_skips_a_bomb(tmp_path, capsys):
  rng = np.random.default_rng(2)
  _write(tmp_path, b"good.png", _saved(Image.fromarray(
      rng.integers(0, 256, (9, 9, 3)).astype(np.uint8)), "PNG"))
  _write(tmp_path, b"bomb.png", _png(np.zeros((1, 1, 1)), 8, 0,
                                     size=(BOMB_SIDE, BOMB_SIDE)))
  names, _, _ = next(predict.folder_batches(str(tmp_path), 32, 0.875, 2,
                                            on_corrupt="skip"))
  assert names == ["good.png"]
  assert "bomb.png" in capsys.readouterr().err


def test_predict_cli_on_a_messy_folder(messy, finished_run, tmp_path, capsys):
  root, _ = messy
  workdir = str(finished_run.workdir)
  bomb = _write(root.parent / "with_bomb", b"bomb.png",
                _png(np.zeros((8, 8, 1)), 8, 0))
  status = predict.main(["--workdir", workdir, "--images", os.path.dirname(bomb),
                         "--out", str(tmp_path / "e"), "--max_pixels", "63"])
  err = capsys.readouterr().err
  assert status == 2 and len(err.strip().splitlines()) <= 3, err
  assert "bomb.png: 8x8 is 64 pixels" in err and "--on_corrupt=skip" in err
  out = tmp_path / "o"
  status = predict.main(["--workdir", workdir, "--images", str(root), "--out",
                         str(out), "--batch", "4", "--on_corrupt=skip"])
  assert status == 0, capsys.readouterr().err
  with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  expected = sorted([image_files.display_name(n) for n in ODD_NAMES]
                    + ["nested/deep16.png"])
  assert [r[0] for r in rows[1:]] == expected
  with np.load(out / "maps.npz") as z:
    assert list(z["files"]) == expected and np.isfinite(z["probs"]).all()


def _tree(root, classes):
  rng = np.random.default_rng(3)
  for c, names in classes.items():
    os.makedirs(os.path.join(os.fsencode(str(root)), b"train", c), exist_ok=True)
    for name in names:
      _write(root, b"train/" + c + b"/" + name, _saved(Image.fromarray(
          rng.integers(0, 256, (7, 7, 3)).astype(np.uint8)), "PNG"))
  return root


def _decoded(folder, split="train"):
  """``{path: pixels}`` of a split, through the training pipeline's tf.data."""
  ds, decode = folder.read(split, keep=("image", "id"))
  files = folder.files(split)
  return {files[int(ex["id"])].path: ex["image"]
          for ex in ds.map(decode).as_numpy_iterator()}


def test_training_folder_reads_a_sixteen_bit_png_by_its_range(tmp_path):
  root = _tree(tmp_path, {b"a": [b"1.png"], b"b": [b"2.png"]})
  deep = np.random.default_rng(4).integers(0, 65536, (9, 11, 1))
  path = _write(root, b"train/a/deep16.png", _png(deep, 16, 0))
  folder = image_folder.ImageFolder(str(root), validation_percent=0)
  np.testing.assert_array_equal(_decoded(folder)[path], _grey(deep[..., 0] >> 8))
  assert {f.path: f.kind for f in folder.files("train")}[path] == \
      image_files.NATIVE_PNG  # TensorFlow's decoder, Pillow's pixels


def test_training_folder_names_links_and_hidden_files(tmp_path):
  root = _tree(tmp_path / "d", {b"caf\xe9": ODD_NAMES,
                                b"plain": [b"a.png", b"b.png"]})
  _write(root, b"train/plain/sub/nested.png", _png(np.zeros((3, 3, 1)), 8, 0))
  _write(root, b"train/plain/.hidden.png", b"not read")
  _write(root, b"train/plain/.cache/x.png", b"not read")
  outside = tmp_path / "outside"
  _write(outside, b"linked.png", _saved(Image.new("RGB", (5, 5)), "PNG"))
  os.symlink(outside, root / "train" / "plain" / "linked_dir")
  os.symlink(outside / "linked.png", root / "train" / "plain" / "link.png")
  os.symlink(root / "train" / "plain", root / "train" / "plain" / "loop")
  folder = image_folder.ImageFolder(str(root), validation_percent=0)
  assert folder.class_names() == ["caf\\xe9", "plain"]
  rel = sorted(os.path.relpath(f.path, root / "train")
               for f in folder.files("train"))
  assert rel == sorted([os.path.join("caf\udce9", os.fsdecode(n)) for n in ODD_NAMES]
                       + ["plain/a.png", "plain/b.png", "plain/link.png",
                          "plain/linked_dir/linked.png", "plain/sub/nested.png"])
  decoded = _decoded(folder)
  assert len(decoded) == len(rel)
  for path, pixels in decoded.items():
    np.testing.assert_array_equal(pixels, image_files.read_image(path))
  # A broken link is an unreadable file: named, or skipped.
  os.symlink(tmp_path / "gone.png", root / "train" / "plain" / "broken.png")
  with pytest.raises(image_files.CorruptImageError, match="broken.png"):
    image_folder.ImageFolder(str(root), validation_percent=0)
  assert image_folder.ImageFolder(str(root), validation_percent=0,
                                  on_corrupt="skip").count("train") == len(rel)


def test_training_folder_bombs_error_or_skip(tmp_path, caplog):
  root = _tree(tmp_path, {b"a": [b"1.png", b"2.png"], b"b": [b"3.png"]})
  _write(root, b"train/b/bomb.png", _png(np.zeros((1, 1, 1)), 8, 0,
                                         size=(BOMB_SIDE, BOMB_SIDE)))
  _write(root, b"train/a/big.png", _png(np.zeros((8, 8, 1)), 8, 0))
  with pytest.raises(image_files.CorruptImageError) as e:
    image_folder.ImageFolder(str(root), max_pixels=63)
  assert "2 unreadable" in str(e.value) and len(str(e.value).splitlines()) == 1
  assert "bomb.png" in str(e.value) and "big.png: 8x8" in str(e.value)
  folder = image_folder.ImageFolder(str(root), validation_percent=0,
                                    on_corrupt="skip", max_pixels=63)
  assert folder.count("train") == 3 and "bomb.png" in caplog.text
  assert image_folder.ImageFolder(str(root), validation_percent=0,
                                  on_corrupt="skip").count("train") == 4


def test_empty_class_folders_are_refused(tmp_path, capsys):
  root = _tree(tmp_path, {b"cat": [b"1.png", b"2.png"], b"dog": [b"3.png"],
                          b"empty": [], b"hidden_only": []})
  _write(root, b"train/hidden_only/.x.png", b"not read")
  _write(root, b"train/dog/bad.png", b"not an image")
  with pytest.raises(catalog.DatasetNotPreparedError,
                     match=r"2 class folder\(s\) .* no readable image: empty, "
                     "hidden_only. Add images"):
    image_folder.ImageFolder(str(root), on_corrupt="skip")
  os.rmdir(root / "train" / "empty")
  os.remove(root / "train" / "hidden_only" / ".x.png")
  os.rmdir(root / "train" / "hidden_only")
  os.remove(root / "train" / "dog" / "3.png")  # dog: only the corrupt file
  with pytest.raises(catalog.DatasetNotPreparedError, match="readable image: dog"):
    image_folder.ImageFolder(str(root), on_corrupt="skip")
  # From the command line: one line, status 2, no workdir; a corrupt file
  # (dog/bad.png) first, then the class it leaves empty.
  def train_on_folder():
    status = cli.run(train.define_flags, train.main, prog="train.py", argv=[
        "--config", f"{LOWRES}:runlocal,dataset=folder,data_dir={root}",
        f"--workdir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) <= 3, err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "run")
    return err
  assert "bad.png: UnidentifiedImageError" in train_on_folder()
  os.remove(root / "train" / "dog" / "bad.png")
  assert "readable image: dog" in train_on_folder()
