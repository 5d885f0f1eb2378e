"""ImageNet-style linear probe: end to end on ten classes (synthetic, and real caltech10) from
random init and from a briefly pre-trained trunk, the feature cache, eval-only lasso, bad input,
and the CLI."""

import json

import pytest
from synthetic import image_folder
from test_eval_checkpoints import train_tiny

from mtssl.cli import main
from mtssl.config import load_config
from mtssl.eval.common import EvalError, load_trunk, random_trunk, suite_settings
from mtssl.eval.imagenet import run


def probe(loaded, data, cache, *sets):
    s = suite_settings("imagenet", "smoke", ["max_per_class=5", "epochs=120", *sets])
    return run(loaded, data, s, settings_name="smoke", cache_dir=cache)


def test_random_and_pretrained_trunks_on_ten_classes(labelled, tmp_path):
    data = labelled.root
    pre = load_trunk(str(train_tiny(tmp_path / "run", steps=1).cfg.run_dir))
    rand = random_trunk(pre.arch)
    cache = tmp_path / "cache"
    results = [probe(t, data, cache) for t in (rand, pre)]
    for r in results:
        assert sorted(r["classes"]) == sorted(labelled.classes)
        assert r["train_images"] == r["eval_images"] == 50 and r["eval_split"] == "test"
        assert 0.0 <= r["metrics"]["top1"] <= r["metrics"]["top5"] <= 1.0
        assert r["metrics"]["top1"] >= 0.2 and r["metrics"]["train_top1"] >= 0.5  # chance: 0.1
        assert not r["features_cached"] and r["extract_images_per_s"] > 0
    assert results[0]["checkpoint"] != results[1]["checkpoint"]
    assert len(list(cache.glob("features-*.pt"))) == 4  # (train, test) x two trunks

    again = probe(pre, data, cache)
    assert again["features_cached"] and again["metrics"] == results[1]["metrics"]
    probe(pre, data, cache, "epochs=5")  # classifier settings reuse the features
    assert len(list(cache.glob("features-*.pt"))) == 4
    lasso = probe(pre, data, cache, "lasso=true")  # per-unit features: a new cache entry
    assert len(list(cache.glob("features-*.pt"))) == 6
    assert len(lasso["alpha"]) == pre.arch.units[2] == 2 and lasso["alpha"] != [0.0, 1.0]


def test_empty_class_and_corrupt_image_are_skipped_and_reported(tmp_path):
    data = image_folder(tmp_path / "d", {"train/a": 4, "train/b": 4, "val/a": 2, "val/b": 2,
                                         "val/c": 1})
    (data / "train" / "empty").mkdir()
    (data / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    loaded = random_trunk(load_config("quickstart").trunk)
    s = suite_settings("imagenet", "smoke", ["resize=32", "image_size=32", "epochs=30"])
    r = run(loaded, data, s)
    assert r["classes"] == ["a", "b"] and r["eval_split"] == "val"
    assert r["train_images"] == 8 and r["eval_images"] == 4
    assert r["skipped"] == {"empty_class": 1, "class_not_in_train": 1, "not_an_image": 1}
    assert "top5" not in r["metrics"]  # two classes: top-5 is not defined
    assert r["metrics"]["top1"] == 1.0  # red vs blue is linearly separable even at random init


def test_missing_splits_are_clear_errors(tmp_path):
    loaded = random_trunk(load_config("quickstart").trunk)
    s = suite_settings("imagenet", "smoke")
    image_folder(tmp_path / "d", {"train/a": 1})
    with pytest.raises(EvalError, match="expected ImageFolder splits train/ and val/"):
        run(loaded, tmp_path / "d", s)
    (tmp_path / "e" / "train" / "a").mkdir(parents=True)
    (tmp_path / "e" / "val").mkdir()
    with pytest.raises(EvalError, match="no class folder holds any image"):
        run(loaded, tmp_path / "e", s)


def test_cli_eval(tmp_path, capsys):
    data = image_folder(tmp_path / "d", {"train/a": 3, "train/b": 3, "test/a": 2, "test/b": 2})
    base = ["eval", "imagenet", "--data", str(data), "--cache-dir", str(tmp_path / "c"),
            "--set", "resize=32", "--set", "image_size=32", "--set", "epochs=5"]
    out = tmp_path / "r.json"
    assert main(base + ["--init", "random", "--arch", "quickstart", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["checkpoint"].startswith("random:") and "top1" in result["metrics"]
    assert "top1:" in capsys.readouterr().out
    assert main(base + ["--init", "random"]) == 1
    assert "--init random needs --arch" in capsys.readouterr().err
    assert main(base + ["--init", "random", "--arch", "quickstart", "--set", "epoch=3"]) == 2
    assert "'imagenet.epoch': unknown key" in capsys.readouterr().err
    run_dir = train_tiny(tmp_path / "run", steps=1).cfg.run_dir
    assert main(base + ["--checkpoint", str(run_dir), "--arch", "quickstart"]) == 1
    assert "different architecture" in capsys.readouterr().err


def test_grid_probe_reads_pooled_cells_and_global_probe_one_vector(tmp_path):
    """The literature's probe (block-3 maps pooled to a grid, standardised, linear) next to the
    globally pooled one, on a tiny trunk; eval-only lasso works with both."""
    import torch

    from mtssl.eval.imagenet import CropDataset, extract_features, list_split
    data = image_folder(tmp_path / "d", {"train/a": 4, "train/b": 4, "val/a": 2, "val/b": 2})
    loaded = random_trunk(load_config("quickstart", ["trunk.units=[1,1,2]",
                                                     "trunk.width=0.0625"]).trunk)
    _, items, _ = list_split(data / "train", None, None)
    channels = loaded.build().out_channels
    for grid, per_tap in ((1, False), (3, False), (2, True)):
        rec = extract_features(loaded.build(16), CropDataset(items, resize=48, size=48),
                               input_mode="rgb", per_tap=per_tap, batch_size=4, workers=0,
                               device=torch.device("cpu"), grid=grid)
        assert rec["features"].shape == (8, 2 if per_tap else 1, channels * grid * grid)
    results = {}
    for sets in (["pool=grid"], ["pool=global"], ["pool=grid", "lasso=true"]):
        s = suite_settings("imagenet", "smoke", ["resize=32", "image_size=32", "epochs=30",
                                                 *sets])
        results[" ".join(sets)] = run(loaded, data, s, cache_dir=tmp_path / "cache")
    assert all(r["metrics"]["top1"] == 1.0 for r in results.values())  # red vs blue
    assert len(results["pool=grid lasso=true"]["alpha"]) == 2


def test_bn_statistics_are_recomputed_on_the_probes_training_images(tmp_path):
    """bn_stats=recompute (the default): every BatchNorm's running statistics become the
    average over one pass of the training split, whatever the checkpoint held; `checkpoint`
    keeps them; the two read different features and are cached apart."""
    import torch

    from mtssl.eval.imagenet import CropDataset, frozen_trunk, list_split, recompute_bn_stats
    data = image_folder(tmp_path / "d", {"train/a": 4, "train/b": 4, "val/a": 2, "val/b": 2})
    loaded = random_trunk(load_config("quickstart", ["trunk.units=[1,1,2]",
                                                     "trunk.width=0.0625"]).trunk)
    _, items, _ = list_split(data / "train", None, None)
    trunk = loaded.build(16)
    first = trunk.block1[0].norm1  # the first BatchNorm: it sees the root's output
    seen = []
    first.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    recompute_bn_stats(trunk, CropDataset(items, resize=48, size=48), input_mode="rgb",
                       batch_size=3, workers=0, device=torch.device("cpu"))
    batch_means = torch.stack([x.mean((0, 2, 3)) for x in seen])  # (batches, C)
    assert torch.allclose(first.running_mean, batch_means.mean(0), atol=1e-5)
    assert not trunk.training

    kept = suite_settings("imagenet", "smoke", ["resize=48", "image_size=48", "bn_stats=checkpoint"])
    redone = suite_settings("imagenet", "smoke", ["resize=48", "image_size=48"])
    assert redone.bn_stats == "recompute"
    cpu = torch.device("cpu")
    assert torch.equal(frozen_trunk(loaded, kept, items, device=cpu).block1[0].norm1.running_mean,
                       torch.zeros_like(first.running_mean))  # a random trunk's initial values
    a = run(loaded, data, kept, cache_dir=tmp_path / "cache")
    b = run(loaded, data, redone, cache_dir=tmp_path / "cache")
    assert not a["features_cached"] and not b["features_cached"]  # cached apart
