"""Person re-id: file names, protocol filtering, sampler, losses, CMC/mAP, a run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from brnpa_jax.data import reid as reid_data
from brnpa_jax.models import reid as reid_model
from brnpa_jax.tasks import reid
from brnpa_jax.explain.figures import draw
from brnpa_jax.train.trainer import train_and_evaluate
from configs import reid_market1501


# -- file names and folders ------------------------------------------------------
@pytest.mark.parametrize("name,dataset,identity,camera", [
    ("0002_c1s1_000451_03.jpg", "market1501", 2, 1),
    ("1501_c6s4_001902_01.jpg", "market1501", 1501, 6),
    ("-1_c3s2_014553_01.jpg", "market1501", -1, 3),     # junk
    ("0000_c6s4_002452_05.jpg", "market1501", 0, 6),    # distractor
    ("0001_c2_f0046182.jpg", "dukemtmc", 1, 2),
    ("7140_c8_f0071385.jpg", "dukemtmc", 7140, 8),
    ("0000_c5_f0052631.jpg", "dukemtmc", 0, 5),
])
def test_parse_real_names(name, dataset, identity, camera):
  assert reid_data.parse_name(name, dataset) == reid_data.ReIDName(identity, camera)


def test_parse_rejects_foreign_names():
  assert reid_data.parse_name("Thumbs.db", "market1501") is None
  with pytest.raises(ValueError, match="0002_c1s1_000451_03.jpg"):
    reid_data.parse_name("0001_c2_f0046182.jpg", "market1501")
  with pytest.raises(ValueError, match="dukemtmc"):
    reid_data.parse_name("0002_c1s1_000451_03.jpg", "dukemtmc")
  with pytest.raises(ValueError, match="Unknown re-id dataset"):
    reid_data.parse_name("0002_c1s1_000451_03.jpg", "cuhk03")


def _write(folder, name, colour, rng, size=(32, 16)):
  os.makedirs(folder, exist_ok=True)
  pixels = np.clip(np.float32(colour) + rng.normal(0, 20, (*size, 3)), 0, 255)
  Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, name))


def make_market(root, train_ids=8, test_ids=4, per_cam=2, seed=0):
  """A Market-1501 layout: identity i has colour i, 2 images in each of 2
  cameras; the test part adds a same-camera gallery image, distractors and
  junk for every query."""
  rng = np.random.default_rng(seed)
  colours = rng.integers(0, 255, (train_ids + test_ids + 1, 3))
  name = lambda pid, cam, j: f"{pid:04d}_c{cam}s1_{j:06d}_01.jpg"
  for pid in range(1, train_ids + 1):
    for cam in (1, 2):
      for j in range(per_cam):
        _write(root / "bounding_box_train", name(pid, cam, j), colours[pid], rng)
  _write(root / "bounding_box_train", name(0, 1, 0), colours[0], rng)
  _write(root / "bounding_box_train", "-1_c1s1_000000_01.jpg", colours[0], rng)
  for pid in range(train_ids + 1, train_ids + test_ids + 1):
    _write(root / "query", name(pid, 1, 0), colours[pid], rng)
    _write(root / "bounding_box_test", name(pid, 1, 1), colours[pid], rng)
    for cam in (2, 3):
      _write(root / "bounding_box_test", name(pid, cam, 0), colours[pid], rng)
    _write(root / "bounding_box_test", f"0000_c2s1_{pid:06d}_01.jpg", colours[0], rng)
    _write(root / "bounding_box_test", f"-1_c3s1_{pid:06d}_01.jpg", colours[0], rng)
  (root / "query" / "Thumbs.db").write_bytes(b"\0")
  return root


@pytest.fixture(scope="module")
def market(tmp_path_factory):
  return make_market(tmp_path_factory.mktemp("reid") / "Market-1501-v15.09.15")


def test_protocol_filtering_and_relabel(market):
  root = reid_data.find_root(str(market.parent), "market1501")  # finds the subfolder
  assert root == str(market)
  train = reid_data.read_split(root, "train", "market1501")
  query = reid_data.read_split(root, "query", "market1501")
  gallery = reid_data.read_split(root, "gallery", "market1501")
  assert set(train.identities) == set(range(1, 9))  # no junk, no distractor
  assert len(train) == 8 * 4 and len(query) == 4
  assert (gallery.identities == 0).sum() == 4 and (gallery.identities > 0).sum() == 12
  assert not (gallery.identities == -1).any()
  labels = reid_data.relabel(np.array([7, 3, 7, 12, 3]))
  np.testing.assert_array_equal(labels, [1, 0, 1, 2, 0])


def test_missing_folder_and_corrupt_image_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="bounding_box_train"):
    reid_data.find_root(str(tmp_path), "dukemtmc")
  bad = tmp_path / "0001_c1s1_000001_01.jpg"
  bad.write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match=str(bad)):
    reid_data.load_image(str(bad))


def test_hold_out_validation(market):
  train = reid_data.read_split(str(market), "train", "market1501")
  rest, (query, gallery) = reid_data.hold_out(train, 2)
  held = set(query.identities)
  assert len(held) == 2 and not held & set(rest.identities)
  assert len(query) == 2 * 2 and len(gallery) == 2 * 2  # one query per camera
  assert len(rest) + len(query) + len(gallery) == len(train)


# -- sampler and augmentation ------------------------------------------------------
def test_pk_sampler():
  labels = np.repeat(np.arange(10), [9, 8, 7, 6, 5, 4, 3, 2, 1, 12])
  p, k = 4, 3
  batches = reid_data.pk_batches(labels, p, k, seed=1, epoch=0)
  chunks = sum(max(n // k, 1) for n in np.bincount(labels))
  assert batches.shape == (chunks // p, p * k)
  for b in batches:
    groups = labels[b].reshape(p, k)
    assert (groups == groups[:, :1]).all()          # K of each identity
    assert len(set(groups[:, 0])) == p              # P distinct identities
  # Identity 8 has one image: drawn K times (with replacement) when chosen.
  np.testing.assert_array_equal(
      batches, reid_data.pk_batches(labels, p, k, seed=1, epoch=0))
  assert not np.array_equal(batches, reid_data.pk_batches(labels, p, k, 1, 1))
  assert not np.array_equal(batches, reid_data.pk_batches(labels, p, k, 2, 0))
  with pytest.raises(ValueError, match="P=11"):
    reid_data.pk_batches(labels, 11, k, 0, 0)


def test_random_erasing():
  image = np.ones((64, 32, 3), np.float32)
  rng = np.random.default_rng(0)
  erased = [reid_data.random_erasing(image, rng, p=1.0) for _ in range(50)]
  fractions = [np.mean(e[..., 0] == 0.0) for e in erased]
  assert min(fractions) >= 0.015 and max(fractions) <= 0.41
  assert np.array_equal(reid_data.random_erasing(image, rng, p=0.0), image)
  noisy = reid_data.random_erasing(image, rng, p=1.0, fill="random")
  assert (noisy != 1.0).any() and np.isfinite(noisy).all()


# -- model and config ----------------------------------------------------------------
def test_model_bnneck_and_strides():
  c = reid_market1501.get_config("runlocal")
  model = reid_model.build_reid_model(c.model, num_classes=5)
  images = jax.ShapeDtypeStruct((2, 32, 16, 3), jnp.float32)
  (logits, aux), variables = jax.eval_shape(model.init_with_output,
                                            jax.random.key(0), images)
  params = variables["params"]
  assert set(params["bnneck"]) == {"scale"}          # no learned shift
  assert set(params["classifier"]) == {"kernel"}     # no bias
  assert logits.shape == (2, 5)
  assert aux["features"].shape[1:3] == (8, 4)        # reid_high: output stride 4
  assert aux["embedding"].shape == aux["embedding_bn"].shape == (2, 3 * 64)
  c.unlock()
  c.model.aux_heads = True
  with pytest.raises(ValueError, match="aux_heads"):
    reid_model.build_reid_model(c.model, 5)


def test_config_switches():
  c = reid_market1501.get_config("dataset=dukemtmc,p=8,per_id=2,res=high")
  assert (c.task, c.data.name, c.batch_size, c.model.res) == ("reid", "dukemtmc",
                                                              16, "high")
  assert c.data.image_size == (256, 128)
  with pytest.raises(ValueError, match="dataset"):
    reid_market1501.get_config("dataset=cuhk03")


# -- losses and metrics --------------------------------------------------------------
def brute_force_triplet(emb, labels, margin, soft):
  losses = []
  for a in range(len(labels)):
    d = np.sqrt(((emb - emb[a]) ** 2).sum(1))
    pos = [d[j] for j in range(len(labels)) if labels[j] == labels[a] and j != a]
    neg = [d[j] for j in range(len(labels)) if labels[j] != labels[a]]
    if pos and neg:
      gap = max(pos) - min(neg)
      losses.append(np.log1p(np.exp(gap)) if soft else max(gap + margin, 0.0))
  return np.mean(losses)


@pytest.mark.parametrize("soft", [False, True])
def test_batch_hard_triplet_matches_brute_force(soft):
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(12, 5)).astype(np.float32)
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4])  # 4: no positive
  loss, active = reid_model.batch_hard_triplet(jnp.asarray(emb), jnp.asarray(labels),
                                         0.3, soft)
  np.testing.assert_allclose(loss, brute_force_triplet(emb, labels, 0.3, soft),
                             rtol=1e-5)
  assert 0.0 < float(active) <= 1.0
  # Degenerate: identical embeddings, one identity: finite, zero.
  same = jnp.ones((4, 5))
  loss, _ = reid_model.batch_hard_triplet(same, jnp.zeros(4, jnp.int32), 0.3, soft)
  assert float(loss) == 0.0
  # Identical embeddings of two identities: zero distances, finite gradient.
  grad = jax.grad(lambda e: reid_model.batch_hard_triplet(
      e, jnp.array([0, 0, 1, 1]), 0.3, soft)[0])(same)
  assert np.isfinite(grad).all()


def hand_example():
  """Gallery on a line (1-D positions); see the expected numbers below."""
  g_pos = np.array([1, 2, 3, 3.5, 4, 5, 6, 7, 8], np.float32)
  g_ids = np.array([1, 2, -1, 4, 1, 0, 1, 3, 1])
  g_cams = np.array([1, 2, 2, 5, 2, 3, 3, 1, 1])
  q_pos = np.array([0, 2.1, 7.2, 100], np.float32)
  q_ids = np.array([1, 2, 3, 4])
  q_cams = np.array([1, 1, 1, 2])
  embed = lambda x: np.stack([x, np.zeros_like(x)], 1)
  return embed(q_pos), q_ids, q_cams, embed(g_pos), g_ids, g_cams


def test_cmc_map_hand_computed():
  # q0 (id 1, cam 1 at 0): ranking g(1) same-cam: out; g(2) id 2: miss 1;
  #   g(3) junk: out; g(3.5) id 4: miss 2; g(4) id 1 cam 2: HIT at rank 3;
  #   g(5) distractor: miss 4; g(6) id 1 cam 3: HIT at rank 5; g(8) same-cam out.
  #   AP = (1/3 + 2/5) / 2 = 11/30.
  # q1 (id 2 at 2.1): g(2) id 2 cam 2 first: rank 1, AP = 1.
  # q2 (id 3, cam 1): its only gallery image g(7) has cam 1: no valid match,
  #   skipped.
  # q3 (id 4 at 100): from g(8) down: 1, 3, 1, 0, 1 (five misses), then g(3.5)
  #   id 4 cam 5: rank 6, AP = 1/6.
  out = reid.retrieval_metrics(*hand_example(), block_size=3)
  assert out["num_valid_queries"] == 3
  np.testing.assert_allclose(out["rank1"], 1 / 3)
  np.testing.assert_allclose(out["rank5"], 2 / 3)
  np.testing.assert_allclose(out["rank10"], 1.0)
  np.testing.assert_allclose(out["mAP"], (11 / 30 + 1 + 1 / 6) / 3, rtol=1e-6)


def test_blocked_equals_unblocked():
  rng = np.random.default_rng(3)
  q, g = rng.normal(size=(23, 16)), rng.normal(size=(57, 16))
  q_ids, g_ids = rng.integers(0, 6, 23), rng.integers(-1, 6, 57)
  q_cams, g_cams = rng.integers(1, 4, 23), rng.integers(1, 4, 57)
  args = (q, q_ids, q_cams, g, g_ids, g_cams)
  whole = reid.retrieval_metrics(*args, block_size=64)
  assert whole == reid.retrieval_metrics(*args, block_size=5)
  assert 0 < whole["num_valid_queries"] <= 23 and 0 < whole["mAP"] < 1


# -- end to end ------------------------------------------------------------------------
def tiny_config(data_dir):
  c = reid_market1501.get_config(f"runlocal,data_dir={data_dir},p=3,per_id=2,"
                                 "val_identities=2")
  c.unlock()
  c.mesh.num_devices = 1
  c.lock()
  return c


def test_train_dataset_is_deterministic(market):
  task = reid.ReIDTask(tiny_config(market))
  assert task.num_classes() == 6 and task.eval_splits() == ["val", "test"]
  first = lambda epoch: next(iter(task.train_dataset(
      batch_size=6, seed=0, epoch=epoch, process_index=0, process_count=1)))
  a, b, c = first(0), first(0), first(1)
  assert a["image"].shape == (6, 32, 16, 3) and a["label"].shape == (6,)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])
  rows = task.train_dataset(batch_size=3, seed=0, epoch=0, process_index=1,
                            process_count=2)
  np.testing.assert_array_equal(next(iter(rows))["label"], a["label"][3:])


@pytest.mark.slow
def test_end_to_end(market, tmp_path):
  summary = train_and_evaluate(tiny_config(market), str(tmp_path), draw=draw)
  for split, queries in (("val", 4), ("test", 4)):
    assert summary[f"{split}_num_valid_queries"] == queries
    for key in ("rank1", "rank5", "rank10", "mAP"):
      assert 0.0 <= summary[f"{split}_{key}"] <= 1.0
    assert summary[f"{split}_rank1"] <= summary[f"{split}_rank5"]
  assert os.path.getsize(summary["overlays"]) > 0
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_rows = [r for r in rows if "train_triplet" in r]
  assert train_rows and all(np.isfinite(r["train_loss"]) for r in train_rows)
