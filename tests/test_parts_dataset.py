"""Tests of the parts dataset, its TFDS builder and the input pipeline."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from brnpa_jax.data import catalog, input_pipeline, parts, parts_tfds, transforms

SPLITS = ("train", "validation", "test")
SMALL = {"train_size": 96, "validation_size": 20, "test_size": 30}


def small_config(data_dir, **parts_overrides):
  cfg = catalog.default_data_config()
  cfg.data_dir = str(data_dir)
  cfg.parts.update({**SMALL, **parts_overrides})
  return cfg


@pytest.fixture(scope="module")
def data_cfg(tfds_dir):
  cfg = small_config(tfds_dir)
  input_pipeline.get_builder(cfg)  # build once for the module
  return cfg


# --- the generator -----------------------------------------------------------


def test_generator_is_deterministic_and_order_independent():
  cfg = parts.PartsConfig()
  batch = parts.generate_split(cfg, "train", 4, start=10)
  for i in range(4):
    one = parts.generate_example(cfg, "train", 10 + i)
    for key in ("image", "object_mask", "part_mask"):
      np.testing.assert_array_equal(batch[key][i], one[key])
    assert batch["label"][i] == one["label"] == (10 + i) % cfg.num_classes
  np.testing.assert_array_equal(batch["id"], np.arange(10, 14))
  other_split = parts.generate_example(cfg, "test", 10)["image"]
  other_seed = parts.generate_example(dataclasses.replace(cfg, seed=1), "train", 10)
  assert not np.array_equal(other_split, batch["image"][0])
  assert not np.array_equal(other_seed["image"], batch["image"][0])


def test_examples_have_the_documented_types_and_masks():
  cfg = parts.PartsConfig()
  size, margin = cfg.image_size, int(cfg.margin * cfg.image_size)
  data = parts.generate_split(cfg, "validation", 60)
  assert data["image"].shape == (60, size, size, 3)
  assert data["image"].dtype == np.uint8
  for key in ("object_mask", "part_mask"):
    assert data[key].shape == (60, size, size) and data[key].dtype == np.uint8
    assert set(np.unique(data[key])) == {0, 1}
  obj, part = data["object_mask"].astype(bool), data["part_mask"].astype(bool)
  assert (obj.sum((1, 2)) > 0.15 * size * size).all()
  # Two glyphs of 10-16 px each: clearly present, clearly small.
  part_area = part.sum((1, 2))
  assert (part_area > 40).all() and (part_area < 0.1 * size * size).all()
  assert not (part & ~obj).any(), "parts must lie on the object"
  outside = np.ones((size, size), bool)
  outside[margin:size - margin, margin:size - margin] = False
  assert not part[:, outside].any(), "parts must stay in the central region"
  assert sorted(np.bincount(data["label"])) == [6] * cfg.num_classes


def test_glyph_types_have_equal_area():
  # Area would otherwise leak the class into colour statistics.
  r, grid = 100.0, np.arange(-160, 160) + 0.5
  areas = {kind: (sdf(grid[None, :], grid[:, None], r) < 0).sum() / r**2
           for kind, (sdf, _) in parts._GLYPHS.items()}
  assert max(areas.values()) / min(areas.values()) < 1.03, areas


def test_class_part_types():
  types = parts.class_part_types(parts.PartsConfig())
  assert len(types) == 10 and len(set(types)) == 10
  assert all(len(set(t)) == 2 and parts.SHARED_TYPE not in t for t in types)
  assert len(parts.class_part_types(parts.PartsConfig(num_classes=28))) == 28
  with pytest.raises(ValueError, match="num_classes"):
    parts.class_part_types(parts.PartsConfig(num_classes=29))


def test_difficulty_knobs_change_the_images():
  base = parts.generate_example(parts.PartsConfig(), "train", 3)
  decoys = parts.generate_example(parts.PartsConfig(num_decoys=2), "train", 3)
  assert not np.array_equal(base["image"], decoys["image"])
  # Decoys are drawn last and off the object: the masks are unchanged.
  np.testing.assert_array_equal(base["part_mask"], decoys["part_mask"])
  np.testing.assert_array_equal(base["object_mask"], decoys["object_mask"])
  # A shared glyph is drawn but is not a part: the part area stays that of
  # two glyphs (three would add half again).
  area = lambda cfg: parts.generate_split(
      cfg, "test", 40)["part_mask"].sum((1, 2)).mean()
  ratio = area(parts.PartsConfig(num_shared=1)) / area(parts.PartsConfig())
  assert 0.8 < ratio < 1.2
  big = parts.generate_example(parts.PartsConfig(image_size=96), "train", 3)
  assert big["image"].shape == (96, 96, 3) and big["part_mask"].any()


def _standardised_colour_stats(images):
  x = images.astype(np.float32) / 255
  return np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)


def test_colour_statistics_do_not_reveal_the_class():
  """Logistic regression on per-channel mean and std stays near chance."""
  cfg = parts.PartsConfig()
  train = parts.generate_split(cfg, "train", 2000)
  test = parts.generate_split(cfg, "test", 1000)
  x_train = _standardised_colour_stats(train["image"])
  x_test = _standardised_colour_stats(test["image"])
  mean, std = x_train.mean(0), x_train.std(0)
  x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
  k = cfg.num_classes
  w, b = np.zeros((6, k)), np.zeros(k)
  onehot = np.eye(k)[train["label"]]
  for _ in range(500):  # full-batch gradient descent on the softmax loss
    z = x_train @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - onehot) / len(p)
    w -= 0.5 * x_train.T @ grad
    b -= 0.5 * grad.sum(0)
  train_acc = ((x_train @ w + b).argmax(1) == train["label"]).mean()
  test_acc = ((x_test @ w + b).argmax(1) == test["label"]).mean()
  print(f"colour-statistics logistic regression: train {train_acc:.3f}, "
        f"test {test_acc:.3f}, chance {1 / k:.3f}")
  assert test_acc <= 2 / k


# --- the TFDS builder --------------------------------------------------------


def test_builder_writes_the_generated_examples(data_cfg):
  builder = input_pipeline.get_builder(data_cfg)
  assert {s: builder.info.splits[s].num_examples for s in SPLITS} == {
      "train": 96, "validation": 20, "test": 30}
  assert builder.info.features["label"].num_classes == 10
  assert builder.info.features["label"].names[0] == "cross+ring"
  pcfg = input_pipeline.parts_config(data_cfg)
  for ex in builder.as_dataset(split="test").take(3).as_numpy_iterator():
    want = parts.generate_example(pcfg, "test", int(ex["id"]))
    np.testing.assert_array_equal(ex["image"], want["image"])  # PNG is lossless
    np.testing.assert_array_equal(ex["part_mask"][..., 0], want["part_mask"])
    np.testing.assert_array_equal(ex["object_mask"][..., 0], want["object_mask"])
    assert ex["label"] == want["label"]


def test_builder_directory_depends_on_every_parameter(tmp_path):
  names = {parts_tfds.make_config(parts.PartsConfig(), None).name}
  for cfg, sizes in [(parts.PartsConfig(seed=1), None),
                     (parts.PartsConfig(noise=0.02), None),
                     (parts.PartsConfig(), {"test": 999})]:
    names.add(parts_tfds.make_config(cfg, sizes).name)
  assert len(names) == 4
  # The defaults resolve to the registered config (TFDS forbids a copy).
  assert parts_tfds.make_config() is parts_tfds.BrnpaParts.BUILDER_CONFIGS[0]
  a = parts_tfds.make_builder(parts.PartsConfig(), {"train": 5}, str(tmp_path))
  b = parts_tfds.make_builder(parts.PartsConfig(seed=3), {"train": 5}, str(tmp_path))
  assert a.data_dir != b.data_dir


def test_builder_under_mock_data(tmp_path):
  cfg = small_config(tmp_path)
  with tfds.testing.mock_data(num_examples=7):
    builder = input_pipeline.get_builder(cfg)
    assert not list(tmp_path.iterdir()), "mocked builds must not write data"
    assert input_pipeline.num_examples(cfg, "test") == 7
    train = list(input_pipeline.make_train_dataset(
        cfg, batch_size=4, seed=0, epoch=0).as_numpy_iterator())
    evals = list(input_pipeline.make_eval_dataset(
        cfg, "test", batch_size=4).as_numpy_iterator())
  assert builder.name == "brnpa_parts"
  assert len(train) == 1 and train[0]["image"].shape == (4, 64, 64, 3)
  assert len(evals) == 2 and evals[1]["mask"].tolist() == [1, 1, 1, 0]
  assert evals[0]["part_mask"].shape == (4, 64, 64)


# --- the input pipeline ------------------------------------------------------


def test_unknown_dataset_name_is_a_clear_error():
  cfg = catalog.default_data_config()
  cfg.name = "birds"
  with pytest.raises(ValueError, match=r"Unknown dataset 'birds'.*'parts'"):
    input_pipeline.get_builder(cfg)


def test_unknown_parts_key_is_a_clear_error(tmp_path):
  cfg = small_config(tmp_path)
  cfg.parts.glyph_sizes = (0.1, 0.2)
  with pytest.raises(ValueError, match="glyph_sizes"):
    input_pipeline.get_builder(cfg)


def test_counts(data_cfg):
  assert input_pipeline.num_classes(data_cfg) == 10
  assert input_pipeline.num_examples(data_cfg, "train") == 96
  assert input_pipeline.num_examples(data_cfg, "test[:10]") == 10


def _train_batches(cfg, **kwargs):
  ds = input_pipeline.make_train_dataset(cfg, batch_size=16, **kwargs)
  return list(ds.as_numpy_iterator())


def test_train_batches(data_cfg):
  batches = _train_batches(data_cfg, seed=0, epoch=0)
  assert len(batches) == 96 // 16
  batch = batches[0]
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (16, 64, 64, 3)
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  images = np.concatenate([b["image"] for b in batches])
  assert abs(images.mean()) < 1.0 and 0.5 < images.std() < 2.0  # normalised
  labels = np.concatenate([b["label"] for b in batches])
  # One epoch sees each of the 96 examples once (label = id % 10): every
  # class appears, 10 or 9 times.
  np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                np.bincount(np.arange(96) % 10))


def test_train_order_and_augmentation_are_deterministic(data_cfg):
  first = _train_batches(data_cfg, seed=0, epoch=0)
  again = _train_batches(data_cfg, seed=0, epoch=0)
  next_epoch = _train_batches(data_cfg, seed=0, epoch=1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  labels = lambda bs: np.concatenate([b["label"] for b in bs])
  assert not np.array_equal(labels(first), labels(next_epoch))
  # Same examples, just reordered: the label histogram is unchanged.
  np.testing.assert_array_equal(np.bincount(labels(first), minlength=10),
                                np.bincount(labels(next_epoch), minlength=10))


def test_train_shards_per_process(data_cfg):
  counts = [len(_train_batches(data_cfg, seed=0, epoch=0, process_index=p,
                               process_count=2)) for p in range(2)]
  assert counts == [3, 3]


def test_eval_batches_are_padded_and_masked(data_cfg):
  batches = list(input_pipeline.make_eval_dataset(
      data_cfg, "test", batch_size=8).as_numpy_iterator())
  assert len(batches) == 4  # 30 examples
  batch = batches[0]
  assert batch["image"].shape == (8, 64, 64, 3)
  assert batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.float32
  for key in ("object_mask", "part_mask"):
    assert batch[key].shape == (8, 64, 64) and batch[key].dtype == np.float32
    assert set(np.unique(batch[key])) <= {0.0, 1.0}
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.tolist() == [1.0] * 30 + [0.0] * 2
  ids = np.concatenate([b["id"] for b in batches])
  assert sorted(ids[:30]) == list(range(30)) and ids[30:].tolist() == [-1, -1]
  last = batches[-1]
  assert not last["image"][6:].any() and not last["part_mask"][6:].any()
  # Parts stay on the object after the eval crop, and are not cropped away.
  real = np.concatenate([b["part_mask"] for b in batches])[:30]
  obj = np.concatenate([b["object_mask"] for b in batches])[:30]
  assert (real.sum((1, 2)) > 0).all() and not (real * (1 - obj)).any()
  again = list(input_pipeline.make_eval_dataset(
      data_cfg, "test", batch_size=8).as_numpy_iterator())
  np.testing.assert_array_equal(batches[1]["image"], again[1]["image"])


def test_eval_processes_see_every_example_once_in_equal_steps(data_cfg):
  per_process = [list(input_pipeline.make_eval_dataset(
      data_cfg, "validation", batch_size=4, process_index=p,
      process_count=3).as_numpy_iterator()) for p in range(3)]
  assert [len(b) for b in per_process] == [2, 2, 2]  # 20 = 7 + 7 + 6
  ids = np.concatenate([b["id"] for bs in per_process for b in bs])
  masks = np.concatenate([b["mask"] for bs in per_process for b in bs])
  assert sorted(ids[masks == 1]) == list(range(20))


# --- transforms --------------------------------------------------------------


def test_transforms_move_masks_with_the_image():
  # A marker region painted red in the image and set in the mask must still
  # coincide after resize, random crop and flip.
  image = np.zeros((60, 100, 3), np.uint8)
  mask = np.zeros((60, 100, 1), np.uint8)
  image[10:30, 55:90, 0] = 255
  mask[10:30, 55:90] = 1
  for s in range(5):
    out, masks = transforms.train_transform(
        tf.constant(image), {"m": tf.constant(mask)}, tf.constant([s, 7]),
        size=48)
    red = transforms.denormalize(out.numpy())[..., 0] > 127
    m = masks["m"].numpy()[..., 0] > 0
    assert out.shape == (48, 48, 3) and masks["m"].shape == (48, 48, 1)
    assert m.any() and (red == m).mean() > 0.97


def test_resize_keeps_aspect_and_follows_torchvision_sizes():
  assert transforms.resize_size(448, 0.875) == 512
  assert transforms.resize_size(64, 0.875) == 73
  image, masks = transforms.resize_short_side(
      tf.zeros((60, 100, 3)), {"m": tf.zeros((60, 100, 1), tf.uint8)}, 73)
  assert image.shape == (73, 121, 3) and masks["m"].shape == (73, 121, 1)
  assert masks["m"].dtype == tf.uint8
  out, _ = transforms.eval_transform(tf.zeros((64, 64, 3), tf.uint8), {}, size=64)
  assert out.shape == (64, 64, 3)


def test_color_jitter_and_denormalize():
  image = tf.random.stateless_uniform((8, 8, 3), [1, 2])
  same = transforms.color_jitter(image, 0.0, 0.0, tf.constant([0, 0]))
  np.testing.assert_array_equal(same.numpy(), image.numpy())
  jittered = transforms.color_jitter(image, 0.126, 0.5, tf.constant([0, 1]))
  assert not np.allclose(jittered.numpy(), image.numpy())
  assert 0.0 <= jittered.numpy().min() and jittered.numpy().max() <= 1.0
  pixels = np.arange(0, 256, 5, dtype=np.uint8).reshape(1, -1, 1).repeat(3, -1)
  normed = transforms.normalize(tf.constant(pixels, tf.float32) / 255).numpy()
  np.testing.assert_array_equal(transforms.denormalize(normed), pixels)
