"""AC-Norm layers, their functional core, and model conversion."""
from nnunet_acnorm.norms.conversion import (ConversionReport, acnorm_modules, acnorm_sync_batchnorm,
                                            convert_to_acnorm, fold_acnorm)
from nnunet_acnorm.norms.functional import (calibrated_tau, domain_indicator, indicators_near_constant,
                                            recalibrated_affine, source_diagonal, sparse_correlation)
from nnunet_acnorm.norms.modules import (ACNORM_FOR_PLAIN, ACBatchNorm1d, ACBatchNorm2d, ACBatchNorm3d,
                                         ACGroupNorm, ACInstanceNorm1d, ACInstanceNorm2d,
                                         ACInstanceNorm3d, AUTO_TAU)

__all__ = [
    "ACBatchNorm1d", "ACBatchNorm2d", "ACBatchNorm3d", "ACInstanceNorm1d", "ACInstanceNorm2d",
    "ACInstanceNorm3d", "ACGroupNorm", "AUTO_TAU", "ACNORM_FOR_PLAIN", "ConversionReport", "acnorm_modules",
    "acnorm_sync_batchnorm", "convert_to_acnorm", "fold_acnorm", "domain_indicator",
    "recalibrated_affine", "sparse_correlation", "calibrated_tau", "indicators_near_constant",
    "source_diagonal",
]
