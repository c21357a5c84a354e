"""nnU-Net raw datasets cut from the bundled real CT/MR volumes (for the demo and the experiments).

Each bundled volume (TotalSegmentator examples, Apache-2.0, see ``data/README.md``) is one
patient; a dataset reorients it to LPS, resamples it to :data:`DEMO_SPACING` (isotropic), cuts it
along z into slabs (the nnU-Net "cases") and remaps TotalSegmentator's label ids to a few
consecutive labels. Isotropic spacing keeps nnU-Net's planner from transposing the slabs: its "2d"
configuration trains on axial slices (tests/test_demo_plans.py checks the plans).
A :class:`SlabTask` describes one such dataset; :data:`TASKS` lists them. A task with
``unseen_patient_held_out`` also gets a held-out case from another patient, the DICOM CT fetched
from PyPI at run time (:mod:`nnunet_acnorm.demo.totalseg_sdist`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
#: isotropic spacing (mm) the datasets are resampled to, in LPS orientation. The bundled volumes have 3 mm;
#: at 4 mm nnU-Net plans 2D patches of 80 x 96, batch 2 (at 3 mm: 112 x 128, batch 3), which keeps the
#: demo and the experiments within CPU minutes per training
DEMO_SPACING = 4.0
DEMO_ORIENTATION = "LPS"
DATA_NOTE = "bundled TotalSegmentator example (Apache-2.0), see nnunet_acnorm/demo/data/README.md"


@dataclass(frozen=True)
class SlabTask:
    """One volume with its label map, cut into ``n_slabs`` cases along z."""

    dataset_id: int
    name: str                  #: nnU-Net dataset name without the id, e.g. "DemoMROrgans"
    image_file: str            #: in DATA_DIR
    seg_file: str              #: in DATA_DIR
    channel: str               #: nnU-Net channel name ("CT": CT normalisation, else z-score)
    labels: dict[str, int]     #: nnU-Net labels (background 0 included)
    totalseg_to_label: dict[int, int]  #: TotalSegmentator id -> label id (others: background)
    n_slabs: int = 5
    held_out: tuple[int, ...] = field(default=(2,))  #: slab indices not used for training
    #: a held-out case from another patient: the DICOM CT of TotalSegmentator's sdist (totalseg_sdist.py)
    unseen_patient_held_out: bool = False

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"

    def case_id(self, slab: int) -> str:
        return f"{self.name.lower()}_{slab:02d}"

    @property
    def train_cases(self) -> list[str]:
        return [self.case_id(i) for i in range(self.n_slabs) if i not in self.held_out]

    @property
    def unseen_case(self) -> str:
        return f"{self.name.lower()}_unseenpatient"

    @property
    def held_out_cases(self) -> list[str]:
        return [self.case_id(i) for i in self.held_out] + ([self.unseen_case] if self.unseen_patient_held_out else [])


ORGANS = {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3, "stomach": 4}
#: TotalSegmentator (v2 "total") ids: liver 5, spleen 1, kidneys 2/3, stomach 6
ORGANS_FROM_TOTALSEG = {5: 1, 1: 2, 2: 3, 3: 3, 6: 4}
PELVIS = {"background": 0, "urinary_bladder": 1, "hips": 2, "gluteal_muscles": 3, "iliopsoas": 4}
#: urinary bladder 21, hip left/right 77/78, gluteus maximus/medius left/right 80-83, iliopsoas 88/89
PELVIS_FROM_TOTALSEG = {21: 1, 77: 2, 78: 2, 80: 3, 81: 3, 82: 3, 83: 3, 88: 4, 89: 4}

CT_ORGANS = SlabTask(981, "DemoCTOrgans", "ct_abdomen.nii.gz", "ct_abdomen_seg.nii.gz", "CT", ORGANS,
                     ORGANS_FROM_TOTALSEG, held_out=())
MR_ORGANS = SlabTask(982, "DemoMROrgans", "mr_abdomen.nii.gz", "mr_abdomen_seg.nii.gz", "MR", ORGANS,
                     ORGANS_FROM_TOTALSEG)
CT_PELVIS = SlabTask(983, "DemoCTPelvis", "ct_pelvis.nii.gz", "ct_pelvis_seg.nii.gz", "CT", PELVIS,
                     PELVIS_FROM_TOTALSEG)
#: structures in both CT patients (the bundled one and the fetched DICOM one) whose intensity does not
#: depend on the contrast agent: the bundled CT is native, the DICOM one contrast-enhanced, so its organs
#: are brighter than any the fine-tuning sees (data/README.md)
SPINE = {"background": 0, "vertebrae": 1, "back_muscles": 2}
#: TotalSegmentator v2 ids: vertebrae S1..C1 26-50, autochthon (erector spinae) left/right 86/87
SPINE_FROM_TOTALSEG = {**{i: 1 for i in range(26, 51)}, 86: 2, 87: 2}
#: trains on the bundled CT patient's abdomen (all slabs), evaluates on another patient's CT
CT_SPINE_UNSEEN = SlabTask(984, "DemoCTSpineUnseenPatient", "ct_abdomen.nii.gz", "ct_abdomen_seg.nii.gz", "CT",
                           SPINE, SPINE_FROM_TOTALSEG, held_out=(), unseen_patient_held_out=True)
TASKS = {task.name: task for task in (CT_ORGANS, MR_ORGANS, CT_PELVIS, CT_SPINE_UNSEEN)}


def _remap(seg, mapping: dict[int, int]):
    import numpy as np

    out = np.zeros(seg.shape, dtype=np.uint8)
    for src, dst in mapping.items():
        out[seg == src] = dst
    return out


def slab_edges(n_slices: int, n: int) -> list[tuple[int, int]]:
    edges = [round(i * n_slices / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def resample_isotropic(image, is_label: bool):
    """``image`` in LPS orientation at :data:`DEMO_SPACING` isotropic (nearest neighbour for labels)."""
    import SimpleITK as sitk

    image = sitk.DICOMOrient(image, DEMO_ORIENTATION)
    spacing = image.GetSpacing()
    new_spacing = (DEMO_SPACING,) * 3
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), spacing, new_spacing)]
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), new_spacing,
                         image.GetDirection(), 0, image.GetPixelID())


def _crop_to_body(image, reference=None, threshold: float = -500.0, margin: int = 2):
    """``image`` cropped in-plane to the box of ``reference`` (default: itself) above ``threshold``
    HU: the DICOM series' 50 cm field of view is mostly air."""
    import SimpleITK as sitk
    import numpy as np

    body = sitk.GetArrayFromImage(reference if reference is not None else image) > threshold  # z, y, x
    ys, xs = np.nonzero(body.any(axis=0))
    x0, x1 = max(0, xs.min() - margin), min(body.shape[2], xs.max() + 1 + margin)
    y0, y1 = max(0, ys.min() - margin), min(body.shape[1], ys.max() + 1 + margin)
    return image[int(x0):int(x1), int(y0):int(y1), :]


def _labels(seg, mapping: dict[int, int]):
    import SimpleITK as sitk

    labels = sitk.GetImageFromArray(_remap(sitk.GetArrayFromImage(seg), mapping))
    labels.CopyInformation(seg)
    return labels


def write_raw_dataset(raw: Path, task: SlabTask, held_out_dir: Path | None = None) -> Path:
    """Write ``task`` as an nnU-Net raw dataset under ``raw``; returns its folder.

    With ``held_out_dir`` the held-out slabs go to ``held_out_dir/imagesTs`` and ``labelsTs``
    (the demo predicts them with ``nnUNetv2_predict``); without it every slab is a training case
    and :func:`write_holdout_split` makes the held-out slabs nnU-Net's validation fold (the
    experiments read nnU-Net's own validation results).
    """
    import SimpleITK as sitk

    image = sitk.ReadImage(str(DATA_DIR / task.image_file))
    labels = _labels(sitk.ReadImage(str(DATA_DIR / task.seg_file)), task.totalseg_to_label)
    image, labels = resample_isotropic(image, False), resample_isotropic(labels, True)
    folder = Path(raw) / task.folder_name
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    held_out = None if held_out_dir is None else Path(held_out_dir)
    n_train = 0
    for i, (z0, z1) in enumerate(slab_edges(image.GetSize()[2], task.n_slabs)):
        n_train += _write_case(folder, held_out if i in task.held_out else None, task.case_id(i),
                               image[:, :, z0:z1], labels[:, :, z0:z1])
    if task.unseen_patient_held_out:
        from nnunet_acnorm.demo.totalseg_sdist import dicom_ct

        other, other_seg = dicom_ct()
        other = resample_isotropic(sitk.Cast(other, image.GetPixelID()), False)
        other_labels = resample_isotropic(_labels(other_seg, task.totalseg_to_label), True)
        other, other_labels = _crop_to_body(other), _crop_to_body(other_labels, other)
        n_train += _write_case(folder, held_out, task.unseen_case, other, other_labels)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": task.channel}, "labels": task.labels, "numTraining": n_train,
        "file_ending": ".nii.gz", "description": DATA_NOTE}, indent=2))
    return folder


def _write_case(folder: Path, held_out_dir: Path | None, case: str, image, labels) -> bool:
    """Write one case: to ``held_out_dir``'s imagesTs/labelsTs where given, else to the dataset's
    imagesTr/labelsTr; returns whether it is a training case."""
    import SimpleITK as sitk

    base, suffix = (held_out_dir, "Ts") if held_out_dir is not None else (folder, "Tr")
    images, segs = base / f"images{suffix}", base / f"labels{suffix}"
    images.mkdir(parents=True, exist_ok=True)
    segs.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(images / f"{case}_0000.nii.gz"))
    sitk.WriteImage(labels, str(segs / f"{case}.nii.gz"))
    return held_out_dir is None


def write_holdout_split(preprocessed: Path, task: SlabTask) -> Path:
    """nnU-Net's ``splits_final.json`` with one fold: train on the training slabs, validate on the
    held-out ones (``nnUNetv2_train D C 0`` then evaluates them with nnU-Net's own code)."""
    path = Path(preprocessed) / task.folder_name / "splits_final.json"
    path.write_text(json.dumps([{"train": task.train_cases, "val": task.held_out_cases}], indent=2))
    return path
