"""Compare segmentation methods by Dice, with paired statistics (``nnUNetv2_acnorm_compare``).

    nnUNetv2_acnorm_compare -ref LABEL_FOLDER -pred FOLDER_A FOLDER_B ... -o OUT
                            [-dj dataset.json] [-names A B ...] [-baseline NAME] [-np N] [--overwrite]
    nnUNetv2_acnorm_compare -m MODEL_FOLDER [MODEL_FOLDER ...] -o OUT [-baseline NAME] [-f FOLDS] [--overwrite]

The first form evaluates prediction folders against a label folder with nnU-Net's own evaluation code
(``compute_metrics``); the second reads the cross-validation results nnU-Net wrote into trained model
folders (``fold_X/validation/summary.json``), pooling runs of one trainer over seeds. Both give per-method
Dice (per label and the mean over labels), paired differences against a baseline with a bootstrap
interval and a Wilcoxon signed-rank test, and write ``comparison.csv``, ``comparison.json`` and
``paired_differences.png``. See docs/compare.md.

- :mod:`~nnunet_acnorm.compare.data`: methods, runs, the comparison; :class:`CompareError`;
- :mod:`~nnunet_acnorm.compare.readers`: prediction folders (nnU-Net's ``compute_metrics``) and model
  folders (their ``summary.json``), checked before anything is evaluated;
- :mod:`~nnunet_acnorm.compare.statistics`: units of pairing, bootstrap interval, Wilcoxon test;
- :mod:`~nnunet_acnorm.compare.report`: the table, the report and the files written to ``-o``.
"""
from nnunet_acnorm.compare.data import CompareError, Comparison, Method, Run
from nnunet_acnorm.compare.readers import load_model_folders, load_prediction_folders
from nnunet_acnorm.compare.report import RESULT_FILES, check_output_folder, format_table, report_text, write_results
from nnunet_acnorm.compare.statistics import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE_LEVEL, compute_statistics,
                                              paired_statistics)

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "CONFIDENCE_LEVEL", "RESULT_FILES", "CompareError", "Comparison",
           "Method", "Run", "check_output_folder", "compute_statistics", "format_table", "load_model_folders",
           "load_prediction_folders", "paired_statistics", "report_text", "write_results"]
