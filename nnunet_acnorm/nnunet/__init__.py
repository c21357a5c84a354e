"""nnU-Net v2 trainers for AC-Norm fine-tuning and the vanilla baseline.

The classes live in :mod:`nnunet_acnorm.nnunet.trainers` (importing it imports nnU-Net);
nnU-Net finds them by name through the shim folder returned by
:func:`nnunet_acnorm.nnunet.discovery.trainer_shim_folder`, which ``pip install`` adds to
``nnUNet_extTrainer`` at every interpreter start (see ``_nnunet_acnorm_env``).
"""
