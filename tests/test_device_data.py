"""benchmarks/device_data.py packs transfer.py's inputs for a lent GPU machine: on SYNTHETIC
stand-ins of ../shared/data (tests/synthetic.py), every photo re-encoded and readable, the
motion masks prepared, and nothing left that points back into the data folder."""

import importlib.util
import json
from pathlib import Path

import pytest
import synthetic
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_device_data_packs_photos_and_prepared_motion(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    synthetic.photos(data / "unlabeled" / "caltech", 6)
    for split, n in (("train", 3), ("test", 2)):
        synthetic.photos(data / "caltech10" / split / "kite", n, seed=n)
    synthetic.videos(data / "videos", ["a.mp4"], frames=24)
    synthetic.davis(data / "davis2016", {"seq": 24})
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("device_data", BENCH / "device_data.py")
    packer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(packer)
    out = tmp_path / "device-data"
    packer.main(["--data", str(data), "--out", str(out)])

    for part in ("unlabeled/caltech", "caltech10/train/kite", "caltech10/test/kite"):
        src, dst = sorted((data / part).glob("*.jpg")), sorted((out / "data" / part).glob("*.jpg"))
        assert [p.name for p in dst] == [p.name for p in src]
        for a, b in zip(src, dst):
            with Image.open(a) as x, Image.open(b) as y:
                assert x.size == y.size and y.format == "JPEG"
    manifest = json.loads((out / "work" / "motion-24" / "manifest.json").read_text())
    assert manifest["frames"]["count"] > 0
    assert not any(p.is_symlink() for p in out.rglob("*"))  # links would not travel
    assert "total" in capsys.readouterr().out
