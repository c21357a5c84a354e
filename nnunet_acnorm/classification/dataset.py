"""Cases of a classification dataset: a folder of images plus a CSV of labels, and the 5-fold splits.

The CSV has a header row. The identifier column (default: the first) names an image in the image
folder, with or without its file ending (APTOS ``id_code``, EyePACS ``image``); the label column
(default: the second) holds integer class indices 0..num_classes-1 (APTOS ``diagnosis``, EyePACS
``level``). Every problem found (missing or unreadable file, bad label, grayscale image for an RGB
network) raises :class:`ClassificationInputError` naming the file or CSV row.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from nnunet_acnorm.classification.errors import ClassificationInputError

IMAGE_ENDINGS_2D = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
IMAGE_ENDINGS_3D = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: PIL modes holding one intensity channel: no colour to feed an RGB-pretrained stem
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La")


@dataclass
class Case:
    identifier: str
    path: str
    label: int | None = None
    #: spatial shape from the header (2D: height, width; 3D: z, y, x)
    shape: tuple[int, ...] | None = None


def image_endings(dim: int) -> tuple[str, ...]:
    return IMAGE_ENDINGS_2D if dim == 2 else IMAGE_ENDINGS_3D


def strip_ending(file_name: str) -> str:
    lower = file_name.lower()
    for ending in IMAGE_ENDINGS_3D + IMAGE_ENDINGS_2D:
        if lower.endswith(ending):
            return file_name[: -len(ending)]
    return file_name


def detect_dim(folder: str) -> int:
    """2 or 3 from the file endings found in ``folder``."""
    names = [n.lower() for n in os.listdir(folder)]
    n3 = sum(n.endswith(IMAGE_ENDINGS_3D) for n in names)
    n2 = sum(n.endswith(IMAGE_ENDINGS_2D) for n in names)
    if n2 == 0 and n3 == 0:
        raise ClassificationInputError(
            f"no images in {folder}: expected 2D {', '.join(IMAGE_ENDINGS_2D)} or 3D "
            f"{', '.join(IMAGE_ENDINGS_3D)} files")
    if n2 and n3:
        raise ClassificationInputError(
            f"{folder} holds both 2D ({n2}) and 3D ({n3}) images: pass -dim 2 or -dim 3")
    return 2 if n2 else 3


def read_label_csv(csv_file: str, id_column: str | None = None, label_column: str | None = None,
                   require_labels: bool = True) -> list[tuple[int, str, str | None]]:
    """Rows of (CSV line number, identifier, raw label or None)."""
    if not os.path.isfile(csv_file):
        raise ClassificationInputError(f"label file {csv_file} does not exist")
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ClassificationInputError(f"{csv_file} is not a readable CSV file ({e})") from None
    if not columns:
        raise ClassificationInputError(f"{csv_file} is empty: expected a header row such as 'image,label'")
    id_column = id_column or columns[0]
    if id_column not in columns:
        raise ClassificationInputError(f"{csv_file} has no column '{id_column}' (columns: {columns})")
    if label_column is None and require_labels:
        if len(columns) < 2:
            raise ClassificationInputError(
                f"{csv_file} has a single column {columns}: expected an identifier and a label column")
        label_column = columns[1]
    if label_column is not None and label_column not in columns:
        if require_labels:
            raise ClassificationInputError(f"{csv_file} has no column '{label_column}' (columns: {columns})")
        label_column = None
    out = []
    for line, row in enumerate(rows, start=2):
        identifier = (row.get(id_column) or "").strip()
        if not identifier:
            raise ClassificationInputError(f"{csv_file} line {line}: empty identifier in column '{id_column}'")
        label = row.get(label_column) if label_column else None
        out.append((line, identifier, None if label is None else label.strip()))
    if not out:
        raise ClassificationInputError(f"{csv_file} lists no images")
    seen: dict[str, int] = {}
    for line, identifier, _ in out:
        key = strip_ending(identifier)
        if key in seen:
            raise ClassificationInputError(
                f"{csv_file} lists '{key}' twice (lines {seen[key]} and {line}): remove the duplicate")
        seen[key] = line
    return out


def parse_label(raw: str | None, num_classes: int | None, where: str,
                hint: str = "fix the CSV or pass the right -num_classes") -> int:
    if raw is None or raw == "":
        raise ClassificationInputError(f"{where}: empty label")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value != int(value):
        raise ClassificationInputError(
            f"{where}: label '{raw}' is not an integer class index (expected 0..N-1)")
    value = int(value)
    if value < 0 or (num_classes is not None and value >= num_classes):
        declared = f"0..{num_classes - 1}" if num_classes is not None else "0 or above"
        raise ClassificationInputError(
            f"{where}: label {value} is outside the declared classes {declared}; {hint}")
    return value


def resolve_image(folder: str, identifier: str, dim: int, where: str) -> str:
    """The file of ``identifier`` in ``folder`` (its name as written, or with a known ending)."""
    candidates = [identifier] if identifier.lower().endswith(image_endings(dim)) else []
    candidates += [identifier + e for e in image_endings(dim)]
    candidates += [identifier + e.upper() for e in image_endings(dim)]
    for name in candidates:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    shown = ", ".join(candidates[: len(image_endings(dim)) + 1])
    raise ClassificationInputError(
        f"{where}: image '{identifier}' not found in {folder} (looked for {shown}); add the file or "
        f"remove the row")


def inspect_image(path: str, dim: int, require_rgb: bool) -> tuple[int, ...]:
    """Read the header of ``path``; return its spatial shape (2D: (height, width); 3D: (z, y, x))."""
    if dim == 2:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as image:
                mode, (width, height) = image.mode, image.size
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ClassificationInputError(f"cannot read image {path} ({type(e).__name__}: {e}); "
                                           "replace or remove the file") from None
        if require_rgb and mode in GRAYSCALE_MODES:
            raise ClassificationInputError(
                f"image {path} is grayscale (PIL mode {mode}) but the network's stem was pretrained on "
                "RGB images: convert the images to RGB (e.g. PIL Image.convert('RGB')), or use a "
                "network pretrained on one channel")
        return height, width
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ClassificationInputError(f"cannot read volume {path} ({first}); replace or remove the "
                                       "file") from None
    if reader.GetDimension() != 3:
        raise ClassificationInputError(f"volume {path} has {reader.GetDimension()} dimensions, expected 3")
    if reader.GetNumberOfComponents() != 1:
        raise ClassificationInputError(
            f"volume {path} has {reader.GetNumberOfComponents()} components per voxel; the 3D networks "
            "take one channel (CT/MR intensities)")
    return tuple(int(s) for s in reversed(reader.GetSize()))


def collect_cases(image_folder: str, csv_file: str | None, dim: int, num_classes: int | None,
                  require_rgb: bool, id_column: str | None = None, label_column: str | None = None,
                  require_labels: bool = True, show_progress: bool = True) -> list[Case]:
    """Every case of the CSV (or, without a CSV, every image of the folder), checked."""
    if not os.path.isdir(image_folder):
        raise ClassificationInputError(f"image folder {image_folder} does not exist")
    if csv_file is not None:
        rows = read_label_csv(csv_file, id_column, label_column, require_labels)
    else:
        names = sorted(n for n in os.listdir(image_folder) if n.lower().endswith(image_endings(dim)))
        if not names:
            raise ClassificationInputError(
                f"no {dim}D images ({', '.join(image_endings(dim))}) in {image_folder}")
        rows = [(0, n, None) for n in names]
    cases = []
    for line, identifier, raw in rows:
        where = f"{csv_file} line {line}" if csv_file else image_folder
        label = parse_label(raw, num_classes, where) if raw is not None else None
        if require_labels and label is None:
            raise ClassificationInputError(f"{where}: no label for '{identifier}'")
        path = resolve_image(image_folder, identifier, dim, where)
        cases.append(Case(strip_ending(identifier), path, label))
    for case in tqdm(cases, desc="checking images", disable=not show_progress or len(cases) < 200,
                     leave=False):
        case.shape = inspect_image(case.path, dim, require_rgb)
    return cases


def infer_num_classes(cases: list[Case], num_classes: int | None) -> int:
    found = max(c.label for c in cases) + 1
    n = num_classes if num_classes is not None else found
    if n < 2:
        raise ClassificationInputError("the labels hold a single class: classification needs at least 2 "
                                       "(pass -num_classes if some classes have no training images)")
    return n


# -- splits --------------------------------------------------------------------------------------

def make_splits(cases: list[Case], n_folds: int = 5, seed: int = 12345) -> list[dict]:
    """nnU-Net's splits (list of {'train': [...], 'val': [...]}, ``generate_crossval_split``: KFold,
    shuffled, seed 12345), stratified by label when every class has at least ``n_folds`` cases: then
    nnU-Net's split is made of each class's cases and fold i joins every class's fold i."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    if len(cases) < n_folds:
        raise ClassificationInputError(f"{len(cases)} labelled images cannot make {n_folds} folds: "
                                       "add images or train with -f all")
    counts = np.bincount([c.label for c in cases])
    if counts[counts > 0].min() >= n_folds:
        groups = [[c.identifier for c in cases if c.label == k] for k in np.flatnonzero(counts)]
    else:
        groups = [[c.identifier for c in cases]]
    per_group = [generate_crossval_split(ids, seed=seed, n_splits=n_folds) for ids in groups]
    return [{part: sorted(str(i) for splits in per_group for i in splits[fold][part]) for part in ("train", "val")}
            for fold in range(n_folds)]


def load_or_create_splits(splits_file: str, cases: list[Case], n_folds: int = 5) -> list[dict]:
    """Reuse ``splits_file`` if it exists (its cases must be the CSV's), else create and save it."""
    identifiers = {c.identifier for c in cases}
    if os.path.isfile(splits_file):
        try:
            with open(splits_file) as f:
                splits = json.load(f)
            in_splits = {i for s in splits for part in ("train", "val") for i in s[part]}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ClassificationInputError(f"{splits_file} is not a splits file ({e}); delete it to make "
                                           "new splits") from None
        if in_splits != identifiers:
            only_csv, only_splits = sorted(identifiers - in_splits), sorted(in_splits - identifiers)
            raise ClassificationInputError(
                f"{splits_file} was made for other cases (only in the CSV: {only_csv[:3]}, only in the "
                f"splits: {only_splits[:3]}): use another -o folder for another dataset")
        return splits
    splits = make_splits(cases, n_folds)
    os.makedirs(os.path.dirname(os.path.abspath(splits_file)), exist_ok=True)
    with open(splits_file, "w") as f:
        json.dump(splits, f, indent=1)
    return splits


def fold_cases(cases: list[Case], splits: list[dict], fold: int | str) -> tuple[list[Case], list[Case]]:
    """(training cases, validation cases) of ``fold``; fold 'all' validates on the training cases
    (as nnU-Net does)."""
    if fold == "all":
        return list(cases), list(cases)
    if not 0 <= int(fold) < len(splits):
        raise ClassificationInputError(f"fold {fold} does not exist: the splits file has folds "
                                       f"0..{len(splits) - 1} (or use -f all)")
    by_id = {c.identifier: c for c in cases}
    split = splits[int(fold)]
    return [by_id[i] for i in split["train"]], [by_id[i] for i in split["val"]]
