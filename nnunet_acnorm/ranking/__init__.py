"""Transferability estimation: rank pretrained checkpoints for a target task.

- :mod:`~nnunet_acnorm.ranking.estimators`: AC-Corr after N fine-tuning steps, LogME and H-score on
  norm-layer features at labelled voxels (any network);
- :mod:`~nnunet_acnorm.ranking.logme`: LogME from its paper's equations;
- :mod:`~nnunet_acnorm.ranking.hscore`: H-score from its paper's formula (Ledoit-Wolf covariance);
- :mod:`~nnunet_acnorm.ranking.direction`: the estimators' names and the decision record (DIRECTION)
  that the command's wording follows;
- :mod:`~nnunet_acnorm.ranking.nnunet_target`: an nnU-Net dataset as the target (plans, fixed
  batches, nnU-Net's loss, candidates through the pretrained loaders and the import);
- :mod:`~nnunet_acnorm.ranking.rank`: the ranking, its files and table;
- the console script ``nnUNetv2_acnorm_rank`` (``nnunet_acnorm/commands/rank.py``).
"""
from nnunet_acnorm.ranking.estimators import (ACCorrMeasurement, ac_corr_after_steps, logme_of_layer,
                                              norm_features_at_labels)
from nnunet_acnorm.ranking.hscore import hscore
from nnunet_acnorm.ranking.logme import fit_evidence, logme

__all__ = ["ACCorrMeasurement", "ac_corr_after_steps", "fit_evidence", "hscore", "logme", "logme_of_layer",
           "norm_features_at_labels"]
