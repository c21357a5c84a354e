"""What a comparison reads and computes on: methods, their runs, per-case Dice; the error type; the
small helpers the readers and the statistics share."""
from __future__ import annotations

from dataclasses import dataclass, field

from nnunet_acnorm.errors import InputError


class CompareError(InputError):
    """A problem with the input of a comparison (nothing is written before it is checked)."""


@dataclass
class Run:
    """One set of results of a method: a prediction folder, or one trained model folder (all its folds)."""
    source: str
    dice: dict  # case id -> {label key: Dice (nan where nnU-Net gives NaN)}
    seed: int | None = None
    seed_source: str = "none"  # "debug.json", "numbered" (no seed found: order given) or "none" (label mode)
    folds: list = field(default_factory=list)


@dataclass
class Method:
    name: str
    runs: list


@dataclass
class Comparison:
    """Everything the statistics need: methods with per-case Dice, in a fixed case and label order."""
    mode: str  # "label_folder" or "model_folders"
    methods: list
    labels: dict  # label key -> display name, in order
    cases: list
    notes: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)


def some(items, k: int = 5) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:k])
    return shown + (f", ... ({len(items) - k} more)" if len(items) > k else "")


def to_float(value) -> float:
    return float("nan") if value is None else float(value)


def label_key(label_or_region) -> str:
    """Key of a label (``"1"``) or region (``"(1, 2)"``), as nnU-Net's summary.json writes them."""
    if isinstance(label_or_region, (tuple, list)):
        return str(tuple(int(i) for i in label_or_region))
    return str(int(label_or_region))


def check_baseline(baseline: str | None, names: list) -> None:
    if baseline is not None and baseline not in names:
        raise CompareError(f"-baseline {baseline} is not one of the methods ({', '.join(names)})")
