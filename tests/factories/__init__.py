"""Builders of test inputs (not tests, not oracles):

- :mod:`tests.factories.checkpoints`: small checkpoints in the published formats of each family;
- :mod:`tests.factories.nnunet`: tiny nnU-Net raw datasets, nnU-Net environments, console-script runs;
- :mod:`tests.factories.images`: tiny labelled 2D / 3D datasets for the classification commands;
- :mod:`tests.factories.networks`, :mod:`tests.factories.norms`: small networks and pretrained-like affines.

The independent AC-Norm formula the layer tests compare against is an oracle, not a builder: it
stays in ``tests/reference_acnorm.py``.
"""
