from dataclasses import dataclass
from pathlib import Path

import pytest
import synthetic

import mtssl.tasks  # noqa: F401  registers the built-in tasks, as every entry point does

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(items):
    """Tests that use the real data carry the shared_data marker: `-m 'not shared_data'` leaves
    them out, `-m shared_data` runs only them."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)


def pytest_terminal_summary(terminalreporter):
    """One line CI logs always show: how many tests skipped, how many of them for want of the
    real data sets (so a CI without ../shared/data says what it did not test)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    real = sum(1 for r in skipped if "shared_data" in getattr(r, "keywords", {})
               or "real data not found" in str(r.longrepr))
    terminalreporter.write_line(f"mtssl: {len(skipped)} test(s) skipped, {real} of them for want "
                                f"of the real data sets in {SHARED_DATA} (reasons above, -ra)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets in ../shared/data; tests that need them skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session",
                params=["synthetic", pytest.param("real", marks=pytest.mark.shared_data)])
def data_kind(request) -> str:
    """The data fixtures below run each test twice: on synthetic data built here (always) and
    on the real data sets (marked shared_data: skipped without ../shared/data). Both must pass
    the same assertions, so the synthetic data carries the facts a test checks (counts, names,
    shapes). They share this one parameter, so a test using several never mixes the kinds."""
    return request.param


@pytest.fixture(scope="session")
def photo_pool(data_kind, request, tmp_path_factory) -> list[Path]:
    """At least 24 photos to prepare: real Caltech ones (every 97th of the pool) or synthetic."""
    if data_kind == "real":
        pool = request.getfixturevalue("shared_data") / "unlabeled" / "caltech"
        return sorted(pool.iterdir())[::97]
    return synthetic.photos(tmp_path_factory.mktemp("photos"), 24)


@dataclass(frozen=True)
class Davis:
    root: Path  # DAVIS 2016 layout
    lengths: dict[str, int]  # frames of the sequences tests use, in the order they use them
    total: int  # frames with a mask in the whole folder
    shape: tuple[int, int]  # (height, width) of every frame


@pytest.fixture(scope="session")
def davis(data_kind, request, tmp_path_factory) -> Davis:
    if data_kind == "real":
        lengths = {"camel": 90, "dog": 60}
        return Davis(request.getfixturevalue("shared_data") / "davis2016", lengths, 782,
                     (480, 854))
    lengths = {"synthetic-a": 12, "synthetic-b": 10}
    root = synthetic.davis(tmp_path_factory.mktemp("davis"), lengths)
    return Davis(root, lengths, sum(lengths.values()), (120, 160))


@pytest.fixture(scope="session")
def videos(data_kind, request, tmp_path_factory) -> list[Path]:
    """Two mp4 clips, the first with at least 30 frames, each with its index (moov) at the end
    of the file."""
    if data_kind == "real":
        real = request.getfixturevalue("shared_data") / "videos"
        return [real / "carphone_pristine.mp4", real / "bikes.mp4"]
    return synthetic.videos(tmp_path_factory.mktemp("videos"), ["a.mp4", "b.mp4"])


@dataclass(frozen=True)
class Labelled:
    root: Path  # ImageFolder layout: {train,test}/<class>/ with at least 5 images per class
    classes: tuple[str, ...]


@pytest.fixture(scope="session")
def labelled(data_kind, request, tmp_path_factory) -> Labelled:
    if data_kind == "real":
        return Labelled(request.getfixturevalue("shared_data") / "caltech10", (
            "Leopards", "bonsai", "brain", "butterfly", "car_side", "chandelier", "grand_piano",
            "hawksbill", "ketch", "watch"))
    classes = tuple(f"synthetic{i}" for i in range(10))
    spec = {f"{split}/{c}": 6 for split in ("train", "test") for c in classes}
    return Labelled(synthetic.image_folder(tmp_path_factory.mktemp("labelled"), spec, size=64),
                    classes)


@dataclass(frozen=True)
class Voc:
    root: Path  # PASCAL VOC layout, one class, at least 16 train and 6 test images
    cls: str


@pytest.fixture(scope="session")
def voc(data_kind, request, tmp_path_factory) -> Voc:
    if data_kind == "real":
        return Voc(request.getfixturevalue("shared_data") / "voc_raccoon", "raccoon")
    return Voc(synthetic.voc(tmp_path_factory.mktemp("voc"), {"train": 16, "test": 6}), "square")


# A few-second CPU model: every code path of the quickstart, smaller numbers.
TINY = [
    "trunk.units=[1,1,2]", "trunk.width=0.0625",
    "tasks.relative_position.patch_size=16", "tasks.relative_position.gap=8",
    "tasks.relative_position.jitter=2", "tasks.relative_position.min_pixels=8000",
    "tasks.relative_position.max_pixels=16000", "tasks.relative_position.batch_size=4",
    "tasks.colorization.input_size=32", "tasks.colorization.batch_size=4",
    "tasks.colorization.prior_batches=2",
    "tasks.exemplar.image_size=48", "tasks.exemplar.patch_size=16", "tasks.exemplar.batch_size=4",
    "tasks.motion_segmentation.frame_size=[32,48]", "tasks.motion_segmentation.batch_size=4",
    "data.num_workers=0", "output.progress=false", "schedule.warmup_steps=1",
]


@pytest.fixture
def tiny_config(tmp_path):
    """load_config for the tiny model writing to tmp_path; extra overrides as arguments."""
    from mtssl.config import load_config

    def make(*extra: str, run: str = "run"):
        return load_config("quickstart", TINY + [f"output.dir={tmp_path / run}", *extra])
    return make
