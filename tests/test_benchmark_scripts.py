"""The CPU benchmark scripts that no other test runs: each runs end to end
at toy sizes, so that an API change cannot leave one failing at start."""

import sys

from benchmarks import backbones, depthwise


def test_backbones_prints_every_model_with_ratios(monkeypatch, capsys):
  # Two of the three families keep it short (ConvNeXt's train step compiles
  # longest); the script treats every model alike.
  monkeypatch.setattr(backbones, "MODELS", (("ResNet", "resnet_tiny", 8),
                                            ("ViT", "vit_test", 8)))
  monkeypatch.setattr(sys, "argv", ["backbones", "--size", "32", "--batch", "2",
                                    "--iters", "1", "--rounds", "1"])
  backbones.main()
  rows = [l for l in capsys.readouterr().out.splitlines()
          if l.split()[:1] in (["ResNet"], ["ViT"])]
  assert len(rows) == 2 and "1.00x" in rows[0]
  # parameters, GFLOP/image and both rates are positive numbers
  for row in rows:
    cols = row.replace("|", " ").split()
    assert float(cols[2].rstrip("M")) > 0 and float(cols[3]) > 0
    assert float(cols[5]) > 0 and float(cols[7]) > 0


def test_depthwise_table_has_each_stage_and_the_total(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["depthwise", "--width", "4", "--size", "32",
                                    "--batch", "2", "--iters", "1", "--rounds", "1"])
  depthwise.main()
  rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")]
  grids = [r.split("|")[1].strip() for r in rows[1:]]
  # ConvNeXt-T at width 4 and 32 px, res high: 8x8 then 4x4 for three stages
  assert grids == ["8x8x6", "4x4x12", "4x4x24", "4x4x48", "all blocks"]
  assert all(float(r.split("|")[5].strip().rstrip("x")) > 0 for r in rows[1:])
