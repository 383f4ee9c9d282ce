"""Datasets by name: a Hugging Face Hub dataset (org/name) or a local dataset folder, with a split and
subset, read by `datasets.load_dataset`, so its cache (HF_DATASETS_CACHE / HF_HOME) and offline mode
(HF_DATASETS_OFFLINE=1: cached datasets only) apply as they do for any `datasets` user.

`check_split` runs on the driver before any Ray work and turns a wrong split or subset into an error
that lists the ones the dataset has. `load` reads the split there too: a Ray run then hands it to Ray
Data as an Arrow table (`data.read_ray_dataset`).
"""

from __future__ import annotations

import re

from pocl_ray.config import ConfigError, HFDataset

# load_dataset's split syntax: "train", "train[:1000]", "train[10%:]", "train+validation".
_SPLIT_NAME = re.compile(r"^\s*([^\[\]+]+?)\s*(\[[^\]]*\])?\s*$")


def describe(ref: HFDataset) -> str:
    """The dataset as a message names it: name, subset and split."""
    subset = f", subset {ref.subset!r}" if ref.subset else ""
    revision = f", revision {ref.revision!r}" if ref.revision else ""
    return f"dataset {ref.dataset!r}{subset}{revision}, split {ref.split!r}"


def requested_splits(split: str) -> list[str]:
    """The split names in a load_dataset split expression ("train[:10]+test" -> ["train", "test"])."""
    names = []
    for part in split.split("+"):
        match = _SPLIT_NAME.match(part)
        if match is None:
            raise ConfigError(f"split {split!r} is not a load_dataset split expression (e.g. train, train[:1000])")
        names.append(match.group(1))
    return names


def split_names(ref: HFDataset) -> list[str]:
    """The splits of the dataset (its subset), asked of `datasets` without reading the data; a missing
    subset of a dataset with several, or a dataset that cannot be found, is a ConfigError naming it."""
    import datasets

    try:
        return list(datasets.get_dataset_split_names(ref.dataset, ref.subset, revision=ref.revision))
    except ValueError as err:  # among others: "Config name is missing ... available configs: [...]"
        raise ConfigError(f"{describe(ref)}: {err}") from None
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        offline = " (HF_DATASETS_OFFLINE is set: only cached datasets can be read)" if _offline() else ""
        raise ConfigError(f"{describe(ref)} cannot be found{offline}: {err}") from None


def check_split(ref: HFDataset) -> None:
    """Raise a ConfigError naming the available splits unless every split `ref.split` asks for exists."""
    available = split_names(ref)
    missing = [name for name in requested_splits(ref.split) if name not in available]
    if missing:
        raise ConfigError(f"{describe(ref)}: no split {missing[0]!r}; the dataset has the splits {available}")


def load(ref: HFDataset, max_rows: int | None = None):
    """The split as a `datasets.Dataset` (first `max_rows` rows when given)."""
    import datasets

    check_split(ref)
    dataset = datasets.load_dataset(ref.dataset, ref.subset, split=ref.split, revision=ref.revision)
    if max_rows is not None:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return dataset


def _offline() -> bool:
    import datasets

    return bool(datasets.config.HF_DATASETS_OFFLINE)
