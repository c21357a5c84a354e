"""The target side of the ranking: an nnU-Net dataset's plans, fixed batches, loss and optimiser,
and each candidate checkpoint turned into the AC-Norm network that ``nnUNetTrainerACNorm`` would
fine-tune.

Everything here mirrors what ``nnUNetv2_train -tr nnUNetTrainerACNorm -pretrained_weights`` does,
without a training run: the trainer is only constructed, in a throw-away results folder
(:mod:`nnunet_acnorm.nnunet.training_step`), for nnU-Net's own loss, optimiser and step. The
trainer's defaults hold unless the caller gives others: its temperature (``ACNORM_TAU``) and its
peak learning rate (``finetune_initial_lr``):

- network: ``nnUNetTrainerACNorm.build_network_architecture`` from the plans (AC-Norm with the
  source "not set"; loading the plain pretrained affines sets source = target), or the same network
  with a fixed temperature;
- weights: every key except the segmentation head (``.seg_layers.``), as nnU-Net's loader;
- loss: the trainer's ``_build_loss`` (``DC_and_CE_loss``, ``DC_and_BCE_loss`` for regions, with
  the deep-supervision weights);
- optimiser: ``nnUNetTrainer.configure_optimizers`` (SGD, Nesterov, momentum 0.99, the trainer's
  weight decay) at the trainer's peak learning rate; the step: ``nnUNetTrainer.train_step`` in
  float32;
- batches: nnU-Net's ``nnUNetDataLoader`` with the validation transforms (no augmentation), the
  cases in a seeded order and the crops from a seeded RNG, so every candidate sees the same cases
  and crops (same positions where the candidates' plans share spacing and patch size).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from nnunet_acnorm.checkpoints import FAMILIES, PretrainedLoadError, read_checkpoint, resolve_family
from nnunet_acnorm.checkpoints.family import apply_family
from nnunet_acnorm.checkpoints.keys import canonical_keys, first_misfit, transferable_keys
from nnunet_acnorm.errors import InputError
from nnunet_acnorm.nnunet.dataset import PreprocessedDatasetError, read_preprocessed_dataset
from nnunet_acnorm.ranking.imports import default_checkpoint, earlier_import, provide_preprocessed_data



class RankingError(InputError):
    """The ranking as a whole cannot run (bad target, bad options): one line for the user."""


class CandidateSkipped(InputError):
    """This candidate cannot be ranked on this target; the message says why (the others go on)."""


@dataclass
class TargetTask:
    dataset_name: str
    configuration: str
    plans_identifier: str
    plans: dict
    dataset_json: dict
    preprocessed_folder: str
    #: the nnU-Net fold whose training cases the batches come from (None: every preprocessed case)
    fold: int | str | None = None
    #: those training cases (None: every preprocessed case)
    cases: tuple[str, ...] | None = None

    @property
    def num_input_channels(self) -> int:
        return len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))


def load_target(dataset: str, configuration: str, plans_identifier: str = "nnUNetPlans",
                fold: int | str | None = None) -> TargetTask:
    """The target dataset's plans and dataset.json from ``nnUNet_preprocessed`` (clear errors). With
    ``fold`` (an int or ``"all"``, as ``nnUNetv2_train`` takes it), the batches come from that fold's
    training cases only: nnU-Net's own split (``nnUNetTrainer.do_split``: ``splits_final.json``, written
    as nnU-Net writes it where it is missing), so that the fold's validation cases stay unseen."""
    try:
        planned = read_preprocessed_dataset(dataset, configuration, plans_identifier)
    except PreprocessedDatasetError as e:
        raise RankingError(str(e)) from None
    target = TargetTask(planned.name, configuration, plans_identifier, planned.plans, planned.dataset_json,
                        planned.folder)
    manager = _managers(target.plans, configuration, target.dataset_json)[1]
    if manager.previous_stage_name is not None:
        raise RankingError(f"configuration {configuration} is a cascade stage; rank with its first stage "
                           "(e.g. 3d_fullres or 3d_lowres)")
    if fold is not None:
        target.fold, target.cases = fold, training_cases(target, fold)
    return target


def training_cases(target: TargetTask, fold: int | str) -> tuple[str, ...]:
    """The training cases of ``fold`` in nnU-Net's split of the target (its trainer's ``do_split``)."""
    trainer = _ranking_trainer(target.plans, target)
    folder = trainer.preprocessed_dataset_folder
    if not os.path.isdir(folder) or not os.listdir(folder):
        raise RankingError(f"--fold {fold}: preprocessed data {folder} not found: run nnUNetv2_preprocess first")
    splits = os.path.join(trainer.preprocessed_dataset_folder_base, "splits_final.json")
    if isinstance(fold, int) and os.path.isfile(splits):
        with open(splits) as f:
            n_folds = len(json.load(f))
        if fold >= n_folds:  # nnU-Net would draw a random 80:20 split instead: say so rather than guess
            raise RankingError(f"--fold {fold}: {splits} defines folds 0-{n_folds - 1}; pass one of them or 'all'")
    elif isinstance(fold, int):
        _check_default_split(trainer, fold, splits)
    trainer.fold = fold
    train, _ = trainer.do_split()
    if not train:
        raise RankingError(f"--fold {fold}: the split has no training cases")
    return tuple(sorted(train))


#: folds of the split nnU-Net writes where splits_final.json is missing (nnUNetTrainer.do_split)
NNUNET_FOLDS = 5


def _check_default_split(trainer, fold: int, splits: str) -> None:
    """Refuse a fold that nnU-Net's default 5-fold split cannot give, before ``do_split`` writes
    ``splits`` or fails inside scikit-learn (fewer cases than folds)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = trainer.preprocessed_dataset_folder
    n_cases = len(infer_dataset_class(folder).get_identifiers(folder))
    if n_cases < NNUNET_FOLDS:
        raise RankingError(f"--fold {fold}: the dataset has {n_cases} training case(s), fewer than the {NNUNET_FOLDS} "
                           f"folds of nnU-Net's default split, so there is no fold {fold}; pass --fold all (every "
                           f"case) or write your own split to {splits}")
    if fold >= NNUNET_FOLDS:
        raise RankingError(f"--fold {fold}: nnU-Net's default split has folds 0-{NNUNET_FOLDS - 1}; pass one of them, "
                           f"'all', or write your own split to {splits}")


def _managers(plans: dict, configuration: str, dataset_json: dict):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    return plans_manager, configuration_manager, label_manager


# -- batches --------------------------------------------------------------------------------------
def case_order(identifiers: list[str], n_batches: int, batch_size: int, seed: int) -> list[list[str]]:
    """The cases of each batch: a seeded permutation of the cases, repeated as often as needed."""
    rng = np.random.RandomState(seed)
    needed = n_batches * batch_size
    order: list[str] = []
    while len(order) < needed:
        order.extend(identifiers[i] for i in rng.permutation(len(identifiers)))
    return [order[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]


def epoch_steps(target: TargetTask, plans: dict | None = None) -> int:
    """Steps of one pass over the target's (training) cases: ceil(cases / batch size)."""
    plans = plans or target.plans
    _, cm, _ = _managers(plans, target.configuration, target.dataset_json)
    folder = os.path.join(target.preprocessed_folder, cm.data_identifier)
    return max(1, math.ceil(len(_dataset(folder, target).identifiers) / cm.batch_size))


def _dataset(folder: str, target: TargetTask):
    """The preprocessed cases in ``folder``: all of them, or the fold's training cases (``target.cases``)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    if not os.path.isdir(folder) or not os.listdir(folder):
        raise CandidateSkipped(f"preprocessed data {folder} not found: run nnUNetv2_preprocess for these plans")
    dataset_class = infer_dataset_class(folder)
    if target.cases is None:
        return dataset_class(folder)
    missing = sorted(set(target.cases) - set(dataset_class.get_identifiers(folder)))
    if missing:
        raise CandidateSkipped(f"preprocessed data {folder} lacks the fold's training case(s) {', '.join(missing[:3])}"
                               f"{' ...' if len(missing) > 3 else ''}: preprocess the whole dataset for these plans")
    return dataset_class(folder, identifiers=list(target.cases))


def fixed_batches(target: TargetTask, plans: dict, n_batches: int, seed: int) -> list[dict]:
    """``n_batches`` batches ({"data", "target"}) of the target for the configuration in ``plans``:
    the same seed gives the same cases and crops."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    trainer = _ranking_trainer(plans, target)
    cm, lm = trainer.configuration_manager, trainer.label_manager
    dataset = _dataset(os.path.join(target.preprocessed_folder, cm.data_identifier), target)
    transforms = trainer.get_validation_transforms(
        trainer._get_deep_supervision_scales(), is_cascaded=False, foreground_labels=lm.foreground_labels,
        regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
    loader = nnUNetDataLoader(dataset, cm.batch_size, cm.patch_size, cm.patch_size, lm,
                              oversample_foreground_percent=0.33, transforms=transforms)
    batches_of_cases = case_order(list(dataset.identifiers), n_batches, cm.batch_size, seed)
    state = np.random.get_state()
    np.random.seed(seed)  # nnU-Net's crop positions come from the global numpy RNG
    try:
        batches = []
        for cases in batches_of_cases:
            loader.get_indices = lambda cases=cases: list(cases)
            batch = loader.generate_train_batch()
            batch["keys"] = list(cases)
            batches.append(batch)
    finally:
        np.random.set_state(state)
    return batches


# -- loss and optimiser -----------------------------------------------------------------------------
def _ranking_trainer(plans: dict, target: TargetTask):
    """The fine-tuning trainer whose network the ranking builds (:func:`build_acnorm_network`), for
    ``plans``: nnU-Net's loss and hyperparameters (:mod:`nnunet_acnorm.nnunet.training_step`)."""
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm
    from nnunet_acnorm.nnunet.training_step import construct_trainer

    return construct_trainer(nnUNetTrainerACNorm, plans, target.configuration, target.dataset_json)


def build_loss(plans: dict, target: TargetTask) -> nn.Module:
    """nnU-Net's training loss for these plans, with its deep-supervision weights
    (``nnUNetTrainer._build_loss`` of the fine-tuning trainer)."""
    from nnunet_acnorm.nnunet.training_step import build_loss as trainer_loss

    return trainer_loss(_ranking_trainer(plans, target))


def trainer_lr() -> float:
    """The learning rate the ranking's steps use by default: ``nnUNetTrainerACNorm``'s peak lr."""
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm

    return float(nnUNetTrainerACNorm.finetune_initial_lr)


def trainer_tau() -> float | str:
    """The temperature the ranking uses by default: ``nnUNetTrainerACNorm``'s (``ACNORM_TAU``)."""
    from nnunet_acnorm.nnunet.trainers import ACNORM_TAU

    return ACNORM_TAU


def finetune_optimizer(network: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """The fine-tuning trainer's optimiser (``nnUNetTrainer.configure_optimizers``: SGD, Nesterov,
    momentum 0.99, the trainer's weight decay) at ``lr`` (default: the trainer's peak lr)."""
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm
    from nnunet_acnorm.nnunet.training_step import build_optimizer, reference_trainer

    return build_optimizer(reference_trainer(nnUNetTrainerACNorm), network, trainer_lr() if lr is None else lr)


def nnunet_train_step(network: nn.Module, loss: nn.Module, optimizer: torch.optim.Optimizer,
                      device: torch.device):
    """One step as ``nnUNetTrainer.train_step`` (forward, loss, backward, clip to 12, SGD step; in
    float32, also on CUDA, without TF32 and with fixed cuDNN algorithms:
    :func:`nnunet_acnorm.nnunet.training_step.make_train_step`). A loss that is not finite skips the
    candidate."""
    from nnunet_acnorm.nnunet.training_step import make_train_step

    train_step = make_train_step(network, loss, optimizer, device, deterministic=True)

    def step(batch: dict) -> float:
        value = train_step(batch)
        if not math.isfinite(value):
            raise CandidateSkipped("the loss is not finite on the target batches (NaN/inf weights or a diverging "
                                   "step); try a smaller --lr")
        return value

    return step


# -- candidates -------------------------------------------------------------------------------------
@dataclass
class PreparedCandidate:
    path: str
    family: str
    plans: dict
    plans_identifier: str
    network: nn.Module
    loaded_keys: int
    notes: list[str] = field(default_factory=list)
    #: the checkpoint to fine-tune from with nnUNetv2_train -pretrained_weights
    pretrained_weights: str = ""


def build_acnorm_network(plans: dict, target: TargetTask, seed: int, tau: float | str | None = None) -> nn.Module:
    """The network ``nnUNetTrainerACNorm`` builds for these plans (deep supervision on), with its
    temperature (``tau`` None) or a fixed one (the paper defines AC-Corr at tau = 1, docs/method.md
    section 2)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_acnorm.norms import convert_to_acnorm
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm
    from nnunet_acnorm.nnunet.pretrained import set_strict_source

    plans_manager, cm, lm = _managers(plans, target.configuration, target.dataset_json)
    torch.manual_seed(seed)  # the fresh segmentation head is the same for every candidate of an architecture
    args = (plans_manager, cm, target.num_input_channels, lm.num_segmentation_heads, True)
    if tau is None:
        network = nnUNetTrainerACNorm.build_network_architecture(*args)
    else:  # the trainer's construction (trainers._acnorm_builder) with another temperature
        network = nnUNetTrainer.build_network_architecture(*args)
        convert_to_acnorm(network, tau=tau, set_source=False)
    set_strict_source(network, False)  # what -pretrained_weights does: plain pretrained weights set the source
    return network


def load_into(network: nn.Module, weights: dict[str, torch.Tensor], path: str) -> int:
    """nnU-Net's -pretrained_weights rule: every key except the head must be in ``weights`` with
    the same shape. Raises :class:`CandidateSkipped` naming the first misfit."""
    own = network.state_dict()
    keys = transferable_keys(canonical_keys(own))
    misfit = first_misfit(own, weights, keys)
    if misfit is not None and misfit.kind == "missing":
        raise CandidateSkipped(f"does not fit the planned network: key {misfit.key} is missing in the file")
    if misfit is not None and misfit.kind == "shape":
        raise CandidateSkipped(f"does not fit the planned network: {misfit.key} has shape {misfit.file_shape} in the "
                               f"file, {misfit.network_shape} in the network")
    if misfit is not None:
        raise CandidateSkipped(f"tensor {misfit.key} contains NaN or infinite values (corrupted or diverged checkpoint)")
    chosen = {key: weights[key] for key in keys}
    network.load_state_dict(chosen, strict=False)
    return len(chosen)


def _stem_input_channels(weights) -> int | None:
    key = weights.stem_weight_key
    if key and key in weights.state_dict and weights.state_dict[key].dim() >= 3:
        return int(weights.state_dict[key].shape[1])
    return weights.info.get("input_channels", weights.family.input_channels)


def _spatial_dims(fam, weights) -> int:
    """The file's own number of spatial dimensions where its stem convolution says (an nnU-Net v2
    checkpoint is 2D or 3D by its plans: the family's default of 3 is wrong for a 2d model), else the
    family's."""
    key = weights.stem_weight_key
    if key and key in weights.state_dict and weights.state_dict[key].dim() in (4, 5):
        return int(weights.state_dict[key].dim()) - 2
    return fam.spatial_dims


def _file_tag(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def prepare_candidate(path: str, target: TargetTask, seed: int, family: str | None = None,
                      trust_pickle: bool = False, adapt_input_channels: bool = False,
                      log: io.StringIO | None = None, tau: float | None = None) -> PreparedCandidate:
    """The AC-Norm network of ``path`` on the target, source affines = the file's affines.

    nnU-Net v2 checkpoints that fit the target plans are used as they are. Any other 3D file goes
    through ``nnUNetv2_acnorm_import`` (plans for its network, preprocessing if the intensity
    normalisation changes, an nnU-Net checkpoint); its plans are named
    ``<plans>__rank_<family>_<file hash>`` and reused by later rankings of the same file.
    """
    try:
        checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
        if family is not None and family not in FAMILIES:
            raise CandidateSkipped(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
        # a DDP/DataParallel save (every key under 'module.') is stripped when that makes it recognisable
        fam, checkpoint, stripped_prefix = resolve_family(checkpoint, path, family)
        weights = apply_family(fam, checkpoint, path)
        if stripped_prefix is not None:
            weights.info["stripped_prefix"] = stripped_prefix
    except PretrainedLoadError as e:
        raise CandidateSkipped(str(e).replace(f"{path}: ", "", 1)) from None
    dims = _spatial_dims(fam, weights)
    if dims != len(target.plans["configurations"][target.configuration]["patch_size"]):
        raise CandidateSkipped(f"a {dims}D {fam.name} network ({weights.description}) does not fit the "
                               f"{target.configuration} configuration")
    stem_channels = _stem_input_channels(weights)
    if stem_channels is not None and stem_channels != target.num_input_channels and not adapt_input_channels:
        raise CandidateSkipped(f"pretrained on {stem_channels} input channel(s), the target has "
                               f"{target.num_input_channels}; pass --adapt_input_channels to rank it with an adapted "
                               "stem (as nnUNetv2_acnorm_import does)")
    notes: list[str] = []
    if weights.info.get("stripped_prefix"):
        # through the import, which writes a checkpoint without the prefix for nnUNetv2_train -pretrained_weights
        notes.append(f"every key was under '{weights.info['stripped_prefix']}' (a DDP/DataParallel save): stripped")
    if fam.name == "nnunet_v2" and not weights.info.get("stripped_prefix"):
        network = build_acnorm_network(target.plans, target, seed, tau)
        try:
            raw = checkpoint["network_weights"]
            loaded = load_into(network, raw, path)
            return PreparedCandidate(path, fam.name, target.plans, target.plans_identifier, network, loaded,
                                     ["fits the target plans as it is"], os.path.abspath(path))
        except CandidateSkipped as e:
            notes.append(f"target plans: {e}; imported with its own architecture")
    return _prepare_by_import(weights, target, seed, notes, log, tau)


def _prepare_by_import(weights, target: TargetTask, seed: int, notes: list[str], log,
                       tau: float | None = None) -> PreparedCandidate:
    """The candidate through ``nnUNetv2_acnorm_import``, or through an earlier import of the same
    weights onto the same plans (:mod:`nnunet_acnorm.ranking.imports`)."""
    path, family = weights.path, weights.family.name
    plans_name = f"{target.plans_identifier}__rank_{family}_{_file_tag(path)}"
    earlier = earlier_import(weights, target.preprocessed_folder, target.plans_identifier, target.configuration,
                             first=plans_name)
    if earlier is None:
        plans_file, checkpoint_file, data_note = _import_for_ranking(weights, target, plans_name, log)
        notes += [f"imported as plans {plans_name}", data_note]
    else:
        plans_name, plans_file, checkpoint_file = earlier.plans_name, earlier.plans_file, earlier.checkpoint_file
        notes.append(f"reused the earlier import of these weights: plans {plans_name}")
    with open(plans_file) as f:
        plans = json.load(f)
    imported = read_checkpoint(checkpoint_file)
    network = build_acnorm_network(plans, target, seed, tau)
    loaded = load_into(network, imported["network_weights"], checkpoint_file)
    fresh = transferable_keys(imported.get("acnorm_import", {}).get("fresh_keys", []))
    if fresh:
        notes.append(f"{len(fresh)} non-head tensors start fresh (not in the file)")
    return PreparedCandidate(path, family, plans, plans_name, network, loaded, notes, checkpoint_file)


def _import_for_ranking(weights, target: TargetTask, plans_name: str, log) -> tuple[str, str, str]:
    """``nnUNetv2_acnorm_import`` of ``weights`` as ``plans_name``, with preprocessed data shared where
    the preprocessing is the same; returns (plans file, checkpoint file, a note on the data)."""
    from nnunet_acnorm.nnunet.plans import import_pretrained

    echo = (lambda line: print(line, file=log)) if log is not None else (lambda line: None)
    checkpoint_file = default_checkpoint(target.preprocessed_folder, plans_name, target.configuration)
    try:  # the weights read above: the file is read and its family detected once
        result = import_pretrained(target.dataset_name, target.configuration, weights,
                                   source_plans=target.plans_identifier, plans_name=plans_name,
                                   output=checkpoint_file, num_processes=1, preprocess=False, overwrite=True,
                                   echo=echo)
    except InputError as e:
        raise CandidateSkipped(str(e).replace(f"{weights.path}: ", "", 1)) from None
    note = provide_preprocessed_data(target.dataset_name, result.plans_file, target.configuration)
    echo(note)
    return result.plans_file, checkpoint_file, note
