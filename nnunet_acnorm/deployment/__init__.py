"""Deployment: fold a trained AC-Norm model folder for stock nnU-Net (``nnUNetv2_acnorm_fold``)."""
