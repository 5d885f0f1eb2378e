import pickle
import subprocess
import sys

import pytest
import yaml

from mtssl.cli import main
from mtssl.config import ConfigError, from_dict, load_config, save_config, to_dict
from mtssl.tasks import TASKS


def test_builtin_configs_load():
    q = load_config("quickstart")
    p = load_config("paper")
    assert q.trunk.width < 1 and q.enabled_tasks() == list(TASKS)  # every built-in task
    assert (p.trunk.depth, p.trunk.output_stride, p.trunk.width) == (101, 8, 1.0)
    assert p.tasks.relative_position.patch_size == 96 and p.tasks.relative_position.gap == 48
    assert p.tasks.colorization.input_size == 256
    assert p.tasks.exemplar.patch_size == 96 and p.tasks.exemplar.image_size == 256
    assert p.tasks.motion_segmentation.frame_size == (240, 320)
    assert p.harmonization.relative_position and not p.harmonization.exemplar


def test_overrides_are_typed():
    cfg = load_config("quickstart", ["trunk.depth=50", "trunk.units=null", "lasso.l1=1e-2",
                                     "tasks.exemplar.negatives=random", "trunk.units=[1,2,3]"])
    assert cfg.trunk.depth == 50 and cfg.trunk.units == (1, 2, 3)
    assert cfg.lasso.l1 == pytest.approx(0.01)  # YAML reads 1e-2 as text; it is coerced
    assert cfg.tasks.exemplar.negatives == "random"


@pytest.mark.parametrize("override, key, words", [
    ("trunk.dpth=50", "trunk.dpth", "valid keys here are: depth, units, width"),
    ("tasks.colorization.sigmaa=3", "tasks.colorization.sigmaa", "sigma"),
    ("tasks.jigsaw.enabled=true", "tasks.jigsaw", "relative_position, colorization"),
    ("trunk.depth=abc", "trunk.depth", "expected an integer"),
    ("trunk.output_stride=32", "trunk.output_stride", "one of 8, 16"),
    ("trunk.depth=34", "trunk.depth", "must be one of [26, 50, 101, 152]"),
    ("tasks.exemplar.batch_size=1", "tasks.exemplar.batch_size", "negatives come from"),
    ("tasks.relative_position.jitter=30", "tasks.relative_position.jitter", "at most half the gap"),
    ("harmonization.colorization=false", "harmonization.colorization", "cannot be switched off"),
    ("lasso.mode=sparse", "lasso.mode", "'lasso', 'naive'"),
    ("output.log_every=true", "output.log_every", "expected an integer"),
    ("trunk=3", "trunk", "expected a mapping"),
])
def test_bad_values_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config("paper", [override])
    assert err.value.key == key
    assert words in str(err.value) and key in str(err.value)


def test_all_tasks_disabled_is_an_error():
    off = [f"tasks.{t}.enabled=false" for t in load_config("quickstart").enabled_tasks()]
    with pytest.raises(ConfigError, match="at least one task"):
        load_config("quickstart", off)


def test_config_imports_neither_torch_nor_pil():
    # Config is the bottom layer: a fresh interpreter, so modules other tests loaded don't count.
    code = ("import mtssl.config, sys; "
            "assert 'torch' not in sys.modules and 'PIL' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reading_a_config_needs_registered_tasks():
    code = ("from mtssl.config import ConfigError, load_config\n"
            "try:\n    load_config('quickstart')\n"
            "except ConfigError as err:\n    print(err.key, '|', err)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.startswith("tasks |") and "import mtssl.tasks" in out.stdout
    assert len(out.stdout.strip().splitlines()) == 1


def test_unknown_config_name_lists_builtins():
    with pytest.raises(ConfigError, match="built-in: paper, quickstart"):
        load_config("papr")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("paper", ["trunk.units=[1,1,2]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # DataLoader workers receive it pickled


def test_cli_rejects_bad_config_before_work(capsys):
    assert main(["train", "--config", "quickstart", "--set", "trunk.wdth=2"]) == 2
    err = capsys.readouterr().err
    assert "trunk.wdth" in err and "valid keys here are" in err


def test_cli_config_prints_resolved(capsys):
    assert main(["config", "--config", "paper", "--set", "trunk.depth=50"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["trunk"]["depth"] == 50
