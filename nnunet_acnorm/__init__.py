"""nnunet-acnorm: AC-Norm fine-tuning and AC-Corr transferability estimation for nnU-Net v2."""
from nnunet_acnorm.norms.ac_corr import ACCorr, ac_corr_from_model, ac_corr_from_state_dicts
from nnunet_acnorm.norms import (ACBatchNorm1d, ACBatchNorm2d, ACBatchNorm3d, ACGroupNorm,
                                 ACInstanceNorm1d, ACInstanceNorm2d, ACInstanceNorm3d,
                                 ConversionReport, acnorm_modules, acnorm_sync_batchnorm,
                                 convert_to_acnorm, fold_acnorm)

__version__ = "0.1.0"

__all__ = [
    "ACBatchNorm1d", "ACBatchNorm2d", "ACBatchNorm3d", "ACInstanceNorm1d", "ACInstanceNorm2d",
    "ACInstanceNorm3d", "ACGroupNorm", "ConversionReport", "acnorm_modules", "acnorm_sync_batchnorm",
    "convert_to_acnorm", "fold_acnorm", "ACCorr", "ac_corr_from_model", "ac_corr_from_state_dicts",
]
