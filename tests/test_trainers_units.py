"""Fast tests of the trainer pieces: schedule, discovery hook, pretrained-weights check, BN trainer."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnunet_acnorm.nnunet.discovery import trainer_shim_folder, with_trainer_folder
from nnunet_acnorm.nnunet.plain_unet_plans import default_plans
from nnunet_acnorm.finetuning.schedules import WarmupPolyLRScheduler

REPO = Path(__file__).resolve().parents[1]


def test_warmup_then_poly_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = WarmupPolyLRScheduler(opt, peak_lr=1e-3, max_epochs=100, warmup_epochs=10)
    lrs = []
    for epoch in range(100):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])), "linear warm-up rises"
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[10] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[10:-1], lrs[11:])), "poly decay falls"
    assert 0 < lrs[-1] < 1e-4
    with pytest.raises(ValueError, match="warmup_epochs"):
        WarmupPolyLRScheduler(opt, 1e-3, max_epochs=5, warmup_epochs=5)


def test_schedule_attributes_are_overridable():
    from nnunet_acnorm.nnunet.schedule_trainers import nnUNetTrainerACNorm_50epochs
    from nnunet_acnorm.nnunet.trainer_registry import TRAINERS
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm, nnUNetTrainerFinetune

    assert nnUNetTrainerACNorm_50epochs.finetune_num_epochs == 50
    # the recipe (docs/experiments.md): nnU-Net's peak lr with a warm-up, every patch on foreground
    assert nnUNetTrainerACNorm.finetune_initial_lr == nnUNetTrainerFinetune.finetune_initial_lr == 1e-2
    assert nnUNetTrainerACNorm.finetune_oversample_foreground == 1.0
    assert nnUNetTrainerACNorm.warmup_fraction == 0.1
    for name in ("nnUNetTrainerACNorm", "nnUNetTrainerACNormBN", "nnUNetTrainerFinetune", "nnUNetTrainerFinetuneBN",
                 "nnUNetTrainerACNorm_tau1", "nnUNetTrainerACNorm_tauAuto", "nnUNetTrainerACNormBN_tau1",
                 "nnUNetTrainerACNormBN_tauAuto"):
        assert name in TRAINERS


@pytest.mark.parametrize("name,mode,norm", [("nnUNetTrainerACNorm", "auto", "ACInstanceNorm3d"),
                                            ("nnUNetTrainerACNorm_tau1", "fixed", "ACInstanceNorm3d"),
                                            ("nnUNetTrainerACNormBN", "auto", "ACBatchNorm3d"),
                                            ("nnUNetTrainerACNormBN_tau1", "fixed", "ACBatchNorm3d")])
def test_temperature_of_each_trainer(name, mode, norm):
    """The default temperature is calibrated per layer; the _tau1 variants keep the paper's 1."""
    from nnunet_acnorm.norms import acnorm_modules
    from nnunet_acnorm.nnunet.trainer_registry import TRAINERS

    plans = _plans(norm="torch.nn.modules.batchnorm.BatchNorm3d") if "BN" in name else _plans()
    layers = acnorm_modules(_build(TRAINERS[name], plans)).values()
    assert layers and {m.tau_mode for m in layers} == {mode} and {type(m).__name__ for m in layers} == {norm}


def test_with_trainer_folder_appends_once_and_keeps_user_folders():
    folder = trainer_shim_folder()
    assert with_trainer_folder(None) == folder
    value = with_trainer_folder(os.pathsep.join(["/a", "/b"]))
    assert value.split(os.pathsep) == ["/a", "/b", folder]
    assert with_trainer_folder(value) == value


def test_start_up_hook_appends_without_clobbering(tmp_path):
    """_nnunet_acnorm_env (run by the .pth at interpreter start) next to a package copy."""
    (tmp_path / "nnunet_acnorm" / "nnunet" / "nnunet_ext").mkdir(parents=True)
    (tmp_path / "_nnunet_acnorm_env.py").write_text((REPO / "_nnunet_acnorm_env.py").read_text())
    folder = str(tmp_path / "nnunet_acnorm" / "nnunet" / "nnunet_ext")
    code = "import _nnunet_acnorm_env, os, sys; print(os.environ.get('nnUNet_extTrainer', '')); " \
           "print('torch' in sys.modules)"
    for preset, expected in ((None, [folder]), ("/mine", ["/mine", folder]),
                             (os.pathsep.join(["/mine", folder]), ["/mine", folder])):
        env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
        if preset is not None:
            env["nnUNet_extTrainer"] = preset
        # -S: no site initialisation, so an installed copy's .pth cannot run first and add its own folder
        out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                             text=True, check=True).stdout.splitlines()
        assert out[0].split(os.pathsep) == expected
        assert out[1] == "False", "the start-up hook must not import torch"


def test_trainer_path_command_prints_the_shim_folder():
    from tests.factories.nnunet import run_console

    out = run_console("nnUNetv2_acnorm_trainer_path").stdout.strip()
    # the console script runs the installed package (site-packages after a regular install, this
    # checkout after an editable one): the same shim folder, wherever it lives
    assert Path(out).is_dir() and Path(out).parts[-3:] == Path(trainer_shim_folder()).parts[-3:]
    shims = sorted(p.name for p in Path(out).glob("*.py"))
    assert shims and shims == sorted(p.name for p in Path(trainer_shim_folder()).glob("*.py"))
    assert not (Path(out) / "__init__.py").exists()
    env = dict(os.environ, nnUNet_extTrainer="/mine")
    appended = run_console("nnUNetv2_acnorm_trainer_path", "--append", env=env).stdout.strip()
    assert appended.split(os.pathsep) == ["/mine", out]


def test_nnunet_finds_the_real_classes_through_the_shim_folder():
    """nnU-Net's own lookup (what nnUNetv2_train -tr does) returns the package's classes, schedule
    variants included: those of a baseline trainer too, although nnU-Net imports the baseline shim
    (and with it the registry) before the schedule shim."""
    code = ("import pickle\n"
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
            "for n in ('nnUNetTrainerACNorm', 'nnUNetTrainerACNormBN', 'nnUNetTrainerFinetune', "
            "'nnUNetTrainerACNorm_1epoch', 'nnUNetTrainerFinetune_20epochs', 'nnUNetTrainerL2SP_5epochs', "
            "'nnUNetTrainerACNormBN_tau1_10epochs', 'nnUNetTrainerACNorm_100epochs'):\n"
            "    c = f(n)\n"
            "    from nnunet_acnorm.nnunet.trainer_registry import TRAINERS\n"
            "    assert c is TRAINERS[n] and pickle.loads(pickle.dumps(c)) is c, n\n"
            "assert f('nnUNetTrainerL2SP_5epochs').finetune_num_epochs == 5\n"
            "print('ok')\n")
    env = dict(os.environ, nnUNet_extTrainer=trainer_shim_folder())
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_every_finetuning_trainer_has_its_schedule_variants():
    """nnU-Net's _Xepochs naming for every fine-tuning trainer of the registry, each variant one idea:
    the base class with finetune_num_epochs set, nothing else. A trainer module registered after the
    schedule module was imported would miss its variants: this fails then."""
    import pickle

    from nnunet_acnorm.nnunet.schedule_trainers import (SCHEDULE_EPOCHS, SCHEDULE_TRAINERS, has_schedule_variants,
                                                        schedule_name)
    from nnunet_acnorm.nnunet.trainer_registry import TRAINERS

    bases = {n: c for n, c in TRAINERS.items() if has_schedule_variants(c)}
    assert {"nnUNetTrainerACNorm", "nnUNetTrainerFinetune", "nnUNetTrainerACNormBN", "nnUNetTrainerL2SP",
            "nnUNetTrainerStochNormBN"} <= set(bases)
    assert SCHEDULE_EPOCHS[:4] == (1, 5, 10, 20) and schedule_name("X", 1) == "X_1epoch"
    for name, base in bases.items():
        for epochs in SCHEDULE_EPOCHS:
            variant = TRAINERS[schedule_name(name, epochs)]
            assert SCHEDULE_TRAINERS[variant.__name__] is variant and variant.__bases__ == (base,)
            assert variant.finetune_num_epochs == epochs and pickle.loads(pickle.dumps(variant)) is variant
            assert {k for k in vars(variant) if not k.startswith("__")} == {"finetune_num_epochs"}
    assert len(SCHEDULE_TRAINERS) == len(bases) * len(SCHEDULE_EPOCHS)


def test_entry_boundary_turns_input_errors_into_one_line(monkeypatch):
    """An InputError ends a trainer's entry methods (what nnU-Net calls) as SystemExit('<trainer>: error:
    <message>'), the one line nnUNetv2_train prints: in the methods a mixin or a subclass overrides too,
    in every trainer of the registry; any other error passes unchanged; __init__ keeps its signature
    (nnU-Net records the init arguments by name)."""
    import inspect

    from nnunet_acnorm.errors import InputError
    from nnunet_acnorm.nnunet.seeding import SEED_ENV
    from nnunet_acnorm.nnunet.trainer_entry import ENTRY_METHODS
    from nnunet_acnorm.nnunet.trainer_registry import TRAINERS
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerFinetune

    class _Mixin:
        def load_checkpoint(self, filename_or_checkpoint):
            raise InputError(f"{filename_or_checkpoint} is bad")

        def initialize(self):
            raise RuntimeError("not an input error")

    class nnUNetTrainerBoundaryTest(_Mixin, nnUNetTrainerFinetune):
        pass

    trainer = object.__new__(nnUNetTrainerBoundaryTest)
    with pytest.raises(SystemExit) as exit_info:
        trainer.load_checkpoint("x.pth")
    assert exit_info.value.code == "nnUNetTrainerBoundaryTest: error: x.pth is bad"
    with pytest.raises(RuntimeError, match="not an input error"):
        trainer.initialize()
    assert list(inspect.signature(nnUNetTrainerBoundaryTest.__init__).parameters) == \
        ["self", "plans", "configuration", "fold", "dataset_json", "device"]
    for cls in [nnUNetTrainerBoundaryTest, *TRAINERS.values()]:
        unwrapped = [name for name in ENTRY_METHODS if not getattr(getattr(cls, name), "input_error_boundary", False)]
        assert not unwrapped, (cls.__name__, unwrapped)
    monkeypatch.delenv("nnUNet_results", raising=False)
    monkeypatch.setenv(SEED_ENV, "abc")  # raised by seeding.resolve_seed in the constructor
    with pytest.raises(SystemExit) as exit_info:
        nnUNetTrainerFinetune(_plans(), "3d_fullres", 0, {}, torch.device("cpu"))
    assert exit_info.value.code.startswith(f"nnUNetTrainerFinetune: error: {SEED_ENV}='abc' is not an integer")


# -- networks built from plans, in process -----------------------------------------------------
def _plans(norm="torch.nn.modules.instancenorm.InstanceNorm3d") -> dict:
    return default_plans((16, 16, 16), (4, 8, 16), 3, norm=norm, configuration="3d_fullres")


def _build(trainer_class, plans=None):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(copy.deepcopy(plans or _plans()))
    return trainer_class.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3)


def test_acnorm_network_loads_plain_checkpoint_through_stock_loader(tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_acnorm.norms import ACInstanceNorm3d, acnorm_modules
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm
    from nnunet_acnorm.nnunet.pretrained import set_strict_source

    plain = _build(nnUNetTrainer)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    torch.save({"network_weights": plain.state_dict()}, tmp_path / "pre.pth")
    net = _build(nnUNetTrainerACNorm)
    assert set(net.state_dict()) == set(plain.state_dict()), "unset sources add no keys"
    set_strict_source(net, False)  # what nnUNetv2_train -pretrained_weights switches on
    load_pretrained_weights(net, str(tmp_path / "pre.pth"))
    layers = acnorm_modules(net)
    assert layers and all(isinstance(m, ACInstanceNorm3d) and m.source_is_set for m in layers.values())
    ref = plain.state_dict()
    for name, m in layers.items():
        assert torch.equal(m.source_weight, ref[name + ".weight"]) and torch.equal(m.weight, ref[name + ".weight"])
    # a fresh network loads the (now larger) state dict strictly: what --c, --val and predict do
    fresh = _build(nnUNetTrainerACNorm)
    fresh.load_state_dict(net.state_dict(), strict=True)
    assert all(m.source_is_set for m in acnorm_modules(fresh).values())


def test_bn_trainer_builds_acbatchnorm_and_folds_to_batchnorm(tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerBN import nnUNetTrainerBN

    from nnunet_acnorm.norms import ACBatchNorm3d, acnorm_modules, fold_acnorm
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNormBN, nnUNetTrainerFinetuneBN
    from nnunet_acnorm.nnunet.pretrained import set_strict_source

    plain = _build(nnUNetTrainerBN)
    plain.train()
    plain(torch.randn(2, 1, 16, 16, 16))  # give the running statistics values
    torch.save({"network_weights": plain.state_dict()}, tmp_path / "bn.pth")
    net = _build(nnUNetTrainerACNormBN)
    assert all(isinstance(m, ACBatchNorm3d) for m in acnorm_modules(net).values())
    set_strict_source(net, False)  # what nnUNetv2_train -pretrained_weights switches on
    load_pretrained_weights(net, str(tmp_path / "bn.pth"))
    baseline = _build(nnUNetTrainerFinetuneBN)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in baseline.modules())
    net.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        before = net(x)[0]
        fold_acnorm(net)
        after = net(x)[0]
    assert torch.allclose(before, after, atol=1e-5)
    assert not acnorm_modules(net)


def test_pretrained_check_names_key_and_both_shapes(tmp_path):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm
    from nnunet_acnorm.nnunet.pretrained import (PretrainedWeightsError, check_pretrained_weights,
                                                         pretrained_weights_from_argv)

    net = _build(nnUNetTrainerACNorm)
    other = _plans()
    other["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32]
    torch.save({"network_weights": _build(nnUNetTrainer, other).state_dict()}, tmp_path / "wide.pth")
    with pytest.raises(PretrainedWeightsError, match=r"first mismatching key '.*' has shape \(8, 1, 3, 3, 3\) in the "
                                                      r"checkpoint but \(4, 1, 3, 3, 3\) in the network"):
        check_pretrained_weights(net, str(tmp_path / "wide.pth"))
    deeper = _plans()
    arch = deeper["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch.update(n_stages=2, features_per_stage=[4, 8], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]],
                n_conv_per_stage=[2, 2], n_conv_per_stage_decoder=[2])
    torch.save({"network_weights": _build(nnUNetTrainer, deeper).state_dict()}, tmp_path / "shallow.pth")
    with pytest.raises(PretrainedWeightsError, match="is missing in the checkpoint"):
        check_pretrained_weights(net, str(tmp_path / "shallow.pth"))
    nan = _build(nnUNetTrainer).state_dict()
    first_key = next(iter(nan))
    nan[first_key] = torch.full_like(nan[first_key], float("nan"))
    torch.save({"network_weights": nan}, tmp_path / "nan.pth")
    with pytest.raises(PretrainedWeightsError, match="NaN"):
        check_pretrained_weights(net, str(tmp_path / "nan.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="cannot load checkpoint"):
        check_pretrained_weights(net, str(tmp_path / "junk.pth"))
    assert pretrained_weights_from_argv(["x", "-pretrained_weights", "a.pth"]) == "a.pth"
    assert pretrained_weights_from_argv(["x", "-pretrained_weights=b.pth"]) == "b.pth"
    assert pretrained_weights_from_argv(["x", "--c"]) is None


def test_untrusted_checkpoint_is_not_executed(tmp_path):
    from nnunet_acnorm.nnunet.pretrained import load_nnunet_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"network_weights": {}, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        load_nnunet_checkpoint(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name", ["nnUNetTrainerL2SP", "nnUNetTrainerDELTA"])
def test_only_rank_0_gathers_and_writes_the_method_state(name, tmp_path):
    """issue 25 G3 for the baselines: save_checkpoint checks the rank before it gathers the method's
    state (the anchor or frozen copy); a rank != 0 neither computes it nor writes anything."""
    from nnunet_acnorm.nnunet.baseline_trainers import TRAINERS

    cls = TRAINERS[name]
    assert cls.method_has_state
    gathered = []

    class Rank1(cls):
        def method_state(self):
            gathered.append(self.local_rank)
            return {"anchor": torch.zeros(1)}

    trainer = object.__new__(Rank1)  # the attributes save_checkpoint reads; no training is set up
    trainer.local_rank, trainer.disable_checkpointing = 1, False
    trainer.save_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    assert gathered == [] and list(tmp_path.iterdir()) == []
