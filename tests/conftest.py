from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(items):
    """Tests that use the real data carry the shared_data marker: `-m 'not shared_data'` leaves
    them out, `-m shared_data` runs only them."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)


@pytest.fixture
def shared_data() -> Path:
    """The real data sets in ../shared/data; tests that need them skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA


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
