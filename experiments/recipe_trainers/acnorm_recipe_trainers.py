"""Recipe variants for experiments/recipe_sweep.py (a shim folder for nnUNet_extTrainer).

Each variant changes one or two class attributes of the demo-schedule trainers, so that a sweep
compares recipes under ``nnUNetv2_train`` with everything else equal.
"""
from nnunet_acnorm.demo.demo_trainers import (nnUNetTrainerACNorm_acnormDemo, nnUNetTrainerACNorm_tau1_acnormDemo,
                                              nnUNetTrainerFinetune_acnormDemo)


class _Lr1e2:
    finetune_initial_lr = 1e-2


class _Lr1e3:
    finetune_initial_lr = 1e-3


class _Fg100:
    finetune_oversample_foreground = 1.0


class _Fg33:
    finetune_oversample_foreground = 0.33


class _NoWarmup:
    warmup_fraction = 0.0


VARIANTS = {
    "lr1e-3_fg33": (_Lr1e3, _Fg33),          # the fine-tuning trainers' recipe before this sweep
    "lr1e-2_fg33": (_Lr1e2, _Fg33),          # the demo's recipe before this sweep
    "lr1e-3_fg100": (_Lr1e3, _Fg100),
    "lr1e-2_fg100": (_Lr1e2, _Fg100),
    "lr1e-2_fg100_nowarmup": (_Lr1e2, _Fg100, _NoWarmup),
}
BASES = {"vanilla": nnUNetTrainerFinetune_acnormDemo, "acnorm": nnUNetTrainerACNorm_acnormDemo,
         "acnorm_tau1": nnUNetTrainerACNorm_tau1_acnormDemo}


def trainer_name(method: str, variant: str) -> str:
    return f"{BASES[method].__name__}_{variant.replace('-', 'm').replace('_', '')}"


TRAINERS = {}
for _variant, _mixins in VARIANTS.items():
    for _method, _base in BASES.items():
        _name = trainer_name(_method, _variant)
        TRAINERS[_name] = type(_name, (*_mixins, _base), {"__doc__": f"{_method}, recipe {_variant}"})
globals().update(TRAINERS)
__all__ = list(TRAINERS)
