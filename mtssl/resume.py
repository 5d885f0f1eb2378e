"""What a resumed run may change: the model's sections stay, named hyper-parameters may move."""

from __future__ import annotations

import fnmatch
import logging

from mtssl.config import MODEL_SECTIONS, SHARED_DATA_KEYS, Config, ConfigError, to_dict
from mtssl.errors import TrainingError

log = logging.getLogger("mtssl.train")

# Sections that define the model and its optimisation: a resumed run must not change them,
# except how many distributed workers share each task's batches.
FROZEN_ON_RESUME = (*MODEL_SECTIONS, "optimizer")
# Of those, what `--allow-changed` may name: hyper-parameters that change no shape or data, for
# continuing a run (e.g. one that diverged) with new values.
CHANGEABLE_ON_RESUME = ("optimizer.*", "lasso.l1", "tasks.*.lr", "tasks.*.weight")


def check_changeable(cfg: Config, keys: tuple[str, ...]) -> tuple[str, ...]:
    """The `--allow-changed` keys, each an existing key matching CHANGEABLE_ON_RESUME."""
    for key in keys:
        node = to_dict(cfg)
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(key, "--allow-changed: no such config key")
            node = node[part]
        if not any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key + ".x", p)
                   for p in CHANGEABLE_ON_RESUME):
            raise ConfigError(key, "--allow-changed: this key cannot change on resume; only "
                                   + ", ".join(CHANGEABLE_ON_RESUME) + " can")
    return tuple(keys)


def check_resumable(saved: Config, current: Config, allowed: tuple[str, ...] = ()) -> None:
    old, new = to_dict(saved), to_dict(current)
    diffs = [k for section in FROZEN_ON_RESUME for k in diff_keys(old[section], new[section], section)
             if not (k.startswith("tasks.") and k.endswith(".workers"))]
    refused = [k for k in diffs if not any(k == a or k.startswith(a + ".") for a in allowed)]
    if refused:
        raise TrainingError("cannot resume: the checkpoint was trained with different settings for "
                            + ", ".join(refused) + " (only schedule, data, output, distributed and "
                            "tasks.<t>.workers may change; name hyper-parameters you mean to change "
                            "with --allow-changed, e.g. --allow-changed tasks.colorization.lr)")
    if diffs:
        log.warning("resuming with changed settings (--allow-changed): %s", ", ".join(diffs))
    # The data section may change (a dataset moved, another loader), but these keys decide
    # which samples come: from here on they differ from what the checkpoint's run would draw.
    data = [f"data.{k}" for k in SHARED_DATA_KEYS if old["data"][k] != new["data"][k]]
    if data:
        log.warning("resuming with changed data settings %s: the samples from here on are not "
                    "those the checkpoint's run would have drawn", ", ".join(data))


def diff_keys(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k2 for k in sorted(set(a) | set(b))
                for k2 in diff_keys(a.get(k), b.get(k), f"{prefix}.{k}")]
    return [] if a == b else [prefix]
