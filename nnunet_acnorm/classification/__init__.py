"""Image classification with AC-Norm fine-tuning, in the style of nnU-Net's commands.

2D: RGB photographs (PNG, JPEG, TIFF), e.g. diabetic retinopathy grading of fundus images, with a
torchvision ResNet-50 (ImageNet or MoCo v2 weights). 3D: volumes read by SimpleITK (NIfTI, NRRD,
MHA), e.g. CT lung nodule patches, with the Models Genesis encoder plus the authors' head or a
MedicalNet 3D ResNet. See ``docs/classification.md``.
"""
from nnunet_acnorm.classification.errors import ClassificationInputError

__all__ = ["ClassificationInputError"]
