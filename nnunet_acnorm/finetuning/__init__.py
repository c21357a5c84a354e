"""Fine-tuning baselines of the AC-Norm paper's comparison, as small pieces shared by the nnU-Net
trainers (:mod:`nnunet_acnorm.nnunet.baseline_trainers`) and the classification trainer
(``nnUNetv2_acnorm_cls_train -method``). Formulas, defaults and choices: docs/baselines.md.

- :mod:`.l2sp`: L2-SP (Li et al. 2018), distance of the weights to the pretrained ones;
- :mod:`.delta`: DELTA (Li et al. 2019), distance of the stage feature maps to a frozen copy;
- :mod:`.bss`: BSS (Chen et al. 2019), the smallest singular values of the batch features;
- :mod:`.stochnorm`: StochNorm (Kou et al. 2020), BatchNorm with stochastic moving statistics;
- :mod:`.lpft`: LP-FT (Kumar et al. 2022) encoder freezing, discriminative learning rates;
- :mod:`.spd`: SPD (Tian et al. 2024), selective projection toward the pretrained weights after each step;
- :mod:`.schedules`: the learning-rate schedules (ours, and nnU-Net master's ``PretrainedTrainer``'s).
"""
from nnunet_acnorm.finetuning.bss import BSS_ETA, BSS_K, bss_penalty
from nnunet_acnorm.finetuning.delta import DELTA_ALPHA, DELTA_BETA, DELTARegulariser, feature_distance
from nnunet_acnorm.finetuning.features import FeatureRecorder, pooled, stage_modules
from nnunet_acnorm.finetuning.l2sp import L2SP_ALPHA, L2SP_BETA, L2SPRegulariser, new_weights_penalty
from nnunet_acnorm.finetuning.lpft import (ENCODER_LR_FACTOR, LPFT_FROZEN_FRACTION, ScaledWarmupPolyLRScheduler,
                                           discriminative_param_groups, frozen_epochs, set_frozen)
from nnunet_acnorm.finetuning.schedules import PretrainedTrainerLRScheduler, WarmupPolyLRScheduler
from nnunet_acnorm.finetuning.spd import SPD_LAMBDA, SelectiveProjectionDecay
from nnunet_acnorm.finetuning.stochnorm import (STOCHNORM_P, StochNorm1d, StochNorm2d, StochNorm3d,
                                                convert_to_stochnorm)

__all__ = ["BSS_ETA", "BSS_K", "bss_penalty", "DELTA_ALPHA", "DELTA_BETA", "DELTARegulariser", "feature_distance",
           "FeatureRecorder", "pooled", "stage_modules", "L2SP_ALPHA", "L2SP_BETA", "L2SPRegulariser", "new_weights_penalty",
           "ENCODER_LR_FACTOR", "LPFT_FROZEN_FRACTION", "ScaledWarmupPolyLRScheduler", "discriminative_param_groups",
           "frozen_epochs", "set_frozen", "STOCHNORM_P", "StochNorm1d", "StochNorm2d", "StochNorm3d",
           "convert_to_stochnorm", "PretrainedTrainerLRScheduler", "WarmupPolyLRScheduler", "SPD_LAMBDA",
           "SelectiveProjectionDecay"]
