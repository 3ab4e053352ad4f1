"""Post-hoc explainers in JAX for every classifier of the zoo, batched and jitted.

``explain(method, model, variables, images, labels)`` returns one saliency map
per image, float32 ``(B, H, W)`` at the input resolution, non-negative and
min-max normalised to [0, 1] per image (a constant map gives zeros). Labels
None explains the class the model predicts on the unperturbed image. Each
(method, model, static options) is jitted once; a new image shape retraces.

Conventions (those of pytorch-grad-cam, captum and the papers):

- CAM methods read the backbone's last feature map ``A`` (B, h, w, C) via
  ``Classifier.features`` / ``Classifier.classify_features``; the class score
  is the class logit (before softmax). ``cam = ReLU(sum_c w_c A_c)``, then
  bilinear upsampling to the input size (half-pixel centres), then per-image
  min-max normalisation.
- ``gradcam`` (Selvaraju et al.): ``w_c`` = spatial mean of d score / d A_c.
- ``gradcampp`` (Chattopadhay et al.): the closed form for an exponential
  score, ``alpha = g^2 / (2 g^2 + sum_ij(A) g^3)`` (0 where g = 0),
  ``w_c = sum_ij alpha * ReLU(g)``.
- ``scorecam`` (Wang et al.): each channel upsampled to the input and min-max
  normalised is a mask; ``w = softmax over channels`` of the class logit of
  the image times that mask (pytorch-grad-cam's weights; its masks are
  upsampled with aligned corners, ours with half-pixel centres:
  docs/explanations.md#where-we-differ-from-pytorch-grad-cam-and-quantus).
- ``ablationcam`` (Desai & Ramaswamy): ``w_c`` = class-logit drop when channel
  c is zeroed, ``y - y_c``. The paper divides by ``y``, a per-image positive
  factor that the normalisation removes (and that flips the map's sign when
  ``y < 0``, which we do not copy).
- ``rise`` (Petsiuk et al.): N random binary ``s x s`` grids (cell kept with
  probability p), bilinearly upsampled to ``(s + 1)`` cells and cropped at a
  random shift within one cell; saliency = ``sum_i P(class | x * M_i) M_i /
  (N p)`` with the softmax probability. The same masks serve every image.
- ``smoothgrad`` (Smilkov et al.): mean over noisy copies ``x + N(0, sigma^2)``
  (sigma = 0.15 of each image's value range) of ``|d logit / d x|``
  (``magnitude='square'``: of its square), summed over colour channels.
- ``integrated_gradients`` (Sundararajan et al.): ``(x - x0) * integral_0^1
  grad(x0 + a (x - x0)) da`` by the trapezoid rule on ``steps`` intervals,
  baseline x0 black (``'black'``: 0 in pixel space, i.e. ``-mean / std``
  after ImageNet normalisation), ``'zero'`` (the normalised zero, the mean
  colour) or an array; map = sum over channels of ``|attribution|``.
  ``raw=True`` returns the signed per-pixel sum over channels, unnormalised:
  it sums to ``f(x) - f(x0)`` (completeness).
- ``rollout`` (Abnar & Zuidema 2020), transformers only: per block, the
  attention weights averaged over heads (``head_fusion='max'``: their
  maximum), plus the identity for the residual path, rows renormalised to
  sum to 1; the product over the blocks, first block rightmost, is the
  rollout matrix. The map is its row of the output token over the patch
  tokens: ``token='mean'`` averages the patch tokens' rows (the tokens every
  head of ours pools; the default), ``token='cls'`` takes the class token's
  row (the paper's choice for class-token classifiers). Class-independent.
- ``own``: the model's own map, ``own_saliency`` upsampled and normalised.

Perturbations act in the model's input space (normalised images), so a masked
pixel takes the value 0, the dataset's mean colour. The perturbed copies of
Score-CAM, Ablation-CAM, RISE, SmoothGrad and Integrated Gradients are
evaluated ``chunk`` copies per image at a time (one forward of ``B * chunk``
inputs, looped with ``lax.scan``), which bounds memory.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from brnpa_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from brnpa_jax.explain.metrics import upsample
from brnpa_jax.models.classifier import Classifier
from brnpa_jax.models.heads import HEADS

_F32 = jnp.float32


# -- shared pieces -----------------------------------------------------------
def normalize_maps(maps_BxHxW: jax.Array) -> jax.Array:
  """Per-map min-max scaling to [0, 1]; constant (or non-finite) maps give 0."""
  m = jnp.nan_to_num(maps_BxHxW.astype(_F32), nan=0.0, posinf=0.0, neginf=0.0)
  axes = tuple(range(1, m.ndim))
  lo, hi = m.min(axes, keepdims=True), m.max(axes, keepdims=True)
  span = hi - lo
  return jnp.where(span > 0, (m - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def _finish_cam(cam_Bxhxw, images):
  return normalize_maps(upsample(jax.nn.relu(cam_Bxhxw), images.shape[1:3]))


def _features(model, variables, images):
  return model.apply(variables, images, method=Classifier.features)


def _head_logits(model, variables, feats):
  return model.apply(variables, feats, method=Classifier.classify_features)[0]


def _logits(model, variables, images):
  return model.apply(variables, images)[0]


def _pick(scores_BxN, labels_B):
  return jnp.take_along_axis(scores_BxN, labels_B[:, None], axis=1)[:, 0]


def _resolve(logits, labels):
  """Labels < 0 (labels=None in ``explain``) become the predicted class."""
  return jnp.where(labels < 0, jnp.argmax(logits, -1), labels).astype(jnp.int32)


def _scan_chunks(fn, n: int, chunk: int):
  """Sums ``fn(idx)`` over index chunks ``[0, chunk)``, ``[chunk, 2 chunk)``..

  ``ceil(n / chunk)`` chunks; indices >= n are padding that ``fn`` must weight
  by zero (``idx < n``). One chunk at a time is live, which bounds memory.
  """
  if n < 1 or chunk < 1:
    raise ValueError(f"need at least one copy and chunk >= 1, got n={n}, "
                     f"chunk={chunk}.")
  chunk = min(chunk, n)
  idx = jnp.arange(-(-n // chunk) * chunk).reshape(-1, chunk)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(fn, idx[0]))
  total, _ = jax.lax.scan(lambda acc, i: (jax.tree.map(jnp.add, acc, fn(i)), None),
                          zeros, idx)
  return total


def _class_scores_of(model, variables, labels, apply_fn, softmax=False):
  """``copies (B, N, ...) -> class score (B, N)``, one forward of B * N inputs.

  ``apply_fn`` is ``_logits`` (images) or ``_head_logits`` (features); the
  score is the class logit, or its softmax probability with ``softmax``.
  """

  def scores(x_BxNx):
    b, n = x_BxNx.shape[:2]
    logits = apply_fn(model, variables, x_BxNx.reshape(b * n, *x_BxNx.shape[2:]))
    if softmax:
      logits = jax.nn.softmax(logits, axis=-1)
    return _pick(logits, jnp.repeat(labels, n)).reshape(b, n)

  return scores


def _input_grads(model, variables, x_BxNxHxWx3, labels):
  """d class logit / d input for each copy; (B, N, H, W, 3) float32."""
  b, n = x_BxNxHxWx3.shape[:2]
  flat = x_BxNxHxWx3.reshape(b * n, *x_BxNxHxWx3.shape[2:])
  logits, vjp = jax.vjp(lambda x: _logits(model, variables, x), flat)
  (grads,) = vjp(jax.nn.one_hot(jnp.repeat(labels, n), logits.shape[-1],
                                dtype=logits.dtype))
  return grads.astype(_F32).reshape(x_BxNxHxWx3.shape)


def _feature_grads(model, variables, images, labels):
  """Features A, d class logit / d A, and the explained labels."""
  feats = _features(model, variables, images)
  logits, vjp = jax.vjp(lambda f: _head_logits(model, variables, f), feats)
  labels = _resolve(logits, labels)
  (grads,) = vjp(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype))
  return feats.astype(_F32), grads.astype(_F32), labels


# -- CAM methods ---------------------------------------------------------------
def grad_cam(model, variables, images, labels, rng):
  """Grad-CAM; see the module docstring for the conventions."""
  del rng
  feats, grads, _ = _feature_grads(model, variables, images, labels)
  weights_BxC = grads.mean(axis=(1, 2))
  return _finish_cam(jnp.einsum("bhwc,bc->bhw", feats, weights_BxC), images)


def grad_cam_pp(model, variables, images, labels, rng):
  """Grad-CAM++ with the exponential-score closed form (module docstring)."""
  del rng
  feats, g, _ = _feature_grads(model, variables, images, labels)
  g2 = g * g
  denom = 2.0 * g2 + feats.sum(axis=(1, 2), keepdims=True) * g2 * g
  alpha = jnp.where(g != 0, g2 / jnp.where(denom != 0, denom, 1.0), 0.0)
  weights_BxC = (alpha * jax.nn.relu(g)).sum(axis=(1, 2))
  return _finish_cam(jnp.einsum("bhwc,bc->bhw", feats, weights_BxC), images)


def score_cam(model, variables, images, labels, rng, *, chunk: int = 32):
  """Score-CAM: softmax over channels of the masked images' class logits.

  Args:
    chunk: channels (masked copies per image) evaluated in one forward.
  """
  del rng
  feats = _features(model, variables, images).astype(_F32)
  labels = _resolve(_head_logits(model, variables, feats), labels)
  b, c = feats.shape[0], feats.shape[-1]
  size = images.shape[1:3]
  scores_of = _class_scores_of(model, variables, labels, _logits)

  def chunk_scores(idx):
    act = jnp.take(feats, jnp.minimum(idx, c - 1), axis=-1)  # (B, h, w, n)
    act = jax.image.resize(act, (b, *size, idx.shape[0]), "bilinear")
    masks = normalize_maps(jnp.moveaxis(act, -1, 1).reshape(-1, *size))
    masked = images[:, None] * masks.reshape(b, -1, *size)[..., None]
    onehot = jax.nn.one_hot(idx, c, dtype=_F32) * (idx < c)[:, None]
    return scores_of(masked) @ onehot  # scattered into (B, C)

  weights_BxC = jax.nn.softmax(_scan_chunks(chunk_scores, c, chunk), axis=-1)
  return _finish_cam(jnp.einsum("bhwc,bc->bhw", feats, weights_BxC), images)


def ablation_cam(model, variables, images, labels, rng, *, chunk: int = 32):
  """Ablation-CAM: weight = class-logit drop when a channel is zeroed.

  Args:
    chunk: channels (ablated copies per image) evaluated in one forward.
  """
  del rng
  feats = _features(model, variables, images)
  logits = _head_logits(model, variables, feats)
  labels = _resolve(logits, labels)
  base = _pick(logits, labels)
  c = feats.shape[-1]
  scores_of = _class_scores_of(model, variables, labels, _head_logits)

  def chunk_drops(idx):
    onehot = jax.nn.one_hot(idx, c, dtype=feats.dtype)  # padding idx >= c: 0
    ablated = feats[:, None] * (1 - onehot)[None, :, None, None, :]
    drop = base[:, None] - scores_of(ablated)
    return drop @ onehot.astype(_F32)

  weights_BxC = _scan_chunks(chunk_drops, c, chunk)
  cam = jnp.einsum("bhwc,bc->bhw", feats.astype(_F32), weights_BxC)
  return _finish_cam(cam, images)


# -- perturbation and input-gradient methods -----------------------------------
def rise_masks(rng, idx, size: tuple[int, int], cells: int = 7,
               keep: float = 0.5) -> jax.Array:
  """RISE masks number ``idx`` (N,) of an input ``size``: (N, H, W) in [0, 1].

  Mask i depends only on ``(rng, i)``, so chunks of one run share nothing and
  any chunking gives the same masks.
  """
  h, w = size
  ch, cw = -(-h // cells), -(-w // cells)

  def one(i):
    k_grid, k_y, k_x = jax.random.split(jax.random.fold_in(rng, i), 3)
    grid = jax.random.bernoulli(k_grid, keep, (cells, cells)).astype(_F32)
    up = jax.image.resize(grid, ((cells + 1) * ch, (cells + 1) * cw), "bilinear")
    dy = jax.random.randint(k_y, (), 0, ch)
    dx = jax.random.randint(k_x, (), 0, cw)
    return jax.lax.dynamic_slice(up, (dy, dx), (h, w))

  return jax.vmap(one)(idx)


def rise(model, variables, images, labels, rng, *, num_masks: int = 4000,
         cells: int = 7, keep: float = 0.5, chunk: int = 64):
  """RISE (Petsiuk et al. 2018).

  Args:
    num_masks: N (the paper uses 4000 for ResNet-50).
    cells: s, grid cells per side.
    keep: p, probability that a cell is kept.
    chunk: masks (masked copies per image) evaluated in one forward.
  """
  labels = _resolve(_logits(model, variables, images), labels)
  size = images.shape[1:3]

  probs_of = _class_scores_of(model, variables, labels, _logits, softmax=True)

  def chunk_sal(idx):
    masks = rise_masks(rng, idx, size, cells, keep)  # (n, H, W)
    probs = probs_of(images[:, None] * masks[None, ..., None])
    probs = probs * (idx < num_masks)
    return jnp.einsum("bn,nhw->bhw", probs, masks)

  sal = _scan_chunks(chunk_sal, num_masks, chunk) / (num_masks * keep)
  return normalize_maps(sal)


def smoothgrad(model, variables, images, labels, rng, *, num_samples: int = 50,
               sigma: float = 0.15, magnitude: str = "abs", chunk: int = 16):
  """SmoothGrad (Smilkov et al. 2017).

  Args:
    num_samples: noisy copies per image.
    sigma: noise standard deviation as a fraction of each image's value range.
    magnitude: ``'abs'`` averages |grad|, ``'square'`` averages grad^2.
    chunk: noisy copies per image in one forward-backward.
  """
  if magnitude not in ("abs", "square"):
    raise ValueError(f"magnitude must be 'abs' or 'square', got {magnitude!r}.")
  labels = _resolve(_logits(model, variables, images), labels)
  images = images.astype(_F32)
  span = images.max(axis=(1, 2, 3)) - images.min(axis=(1, 2, 3))
  scale = (sigma * span)[:, None, None, None, None]

  def chunk_sum(idx):
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(idx)
    noise = jax.vmap(lambda k: jax.random.normal(k, images.shape), out_axes=1)(keys)
    g = _input_grads(model, variables, images[:, None] + scale * noise, labels)
    g = jnp.abs(g) if magnitude == "abs" else g * g
    return jnp.einsum("bnhwc,n->bhw", g, (idx < num_samples).astype(_F32))

  return normalize_maps(_scan_chunks(chunk_sum, num_samples, chunk) / num_samples)


def _baseline(baseline, images):
  if isinstance(baseline, str):
    if baseline == "zero":
      return jnp.zeros_like(images)
    if baseline == "black":
      black = -np.float32(IMAGENET_MEAN) / np.float32(IMAGENET_STD)
      return jnp.broadcast_to(jnp.asarray(black), images.shape)
    raise ValueError(f"baseline must be 'black', 'zero' or an array, got {baseline!r}.")
  return jnp.broadcast_to(jnp.asarray(baseline, images.dtype), images.shape)


def integrated_gradients(model, variables, images, labels, rng, *,
                         baseline: Any = "black", steps: int = 50,
                         raw: bool = False, chunk: int = 16):
  """Integrated Gradients (Sundararajan et al. 2017), trapezoid rule.

  Args:
    baseline: ``'black'``, ``'zero'`` or an array broadcastable to the images
      (in the model's normalised input space).
    steps: intervals of the path; ``steps + 1`` gradient evaluations.
    raw: return the signed attributions summed over channels, unnormalised.
    chunk: path points per image in one forward-backward.
  """
  del rng
  labels = _resolve(_logits(model, variables, images), labels)
  images = images.astype(_F32)
  base = _baseline(baseline, images)
  delta = images - base
  weights = jnp.full((steps + 1,), 1.0 / steps).at[jnp.array([0, steps])].set(
      0.5 / steps)

  def chunk_sum(idx):
    alphas = idx.astype(_F32) / steps
    path = base[:, None] + alphas[None, :, None, None, None] * delta[:, None]
    g = _input_grads(model, variables, path, labels)
    w = jnp.where(idx <= steps, weights[jnp.minimum(idx, steps)], 0.0)
    return jnp.einsum("bnhwc,n->bhwc", g, w)

  attr = delta * _scan_chunks(chunk_sum, steps + 1, chunk)
  if raw:
    return attr.sum(-1)
  return normalize_maps(jnp.abs(attr).sum(-1))


# -- attention rollout -------------------------------------------------------------
def attention_weights(model, variables, images) -> tuple[list[jax.Array], tuple]:
  """Each block's attention weights (B, heads, N, N), first block first, as
  the ViT backbone records them (``sow``), and the patch grid (h, w)."""
  (_, aux), state = model.apply(variables, images, mutable=["intermediates"])
  recorded = state.get("intermediates", {}).get("backbone", {})
  blocks = sorted((k for k in recorded if k.startswith("blocks_")),
                  key=lambda k: int(k.rsplit("_", 1)[1]))
  if not blocks:
    raise ValueError(
        f"attention rollout needs a transformer backbone (vit_*, deit_*); "
        f"{type(getattr(model, 'backbone', model)).__name__} records no "
        "attention weights.")
  return ([recorded[b]["attn"]["attention"][0] for b in blocks],
          aux["features"].shape[1:3])


def attention_rollout(model, variables, images, labels, rng, *,
                      head_fusion: str = "mean", token: str = "mean"):
  """Attention rollout (Abnar & Zuidema 2020); see the module docstring.

  Args:
    head_fusion: ``'mean'`` (the paper) or ``'max'`` over heads.
    token: ``'mean'`` (the patch tokens' mean row) or ``'cls'``.
  """
  del labels, rng
  if head_fusion not in ("mean", "max") or token not in ("mean", "cls"):
    raise ValueError(f"head_fusion must be 'mean' or 'max' and token 'mean' "
                     f"or 'cls', got {head_fusion!r}, {token!r}.")
  attentions, (h, w) = attention_weights(model, variables, images)
  rollout = None
  for attn_BxHxNxN in attentions:
    a = attn_BxHxNxN.astype(_F32)
    a = a.mean(axis=1) if head_fusion == "mean" else a.max(axis=1)
    a = 0.5 * a + 0.5 * jnp.eye(a.shape[-1], dtype=_F32)
    a = a / a.sum(axis=-1, keepdims=True)
    rollout = a if rollout is None else a @ rollout
  prefix = rollout.shape[-1] - h * w  # the class token
  rows = rollout[:, 0] if token == "cls" else rollout[:, prefix:].mean(axis=1)
  sal = rows[:, prefix:].reshape(-1, h, w)
  return normalize_maps(upsample(sal, images.shape[1:3]))


# -- the model's own map ---------------------------------------------------------
_HEAD_NAMES = {cls: name for name, cls in HEADS.items()}


def head_name(model) -> str:
  """``'brnpa'``, ``'bcnn'`` or ``'gap'``: the kind of the model's head."""
  name = _HEAD_NAMES.get(type(getattr(model, "head", None)))
  if name is None:
    raise ValueError(f"no known head on {type(model).__name__}; known heads: "
                     f"{sorted(HEADS)}.")
  return name


def own_saliency(aux: dict, head: str) -> jax.Array:
  """The model's own map at feature resolution, min-max normalised (B, h, w).

  docs/method.md#own-maps (release protocol): brnpa: map 1 x norm map; gap: the norm
  map; bcnn: mean of its maps x norm map.

  Args:
    aux: the model's aux dict (``maps`` (B, K, h, w), ``norms`` (B, h, w)).
    head: ``head_name(model)``.
  """
  norms = aux["norms"].astype(_F32)
  maps = aux["maps"].astype(_F32)
  if head == "brnpa":
    sal = maps[:, 0] * norms
  elif head == "bcnn":
    sal = maps.mean(axis=1) * norms
  elif head == "gap":
    sal = norms
  else:
    raise ValueError(f"unknown head {head!r}; known: {sorted(HEADS)}.")
  return normalize_maps(sal)


def own(model, variables, images, labels, rng):
  """The model's own map (``own_saliency``), upsampled to the input size."""
  del labels, rng
  _, aux = model.apply(variables, images)
  sal = own_saliency(aux, head_name(model))
  return normalize_maps(upsample(sal, images.shape[1:3]))


# -- the entry point -------------------------------------------------------------
EXPLAINERS: dict[str, Callable[..., jax.Array]] = {
    "own": own,
    "gradcam": grad_cam,
    "gradcampp": grad_cam_pp,
    "scorecam": score_cam,
    "ablationcam": ablation_cam,
    "rise": rise,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "rollout": attention_rollout,
}
DISPLAY_NAMES = {
    "own": "own map", "gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++",
    "scorecam": "Score-CAM", "ablationcam": "Ablation-CAM", "rise": "RISE",
    "smoothgrad": "SmoothGrad", "integrated_gradients": "Integrated Gradients",
    "rollout": "attention rollout",
}


def options_of(method: str) -> dict[str, Any]:
  """The options a method takes, with their defaults."""
  if method not in EXPLAINERS:
    raise ValueError(f"unknown explainer {method!r}; known: {sorted(EXPLAINERS)}.")
  params = inspect.signature(EXPLAINERS[method]).parameters.values()
  return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}


@functools.lru_cache(maxsize=None)
def _jitted(method: str, model, static: tuple):
  return jax.jit(functools.partial(EXPLAINERS[method], model, **dict(static)))


def explain(method: str, model, variables, images_BxHxWx3, labels_B=None, *,
            rng=None, **options) -> jax.Array:
  """Saliency maps of ``method`` for a batch of images.

  Args:
    method: a key of ``EXPLAINERS``.
    model: a ``Classifier`` (unbound).
    variables: its ``{'params', 'batch_stats'}``.
    images_BxHxWx3: the model's (normalised) inputs.
    labels_B: classes to explain; None (or a negative label) explains the
      class predicted on the unperturbed image.
    rng: key for the random methods (RISE masks, SmoothGrad noise); default
      ``jax.random.key(0)``.
    **options: the method's options (``options_of(method)``), e.g. ``chunk``.

  Returns:
    float32 (B, H, W) maps in [0, 1] (``integrated_gradients`` with
    ``raw=True``: signed attributions summed over channels).
  """
  known = options_of(method)
  unknown = set(options) - set(known)
  if unknown:
    raise ValueError(f"{method} takes no option(s) {sorted(unknown)}; its "
                     f"options: {known}.")
  images = jnp.asarray(images_BxHxWx3)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (B, H, W, 3), got {images.shape}.")
  b = images.shape[0]
  if labels_B is None:
    labels = jnp.full((b,), -1, jnp.int32)
  else:
    labels = jnp.asarray(labels_B, jnp.int32)
    if labels.shape != (b,):
      raise ValueError(f"labels must be ({b},) for {b} images, got {labels.shape}.")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and int(labels.max()) >= num_classes:
      raise ValueError(f"label {int(labels.max())} is out of range for "
                       f"{num_classes} classes.")
  if rng is None:
    rng = jax.random.key(0)
  dynamic = {k: v for k, v in options.items()
             if isinstance(v, (jax.Array, np.ndarray))}
  static = tuple(sorted((k, v) for k, v in options.items() if k not in dynamic))
  return _jitted(method, model, static)(variables, images, labels, rng, **dynamic)
