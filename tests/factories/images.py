"""Tiny labelled image datasets for the classification commands: 2D RGB images and 3D CT-like
volumes with a CSV of labels, made from a seeded generator."""
from __future__ import annotations

import os

import numpy as np


def labelled_cases(folder, csv_file, header: str, n: int, prefix: str, seed: int):
    """Yield (generator, file stem, label) for ``n`` cases with labels 0, 1, 0, ..., and write the CSV
    (``header``); the images are made from ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    with open(csv_file, "w", newline="") as f:
        f.write(header + "\n")
        for i in range(n):
            stem, label = f"{prefix}{i:03d}", i % 2
            yield rng, stem, label
            f.write(f"{stem},{label}\n")


def make_rgb_dataset(folder, csv_file, n: int, size: int = 32, seed: int = 0, extension: str = ".png") -> None:
    """Class 1: red-dominated images, class 0: blue-dominated (an easy colour signal)."""
    from PIL import Image
    for rng, stem, label in labelled_cases(folder, csv_file, "id_code,diagnosis", n, "img", seed):
        image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        image[..., 0 if label else 2] += 150
        Image.fromarray(image).save(os.path.join(folder, stem + extension))


def make_volume_dataset(folder, csv_file, n: int, size: int = 16, seed: int = 0) -> None:
    """CT-like patches in HU: class 1 holds a dense 8^3 'nodule' in lung-like background."""
    import SimpleITK as sitk
    for rng, stem, label in labelled_cases(folder, csv_file, "case,label", n, "case", seed):
        volume = rng.normal(-700, 50, (size, size, size)).astype(np.float32)
        if label:
            c = size // 2
            volume[c - 4:c + 4, c - 4:c + 4, c - 4:c + 4] = rng.normal(300, 50, (8, 8, 8))
        sitk.WriteImage(sitk.GetImageFromArray(volume), os.path.join(folder, f"{stem}.nii.gz"))
