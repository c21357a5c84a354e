"""The nnU-Net v2 integration: everything that knows nnU-Net's plans, datasets, trainers and folders.

- :mod:`~nnunet_acnorm.nnunet.trainers`, :mod:`~nnunet_acnorm.nnunet.baseline_trainers`: the
  fine-tuning trainers (importing them imports nnU-Net). nnU-Net finds them by name through the
  shim folder returned by :func:`nnunet_acnorm.nnunet.discovery.trainer_shim_folder`, which
  ``pip install`` adds to ``nnUNet_extTrainer`` at every interpreter start (``_nnunet_acnorm_env``);
  :mod:`~nnunet_acnorm.nnunet.schedule_trainers` derives their schedule lengths, and
  :mod:`~nnunet_acnorm.nnunet.trainer_registry` lists them all by name;
- :mod:`~nnunet_acnorm.nnunet.pretrained`: the checks around ``-pretrained_weights`` and ``--c``;
- :mod:`~nnunet_acnorm.nnunet.plans`: plans and a checkpoint for a pretrained file of any family;
- :mod:`~nnunet_acnorm.nnunet.dataset`, :mod:`~nnunet_acnorm.nnunet.fold`,
  :mod:`~nnunet_acnorm.nnunet.seeding`. (Comparing results is :mod:`nnunet_acnorm.compare`.)
"""
