"""Networks for pretrained families whose architecture nnU-Net lacks (buildable from plans by
dotted path), with the published attribute names so the published state dicts load.

Do not export names equal to a submodule's name: nnU-Net resolves the plans' dotted paths with
``pydoc.locate``, which would find the attribute instead of the module."""
from nnunet_acnorm.networks.genesis_unet3d import (GenesisClassifier3D, GenesisEncoder3D, GenesisUNet3D)
from nnunet_acnorm.networks.medicalnet_resnet import (MedicalNetResNet3D, MedicalNetUNet3D, build_medicalnet_resnet)
from nnunet_acnorm.networks.parts import encoder_prefixes, is_encoder_key
from nnunet_acnorm.networks.stunet import STUNET_SIZES, STUNet

__all__ = ["GenesisEncoder3D", "GenesisUNet3D", "GenesisClassifier3D", "MedicalNetResNet3D",
           "MedicalNetUNet3D", "build_medicalnet_resnet", "STUNet", "STUNET_SIZES", "encoder_prefixes",
           "is_encoder_key"]
