"""Turn a trained AC-Norm model folder into one for stock ``nnUNetTrainer`` (``nnUNetv2_acnorm_fold``).

Every AC-Norm layer is folded into the plain norm of its type with weight (I+S)γt and bias (I+S)βt
(:func:`nnunet_acnorm.fold_acnorm`), which computes the same outputs at inference. The new folder
holds, for every fold and checkpoint, the folded weights with ``trainer_name = 'nnUNetTrainer'``,
a ``plans.json`` whose ``norm_op`` is the folded norm type (for example BatchNorm3d for
``nnUNetTrainerACNormBN``) and whose plans name, ``<plans>_foldedFrom_<AC-Norm trainer>``, says
which trainer the model came from, and the dataset files. Stock nnU-Net predicts with it, with the
plugin not installed:

    nnUNetv2_predict -i in -o out -d D -c C -f 0 -tr nnUNetTrainer -p nnUNetPlans_foldedFrom_nnUNetTrainerACNorm
    nnUNetv2_predict_from_modelfolder -i in -o out -m <folded folder> -f 0

Before writing anything, each checkpoint is checked (written by the model folder's trainer, finite
weights, every AC-Norm source present: :mod:`nnunet_acnorm.nnunet.trained_checkpoints`), its
folded weights are loaded strictly into the network that stock ``nnUNetTrainer`` builds from the
new plans, and both networks are run on the same random input; the largest softmax-probability
difference is printed and stored in ``acnorm_fold.json``, with the list of files written. The
output may not be, contain or lie inside the model folder, nor be or contain an nnU-Net root
(:func:`nnunet_acnorm.outputs.check_output`); ``--overwrite`` replaces only a folded model this
command wrote (every file listed in its ``acnorm_fold.json``), atomically
(:func:`nnunet_acnorm.outputs.replace_folder`: a kill at any point leaves the old or the new
folder whole).
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import pydoc
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_acnorm.errors import InputError
from nnunet_acnorm.outputs import OutputError, check_output, check_replaceable, replace_folder

#: the folded plans identifier: ``<plans>_foldedFrom_<AC-Norm trainer>``
FOLDED_PLANS_INFIX = "_foldedFrom_"
STOCK_TRAINER = "nnUNetTrainer"
#: the report (and list of files) every folded model folder holds
FOLD_REPORT = "acnorm_fold.json"


class FoldError(InputError):
    """The model folder cannot be folded; the message says why and what to do."""


@dataclass
class FoldReport:
    output_folder: Path
    plans_identifier: str
    configuration: str
    checkpoints: list[str] = field(default_factory=list)
    max_probability_difference: float = 0.0
    norm_op: str = ""


def folded_plans_identifier(plans: str, trainer: str) -> str:
    """The plans identifier of the folded model: the plans and the AC-Norm trainer it came from."""
    return f"{plans}{FOLDED_PLANS_INFIX}{trainer}"


def default_output_folder(model_folder: Path) -> Path:
    trainer, plans, configuration = _split_model_folder_name(model_folder)
    return model_folder.parent / f"{STOCK_TRAINER}__{folded_plans_identifier(plans, trainer)}__{configuration}"


def _split_model_folder_name(model_folder: Path) -> tuple[str, str, str]:
    from nnunet_acnorm.checkpoints.results_folder import split_model_folder_name

    parts = split_model_folder_name(model_folder.name)
    if parts is None:
        raise FoldError(f"{model_folder} is not an nnU-Net model folder (expected a name like "
                        "nnUNetTrainerACNorm__nnUNetPlans__3d_fullres)")
    return parts


def _find_trainer_class(trainer_name: str):
    from nnunet_acnorm.nnunet.trainer_registry import TRAINERS

    if trainer_name in TRAINERS:
        return TRAINERS[trainer_name]
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(trainer_name)
    except RuntimeError:
        raise FoldError(f"trainer {trainer_name} (named in the checkpoint) cannot be found; add its folder to "
                        "nnUNet_extTrainer") from None


def _checkpoints(model_folder: Path, names: list[str] | None) -> list[Path]:
    folds = sorted(p for p in model_folder.glob("fold_*") if p.is_dir())
    if not folds:
        raise FoldError(f"{model_folder} has no fold_* folders: nothing was trained there")
    found = []
    for fold in folds:
        wanted = names or sorted(p.name for p in fold.glob("checkpoint_*.pth"))
        for name in wanted:
            if (fold / name).is_file():
                found.append(fold / name)
    if not found:
        raise FoldError(f"no checkpoint ({', '.join(names) if names else 'checkpoint_*.pth'}) in the fold "
                        f"folders of {model_folder}")
    return found


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def fold_model_folder(model_folder, output_folder=None, overwrite: bool = False,
                      checkpoint_names: list[str] | None = None, seed: int = 0, log=print) -> FoldReport:
    """Write the folded copy of ``model_folder`` (see the module docstring); returns a report."""
    model_folder = Path(model_folder).resolve()
    folder_trainer, plans_identifier = _check_model_folder(model_folder)
    output_folder = check_output(output_folder or default_output_folder(model_folder), "-o",
                                 reads={"model folder": model_folder})
    check_fold_output(output_folder, overwrite)
    checkpoints = _checkpoints(model_folder, checkpoint_names)

    import torch  # after the checks of the folders: a refusal is quick
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((model_folder / "plans.json").read_text())
    new_plans = copy.deepcopy(plans)
    new_plans["plans_name"] = folded_plans_identifier(plans_identifier, folder_trainer)
    source = _FoldSource(model_folder, folder_trainer, plans, PlansManager(copy.deepcopy(plans)),
                         json.loads((model_folder / "dataset.json").read_text()), new_plans,
                         torch.Generator().manual_seed(seed), log)
    report = FoldReport(output_folder, new_plans["plans_name"], "")
    folded_checkpoints = [_fold_checkpoint(path, source, report) for path in checkpoints]
    _write_output(model_folder, output_folder, overwrite, new_plans, folded_checkpoints, report, log)
    return report


def _check_model_folder(model_folder: Path) -> tuple[str, str]:
    """(trainer, plans identifier) of a trained nnU-Net model folder; FoldError for anything else."""
    if not model_folder.is_dir():
        raise FoldError(f"model folder not found: {model_folder}")
    for name in ("plans.json", "dataset.json"):
        if not (model_folder / name).is_file():
            raise FoldError(f"{model_folder} has no {name}: not a trained nnU-Net model folder")
    folder_trainer, plans_identifier, _ = _split_model_folder_name(model_folder)
    return folder_trainer, plans_identifier


@dataclass
class _FoldSource:
    """What every checkpoint of a model folder is folded with (``new_plans``: the folded plans, filled in)."""
    model_folder: Path
    folder_trainer: str
    plans: dict
    plans_manager: object
    dataset_json: dict
    new_plans: dict
    generator: object
    log: object


def _fold_checkpoint(path: Path, source: _FoldSource, report: FoldReport) -> tuple[Path, dict]:
    """(path relative to the model folder, folded checkpoint) of one checkpoint, checked against the
    network stock ``nnUNetTrainer`` builds from the folded plans; ``report`` and the plans are updated."""
    from nnunet_acnorm.norms import fold_acnorm

    checkpoint, configuration = _read_checkpoint(path, source)
    report.configuration = configuration
    configuration_manager = source.plans_manager.get_configuration(configuration)
    n_in, n_out = _channels(source, configuration_manager)
    trainer_class = _find_trainer_class(checkpoint["trainer_name"])
    network, n_layers = _acnorm_network(path, checkpoint, trainer_class, source, configuration_manager, n_in, n_out)
    network.eval()
    fold_acnorm(network)
    norm_types = {type(m) for m in network.modules() if type(m).__name__ in NORM_TYPE_NAMES}
    report.norm_op = _set_norm_op(source.new_plans, configuration, configuration_manager, norm_types, network)
    folded_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    stock = _stock_network(path, source.new_plans, configuration, n_in, n_out, folded_state, norm_types)
    difference = _max_probability_difference(trainer_class, source.plans_manager, configuration_manager, n_in, n_out,
                                             checkpoint["network_weights"], stock, source.generator)
    report.max_probability_difference = max(report.max_probability_difference, difference)
    relative = path.relative_to(source.model_folder)
    report.checkpoints.append(str(relative))
    source.log(f"{relative}: folded {n_layers} AC-Norm layer(s); largest softmax difference to the AC-Norm "
               f"network on a random input: {difference:.2e}")
    return relative, _folded_checkpoint(checkpoint, folded_state, source.new_plans)


def _read_checkpoint(path: Path, source: _FoldSource) -> tuple[dict, str]:
    """(checkpoint, its configuration): read weights-only and checked (trainer, finite weights)."""
    from nnunet_acnorm.nnunet.pretrained import load_nnunet_checkpoint
    from nnunet_acnorm.nnunet.trained_checkpoints import check_trained_checkpoint

    try:
        checkpoint = load_nnunet_checkpoint(str(path))
    except (ValueError, FileNotFoundError) as e:
        raise FoldError(str(e)) from None
    check_trained_checkpoint(path, checkpoint, source.folder_trainer, "the name of its model folder")
    configuration = checkpoint.get("init_args", {}).get("configuration")
    if configuration not in source.plans["configurations"]:
        raise FoldError(f"{path}: configuration {configuration!r} is not in {source.model_folder / 'plans.json'}")
    return checkpoint, configuration


def _channels(source: _FoldSource, configuration_manager) -> tuple[int, int]:
    """(input channels, segmentation heads) of the model's network."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    n_in = determine_num_input_channels(source.plans_manager, configuration_manager, source.dataset_json)
    return n_in, source.plans_manager.get_label_manager(source.dataset_json).num_segmentation_heads


def _acnorm_network(path: Path, checkpoint: dict, trainer_class, source: _FoldSource, configuration_manager,
                    n_in: int, n_out: int):
    """(the trainer's network with the checkpoint's weights, strictly: every source present; its number
    of AC-Norm layers)."""
    from nnunet_acnorm.nnunet.pretrained import describe_missing_sources, missing_source_layers, set_strict_source
    from nnunet_acnorm.norms import acnorm_modules

    network = trainer_class.build_network_architecture(source.plans_manager, configuration_manager, n_in, n_out,
                                                       enable_deep_supervision=False)
    layers = acnorm_modules(network)
    if not layers:
        raise FoldError(f"{path}: trainer {checkpoint['trainer_name']} has no AC-Norm layers; its model folder "
                        "already works with stock nnU-Net")
    set_strict_source(network, True)  # whatever the trainer class: a stripped source is refused
    missing = missing_source_layers(network, checkpoint["network_weights"])
    if missing:
        raise FoldError(describe_missing_sources(str(path), missing, len(layers), checkpoint["trainer_name"]))
    try:
        network.load_state_dict(checkpoint["network_weights"], strict=True)
    except RuntimeError as e:
        raise FoldError(f"{path}: the weights do not fit the network of {checkpoint['trainer_name']}: "
                        f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    unset = [n for n, m in layers.items() if not m.source_is_set]
    if unset:
        source.log(f"warning: {path}: {len(unset)} AC-Norm layer(s) have no source affines (the checkpoint was "
                   "written before training started); folding with source = target")
    return network, len(layers)


def _stock_network(path: Path, new_plans: dict, configuration: str, n_in: int, n_out: int, folded_state: dict,
                   norm_types: set):
    """The network stock ``nnUNetTrainer`` builds from the folded plans, with the folded weights (strictly;
    its norm types must be the folded network's ``norm_types``)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(copy.deepcopy(new_plans))
    configuration_manager = plans_manager.get_configuration(configuration)
    stock = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, n_in, n_out,
                                                     enable_deep_supervision=False)
    stock_norm_types = {type(m) for m in stock.modules() if type(m).__name__ in NORM_TYPE_NAMES}
    if stock_norm_types != norm_types:
        raise FoldError(f"{path}: stock nnUNetTrainer builds {configuration_manager.network_arch_class_name} "
                        f"with norm layers {sorted(t.__name__ for t in stock_norm_types)}, the folded network "
                        f"has {sorted(t.__name__ for t in norm_types)}; its plans cannot describe the folded model")
    try:
        stock.load_state_dict(folded_state, strict=True)
    except RuntimeError as e:
        raise FoldError(f"{path}: the folded weights do not load into stock nnUNetTrainer's network: {e}") from None
    stock.eval()
    return stock


def _folded_checkpoint(checkpoint: dict, folded_state: dict, new_plans: dict) -> dict:
    """The checkpoint for stock ``nnUNetTrainer``: folded weights, its trainer name, the folded plans."""
    import torch

    from nnunet_acnorm.checkpoints.io import plain_python

    new_checkpoint = plain_python(dict(checkpoint))  # no numpy scalars: loads with weights_only=True as it is
    new_checkpoint.update(network_weights=folded_state, trainer_name=STOCK_TRAINER, optimizer_state=None,
                          grad_scaler_state=None)
    init_args = dict(checkpoint.get("init_args", {}))
    if "plans" in init_args:
        init_args["plans"] = copy.deepcopy(new_plans)
    # nnU-Net stores the trainer's torch.device: as a string, the folded checkpoint loads with the
    # weights-only loading of torch < 2.4 too, which has no torch.device (stock nnU-Net never reads it)
    new_checkpoint["init_args"] = {k: str(v) if isinstance(v, torch.device) else v for k, v in init_args.items()}
    return new_checkpoint


#: the plain norm layers AC-Norm folds into
NORM_TYPE_NAMES = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
                             "InstanceNorm3d", "GroupNorm"})


def _set_norm_op(new_plans: dict, configuration: str, configuration_manager, norm_types: set, network) -> str:
    """Make the plans' ``norm_op`` the folded network's norm type (where the network class takes one);
    returns that type's dotted name."""
    if len(norm_types) != 1:
        raise FoldError(f"the folded network mixes norm types {sorted(t.__name__ for t in norm_types)}; a plans "
                        "file describes one norm_op, so stock nnU-Net cannot rebuild it")
    norm_type = next(iter(norm_types))
    config = new_plans["configurations"][configuration]
    if "architecture" not in config:  # inherited: write the resolved architecture into this configuration
        config["architecture"] = {"network_class_name": configuration_manager.network_arch_class_name,
                                  "arch_kwargs": copy.deepcopy(configuration_manager.network_arch_init_kwargs),
                                  "_kw_requires_import": list(configuration_manager.network_arch_init_kwargs_req_import)}
    arch_kwargs = config["architecture"]["arch_kwargs"]
    dotted = arch_kwargs.get("norm_op")
    if not dotted and not _takes_norm_op(configuration_manager.network_arch_class_name):
        # a network class that builds its own norm layers (Genesis, MedicalNet): nothing to set; the
        # stock build is checked against the folded network's norm types
        return _dotted(norm_type)
    if (pydoc.locate(dotted) if dotted else None) is not norm_type:
        example = next(m for m in network.modules() if type(m) is norm_type)
        arch_kwargs["norm_op"] = _dotted(norm_type)
        arch_kwargs["norm_op_kwargs"] = {"eps": example.eps, "affine": True}
        if "norm_op" not in config["architecture"].get("_kw_requires_import", []):
            config["architecture"].setdefault("_kw_requires_import", []).append("norm_op")
    return arch_kwargs["norm_op"]


def _takes_norm_op(network_class_name: str) -> bool:
    """Whether the network class is built with a ``norm_op`` argument (STU-Net's default is used when
    the plans leave it out; Genesis and MedicalNet have none)."""
    network_class = pydoc.locate(network_class_name)
    return network_class is not None and "norm_op" in inspect.signature(network_class).parameters


def _max_probability_difference(trainer_class, plans_manager, configuration_manager, n_in, n_out, weights,
                                stock, generator) -> float:
    import torch

    acnorm = trainer_class.build_network_architecture(plans_manager, configuration_manager, n_in, n_out,
                                                      enable_deep_supervision=False)
    acnorm.load_state_dict(weights, strict=True)
    acnorm.eval()
    patch = [min(int(p), 64) for p in configuration_manager.patch_size]  # small and valid for the network
    divisor = [1] * len(patch)
    strides = configuration_manager.network_arch_init_kwargs.get("strides") or []
    for stride in strides:
        stride = stride if isinstance(stride, (list, tuple)) else [stride] * len(patch)
        divisor = [d * int(s) for d, s in zip(divisor, stride)]
    patch = [max(d, (p // d) * d) for p, d in zip(patch, divisor)]
    x = torch.randn((1, n_in, *patch), generator=generator)
    with torch.no_grad():
        p_acnorm = torch.softmax(acnorm(x), 1)
        p_stock = torch.softmax(stock(x), 1)
    return float((p_acnorm - p_stock).abs().max())


def check_fold_output(output_folder: Path, overwrite: bool) -> None:
    """OutputError unless ``output_folder`` is new, or (``overwrite``) a folded model this command
    wrote: every file in it is listed in its ``acnorm_fold.json``."""
    if not output_folder.is_dir() or output_folder.is_symlink() or not overwrite:
        check_replaceable(output_folder, "-o", overwrite, lambda relative: False, "the folded model")
        return
    try:
        files = set(json.loads((output_folder / FOLD_REPORT).read_text())["files"]) | {FOLD_REPORT}
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(f"-o {output_folder} is not a folded model written by nnUNetv2_acnorm_fold (no readable "
                          f"{FOLD_REPORT} listing its files): --overwrite replaces only those; choose another "
                          "folder (nothing was replaced)") from None
    check_replaceable(output_folder, "-o", overwrite, files.__contains__,
                      f"the files nnUNetv2_acnorm_fold wrote there (listed in {FOLD_REPORT})")


def _copy_ignore(folder: str, names: list[str]) -> list[str]:
    """What is not copied from a fold folder: checkpoints (written folded), locks, symbolic links."""
    return [n for n in names if n.endswith((".pth", ".lock")) or os.path.islink(os.path.join(folder, n))]


def _write_output(model_folder: Path, output_folder: Path, overwrite: bool, new_plans: dict,
                  folded_checkpoints: list, report: FoldReport, log=print) -> None:
    import torch

    def write(staging: Path) -> None:
        for name in ("dataset.json", "dataset_fingerprint.json"):
            if (model_folder / name).is_file() and not (model_folder / name).is_symlink():
                shutil.copy2(model_folder / name, staging / name)
        (staging / "plans.json").write_text(json.dumps(new_plans, indent=4))
        for fold in sorted({rel.parent for rel, _ in folded_checkpoints}):
            # training logs and validation results travel along (find_best_configuration reads them)
            shutil.copytree(model_folder / fold, staging / fold, ignore=_copy_ignore)
        for relative, checkpoint in folded_checkpoints:
            torch.save(checkpoint, staging / relative)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        (staging / FOLD_REPORT).write_text(json.dumps({
            "folded_from": str(model_folder), "plans_identifier": report.plans_identifier,
            "configuration": report.configuration, "norm_op": report.norm_op, "checkpoints": report.checkpoints,
            "max_probability_difference_random_input": report.max_probability_difference, "files": files},
            indent=2))
        check_fold_output(output_folder, overwrite)  # again: it may have appeared or changed meanwhile

    replace_folder(output_folder, write, log)
