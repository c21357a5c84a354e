"""``nnUNetv2_acnorm_rank``: transferability estimators for pretrained checkpoints on an nnU-Net
dataset, side by side (AC-Corr, AC-Corr over all layers, LogME, H-score), ordered by one of them.

    nnUNetv2_acnorm_rank -d 501 -c 3d_fullres -i a.pth b.pth c.pth [--steps 1 | --epoch]
                         [--estimators ac_corr,logme,hscore] [--rank_by ac_corr]
                         [--layers deepest|all|NAME ...] [-o OUTDIR] [-device cpu|cuda] [--seed 0]
"""
from __future__ import annotations

import argparse
import os

from nnunet_acnorm.checkpoints import FAMILIES
from nnunet_acnorm.commands._cli import run_command
from nnunet_acnorm.errors import InputError
from nnunet_acnorm.outputs import check_output
from nnunet_acnorm.ranking.direction import (DIRECTION, DIRECTION_STEP_SETTINGS, ESTIMATORS, UnknownEstimator,
                                             parse_estimators, step_settings_text, temperature_text)

PROG = "nnUNetv2_acnorm_rank"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Transferability estimators for pretrained checkpoints on an nnU-Net dataset, side by side: "
                    "each candidate becomes an AC-Norm network (source = its pretrained affines); LogME and H-score "
                    "score its pretrained features at labelled voxels, AC-Corr the sum of its sparse correlation "
                    "matrix S after a few fine-tuning steps on the same seeded batches. Until the direction "
                    "experiment has settled which estimator to trust, the order is a convention, not a "
                    "recommendation (the command says so).")
    p.add_argument("-d", dest="dataset", required=True, help="target dataset name or id")
    p.add_argument("-c", dest="configuration", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-i", dest="candidates", nargs="+", required=True, help="candidate checkpoint files")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="target plans identifier (default nnUNetPlans)")
    how_long = p.add_mutually_exclusive_group()
    how_long.add_argument("--steps", type=int, default=1, help="fine-tuning steps per candidate (default 1)")
    how_long.add_argument("--epoch", action="store_true",
                          help="one pass over the target's cases instead (ceil(cases / batch size) steps)")
    p.add_argument("--fold", default=None,
                   help="draw the batches from the training cases of this fold of nnU-Net's split (0-4 or 'all', "
                        "as nnUNetv2_train takes it; splits_final.json), so that its validation cases stay unseen "
                        "(default: every preprocessed case)")
    p.add_argument("--layers", nargs="+", default=["deepest"],
                   help="norm layers: 'deepest' (default: the deepest encoder norm), 'all', or layer names")
    p.add_argument("-o", dest="output", default=None,
                   help="output folder (default nnUNet_results/<dataset>/acnorm_ranking__<plans>__<configuration>)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier ranking in -o")
    p.add_argument("-device", dest="device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches and the fresh heads (default 0)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the steps (default: nnUNetTrainerACNorm's peak lr, 1e-2; the direction "
                        f"experiment's record was measured with {step_settings_text(**DIRECTION_STEP_SETTINGS)})")
    p.add_argument("--tau", type=float, default=None,
                   help="temperature of the steps and of S (default: nnUNetTrainerACNorm's, calibrated per layer; "
                        "1 is the paper's AC-Corr)")
    p.add_argument("--estimators", default="ac_corr",
                   help="comma-separated estimators, computed in one run on the same batches: "
                        f"{', '.join(ESTIMATORS)} (default ac_corr)")
    p.add_argument("--rank_by", default=DIRECTION["estimator"],
                   help=f"the estimator that orders the table, higher first (default {DIRECTION['estimator']}; "
                        "added to --estimators if missing)")
    p.add_argument("--logme", action="store_true", help="alias: add logme to --estimators")
    p.add_argument("-f", dest="family", choices=sorted(FAMILIES), default=None,
                   help="force the family of every candidate (default: detected per file)")
    p.add_argument("--trust_pickle", action="store_true",
                   help="allow files that need arbitrary pickled Python objects (only for trusted files)")
    p.add_argument("--adapt_input_channels", action="store_true",
                   help="rank candidates pretrained on another number of input channels with an adapted stem "
                        "(default: skip them)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _layers_arg(values: list[str]):
    if values in (["deepest"], ["all"]):
        return values[0]
    if "deepest" in values or "all" in values:
        raise InputError("--layers takes 'deepest', 'all', or layer names, not a mix")
    return values


def _fold_arg(value: str | None) -> int | str | None:
    if value is None or value == "all":
        return value
    try:
        fold = int(value)
    except ValueError:
        fold = -1
    if fold < 0:
        raise InputError(f"--fold takes a fold number (0, 1, ...) or 'all', got {value!r}")
    return fold


def _check_layers(layers, target, seed: int) -> None:
    """Named --layers must be norm layers of the network the target's plans build (else every
    candidate would be skipped)."""
    if isinstance(layers, str):
        return
    from nnunet_acnorm.norms import acnorm_modules
    from nnunet_acnorm.ranking.nnunet_target import build_acnorm_network

    names = list(acnorm_modules(build_acnorm_network(target.plans, target, seed)))
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise InputError(f"--layers: {', '.join(unknown)} is not a norm layer of the network of {target.plans_identifier} "
                         f"{target.configuration} (e.g. {', '.join(names[:2])}, ..., {names[-1]}); or use 'deepest' "
                         "or 'all'")


def _default_output(dataset_name: str, plans: str, configuration: str) -> str | None:
    results = os.environ.get("nnUNet_results")
    if not results:  # unset or empty (nnU-Net takes an empty value as set: a folder relative to the cwd)
        return None
    return os.path.join(results, dataset_name, f"acnorm_ranking__{plans}__{configuration}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _check_numbers(args)
    layers = _layers_arg(args.layers)
    fold = _fold_arg(args.fold)
    try:
        estimators = parse_estimators(args.estimators.split(",") + (["logme"] if args.logme else []))
        parse_estimators([args.rank_by])
    except UnknownEstimator as e:
        raise InputError(f"--estimators / --rank_by: {e}") from None
    if args.rank_by not in estimators:
        estimators.insert(0, args.rank_by)

    from nnunet_acnorm.ranking.nnunet_target import load_target
    from nnunet_acnorm.ranking.rank import check_output_folder, rank_candidates, write_results

    target = load_target(args.dataset, args.configuration, args.plans, fold)
    output = args.output or _default_output(target.dataset_name, args.plans, args.configuration)
    if output is None:
        raise InputError("nnUNet_results is not set (or empty): pass -o OUTDIR")
    check_output(output, "-o", reads={"candidate": args.candidates, "preprocessed dataset": target.preprocessed_folder})
    _check_layers(layers, target, args.seed)
    try:  # checked before the work, not after
        check_output_folder(output, args.overwrite)
    except FileExistsError as e:
        raise InputError(str(e)) from None

    logs: dict[str, str] = {}
    ranking = rank_candidates(args.candidates, target, steps="epoch" if args.epoch else args.steps, layers=layers,
                              seed=args.seed, device=args.device, lr=args.lr, tau=args.tau, estimators=estimators,
                              rank_by=args.rank_by,
                              family=args.family, trust_pickle=args.trust_pickle,
                              adapt_input_channels=args.adapt_input_channels, progress=not args.no_progress, logs=logs)
    try:
        written = write_results(ranking, output, overwrite=args.overwrite, logs=logs)
    except FileExistsError as e:  # appeared while the candidates were ranked
        raise InputError(str(e)) from None
    _print_ranking(ranking, target, args)
    print(f"Results: {', '.join(written)}")
    if not ranking.ranked:
        raise InputError("no candidate could be ranked (see the reasons above)" if not ranking.excluded else
                         "no candidate could be ranked: every measured candidate was excluded (see the reasons above)")


def _check_numbers(args) -> None:
    """--steps, --tau, --lr, --seed in range; -device cuda only with a CUDA device."""
    if args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    if args.tau is not None and not args.tau > 0:
        raise InputError(f"--tau must be > 0, got {args.tau}")
    if args.lr is not None and not args.lr > 0:
        raise InputError(f"--lr must be > 0, got {args.lr}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("-device cuda: no CUDA device is available; use -device cpu")


def _print_ranking(ranking, target, args) -> None:
    """The table, the step settings, the direction note, the cost, and the command for the top candidate."""
    from nnunet_acnorm.ranking.rank import format_table

    way = ranking.order_word
    cases_text = "batches from all preprocessed cases; " if ranking.fold is None else \
        f"batches from the {len(ranking.cases)} training cases of fold {ranking.fold}; "
    steps_text = f"{ranking.steps} step(s) per candidate, layers: {ranking.layers}, " if ranking.steps else ""
    print(f"\nTransferability estimates on {target.dataset_name} {target.configuration} (plans "
          f"{target.plans_identifier}): {', '.join(ranking.estimators)}; {steps_text}seed {ranking.seed}; "
          f"{cases_text}ordered by {way} {ranking.rank_by}")
    print(format_table(ranking))
    if ranking.steps:
        print(step_settings(ranking))
    print(f"\n{ranking.direction_note}.")
    epoch = ranking.epoch_seconds()
    if epoch is not None:
        per_candidate = sum(c.seconds for c in ranking.measured) / len(ranking.measured)
        print(f"Cost: {per_candidate:.1f} s per candidate (including preparation) vs about {epoch:.0f} s for one "
              f"nnU-Net fine-tuning epoch (250 iterations at the measured step time)")
    top = ranking.ranked[0] if ranking.ranked else None
    if top is not None:
        command = (f"nnUNetv2_train {args.dataset} {args.configuration} FOLD -p {top.plans_identifier} "
                   f"-tr nnUNetTrainerACNorm -pretrained_weights {top.pretrained_weights}")
        if ranking.reliable:
            print(f"Recommended ({way} {ranking.rank_by}): {top.name}. Fine-tune it with:\n  {command}")
        else:
            print(f"{way.capitalize()} {ranking.rank_by}: {top.name} (not a recommendation: see above). To fine-tune "
                  f"it:\n  {command}")


def step_settings(ranking) -> str:
    """The learning rate and temperature of the steps, and whose defaults they are."""
    lr = f"lr {ranking.lr:g}" + (" (nnUNetTrainerACNorm's peak lr; --lr to change)" if "lr" in ranking.trainer_defaults
                                 else " (--lr)")
    tau = f"temperature {temperature_text(ranking.tau)}" + (" (nnUNetTrainerACNorm's; --tau 1 for the paper's AC-Corr)"
                                                            if "tau" in ranking.trainer_defaults else " (--tau)")
    return (f"Steps: {lr}, {tau}. The direction experiment's record was measured with "
            f"{step_settings_text(**DIRECTION_STEP_SETTINGS)}.")


def rank_entry(argv: list[str] | None = None) -> None:
    run_command(PROG, main, argv)


if __name__ == "__main__":
    rank_entry()
