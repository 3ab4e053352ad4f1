r"""The operator's reference values, from the authors' release rule in PyTorch.

``tests/brnpa_reference.npz`` holds, for each case of ``CASES``, non-negative
features (NHWC), the vectors and maps of the release's operator, and the
input gradient for a cotangent on the vectors; ``tests/test_brnpa.py``
compares ours with them. The rule is that of the release,
``github.com/TristanGomez44/br_npa`` at commit ``4c93b8d``
(``RELEASE_COMMIT``), ``code/modelBuilder.py``, ``representativeVectors``;
``release_operator`` below restates it in PyTorch (autograd gives the
gradient, as it does in the release). Regenerate (needs torch):

  python -m brnpa_jax.tools.brnpa_golden --out tests/brnpa_reference.npz \
      --inputs tests/brnpa_reference.npz

``--inputs`` keeps an existing file's features and cotangents (without it
they are drawn from ``--seed``) and prints how far the new outputs are from
that file's. The stored file's outputs are reproduced to a relative
difference of at most 5e-7 (torch 2.13.0, CPU); the test's tolerance is 1e-5.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from brnpa_jax import cli

RELEASE_COMMIT = "4c93b8dcc9a5ffc3bffd7f944c6172be48f3a9d8"
NORM_EPS = 1e-5  # the release's constant on every norm
# name -> (features shape NHWC, K, no_refine)
CASES = {
    "small": ((2, 7, 7, 16), 3, False),
    "rect": ((3, 6, 10, 32), 3, False),
    "k5": ((2, 9, 9, 24), 5, False),
    "norefine": ((2, 7, 7, 16), 3, True),
    "wide": ((1, 14, 14, 2048), 3, False),
}
OUTPUTS = ("vectors", "maps_bkhw", "grad_nhwc")


def release_operator(x_BxHxWxC, num_maps: int, no_refine: bool):
  """The release's rule on a torch tensor: (vectors (B, K, C), maps (B, K, H, W)).

  Per image: norms ``n = ||x|| + 1e-5``; K rounds, each picking the argmax
  of the score (initially ``n``), the cosine ``s`` of every position with
  the pick (both norms with their epsilon), the map ``s / sum(s)`` and the
  vector ``sum(map * x)`` (the pick itself with ``no_refine``), then the
  score times ``1 - s``.
  """
  import torch  # pylint: disable=g-import-not-at-top  # optional: regeneration only
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h * w, c)
  norm = torch.sqrt((x * x).sum(-1)) + NORM_EPS
  score = norm.clone()
  rows = torch.arange(b)
  vectors, maps = [], []
  for _ in range(num_maps):
    pick = score.argmax(dim=1)
    x_pick, n_pick = x[rows, pick], norm[rows, pick]
    sim = (x * x_pick[:, None]).sum(-1) / (norm * n_pick[:, None])
    attention = sim / sim.sum(dim=1, keepdim=True)
    vectors.append(x_pick if no_refine else (x * attention[..., None]).sum(1))
    maps.append(attention.reshape(b, h, w))
    score = (1 - sim) * score
  return torch.stack(vectors, 1), torch.stack(maps, 1)


def release_outputs(features_nhwc: np.ndarray, num_maps: int, no_refine: bool,
                    cotangent: np.ndarray) -> dict[str, np.ndarray]:
  """Vectors, maps and d<vectors, cotangent>/d features, in float32."""
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.from_numpy(features_nhwc).requires_grad_(True)
  vectors, maps = release_operator(x, num_maps, no_refine)
  (grad,) = torch.autograd.grad((vectors * torch.from_numpy(cotangent)).sum(), x)
  return {"vectors": vectors.detach().numpy(), "maps_bkhw": maps.detach().numpy(),
          "grad_nhwc": grad.numpy()}


def draw_inputs(seed: int) -> dict[str, np.ndarray]:
  """Features ReLU(N(0, 1)) and cotangents N(0, 1) for every case."""
  out = {}
  for i, (name, (shape, k, no_refine)) in enumerate(CASES.items()):
    rng = np.random.default_rng(seed + i)
    out[f"{name}/features_nhwc"] = np.maximum(
        rng.standard_normal(shape), 0).astype(np.float32)
    out[f"{name}/k"] = np.array(k, np.int32)
    out[f"{name}/no_refine"] = np.array(no_refine)
    out[f"{name}/cotangent"] = rng.standard_normal(
        (shape[0], k, shape[-1])).astype(np.float32)
  return out


def _define(fv: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_string("out", None, "The .npz to write.", flag_values=fv,
                      required=True)
  flags.DEFINE_string("inputs", None, "An existing reference file whose "
                      "features and cotangents to keep.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of new inputs (without --inputs).",
                       flag_values=fv)


def _main(fv: flags.FlagValues) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  old = {}
  if fv.inputs:
    with np.load(fv.inputs) as f:
      old = {k: f[k] for k in f.files}
  data = ({k: v for k, v in old.items() if k.rsplit("/", 1)[-1] not in OUTPUTS}
          if old else draw_inputs(fv.seed))
  for name in CASES:
    for key, value in release_outputs(
        data[f"{name}/features_nhwc"], int(data[f"{name}/k"]),
        bool(data[f"{name}/no_refine"]), data[f"{name}/cotangent"]).items():
      data[f"{name}/{key}"] = value
      if f"{name}/{key}" in old:
        ref = old[f"{name}/{key}"].astype(np.float64)
        diff = np.max(np.abs(value - ref)) / np.max(np.abs(ref))
        print(f"{name}/{key}: max |new - old| / max |old| = {diff:.2g}")
  data["release_commit"] = np.array(RELEASE_COMMIT)
  data["torch_version"] = np.array(str(torch.__version__))
  np.savez_compressed(fv.out, **data)
  print(f"Wrote {fv.out}.")


def main(argv=None) -> int:
  return cli.run(_define, _main, doc=__doc__, argv=argv,
                 prog="python -m brnpa_jax.tools.brnpa_golden")


if __name__ == "__main__":
  raise SystemExit(main())
