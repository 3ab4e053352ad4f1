"""The fine-grained TFDS datasets (mocked) and image-folder datasets."""

import io
import logging

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from brnpa_jax.data import (catalog, image_files, image_folder, input_pipeline,
                            tfds_datasets, transforms)
from fake_tfds import H, W, mock_tfds


# --- mocked TFDS datasets ----------------------------------------------------


def data_config(name, size=32, **kw):
  cfg = catalog.fine_grained_data_config(name, image_size=size, **kw)
  cfg.shuffle_buffer = 16
  return cfg


def test_cub_under_mock_data_has_masks_and_boxes():
  cfg = data_config("caltech_birds2011")
  with mock_tfds(6):
    assert input_pipeline.num_classes(cfg) == 200
    assert input_pipeline.num_examples(cfg, "validation") == 6
    train = list(input_pipeline.make_train_dataset(
        cfg, batch_size=4, seed=0, epoch=0).as_numpy_iterator())
    evals = list(input_pipeline.make_eval_dataset(
        cfg, "test", batch_size=4).as_numpy_iterator())
  assert len(train) == 1
  assert train[0]["image"].shape == (4, 32, 32, 3)
  assert train[0]["image"].dtype == np.float32
  assert train[0]["label"].dtype == np.int32
  assert len(evals) == 2 and evals[1]["mask"].tolist() == [1, 1, 0, 0]
  batch = evals[0]
  assert batch["object_mask"].shape == (4, 32, 32)
  assert batch["object_mask"].dtype == np.float32
  assert batch["bbox"].shape == (4, 4) and batch["bbox"].dtype == np.float32
  assert batch["label"].tolist() == [0, 1, 2, 3]
  assert batch["id"].tolist() == [0, 1, 2, 3]
  # 40 x 60 -> short side 36 (36 x 54) -> centre crop 32 at (2, 11).
  np.testing.assert_allclose(batch["bbox"][0], [7 / 32, 16 / 32, 25 / 32, 1.0],
                             atol=1e-6)
  # The mask is the box: the 100-valued strip (a minority) is background.
  mask = batch["object_mask"][0]
  assert set(np.unique(mask)) == {0.0, 1.0}
  ys, xs = np.nonzero(mask)
  assert abs(ys.min() - 7) <= 1 and abs(ys.max() + 1 - 25) <= 1
  assert abs(xs.min() - 16) <= 1 and xs.max() == 31
  np.testing.assert_array_equal(evals[1]["bbox"][2:], 0.0)  # padding


def test_cub_validation_is_carved_from_train():
  splits = catalog.FINE_GRAINED["caltech_birds2011"].splits
  assert splits["train"] == "train[:90%]" and splits["validation"] == "train[90%:]"
  assert splits["test"] == "test" and splits["trainval"] == "train"
  flowers = catalog.FINE_GRAINED["oxford_flowers102"].splits
  assert flowers["validation"] == "validation"


@pytest.mark.parametrize("name,classes,extra", [
    ("cars196", 196, {"bbox"}),
    ("stanford_dogs", 120, {"bbox"}),
    ("oxford_flowers102", 102, set()),
    ("oxford_iiit_pet", 37, {"object_mask"}),
])
def test_other_fine_grained_datasets_under_mock_data(name, classes, extra):
  cfg = data_config(name)
  with mock_tfds(3):
    assert input_pipeline.num_classes(cfg) == classes
    train = next(input_pipeline.make_train_dataset(
        cfg, batch_size=2, seed=0, epoch=0).as_numpy_iterator())
    batch = next(input_pipeline.make_eval_dataset(
        cfg, "validation", batch_size=2).as_numpy_iterator())
  assert train["image"].shape == (2, 32, 32, 3)
  assert set(batch) == {"image", "label", "mask", "id"} | extra
  if name == "stanford_dogs":  # the box enclosing both dogs
    enclosing = transforms.eval_box(tf.constant([0.1, 0.1, 0.9, 0.4]),
                                    tf.constant([H, W]), size=32,
                                    resize_mode=cfg.resize)
    np.testing.assert_allclose(batch["bbox"][0], enclosing.numpy(), atol=1e-6)
  if name == "oxford_iiit_pet":  # pet and outline, not background
    ys, xs = np.nonzero(batch["object_mask"][0])
    assert abs(ys.min() - 7) <= 1 and abs(xs.min() - 16) <= 1


def test_unprepared_tfds_dataset_says_how_to_get_it(tmp_path):
  cfg = data_config("stanford_dogs", data_dir=str(tmp_path))
  with pytest.raises(catalog.DatasetNotPreparedError) as e:
    input_pipeline.num_classes(cfg)
  msg = str(e.value)
  assert f"tfds build stanford_dogs --data_dir={tmp_path}" in msg
  assert f"{tmp_path}/downloads/manual" in msg and "images.tar" in msg
  assert "pip install scipy" in msg


def test_unknown_fine_grained_dataset():
  with pytest.raises(ValueError, match="valid:.*caltech_birds2011"):
    catalog.fine_grained_data_config("cub")
  with pytest.raises(ValueError, match="data_dir"):
    catalog.fine_grained_data_config("folder")


def test_recipe_augmentation_settings():
  cfg = catalog.fine_grained_data_config()
  assert (cfg.image_size, cfg.resize_ratio, cfg.flip) == (448, 0.875, True)
  assert (cfg.brightness, cfg.saturation) == (0.126, 0.5)
  assert transforms.resize_size(448, cfg.resize_ratio) == 512
  assert transforms.resize_size(224, cfg.resize_ratio) == 256


def test_eval_box_follows_the_centre_crop():
  # 100 x 50 (portrait) at size 28: short side 32 -> 64 x 32, crop top 18.
  box = transforms.eval_box(tf.constant([0.5, 0.0, 1.0, 0.5]), tf.constant([100, 50]),
                            size=28)
  np.testing.assert_allclose(box.numpy(), [14 / 28, 0.0, 1.0, 14 / 28], atol=1e-6)
  # Square resize (the release's): 100 x 50 -> 32 x 32, crop offset 2 both ways.
  box = transforms.eval_box(tf.constant([0.5, 0.0, 1.0, 0.5]), tf.constant([100, 50]),
                            size=28, resize_mode="square")
  np.testing.assert_allclose(box.numpy(), [14 / 28, 0.0, 1.0, 14 / 28], atol=1e-6)
  box = transforms.eval_box(tf.constant([0.0, 0.0, 0.25, 1.0]), tf.constant([100, 50]),
                            size=28, resize_mode="square")
  np.testing.assert_allclose(box.numpy(), [0.0, 0.0, 6 / 28, 1.0], atol=1e-6)


@pytest.mark.parametrize("mode", ["short_side", "square"])
def test_resize_modes_keep_or_drop_the_aspect_ratio(mode):
  """A 40 x 120 image with a white left quarter: the square resize squeezes
  the width, so the centre crop still shows the white; the short-side
  resize keeps the aspect ratio and the centre crop cuts the left end off."""
  image = np.zeros((40, 120, 3), np.uint8)
  image[:, :30] = 255  # a white left quarter
  out, _ = transforms.eval_transform(tf.constant(image), {}, size=28,
                                     resize_mode=mode)
  left_column = out.numpy()[:, 0].mean()
  if mode == "square":  # 120 -> 32 wide: the white end survives the crop
    assert left_column > 1.0
  else:  # 120 -> 96 wide, crop offset 34: the left end is cut off
    assert left_column < -1.0
  with pytest.raises(ValueError, match="resize="):
    transforms.resize(tf.zeros((4, 4, 3)), {}, 8, "stretch")


# --- image folders -------------------------------------------------------------


def _save(path, image, fmt, **kw):
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, fmt, **kw)
  return path


def _colour(seed, size=(24, 18)):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _write_tree(root, corrupt=True):
  """train/ with 3 classes of 4 (every colour mode), test/ with 2 per class."""
  files = {}
  modes = ["RGB", "L", "RGBA", "P", "CMYK", "LA"]
  k = 0
  for split, per_class in (("train", 4), ("test", 2)):
    for c in ("cardinal", "albatross", "wren"):
      for j in range(per_class):
        mode = modes[k % len(modes)]
        image = _colour(k).convert(mode)
        fmt = "JPEG" if mode in ("RGB", "L", "CMYK") else "PNG"
        if mode == "P":
          image.info["transparency"] = 0
        ext = "jpg" if fmt == "JPEG" else "png"
        path = _save(root / split / c / f"{j}_{mode}.{ext}", image, fmt)
        files[str(path)] = (split, c, mode)
        k += 1
  (root / "train" / "wren" / "notes.txt").write_text("not an image")
  if corrupt:
    good = io.BytesIO()
    _colour(99, (200, 150)).save(good, "JPEG")  # header intact, data cut
    data = good.getvalue()
    (root / "train" / "wren" / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (root / "train" / "albatross" / "garbage.jpg").write_bytes(b"\x00" * 64)
  return files


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  return root, _write_tree(root, corrupt=False)


@pytest.fixture(scope="module")
def corrupt_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("corrupt")
  _write_tree(root, corrupt=True)
  return root


def test_folder_classes_splits_and_kinds(tree):
  root, files = tree
  ds = image_folder.ImageFolder(str(root), validation_percent=25)
  assert ds.classes == ["albatross", "cardinal", "wren"]
  assert ds.num_classes() == 3
  assert (ds.count("train"), ds.count("validation"), ds.count("test")) == (9, 3, 6)
  assert ds.count("trainval") == 12
  train = {f.path for f in ds.files("train")}
  val = ds.files("validation")
  assert not train & {f.path for f in val}
  assert sorted(f.label for f in val) == [0, 1, 2]  # one per class
  for f in ds.files("trainval") + ds.files("test"):
    split, cls, mode = files[f.path]
    assert ds.classes[f.label] == cls and f"/{split}/" in f.path
    expected = {"RGB": image_files.NATIVE_JPEG, "L": image_files.NATIVE_JPEG,
                "CMYK": image_files.PILLOW}.get(mode, image_files.NATIVE_PNG)
    assert f.kind == expected, (f.path, mode)
  again = image_folder.ImageFolder(str(root), validation_percent=25)
  assert again.files("validation") == val
  other = image_folder.ImageFolder(str(root), validation_percent=25, seed=1)
  assert other.files("validation") != val


def test_folder_decodes_every_mode_to_rgb_like_pillow(tree):
  root, files = tree
  ds = image_folder.ImageFolder(str(root))
  for f in ds.files("trainval"):
    got = image_files.decode_file(tf.constant(f.path), tf.constant(f.kind)).numpy()
    with Image.open(f.path) as im:
      want = np.asarray(im.convert("RGB"))
    assert got.shape == (18, 24, 3) and got.dtype == np.uint8
    # The same pixels as torchvision's loader (Pillow's convert('RGB')) for
    # every 8-bit mode, native decoders included.
    np.testing.assert_array_equal(got, want, err_msg=f.path)
    if files[f.path][2] == "CMYK":
      rgb = np.asarray(_colour(list(files).index(f.path)), int)
      assert np.abs(got.astype(int) - rgb).mean() < 20  # colours survive


def test_folder_pipeline(tree):
  root, _ = tree
  cfg = data_config("folder", size=32, data_dir=str(root))
  cfg.folder.validation_percent = 25.0
  assert input_pipeline.num_classes(cfg) == 3
  assert input_pipeline.num_examples(cfg, "train") == 9
  train = list(input_pipeline.make_train_dataset(
      cfg, batch_size=4, seed=0, epoch=0).as_numpy_iterator())
  assert len(train) == 2 and train[0]["image"].shape == (4, 32, 32, 3)
  assert np.isfinite(train[0]["image"]).all()
  evals = list(input_pipeline.make_eval_dataset(
      cfg, "test", batch_size=4).as_numpy_iterator())
  ids = np.concatenate([b["id"] for b in evals])
  assert sorted(ids[ids >= 0]) == list(range(6))
  folder = image_folder.load(str(root), 25.0)
  labels = np.concatenate([b["label"] for b in evals])[ids >= 0]
  assert labels.tolist() == [folder.files("test")[i].label for i in ids[ids >= 0]]
  quarters = [folder.read("test", keep=("id",), process_index=i, process_count=4)[0]
              for i in range(4)]
  seen = sorted(int(ex["id"]) for q in quarters for ex in q.as_numpy_iterator())
  assert seen == list(range(6))
  # 'slice': two processes hold the rows of the one-process global batches.
  cfg.process_split = "slice"
  rows = [next(input_pipeline.make_train_dataset(
      cfg, batch_size=2, seed=0, epoch=0, process_index=i, process_count=2
  ).as_numpy_iterator())["image"] for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(rows), train[0]["image"])


def test_folder_at_448(tree):
  root, _ = tree
  cfg = data_config("folder", size=448, data_dir=str(root))
  batch = next(input_pipeline.make_eval_dataset(cfg, "validation", batch_size=1)
               .as_numpy_iterator())
  assert batch["image"].shape == (1, 448, 448, 3)


def test_corrupt_files_are_named(corrupt_tree):
  root = corrupt_tree
  with pytest.raises(image_folder.CorruptImageError) as e:
    image_folder.ImageFolder(str(root))
  msg = str(e.value)
  assert "2 unreadable" in msg and "on_corrupt='skip'" in msg
  assert str(root / "train/wren/truncated.jpg") in msg
  assert str(root / "train/albatross/garbage.jpg") in msg
  # Without a full decode only the unreadable header is found.
  with pytest.raises(image_folder.CorruptImageError) as e:
    image_folder.ImageFolder(str(root), verify=False)
  assert "1 unreadable" in str(e.value) and "garbage.jpg" in str(e.value)


def test_corrupt_files_can_be_skipped(corrupt_tree, caplog):
  with caplog.at_level(logging.WARNING):
    ds = image_folder.ImageFolder(str(corrupt_tree), on_corrupt="skip")
  assert "truncated.jpg" in caplog.text and "garbage.jpg" in caplog.text
  assert ds.count("trainval") == 12  # the .txt file is ignored as well


def test_missing_folders_say_what_layout_is_expected(tmp_path, tree):
  with pytest.raises(catalog.DatasetNotPreparedError,
                     match=r"(?s)does not exist.*nowhere/train/<class>/<image>"):
    image_folder.ImageFolder(str(tmp_path / "nowhere"))
  (tmp_path / "images").mkdir()
  with pytest.raises(catalog.DatasetNotPreparedError, match="No train/ folder"):
    image_folder.ImageFolder(str(tmp_path))
  only_train = tmp_path / "only_train"
  _save(only_train / "train" / "a" / "x.png", _colour(0), "PNG")
  _save(only_train / "train" / "a" / "y.png", _colour(1), "PNG")
  ds = image_folder.ImageFolder(str(only_train))
  with pytest.raises(ValueError, match="no split 'test'.*test/ folder"):
    ds.files("test")
  _save(only_train / "test" / "b" / "z.png", _colour(2), "PNG")
  with pytest.raises(catalog.DatasetNotPreparedError, match=r"train/ lacks: \['b'\]"):
    image_folder.ImageFolder(str(only_train))
  with pytest.raises(ValueError, match="on_corrupt"):
    image_folder.ImageFolder(str(tree[0]), on_corrupt="ignore")


def test_the_authors_layout_and_the_cub_archive(tmp_path):
  # The official archive: images/<class>/, images.txt, train_test_split.txt.
  cub = tmp_path / "CUB_200_2011"
  names, split = [], []
  for i, (cls, is_train) in enumerate([("001.Albatross", 1), ("001.Albatross", 0),
                                       ("002.Auklet", 1), ("002.Auklet", 1),
                                       ("002.Auklet", 0)], start=1):
    _save(cub / "images" / cls / f"{cls}_{i}.jpg", _colour(i), "JPEG")
    names.append(f"{i} {cls}/{cls}_{i}.jpg")
    split.append(f"{i} {is_train}")
  (cub / "images.txt").write_text("\n".join(names) + "\n")
  (cub / "train_test_split.txt").write_text("\n".join(split) + "\n")
  # Arranged as the authors' release reads it: data/CUB-200-2011_{train,test}.
  arranged, data = tmp_path / "arranged", tmp_path / "data"
  assert image_folder.arrange_cub(str(cub), str(arranged)) == {"train": 3, "test": 2}
  assert (arranged / "train" / "002.Auklet" / "002.Auklet_3.jpg").is_symlink()
  data.mkdir()
  for split in ("train", "test"):
    (arranged / split).rename(data / f"CUB-200-2011_{split}")
  ds = image_folder.ImageFolder(str(data))
  assert ds.classes == ["001.Albatross", "002.Auklet"]
  assert (ds.count("train") + ds.count("validation"), ds.count("test")) == (3, 2)
  assert all("CUB-200-2011_test" in f.path for f in ds.files("test"))
  (data / "cars_train").mkdir()
  with pytest.raises(catalog.DatasetNotPreparedError, match="Several train"):
    image_folder.ImageFolder(str(data))
  with pytest.raises(FileNotFoundError, match="images.txt is missing"):
    image_folder.arrange_cub(str(tmp_path / "data"), str(tmp_path / "out"))
