"""Which fine-tuning recipe transfers: the experiment of finetune_experiment.py over recipe variants.

    python experiments/recipe_sweep.py --output OUT --transfers ct_to_mr --seeds 0-2 \\
        --methods vanilla@lr1e-2_fg100,acnorm_tau1@lr1e-2_fg100

A method ``BASE@VARIANT`` is the demo-schedule trainer BASE (vanilla, acnorm, acnorm_tau1) with the recipe
VARIANT of ``recipe_trainers/acnorm_recipe_trainers.py`` (peak learning rate, foreground
oversampling, warm-up). Same datasets, source models, seeds and outputs as the main experiment; each
base's variants are compared against the base at the trainers' recipe (``CURRENT_RECIPE``), paired
by seed. ``--publish experiments/results/recipe`` writes that folder only (not the README's table).
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "recipe_trainers"))

from acnorm_recipe_trainers import BASES, VARIANTS, trainer_name  # noqa: E402
from finetune_experiment import METHODS, main  # noqa: E402

SWEEP_METHODS = {f"{base}@{variant}": (trainer_name(base, variant), METHODS[base][1])
                 for variant in VARIANTS for base in BASES}
#: the trainers' recipe, each base's baseline: its other recipes are compared against it, paired by seed
CURRENT_RECIPE = "lr1e-2_fg100"
SWEEP_GROUPS = [(base, [f"{base}@{variant}" for variant in VARIANTS], f"{base}@{CURRENT_RECIPE}") for base in BASES]

if __name__ == "__main__":
    # --publish writes experiments/results/recipe/ only: the README's table is the main experiment's
    main(methods_table=SWEEP_METHODS, trainer_folders=(str(HERE / "recipe_trainers"),),
         description=__doc__.split("\n\n")[0], groups=SWEEP_GROUPS, to_readme=False)
