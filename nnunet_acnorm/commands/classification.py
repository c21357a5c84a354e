"""Console scripts: ``nnUNetv2_acnorm_cls_train``, ``nnUNetv2_acnorm_cls_predict``,
``nnUNetv2_acnorm_cls_evaluate`` (options in nnU-Net's style: ``-x value``, ``--flag``).

Input problems end the command with a one-line ``error: ...`` on stderr and exit status 1; no
result already on disk is overwritten by a failed or refused run.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import sys

import numpy as np

from nnunet_acnorm.classification.errors import ClassificationInputError
from nnunet_acnorm.commands._cli import run_command
from nnunet_acnorm.outputs import check_output

DEFAULT_BATCH_SIZE = {2: 16, 3: 8}
#: a bound that catches typos (-num_epochs 10^21 would run for ever); far above any real schedule
MAX_EPOCHS = 100_000
#: -method -> what it is (the trainers: classification.trainer.METHODS)
METHOD_NAMES = {"acnorm": "AC-Norm on every BatchNorm", "vanilla": "plain fine-tuning",
                "l2sp": "L2-SP", "acnorm_l2sp": "AC-Norm and L2-SP", "delta": "DELTA",
                "bss": "batch spectral shrinkage", "stochnorm": "StochNorm", "lpft": "LP-FT (head first, then all)",
                "dlr": "discriminative learning rate (pretrained layers x 0.1)"}


def _run(prog: str, main) -> None:
    # a non-finite loss or output (FloatingPointError) is reported like bad input: one line, exit 1
    run_command(prog, main, sys.argv[1:], errors=(FloatingPointError,))


def _device(name: str):
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise ClassificationInputError("-device cuda: no CUDA GPU is available here; use -device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ClassificationInputError("-device mps: MPS is not available here; use -device cpu")
    return torch.device(name)


def _default_workers() -> int:
    value = os.environ.get("nnUNet_n_proc_DA")
    if value is not None:
        try:
            return max(int(value), 0)
        except ValueError:
            raise ClassificationInputError(f"nnUNet_n_proc_DA='{value}' is not an integer") from None
    return min(8, os.cpu_count() or 1)


def _check_train_arguments(args) -> None:
    """Every numeric option in range, before anything is read or written (a refused run leaves no
    splits file, fold folder or log behind)."""
    def finite(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not isinstance(args.tau, str) and not (finite(args.tau) and args.tau > 0):
        raise ClassificationInputError(f"-tau {args.tau}: the AC-Norm temperature must be a finite number > 0")
    if not (finite(args.initial_lr) and args.initial_lr > 0):
        raise ClassificationInputError(f"-initial_lr {args.initial_lr}: must be a finite number > 0")
    if not (finite(args.weight_decay) and args.weight_decay >= 0):
        raise ClassificationInputError(f"-weight_decay {args.weight_decay}: must be a finite number >= 0")
    if args.num_epochs is not None and not 1 <= args.num_epochs <= MAX_EPOCHS:
        raise ClassificationInputError(f"-num_epochs {args.num_epochs}: must be from 1 to {MAX_EPOCHS}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ClassificationInputError(f"-batch_size {args.batch_size}: must be at least 1")
    if args.image_size < 1:
        raise ClassificationInputError(f"-image_size {args.image_size}: must be at least 1")
    if args.patch_size is not None and min(args.patch_size) < 1:
        raise ClassificationInputError(f"-patch_size {args.patch_size}: every size must be at least 1")
    if args.num_classes is not None and args.num_classes < 2:
        raise ClassificationInputError(f"-num_classes {args.num_classes}: a classifier needs at least 2 classes")
    if args.num_workers is not None and args.num_workers < 0:
        raise ClassificationInputError(f"-num_workers {args.num_workers}: must be >= 0")
    if args.pretrained is not None and os.path.isdir(args.pretrained):
        raise ClassificationInputError(f"-pretrained {args.pretrained} is a directory, not a checkpoint file; give "
                                       "the file itself")


def _check_finite_volumes(cases) -> None:
    """Every floating-point 3D volume holds finite values only (read before anything is written; a
    NaN would otherwise surface as "loss became nan" epochs later, without the file's name)."""
    import SimpleITK as sitk

    from nnunet_acnorm.classification.data_loading import read_volume

    reader = sitk.ImageFileReader()
    for case in cases:
        reader.SetFileName(case.path)
        try:
            reader.ReadImageInformation()
            floating = "float" in sitk.GetPixelIDValueAsString(reader.GetPixelID())
        except RuntimeError:
            floating = True  # read_volume names the file
        if floating and not np.isfinite(read_volume(case.path)).all():
            raise ClassificationInputError(f"{case.path} holds NaN or infinite values; fix or remove the volume "
                                           "(nothing was written)")


def _check_results_folder(results: str, dim: int, num_classes: int) -> None:
    """Every fold of a results folder must share the classes: refuse a run that does not fit the
    folds already trained there (dataset_classification.json)."""
    described = os.path.join(results, "dataset_classification.json")
    if not os.path.isfile(described):
        return
    try:
        with open(described) as f:
            previous = json.load(f)
        before = (int(previous["dim"]), int(previous["num_classes"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise ClassificationInputError(f"{described} is not readable; it describes the folds of {results}: "
                                       "restore it or use another -o") from None
    if before != (dim, num_classes):
        raise ClassificationInputError(
            f"{results} holds folds trained with {before[1]} classes ({before[0]}D) per {described}; this run has "
            f"{num_classes} classes ({dim}D). Every fold of a results folder must share them: fix -num_classes or "
            "the labels, or use another -o (nothing was written)")


def _parser(prog: str, description: str, required: dict[str, str]) -> argparse.ArgumentParser:
    """The parser of the console script ``prog``, with its ``required`` options (flag -> help) first."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    for flag, text in required.items():
        p.add_argument(flag, required=True, help=text)
    return p


def _fold_arg(value: str):
    if value == "all":
        return "all"
    if not re.fullmatch(r"\d+", value):
        raise argparse.ArgumentTypeError(f"fold must be an integer or 'all', got '{value}'")
    return int(value)


# -- train ------------------------------------------------------------------------------------------

def train_parser() -> argparse.ArgumentParser:
    p = _parser("nnUNetv2_acnorm_cls_train",
                "Fine-tune a pretrained classifier on one fold (AC-Norm on every BatchNorm, or "
                "plain fine-tuning with --vanilla). 2D: RGB PNG/JPEG/TIFF images, torchvision "
                "ResNet (ResNet-50). 3D: NIfTI/NRRD/MHA volumes, Models Genesis or MedicalNet encoders.",
                {"-i": "folder of images",
                 "-l": "CSV with a header: image identifier column, label column (integer classes 0..N-1)",
                 "-o": "results folder: splits_final.json and fold_X/ go here"})
    p.add_argument("-f", required=True, type=_fold_arg, help="fold 0-4 of the 5-fold split, or 'all'")
    p.add_argument("-pretrained", help="pretrained checkpoint (torchvision or MoCo v2 ResNet-50 for 2D; "
                                       "Models Genesis or MedicalNet for 3D)")
    p.add_argument("-pretrained_family", default=None,
                   choices=["torchvision_resnet", "moco_v2", "genesis", "medicalnet"],
                   help="family of -pretrained (default: recognised from the file's keys)")
    p.add_argument("--trust_pickle", action="store_true",
                   help="allow full unpickling of -pretrained (only for files from a trusted source)")
    p.add_argument("-method", default=None, choices=list(METHOD_NAMES),
                   help="fine-tuning method (default acnorm): " + "; ".join(f"{k} = {v}" for k, v in
                                                                         METHOD_NAMES.items())
                        + " (docs/baselines.md)")
    p.add_argument("--vanilla", action="store_true", help="plain fine-tuning (no AC-Norm), for comparison: "
                                                          "the same as -method vanilla")
    p.add_argument("-arch", choices=["resnet", "genesis", "medicalnet"], default=None,
                   help="network when training without -pretrained (only with --vanilla)")
    p.add_argument("-depth", type=int, default=None, help="ResNet depth for -arch resnet (default 50) or "
                                                          "medicalnet (default 18) without -pretrained")
    p.add_argument("-dim", "--dim", type=int, choices=[2, 3], default=None,
                   help="2 or 3 (default: from the network, else from the image files)")
    p.add_argument("-num_classes", type=int, default=None,
                   help="number of classes (default: highest label + 1); labels outside are an error")
    p.add_argument("-id_column", default=None, help="CSV column of image identifiers (default: first)")
    p.add_argument("-label_column", default=None, help="CSV column of labels (default: second)")
    p.add_argument("-num_epochs", type=int, default=None, help="epochs (default 100); with --c, raises "
                                                              "the total of a finished training")
    p.add_argument("-batch_size", type=int, default=None, help="default 16 (2D) / 8 (3D)")
    p.add_argument("-image_size", type=int, default=512, help="2D: side of the square network input "
                                                              "(default 512)")
    p.add_argument("-patch_size", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="3D: network input size, volumes are centre cropped/padded to it (default: "
                        "the volumes' common shape)")
    p.add_argument("-intensity", choices=["ct", "zscore", "none"], default=None,
                   help="3D intensity preprocessing (default: ct for genesis, zscore for medicalnet)")
    p.add_argument("-initial_lr", type=float, default=0.01, help="SGD (Nesterov, momentum 0.9) initial "
                                                                "learning rate, poly decay (default 0.01)")
    p.add_argument("-weight_decay", type=float, default=3e-5)
    p.add_argument("-imbalance", choices=["loss", "sampling", "none"], default="loss",
                   help="class imbalance: 'loss' = class-weighted cross-entropy (balanced weights, "
                        "default), 'sampling' = weighted random sampling, 'none'")
    p.add_argument("-selection_metric", choices=["kappa", "auc", "accuracy"], default="kappa",
                   help="validation metric whose moving average picks checkpoint_best (default: "
                        "quadratic weighted kappa)")
    p.add_argument("-tau", type=float, default=1.0, help="AC-Norm temperature (default 1)")
    p.add_argument("--c", action="store_true", help="continue from the fold's latest checkpoint")
    p.add_argument("-device", choices=["cuda", "cpu", "mps"], default="cuda",
                   help="cuda (mixed precision), cpu or mps (float32); default cuda")
    p.add_argument("-num_workers", type=int, default=None,
                   help="data loading processes (default: $nnUNet_n_proc_DA, else min(8, CPUs))")
    return p


def _train(argv) -> None:
    import torch
    from nnunet_acnorm.classification.trainer import METHODS
    args = train_parser().parse_args(argv)
    _check_train_arguments(args)
    check_output(args.o, "-o", reads={"image folder": args.i, "labels CSV": args.l, "pretrained file": args.pretrained})
    device = _device(args.device)
    if args.f != "all" and not 0 <= args.f < 5:
        raise ClassificationInputError(f"-f {args.f}: the splits have folds 0..4 (or use -f all)")
    fold_folder = os.path.join(args.o, f"fold_{args.f}")
    if args.vanilla and args.method not in (None, "vanilla"):
        raise ClassificationInputError(f"--vanilla is -method vanilla; it contradicts -method {args.method}")
    method = "vanilla" if args.vanilla else args.method or "acnorm"
    checkpoint = _checkpoint_to_continue(args, fold_folder)
    if checkpoint is not None:
        trainer_class, config = _continued_config(args, checkpoint, METHODS[method], fold_folder)
    else:
        trainer_class, config = METHODS[method], _new_config(args, method)
    if config["num_epochs"] < 1:
        raise ClassificationInputError("-num_epochs must be at least 1")
    cases = _training_cases(args, config, checkpoint)
    trainer, train_cases, val_cases = _set_up_trainer(args, config, cases, trainer_class, fold_folder, device,
                                                      checkpoint)
    with open(os.path.join(args.o, "dataset_classification.json"), "w") as f:
        json.dump({"dim": config["dim"], "num_classes": config["num_classes"], "num_cases": len(cases),
                   "labels_file": os.path.abspath(args.l), "images_folder": os.path.abspath(args.i)}, f,
                  indent=1)
    trainer.run_training(train_cases, val_cases)
    torch.cuda.empty_cache() if device.type == "cuda" else None


def _checkpoint_to_continue(args, fold_folder: str) -> dict | None:
    """With --c the fold's checkpoint in nnU-Net's order (final, latest, best), or None (a new
    training); without, a fold that holds a checkpoint is refused."""
    from nnunet_acnorm.classification.trainer import CHECKPOINT_NAMES, load_checkpoint

    existing = [n for n in CHECKPOINT_NAMES if os.path.isfile(os.path.join(fold_folder, n))]
    if not args.c:
        if existing:
            raise ClassificationInputError(
                f"{fold_folder} already holds {', '.join(existing)}: pass --c to continue that training or "
                "choose another -o (nothing was overwritten)")
        return None
    for name in CHECKPOINT_NAMES:
        if name in existing:
            return load_checkpoint(os.path.join(fold_folder, name))
    print(f"WARNING: --c: no checkpoint in {fold_folder}; starting a new training", flush=True)
    return None


def _continued_config(args, checkpoint: dict, trainer_class, fold_folder: str) -> tuple[type, dict]:
    """(trainer class, configuration) of a continued training: the checkpoint's, with the options --c may change."""
    from nnunet_acnorm.classification.trainer import TRAINERS

    config = dict(checkpoint["config"])
    trained = TRAINERS[config["trainer_name"]]
    if trained is not trainer_class:
        raise ClassificationInputError(
            f"{fold_folder} was trained with {config['trainer_name']}; --c must keep it "
            f"(-method {trained.method_name}" + (", or --vanilla)" if trained.method_name == "vanilla" else ")"))
    if args.num_epochs is not None:
        config["num_epochs"] = args.num_epochs
    if args.num_workers is not None:
        config["num_workers"] = args.num_workers
    return trained, config


def _new_config(args, method: str) -> dict:
    """The configuration of a new training: the network (from -pretrained, or -arch from scratch) and the options."""
    from nnunet_acnorm.networks.classifiers import ARCHITECTURES

    net = _network_description(args, method)
    if args.dim is not None and args.dim != net["dim"]:
        raise ClassificationInputError(f"-dim {args.dim} does not fit the {net['architecture']} network "
                                       f"({net['dim']}D)")
    return {**net, "num_classes": None, "image_size": args.image_size,
            "patch_size": list(args.patch_size) if args.patch_size else None,
            "intensity": args.intensity or ARCHITECTURES[net["architecture"]].default_intensity,
            "num_epochs": args.num_epochs if args.num_epochs is not None else 100,
            "batch_size": args.batch_size or DEFAULT_BATCH_SIZE[net["dim"]],
            "initial_lr": args.initial_lr, "weight_decay": args.weight_decay,
            "imbalance": args.imbalance, "selection_metric": args.selection_metric, "tau": args.tau,
            "pretrained_file": os.path.abspath(args.pretrained) if args.pretrained else None,
            "num_workers": args.num_workers if args.num_workers is not None else _default_workers()}


def _network_description(args, method: str) -> dict:
    """The network of a new training: described from the -pretrained file, or -arch (with --vanilla)."""
    from nnunet_acnorm.classification.pretrained import describe_pretrained
    from nnunet_acnorm.networks.classifiers import ARCHITECTURES

    if args.pretrained is None and method != "vanilla":
        raise ClassificationInputError(
            f"{'AC-Norm' if method == 'acnorm' else '-method ' + method} fine-tunes a pretrained network: pass "
            "-pretrained FILE (or --vanilla -arch ... to train a network from scratch)")
    if args.pretrained is not None:
        if not os.path.isfile(args.pretrained):
            raise ClassificationInputError(f"pretrained file {args.pretrained} does not exist")
        net = describe_pretrained(args.pretrained, args.pretrained_family, args.trust_pickle)
        if args.arch is not None and args.arch != net["architecture"]:
            raise ClassificationInputError(f"-arch {args.arch} does not match the pretrained "
                                           f"'{net['pretrained_family']}' file ({net['architecture']})")
        return net
    if args.arch is None:
        raise ClassificationInputError("without -pretrained, pass -arch resnet|genesis|medicalnet")
    dim, channels = ARCHITECTURES[args.arch].dim, ARCHITECTURES[args.arch].in_channels
    depth = {"resnet": args.depth or 50, "medicalnet": args.depth or 18}.get(args.arch)
    return {"architecture": args.arch, "dim": dim, "in_channels": channels,
            "pretrained_family": None, "depth": depth, "base_features": None, "shortcut_type": None}


def _training_cases(args, config: dict, checkpoint: dict | None) -> list:
    """The labelled cases of -i/-l, checked against the network; a new training takes the number of
    classes and (3D) the patch size from them."""
    from nnunet_acnorm.classification.dataset import collect_cases, detect_dim, infer_num_classes

    dim = config["dim"]
    if not os.path.isdir(args.i):
        raise ClassificationInputError(f"image folder {args.i} does not exist")
    found_dim = detect_dim(args.i)
    if found_dim != dim:
        raise ClassificationInputError(f"{args.i} holds {found_dim}D images but the {config['architecture']} "
                                       f"network is {dim}D")
    cases = collect_cases(args.i, args.l, dim, args.num_classes if checkpoint is None else
                          config["num_classes"], require_rgb=dim == 2, id_column=args.id_column,
                          label_column=args.label_column)
    if checkpoint is None:
        config["num_classes"] = infer_num_classes(cases, args.num_classes)
        if dim == 3 and config["patch_size"] is None:
            shapes = {c.shape for c in cases}
            if len(shapes) != 1:
                raise ClassificationInputError(
                    f"the volumes have {len(shapes)} different shapes (e.g. {sorted(shapes)[:2]}): pass "
                    "-patch_size Z Y X")
            config["patch_size"] = list(shapes.pop())
        if dim == 3 and any(s % 8 for s in config["patch_size"]):
            raise ClassificationInputError(
                f"patch size {config['patch_size']} must be divisible by 8 in every axis (three 2x "
                "downsamplings): pass -patch_size")
    if dim == 3:
        _check_finite_volumes(cases)
    return cases


def _set_up_trainer(args, config: dict, cases: list, trainer_class, fold_folder: str, device, checkpoint):
    """(trainer, training cases, validation cases): splits and the initialised trainer. A refused set-up
    leaves nothing behind: the log, splits and folders this run created go."""
    from nnunet_acnorm.classification.dataset import fold_cases, load_or_create_splits

    _check_results_folder(args.o, config["dim"], int(config["num_classes"]))
    splits_file = os.path.join(args.o, "splits_final.json")
    new_paths = [p for p in (args.o, fold_folder, splits_file) if not os.path.exists(p)]
    trainer = None
    try:
        splits = load_or_create_splits(splits_file, cases)
        train_cases, val_cases = fold_cases(cases, splits, args.f)
        trainer = trainer_class(config, args.f, fold_folder, device)
        if checkpoint is not None:
            trainer.initialize_from_checkpoint(checkpoint)
        else:
            trainer.initialize(config["pretrained_file"], args.trust_pickle)
    except (ClassificationInputError, ValueError) as e:
        if trainer is not None and trainer.log_file and os.path.isfile(trainer.log_file) \
                and fold_folder not in new_paths:
            os.remove(trainer.log_file)
        for path in reversed(new_paths):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.isfile(path):
                os.remove(path)
        if isinstance(e, ClassificationInputError):
            raise
        raise ClassificationInputError(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from None
    return trainer, train_cases, val_cases


# -- predict ----------------------------------------------------------------------------------------

def predict_parser() -> argparse.ArgumentParser:
    p = _parser("nnUNetv2_acnorm_cls_predict",
                "Predict class probabilities with the ensemble of the folds trained in -m (mean of their "
                "softmax outputs).",
                {"-i": "folder of images", "-o": "output CSV: image, prediction, probability_0..N-1",
                 "-m": "results folder of nnUNetv2_acnorm_cls_train (holds fold_X/)"})
    p.add_argument("-f", nargs="+", type=_fold_arg, default=None,
                   help="folds to ensemble (default: every fold_X in -m holding -chk)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("-l", default=None, help="optional CSV whose first column lists the images to predict "
                                            "(default: every image in -i)")
    p.add_argument("-id_column", default=None, help="identifier column of -l (default: first)")
    p.add_argument("-device", choices=["cuda", "cpu", "mps"], default="cuda")
    p.add_argument("-batch_size", type=int, default=None)
    p.add_argument("-num_workers", type=int, default=None)
    return p


def _predict(argv) -> None:
    from torch.utils.data import DataLoader
    from nnunet_acnorm.classification.data_loading import make_dataset
    from nnunet_acnorm.classification.dataset import collect_cases
    from nnunet_acnorm.classification.trainer import (ClassificationTrainer, load_checkpoint,
                                                      predict_with_network, write_predictions)
    args = predict_parser().parse_args(argv)
    device = _device(args.device)
    if not os.path.isdir(args.m):
        raise ClassificationInputError(f"model folder {args.m} does not exist")
    check_output(args.o, "-o", reads={"model folder": args.m, "image folder": args.i, "image list": args.l})
    if os.path.isdir(args.o):
        raise ClassificationInputError(f"-o {args.o} is a folder; give the CSV file to write")
    if args.f is None:
        folders = sorted(glob.glob(os.path.join(args.m, "fold_*")))
        folders = [d for d in folders if os.path.isfile(os.path.join(d, args.chk))]
        if not folders:
            raise ClassificationInputError(f"no fold_X folder in {args.m} holds {args.chk}; train first "
                                           "or pass -chk")
    else:
        folders = [os.path.join(args.m, f"fold_{f}") for f in args.f]
    checkpoints = [load_checkpoint(os.path.join(d, args.chk)) for d in folders]
    config = checkpoints[0]["config"]
    for d, c in zip(folders, checkpoints):
        for key in ("dim", "num_classes", "image_size", "patch_size", "intensity"):
            if c["config"].get(key) != config.get(key):
                raise ClassificationInputError(
                    f"{d} differs from {folders[0]} in {key} ({c['config'].get(key)} vs {config.get(key)}): "
                    "ensemble only folds of one training set-up")
    dim = config["dim"]
    cases = collect_cases(args.i, args.l, dim, None, require_rgb=dim == 2, id_column=args.id_column,
                          label_column=None, require_labels=False)
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE[dim]
    workers = args.num_workers if args.num_workers is not None else _default_workers()
    loader = DataLoader(make_dataset(cases, config, train=False), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda")
    total = np.zeros((len(cases), int(config["num_classes"])))
    for d, checkpoint in zip(folders, checkpoints):
        network = ClassificationTrainer.network_from_checkpoint(checkpoint).to(device)
        probabilities, _ = predict_with_network(network, loader, device, amp=device.type == "cuda",
                                                desc=f"predicting ({os.path.basename(d)})")
        total += probabilities
    out_folder = os.path.dirname(os.path.abspath(args.o))
    os.makedirs(out_folder, exist_ok=True)
    write_predictions(args.o, [c.identifier for c in cases], total / len(folders))
    print(f"{len(cases)} images predicted with {len(folders)} fold(s) "
          f"({', '.join(os.path.basename(d) for d in folders)}): {args.o}")


# -- evaluate ---------------------------------------------------------------------------------------

def evaluate_parser() -> argparse.ArgumentParser:
    p = _parser("nnUNetv2_acnorm_cls_evaluate",
                "Accuracy, quadratic weighted kappa, per-class and macro AUC of a predictions CSV against a "
                "labels CSV.",
                {"-p": "predictions CSV of nnUNetv2_acnorm_cls_predict",
                 "-l": "labels CSV (identifier column, label column)"})
    p.add_argument("-o", default=None, help="summary JSON (default: next to -p, <name>_summary.json); "
                                            "the confusion matrix goes next to it as .png")
    p.add_argument("-id_column", default=None)
    p.add_argument("-label_column", default=None)
    return p


def _read_predictions(path: str) -> tuple[dict[str, np.ndarray], int]:
    import csv
    if not os.path.isfile(path):
        raise ClassificationInputError(f"predictions file {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = list(reader)
    prob_columns = sorted((c for c in columns if re.fullmatch(r"probability_\d+", c)),
                          key=lambda c: int(c.split("_")[1]))
    if "image" not in columns or not prob_columns or \
            [int(c.split("_")[1]) for c in prob_columns] != list(range(len(prob_columns))):
        raise ClassificationInputError(f"{path} is not a predictions CSV (expected columns image, "
                                       f"prediction, probability_0..N-1; found {columns})")
    out = {}
    for line, row in enumerate(rows, start=2):
        try:
            p = np.array([float(row[c]) for c in prob_columns])
        except (TypeError, ValueError):
            raise ClassificationInputError(f"{path} line {line}: probabilities are not numbers") from None
        if not np.isfinite(p).all():
            raise ClassificationInputError(f"{path} line {line}: probabilities hold NaN or infinity")
        out[row["image"]] = p
    return out, len(prob_columns)


def _evaluate(argv) -> None:
    from nnunet_acnorm.classification.dataset import parse_label, read_label_csv, strip_ending
    from nnunet_acnorm.classification.metrics import (classification_metrics, format_metrics,
                                                      plot_confusion_matrix, save_summary)
    args = evaluate_parser().parse_args(argv)
    if args.o is not None:
        check_output(args.o, "-o", reads={"predictions CSV": args.p, "labels CSV": args.l})
    predictions, num_classes = _read_predictions(args.p)
    rows = read_label_csv(args.l, args.id_column, args.label_column)
    labels, probabilities = [], []
    for line, identifier, raw in rows:
        key = strip_ending(identifier)
        if key not in predictions:
            raise ClassificationInputError(f"{args.l} line {line}: no prediction for '{key}' in {args.p}")
        labels.append(parse_label(raw, num_classes, f"{args.l} line {line}",
                                  hint=f"the predictions have {num_classes} classes"))
        probabilities.append(predictions[key])
    metrics = classification_metrics(labels, np.stack(probabilities), num_classes)
    out = args.o or os.path.splitext(args.p)[0] + "_summary.json"
    save_summary(metrics, out, {"predictions": os.path.abspath(args.p), "labels": os.path.abspath(args.l)})
    plot_confusion_matrix(metrics, os.path.splitext(out)[0] + "_confusion_matrix.png",
                          os.path.basename(args.p))
    print(format_metrics(metrics))
    print(f"summary: {out}")


# -- console scripts (pyproject.toml) ----------------------------------------------------------------

def train_entry() -> None:
    _run("nnUNetv2_acnorm_cls_train", _train)


def predict_entry() -> None:
    _run("nnUNetv2_acnorm_cls_predict", _predict)


def evaluate_entry() -> None:
    _run("nnUNetv2_acnorm_cls_evaluate", _evaluate)
