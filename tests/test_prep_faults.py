"""`mtssl prep` faults on generated inputs (no ../shared needed): a file name that is not UTF-8,
a frame folder with missing frame numbers, a prep killed with SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mtssl.prep.dataset import prepare
from mtssl.prep.options import PrepConfig
from mtssl.prep.shards import TEMP_PREFIX
from mtssl.prep.walk import walk

ROOT = Path(__file__).resolve().parents[1]


def photo(path: Path, seed: int, size=(96, 128)) -> None:
    rng = np.random.default_rng(seed)
    # Smooth colour gradients plus noise: a decodable colour image of a usable size.
    y, x = np.mgrid[0:size[0], 0:size[1]]
    rgb = np.stack([x * 2 % 256, y * 2 % 256, (x + y + seed * 40) % 256], -1)
    rgb = np.clip(rgb + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=90)


def options(src, out, **kw) -> PrepConfig:
    return PrepConfig(input=str(src), output=str(out), **{"short_side": 64, "progress": False,
                                                          **kw})


def test_a_non_utf8_file_name_is_skipped_with_a_reason(tmp_path):
    src = tmp_path / "in"
    for i in range(3):
        photo(src / f"ok{i}.jpg", i)
    bad = os.fsencode(src) + b"/caf\xe9-latin1.jpg"  # a Latin-1 name from an old archive
    photo(Path(os.fsdecode(bad)), 9)
    manifest = prepare(options(src, tmp_path / "out"))
    assert manifest["images"]["count"] == 3
    assert ["caf\\xe9-latin1.jpg", "undecodable_name"] in [s[:2] for s in
                                                           manifest["skipped"]["items"]]
    again = prepare(options(src, tmp_path / "out"))  # a re-run meets it again, and goes on
    assert again == manifest


def test_a_frame_folder_with_a_gap_is_split_not_bridged(tmp_path):
    clip = tmp_path / "in" / "clip"
    numbers = list(range(0, 12)) + list(range(28, 40))  # frames 12..27 are missing
    for n in numbers:
        photo(clip / f"{n:05d}.jpg", n)
    items = list(walk(tmp_path / "in"))
    assert [i.rel for i in items] == ["clip#0-11", "clip#28-39"]
    for item in items:
        got = [int(Path(f).stem) for f in item.frames]
        assert got == list(range(got[0], got[0] + len(got)))  # consecutive: no jump inside


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    from mtssl.procs import pid_alive
    return pid_alive(pid)


def test_a_killed_prep_leaves_no_temp_tar_behind_after_the_next_run(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(150):
        photo(src / f"p{i:03d}.jpg", i, size=(240, 320))
    before = set(Path(tempfile.gettempdir()).glob("*.tar"))
    proc = subprocess.Popen([sys.executable, "-m", "mtssl.cli", "prep", str(src), str(out),
                             "--short-side", "64", "--progress", "false", "--workers", "2"],
                            cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob(f"{TEMP_PREFIX}*.tar")):
        assert proc.poll() is None and time.monotonic() < deadline, "no temp tar seen"
        time.sleep(0.01)
    workers = children(proc.pid)
    assert workers, "prep --workers 2 runs worker processes"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Its workers die with it (PR_SET_PDEATHSIG), instead of waiting forever on a dead parent.
    deadline = time.monotonic() + 20
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in workers), "prep's workers outlived it"
    # The temporary is next to the output (found by whoever looks there), not in /tmp.
    assert set(Path(tempfile.gettempdir()).glob("*.tar")) <= before
    assert list(out.glob(f"{TEMP_PREFIX}*.tar"))
    manifest = prepare(options(src, out))
    assert manifest["images"]["count"] == 150
    assert list(out.glob(f"{TEMP_PREFIX}*")) == []
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_prep_help_states_each_default_once(capsys):
    import pytest

    from mtssl.cli import main
    with pytest.raises(SystemExit):
        main(["prep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "(default: next to a local output, else the system temp folder)" in text
