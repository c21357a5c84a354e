"""Networks for pretrained families whose architecture nnU-Net lacks (buildable from plans by
dotted path), with the published attribute names so the published state dicts load."""
from nnunet_acnorm.networks.genesis_unet3d import (GenesisClassifier3D, GenesisEncoder3D, GenesisUNet3D)
from nnunet_acnorm.networks.medicalnet_resnet import (MedicalNetResNet3D, MedicalNetUNet3D, medicalnet_resnet)

__all__ = ["GenesisEncoder3D", "GenesisUNet3D", "GenesisClassifier3D", "MedicalNetResNet3D",
           "MedicalNetUNet3D", "medicalnet_resnet"]
