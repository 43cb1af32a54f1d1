"""Cross-validation splits: written once to `splits.json`, then read (a user may edit it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.atomic import read_json, write_json
from autoseg.errors import AutosegError

NUM_FOLDS = 5


class SplitError(AutosegError):
    """A splits.json that does not fit the preprocessed cases; the message names the fix."""


def make_splits(case_ids: list[str], num_folds: int = NUM_FOLDS, seed: int = 12345) -> list[dict]:
    """nnU-Net v2's folds: the sorted case ids shuffled by numpy's legacy RandomState(seed), cut into `num_folds`
    consecutive parts (the first `n % num_folds` one larger), as scikit-learn's `KFold(num_folds, shuffle=True,
    random_state=seed)` does; so fold K holds out the same cases in both tools."""
    ids = sorted(case_ids)
    if len(ids) < num_folds:
        raise SplitError(f"{len(ids)} cases cannot be split into {num_folds} folds; use --fold all to train on every "
                         f"case")
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    folds = np.array_split(order, num_folds)
    return [{"train": sorted(ids[i] for k, f in enumerate(folds) if k != fold for i in f),
             "val": sorted(ids[i] for i in folds[fold])} for fold in range(num_folds)]


def load_or_create_splits(path: Path, case_ids: list[str], seed: int = 12345) -> list[dict]:
    """Read `splits.json` if it exists (checking that every case it names exists), else write a new one."""
    path = Path(path)
    if path.is_file():
        data = read_json(path)
        splits = data["folds"] if isinstance(data, dict) else data
        known = set(case_ids)
        for k, s in enumerate(splits):
            unknown = sorted((set(s["train"]) | set(s["val"])) - known)
            if unknown:
                raise SplitError(f"{path}: fold {k} names case(s) that are not preprocessed: {unknown[:5]}; "
                                 "fix the file or delete it to make new splits")
        return splits
    splits = make_splits(case_ids, seed=seed)
    write_json(path, {"format_version": 1, "seed": seed, "folds": splits})
    return splits


def fold_cases(splits: list[dict], fold: int | str, case_ids: list[str]) -> tuple[list[str], list[str]]:
    """(train, val) case ids for a fold; fold "all" trains on every case without validation."""
    if fold == "all":
        return sorted(case_ids), []
    fold = int(fold)
    if not 0 <= fold < len(splits):
        raise SplitError(f"fold {fold} does not exist; splits.json has folds 0..{len(splits) - 1} (or use 'all')")
    return list(splits[fold]["train"]), list(splits[fold]["val"])
