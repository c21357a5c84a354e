"""Reading, preprocessing and augmentation: torchvision transforms v2 (2D), batchgeneratorsv2 (3D).

2D (fundus photographs, RGB networks pretrained on ImageNet):
  training: RandomResizedCrop(image_size, scale 0.7-1, aspect 0.9-1.1), horizontal and vertical
  flips, rotation by up to 180 degrees (a fundus has no canonical orientation), ColorJitter
  (brightness/contrast 0.2, saturation 0.1), then ImageNet mean/std normalisation;
  inference: Resize(image_size) of the short side + CenterCrop(image_size) + the same normalisation.
3D (CT/MR patches, 1 channel):
  intensities: ``ct`` clips Hounsfield units to [-1000, 1000] and scales to [0, 1] (Models Genesis
  pretraining), ``zscore`` subtracts the volume's mean and divides by its std (MedicalNet),
  ``none`` keeps them; then a centre crop / pad (acvl_utils' ``crop_and_pad_nd``, padded with the
  lowest value) to the patch size;
  training: nnU-Net's batchgeneratorsv2 recipe (rotation and scaling with p=0.2, Gaussian noise,
  brightness, contrast, gamma, mirroring along every axis).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from nnunet_acnorm.classification.dataset import GRAYSCALE_MODES, Case
from nnunet_acnorm.classification.errors import ClassificationInputError
from nnunet_acnorm.networks.genesis_unet3d import GENESIS_CT_WINDOW

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTENSITY_SCHEMES = ("ct", "zscore", "none")


# -- 2D --------------------------------------------------------------------------------------------

def transforms_2d(image_size: int, train: bool):
    from torchvision.transforms import v2
    if train:
        spatial = [v2.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True),
                   v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.RandomRotation(180),
                   v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1)]
    else:
        spatial = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.ToImage(), *spatial, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def read_rgb(path: str):
    from PIL import Image
    try:
        with Image.open(path) as image:
            if image.mode in GRAYSCALE_MODES:
                raise ClassificationInputError(
                    f"image {path} is grayscale (PIL mode {image.mode}) but the network expects RGB")
            return image.convert("RGB")
    except ClassificationInputError:
        raise
    except Exception as e:  # truncated or corrupted pixel data only shows when decoding
        raise ClassificationInputError(f"cannot decode image {path} ({type(e).__name__}: {e}); replace "
                                       "or remove the file") from None


class Images2D(Dataset):
    def __init__(self, cases: list[Case], image_size: int, train: bool):
        self.cases = cases
        self.transform = transforms_2d(image_size, train)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int):
        case = self.cases[index]
        image = self.transform(read_rgb(case.path))
        return image, -1 if case.label is None else case.label


# -- 3D --------------------------------------------------------------------------------------------

def read_volume(path: str) -> np.ndarray:
    import SimpleITK as sitk
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(np.float32, copy=False)
    except RuntimeError as e:
        raise ClassificationInputError(f"cannot read volume {path}; replace or remove the file "
                                       f"({str(e).strip().splitlines()[-1] if str(e).strip() else ''})"
                                       ) from None


def normalize_intensities(volume: np.ndarray, scheme: str) -> np.ndarray:
    if scheme == "ct":  # the Models Genesis pretraining window, the one the Genesis network applies
        low, high = GENESIS_CT_WINDOW
        return (np.clip(volume, low, high) - low) / (high - low)
    if scheme == "zscore":
        return (volume - volume.mean()) / max(float(volume.std()), 1e-8)
    if scheme == "none":
        return volume
    raise ClassificationInputError(f"unknown intensity scheme '{scheme}' (choose from {INTENSITY_SCHEMES})")


def center_crop_or_pad(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Centre crop each axis longer than ``shape`` and pad (symmetrically, the extra voxel after) each
    shorter one, with acvl_utils' ``crop_and_pad_nd``; the padding holds the lowest value of the
    cropped volume (background)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    starts = [(size - target) // 2 if size >= target else -((target - size) // 2)
              for size, target in zip(volume.shape, shape)]
    bbox = [[start, start + target] for start, target in zip(starts, shape)]
    inside = volume[tuple(slice(max(lo, 0), min(hi, size)) for (lo, hi), size in zip(bbox, volume.shape))]
    return crop_and_pad_nd(volume, bbox, pad_value=float(inside.min()) if inside.size else 0.0)


def transforms_3d(patch_size: tuple[int, ...]):
    """nnU-Net's 3D training augmentation (batchgeneratorsv2), minus the segmentation parts."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    angle = 30 / 360 * 2 * np.pi
    return ComposeTransforms([
        SpatialTransform(patch_size, patch_center_dist_from_border=0, random_crop=False,
                         p_rotation=0.2, rotation=(-angle, angle), p_scaling=0.2, scaling=(0.7, 1.4),
                         p_synchronize_scaling_across_axes=1),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1,
                                               synchronize_channels=True), apply_probability=0.1),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0,
                                       synchronize_channels=False, p_per_channel=1, p_retain_stats=1),
                        apply_probability=0.3),
        MirrorTransform(allowed_axes=(0, 1, 2)),
    ])


class Volumes3D(Dataset):
    def __init__(self, cases: list[Case], patch_size: tuple[int, ...], intensity: str, train: bool):
        self.cases = cases
        self.patch_size = tuple(int(s) for s in patch_size)
        self.intensity = intensity
        self.augment = transforms_3d(self.patch_size) if train else None

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int):
        case = self.cases[index]
        volume = normalize_intensities(read_volume(case.path), self.intensity)
        volume = center_crop_or_pad(volume, self.patch_size)
        image = torch.from_numpy(np.ascontiguousarray(volume))[None]
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        return image.float(), -1 if case.label is None else case.label


def make_dataset(cases: list[Case], config: dict, train: bool) -> Dataset:
    if config["dim"] == 2:
        return Images2D(cases, config["image_size"], train)
    return Volumes3D(cases, config["patch_size"], config["intensity"], train)
