"""AC-Norm layers, their functional core, and model conversion."""
from nnunet_acnorm.norms.conversion import (ConversionReport, acnorm_modules, acnorm_sync_batchnorm,
                                            convert_to_acnorm, fold_acnorm)
from nnunet_acnorm.norms.functional import domain_indicator, recalibrated_affine, sparse_correlation
from nnunet_acnorm.norms.modules import (ACNORM_FOR_PLAIN, ACBatchNorm1d, ACBatchNorm2d, ACBatchNorm3d,
                                         ACGroupNorm, ACInstanceNorm1d, ACInstanceNorm2d,
                                         ACInstanceNorm3d)

__all__ = [
    "ACBatchNorm1d", "ACBatchNorm2d", "ACBatchNorm3d", "ACInstanceNorm1d", "ACInstanceNorm2d",
    "ACInstanceNorm3d", "ACGroupNorm", "ACNORM_FOR_PLAIN", "ConversionReport", "acnorm_modules",
    "acnorm_sync_batchnorm", "convert_to_acnorm", "fold_acnorm", "domain_indicator",
    "recalibrated_affine", "sparse_correlation",
]
