"""Few-shot: splits, episodes, prototype classifier, ResNet-12, data, end to end."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from brnpa_jax.data import fewshot as data_lib
from brnpa_jax.explain.figures import draw
from brnpa_jax.models import build_model
from brnpa_jax.models.resnet12 import ResNet12, ResNet12Narrow
from brnpa_jax.tasks import fewshot
from brnpa_jax.models import STRIDES
from brnpa_jax.tasks import distill
from brnpa_jax.train.state import create_state
from brnpa_jax.train.trainer import Trainer, train_and_evaluate
from configs import fewshot_folder, fewshot_omniglot
from helpers import FAST_PRNG

# -- class splits and episodes ------------------------------------------------


def test_class_splits_are_disjoint_and_documented_sizes():
  cub = data_lib.cub_class_splits()
  assert [len(cub[s]) for s in data_lib.SPLITS] == [100, 50, 50]
  assert cub["val"][:3].tolist() == [1, 5, 9] and cub["novel"][:2].tolist() == [3, 7]
  omni = data_lib.omniglot_class_splits()
  assert [len(omni[s]) for s in data_lib.SPLITS] == [964, 329, 330]
  for splits, total in ((cub, 200), (omni, 1623)):
    union = np.concatenate([splits[s] for s in data_lib.SPLITS])
    assert sorted(union.tolist()) == list(range(total))


@pytest.fixture(scope="module")
def labels():
  # 12 classes of 9 to 14 images, shuffled.
  rng = np.random.default_rng(0)
  return rng.permutation(np.repeat(np.arange(12), rng.integers(9, 15, 12)))


def test_episode_counts_disjoint_and_deterministic(labels):
  sampler = data_lib.EpisodeSampler(labels, ways=5, shots=3, queries=4, seed=7)
  eps = sampler.episodes(10, 6)
  assert eps.support.shape == (6, 5, 3) and eps.query.shape == (6, 5, 4)
  for support, query, classes in zip(eps.support, eps.query, eps.classes):
    assert len(set(classes.tolist())) == 5
    assert not set(support.ravel()) & set(query.ravel())
    assert len(set(support.ravel()) | set(query.ravel())) == 5 * 7
    for n, c in enumerate(classes):
      assert (labels[support[n]] == c).all() and (labels[query[n]] == c).all()
  # Episode i depends on (seed, i) only: any range, any order, same episodes.
  again = data_lib.EpisodeSampler(labels, 5, 3, 4, seed=7)
  single = again.episode(13)
  np.testing.assert_array_equal(single[0], eps.support[3])
  np.testing.assert_array_equal(single[1], eps.query[3])
  other = data_lib.EpisodeSampler(labels, 5, 3, 4, seed=8).episodes(10, 6)
  assert not np.array_equal(other.support, eps.support)
  assert not np.array_equal(sampler.episodes(16, 6).support, eps.support)


def test_episode_sampler_rejects_impossible_episodes(labels):
  with pytest.raises(ValueError, match="fewer than shots"):
    data_lib.EpisodeSampler(labels, 5, 5, 5, seed=0)
  with pytest.raises(ValueError, match="13-way episodes need 13 classes"):
    data_lib.EpisodeSampler(labels, 13, 1, 1, seed=0)


# -- the prototype classifier and the loss ------------------------------------


def test_prototype_classifier_known_answer():
  e = np.eye(3, dtype=np.float32)
  # Two shots per class around e_n (means exactly e_0, e_1, 4 e_2).
  support = np.stack([e[0] + 0.1 * e[1], e[0] - 0.1 * e[1], e[1], e[1],
                      3 * e[2], 5 * e[2]])
  s_labels = np.array([0, 0, 1, 1, 2, 2])
  query = np.stack([e[0] * 0.9, e[1] + 0.2 * e[2], 0.5 * e[2], 2.2 * e[1]])
  logits = fewshot.prototype_logits(support, s_labels, query, ways=3)
  # Hand-computed squared distances to (e0, e1, 4 e2).
  expected = -np.array([[0.01, 1.81, 16.81],
                        [2.04, 0.04, 15.44],
                        [1.25, 1.25, 12.25],
                        [5.84, 1.44, 20.84]])
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  assert np.argmax(logits, -1).tolist() == [0, 1, 0, 1]
  # The cosine classifier ignores norms: 0.5 e2 is class 2 there.
  cos = fewshot.prototype_logits(support, s_labels, query, ways=3,
                                 metric="cosine", scale=10.0)
  assert np.argmax(cos, -1).tolist() == [0, 1, 2, 1]
  np.testing.assert_allclose(cos[2], [0.0, 0.0, 10.0], atol=1e-5)
  # Degenerate input stays finite.
  zeros = fewshot.prototype_logits(np.zeros((6, 3)), s_labels, np.zeros((2, 3)),
                                   ways=3, metric="cosine")
  assert np.isfinite(zeros).all()


def test_vmapped_episodes_equal_a_loop(labels):
  emb = np.random.default_rng(1).normal(size=(len(labels), 16)).astype(np.float32)
  emb += 1.5 * np.eye(16, dtype=np.float32)[labels]  # some class structure
  sampler = data_lib.EpisodeSampler(labels, 5, 2, 3, seed=3)
  eps = sampler.episodes(0, 7)
  proto, cos = jax.device_get(
      fewshot.episode_accuracies(jnp.asarray(emb), eps.support, eps.query))
  logits_fn = jax.jit(fewshot.prototype_logits, static_argnums=(3, 4))
  q_labels = np.repeat(np.arange(5), 3)
  for i in range(7):
    s = emb[eps.support[i].reshape(-1)]
    q = emb[eps.query[i].reshape(-1)]
    for metric, got in (("euclidean", proto[i]), ("cosine", cos[i])):
      logits = logits_fn(s, np.repeat(np.arange(5), 2), q, 5, metric)
      assert got == pytest.approx(np.mean(np.argmax(logits, -1) == q_labels))
  # Batches of 3 with a padded last batch give the same 7 accuracies.
  r = fewshot.evaluate_episodes(emb, sampler, num_episodes=7, batch=3)
  assert r["prototype"] == pytest.approx(float(np.mean(proto)))
  assert r["cosine_ci95"] == pytest.approx(1.96 * np.std(cos) / np.sqrt(7), rel=1e-5)


def test_prototypical_loss_matches_numpy():
  ways, shots, queries = 3, 2, 2
  layout = data_lib.episode_layout(ways, shots, queries)
  rng = np.random.default_rng(2)
  emb = rng.normal(size=(2 * len(layout), 4)).astype(np.float64)
  loss, acc = jax.jit(functools.partial(
      fewshot.prototypical_loss, ways=ways, shots=shots, queries=queries))(
          jnp.asarray(emb, jnp.float32), jnp.tile(layout, 2))
  ces, hits = [], []
  for ep in emb.reshape(2, len(layout), 4):
    protos = ep[:6].reshape(ways, shots, 4).mean(1)
    for q, y in zip(ep[6:], layout[6:]):
      logits = -((q - protos) ** 2).sum(-1)
      logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
      ces.append(-logp[y])
      hits.append(np.argmax(logits) == y)
  assert float(loss) == pytest.approx(np.mean(ces), rel=1e-5)
  assert float(acc) == pytest.approx(np.mean(hits))
  with pytest.raises(ValueError, match="multiple of 12"):
    fewshot.prototypical_loss(jnp.zeros((13, 4)), jnp.zeros(13, jnp.int32),
                              ways=ways, shots=shots, queries=queries)


def test_mean_ci95():
  mean, ci = fewshot.mean_ci95([0.2, 0.4, 0.6, 0.8])
  assert mean == pytest.approx(0.5)
  assert ci == pytest.approx(1.96 * np.std([0.2, 0.4, 0.6, 0.8]) / 2)


# -- ResNet-12 ------------------------------------------------------------------


def _resnet12_params(widths):
  """Conv weights, 1x1 shortcuts and 4 BNs (scale, bias) per block."""
  total, cin = 0, 3
  for c in widths:
    total += 9 * cin * c + 2 * 9 * c * c + cin * c + 4 * 2 * c
    cin = c
  return total


@pytest.mark.parametrize("res,size,hw", [("low", 84, 5), ("high", 84, 21),
                                         ("low", 32, 2), ("high", 32, 8)])
def test_resnet12_shapes(res, size, hw):
  cfg = ml_collections.ConfigDict(dict(
      backbone="resnet12", res=res, head="brnpa", num_maps=3, refine=True,
      init="norm", aux_heads=False, dropout=0.0, use_bias=True, width=64))
  model = build_model(cfg, 7)
  images = jnp.zeros((2, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  logits, aux = jax.eval_shape(lambda v: model.apply(v, images), variables)
  assert logits.shape == (2, 7)
  assert aux["features"].shape == (2, hw, hw, 640)
  assert aux["embedding"].shape == (2, 3 * 640)
  backbone = sum(x.size for x in jax.tree.leaves(variables["params"]["backbone"]))
  assert backbone == _resnet12_params((64, 160, 320, 640))  # 12.4 M


def test_resnet12_narrow_and_width_scaling():
  assert ResNet12Narrow().widths == (64, 128, 256, 512)
  assert ResNet12(width=8).widths == (8, 20, 40, 80)
  assert ResNet12(strides=(1, 2, 1, 1)).output_stride == 4
  with pytest.raises(ValueError, match="smaller than ResNet-12's output stride"):
    ResNet12(width=8).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


# -- data -----------------------------------------------------------------------


def _write_folder(root, classes_per_split, per_class, side=40):
  """Coloured squares whose colour and place depend on the class."""
  rng = np.random.default_rng(0)
  for split, names in classes_per_split.items():
    for c, name in enumerate(names):
      os.makedirs(os.path.join(root, split, name))
      for i in range(per_class):
        img = rng.integers(0, 40, (side, side + 8, 3), dtype=np.uint8)
        colour = np.array([(c * 97) % 255, (c * 53 + 80) % 255, (c * 31 + 160) % 255])
        top = 4 + 3 * (c % 6)
        img[top:top + 14, top:top + 14] = colour
        mode = "L" if i == 0 else "RGB"  # one grayscale file per class
        Image.fromarray(img).convert(mode).save(
            os.path.join(root, split, name, f"{i}.png"))


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("fewshot_folder")
  _write_folder(root, {"train": [f"base{i}" for i in range(4)],
                       "val": [f"val{i}" for i in range(5)],
                       "test": [f"novel{i}" for i in range(5)]}, per_class=6)
  return str(root)


def _tiny_folder_config(root, workdir_arg=""):
  c = fewshot_folder.get_config(f"root={root},runlocal" + workdir_arg)
  c.unlock()
  c.mesh.num_devices = 1
  c.fewshot.eval_shots, c.fewshot.eval_queries = (1, 2), 3
  c.fewshot.eval_episodes, c.fewshot.eval_episode_batch = 6, 4
  c.data.image_size = 32
  c.lock()
  return c


def test_folder_reader(folder_root, tmp_path):
  c = _tiny_folder_config(folder_root)
  base = data_lib.load_split(c.data, "base")
  assert base.images.shape == (24, 36, 36, 3) and base.images.dtype == np.uint8
  assert base.class_ids.tolist() == [f"base{i}" for i in range(4)]
  assert np.bincount(base.labels).tolist() == [6] * 4
  bad = tmp_path / "train" / "a"
  bad.mkdir(parents=True)
  (bad / "broken.jpg").write_bytes(b"not an image")
  c.unlock()
  c.data.folder.root = str(tmp_path)
  with pytest.raises(ValueError, match="broken.jpg"):
    data_lib.load_split(c.data, "base")
  with pytest.raises(FileNotFoundError, match="val folder"):
    data_lib.load_split(c.data, "val")


def test_omniglot_mock_classes_and_channels(tmp_path):
  def as_dataset(self, split, **kwargs):
    del kwargs
    label = {"train": [3, 963, 964, 3], "test": [964, 1292, 1293, 1622]}[split]
    return tf.data.Dataset.from_tensor_slices({
        "image": np.full((4, 105, 105, 3), 200, np.uint8),
        "alphabet": np.zeros(4, np.int64),
        "alphabet_char_id": np.zeros(4, np.int64),
        "label": np.array(label, np.int64)})

  c = fewshot_omniglot.get_config()
  c.unlock()
  c.data.data_dir = str(tmp_path)
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    sets = {s: data_lib.load_split(c.data, s) for s in data_lib.SPLITS}
  assert sets["base"].labels.tolist() == [3, 963, 3]
  assert sets["val"].labels.tolist() == [0, 328]
  assert sets["novel"].labels.tolist() == [0, 329]
  assert sets["val"].images.shape == (2, 28, 28, 3)
  assert sets["base"].num_classes == 964


def test_episode_batches_layout_and_processes(folder_root):
  data = data_lib.load_split(_tiny_folder_config(folder_root).data, "base")
  sampler = data_lib.EpisodeSampler(data.labels, 2, 1, 2, seed=0)
  kw = dict(num_batches=2, first_episode=4, seed=0, size=32, flip=True)
  whole = list(data_lib.episode_batches(data, sampler, episodes_per_batch=2, **kw))
  halves = [list(data_lib.episode_batches(data, sampler, episodes_per_batch=1,
                                          process_index=p, process_count=2, **kw))
            for p in range(2)]
  assert whole[0]["image"].shape == (12, 32, 32, 3)
  assert whole[0]["label"].tolist() == [0, 1, 0, 0, 1, 1] * 2
  for b in range(2):  # two processes see the episodes one process would
    np.testing.assert_array_equal(
        whole[b]["episode_class"],
        np.concatenate([halves[0][b]["episode_class"], halves[1][b]["episode_class"]]))
  # The query rows of an episode are of the class of its label.
  ec, lab = whole[0]["episode_class"][:6], whole[0]["label"][:6]
  assert len({(l, c) for l, c in zip(lab, ec)}) == 2


# -- end to end -------------------------------------------------------------------



def _with(config, **fields):
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in fields.items():
    node, *path = key.split(".")
    target = c[node] if path else c
    target[path[-1] if path else node] = value
  return c


@pytest.fixture(scope="module")
def pretrained(folder_root, tmp_path_factory):
  """One low-resolution pretraining epoch through the trainer."""
  workdir = tmp_path_factory.mktemp("fs_pre")
  config = _with(_tiny_folder_config(folder_root), batch_size=8,
                 eval_batch_size=8, **{"model.res": "low"})
  with jax.default_prng_impl(FAST_PRNG):
    summary = train_and_evaluate(config, str(workdir), draw=draw)
  return config, workdir, summary


@pytest.mark.slow
def test_pretrain_through_the_trainer(pretrained):
  _, workdir, summary = pretrained
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train = [r for r in rows if "train_loss" in r]
  val = [r for r in rows if "val_5way_1shot_accuracy" in r]
  assert len(train) >= 1 and all(np.isfinite(r["train_loss"]) for r in train)
  assert len(val) == 1 and 0 < val[0]["val_5way_1shot_accuracy_ci95"] < 0.5
  assert summary["best_val_5way_1shot_accuracy"] == val[0]["val_5way_1shot_accuracy"]
  for k in ("1shot_accuracy", "1shot_cosine", "2shot_accuracy", "2shot_cosine"):
    assert 0.0 <= summary[f"novel_5way_{k}"] <= 1.0
  # Colour classes: well above chance (0.2) after one epoch.
  assert summary["novel_5way_2shot_accuracy"] > 0.5
  assert os.path.getsize(summary["overlays"]) > 1000


def _episodic(config, workdir):
  """The episodic phase from the pretraining in ``workdir``, at high
  resolution (the same parameters), 2-way 1-shot 2-query episodes, lr 0.
  Both episodic tests run this config: its programs compile once."""
  return _with(config, **{"fewshot.phase": "episodic",
                          "fewshot.pretrain_workdir": str(workdir),
                          "model.res": "high", "fewshot.train_ways": 2,
                          "fewshot.train_shots": 1, "fewshot.train_queries": 2,
                          "batch_size": 12, "optim.lr": 0.0,
                          "optim.weight_decay": 0.0})


@pytest.mark.slow
def test_episodic_finetuning_from_pretrained(pretrained, tmp_path):
  config, workdir, _ = pretrained
  epi = _episodic(config, workdir)
  with jax.default_prng_impl(FAST_PRNG):  # the init key below
    trainer = Trainer(epi, str(tmp_path))
  task = trainer.task
  assert task.num_train_examples() == 4 * 6 and trainer.steps_per_epoch == 2
  fresh = trainer._init(trainer.init_rng)  # pylint: disable=protected-access
  state = task.initial_state(fresh)
  saved, _, _ = fewshot.load_pretrained(str(workdir))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(a, b)
  ds = task.train_dataset(batch_size=12, seed=0, epoch=0, process_index=0,
                          process_count=1)
  for batch in tfds.as_numpy(ds):
    state, metrics = trainer.train_step(state, trainer.to_global(batch),
                                        trainer.train_rng)
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
  assert int(state.step) == 2
  novel = task.evaluate(trainer.context, state, "novel")
  assert 0.2 < novel["5way_2shot_accuracy"] <= 1.0
  # Padded batches put back in order: the last, padded batch (rows 24..29).
  images = task.image_set("val").images
  emb = fewshot.split_embeddings(trainer.context, state, images, 32)
  assert emb.shape == (30, 3 * 80)
  last = np.zeros((8, 32, 32, 3), np.float32)
  last[:6] = data_lib.center(images[24:], 32)
  _, aux = trainer.forward(state, trainer.to_global({"image": last})["image"])
  np.testing.assert_allclose(emb[24:], aux["embedding"][:6], rtol=1e-5,
                             atol=1e-5)

  with pytest.raises(ValueError, match="pretrain_workdir"):
    fewshot.FewShotTask(_with(epi, **{"fewshot.pretrain_workdir": ""}))
  missing = fewshot.FewShotTask(_with(epi, **{"fewshot.pretrain_workdir":
                                              str(workdir / "nope")}))
  with pytest.raises(FileNotFoundError, match="Run the pretrain phase first"):
    missing.initial_state(fresh)
  wider = _with(epi, **{"model.width": 16})
  model = build_model(wider.model, 4)
  shapes = jax.eval_shape(lambda: create_state(
      model, trainer.tx, jax.random.key(0), (1, 32, 32, 3)))
  with pytest.raises(ValueError, match="do not fit the model"):
    fewshot.FewShotTask(wider).initial_state(shapes)
  trainer.close()


@pytest.mark.slow
def test_pretraining_distilled_from_low_resolution_teacher(pretrained):
  config, workdir, _ = pretrained
  kd = _with(config, **{"distill.teacher_workdir": str(workdir),
                        "model.res": "high"})
  task = fewshot.FewShotTask(kd)
  context = task.train_context()
  assert tuple(task.teacher.backbone.strides) == STRIDES["low"]  # its config.json
  base = task.image_set("base")
  images = data_lib.center(base.images[:4], 32)
  batch = {"image": images, "label": base.labels[:4]}
  student = jax.random.normal(jax.random.key(0), (4, 4))
  # One compile for both: the loss and, apart, the teacher's logits.
  loss, metrics, teacher_logits = jax.jit(lambda s, b, c: (
      *task.loss_and_metrics(s, {}, b, c), task.teacher.apply(c, b["image"])[0]))(
          student, batch, context)
  expected, kl, _ = distill.distillation_loss(
      student, teacher_logits, batch["label"], temperature=16.0, alpha=0.4)
  assert float(loss) == pytest.approx(float(expected), rel=1e-4)
  assert float(metrics["kl"]) == pytest.approx(float(kl), rel=1e-4)
  with pytest.raises(ValueError, match="pretraining phase"):
    fewshot.FewShotTask(_with(kd, **{"fewshot.phase": "episodic",
                                     "fewshot.pretrain_workdir": str(workdir)}))


@pytest.mark.slow
def test_episodic_phase_through_the_trainer(pretrained, tmp_path):
  """With lr 0 the episodic run's parameters stay the pretrained ones."""
  config, workdir, _ = pretrained
  epi = _episodic(config, workdir)
  with jax.default_prng_impl(FAST_PRNG):
    summary = train_and_evaluate(epi, str(tmp_path))
  assert 0.2 < summary["novel_5way_2shot_accuracy"] <= 1.0
  saved, _, _ = fewshot.load_pretrained(str(workdir))
  after, _, _ = fewshot.load_pretrained(str(tmp_path))
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(a, b)
