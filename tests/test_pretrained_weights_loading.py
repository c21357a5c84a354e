"""``nnUNetv2_train -pretrained_weights`` in our trainers, through nnU-Net's own
``run_training.maybe_load_checkpoint`` (what ``nnUNetv2_train`` calls) on real trainer objects, in
process (a tiny network, no data, no training):

- the file is read once: a file swapped for one with pickled code after our check is never read
  again (nnU-Net's loader would reopen the path with ``weights_only=False``);
- ``pretrained_parts``: the ``_encoderOnly`` trainers load the encoder and stem only; with AC-Norm
  the fresh decoder keeps plain norms;
- convolution kernels of another spatial size are bridged, other widths refused with one line;
- a network with LayerNorm only is refused by the AC-Norm trainers with one line.
"""
import os
import sys

import pytest
import torch

from nnunet_acnorm.checkpoints.io import safe_torch_load
from nnunet_acnorm.nnunet.plain_unet_plans import default_dataset_json, default_plans
from tests.factories import checkpoints as cf

CONFIG = "3d_fullres"


def _plans(kernels=None, features=(4, 8, 16)):
    plans = default_plans((16, 16, 16), features, 3, configuration=CONFIG)
    if kernels is not None:
        plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]["kernel_sizes"] = kernels
    return plans


def _source(path, plans=None, seed=1):
    """An nnU-Net checkpoint of the tiny network of ``plans`` (norm affines randomised)."""
    return cf.save_nnunet_v2_checkpoint(path, plans=plans or _plans(), configuration=CONFIG, seed=seed)


@pytest.fixture
def start(tmp_path, monkeypatch):
    """``start(trainer_class, pretrained, plans)``: construct the trainer as nnUNetv2_train does and run
    nnU-Net's ``maybe_load_checkpoint`` with ``-pretrained_weights pretrained``; returns the trainer."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_compile", "false")
    data = tmp_path / "preprocessed" / "Dataset999_Bench" / "bench"  # initialize() infers the dataset class
    data.mkdir(parents=True)
    (data / "case_000.b2nd").write_bytes(b"")

    def run(trainer_class, pretrained, plans=None, command_line=True):
        """``command_line=False``: nnU-Net used as a Python API (no -pretrained_weights in sys.argv)."""
        flag = ["-pretrained_weights", str(pretrained)] if command_line else []
        monkeypatch.setattr(sys, "argv", ["nnUNetv2_train", "999", CONFIG, "0", "-tr", trainer_class.__name__,
                                          *flag, "-device", "cpu"])
        plans = {**(plans or _plans()), "continue_training": False}  # what get_trainer_from_args adds
        trainer = trainer_class(plans, CONFIG, 0, default_dataset_json(3), torch.device("cpu"))
        maybe_load_checkpoint(trainer, False, False, str(pretrained))
        return trainer

    return run


class Payload:
    """Pickled code: unpickling it creates the folder ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_swapped_pretrained_file_is_never_reopened(start, tmp_path, monkeypatch):
    """issue 31 item 2: the bytes checked are the bytes loaded. The file is swapped for one that runs
    pickled code right after our check has read it; on main, nnU-Net's loader then reopened the path
    with weights_only=False and ran it."""
    from nnunet_acnorm.nnunet import pretrained as pretrained_module
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm

    good = _source(tmp_path / "checkpoint_final.pth")
    marker = tmp_path / "pickled_code_ran"
    evil_state = safe_torch_load(good)
    evil_state["network_weights"] = {k: torch.zeros_like(v) for k, v in evil_state["network_weights"].items()}
    evil_state["payload"] = Payload(marker)
    evil = tmp_path / "evil.pth"
    torch.save(evil_state, evil)
    expected = safe_torch_load(good)["network_weights"]
    read = pretrained_module.load_nnunet_checkpoint
    reads = []

    def read_then_swap(fname, *args, **kwargs):  # the attacker replaces the file once it has been checked
        checkpoint = read(fname, *args, **kwargs)
        reads.append(fname)
        if os.path.abspath(fname) == os.path.abspath(good) and os.path.exists(evil):
            os.replace(evil, good)
        return checkpoint

    monkeypatch.setattr(pretrained_module, "load_nnunet_checkpoint", read_then_swap)
    trainer = start(nnUNetTrainerACNorm, good)
    assert reads == [str(good)]  # our check read it, and nothing else did
    assert not marker.exists(), "the swapped file's pickled code ran"
    loaded = trainer.network.state_dict()
    key = "encoder.stages.1.0.convs.0.conv.weight"
    assert torch.equal(loaded[key], expected[key])  # the checked tensors, not the swapped file's zeros
    assert torch.equal(loaded["encoder.stages.0.0.convs.0.norm.source_weight"],
                       expected["encoder.stages.0.0.convs.0.norm.weight"])
    # the payload is live: plain unpickling of the swapped-in file runs it
    assert not marker.exists()
    with open(good, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()


def test_python_api_pretrained_weights_are_read_safely_too(start, tmp_path):
    """run_training(..., pretrained_weights=...) as a Python API (nothing in sys.argv): our trainers
    still read the file once with weights_only=True; a file with pickled code is refused, not run."""
    from nnunet_acnorm.nnunet.pretrained import PretrainedWeightsError
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm

    good = _source(tmp_path / "checkpoint_final.pth")
    trainer = start(nnUNetTrainerACNorm, good, command_line=False)
    expected = safe_torch_load(good)["network_weights"]
    assert torch.equal(trainer.network.state_dict()["encoder.stages.0.0.convs.1.norm.source_bias"],
                       expected["encoder.stages.0.0.convs.1.norm.bias"])
    trainer._fold_lock.release()  # that run is over (the lock is otherwise held until its process ends)
    marker = tmp_path / "pickled_code_ran"
    evil = safe_torch_load(good)
    evil["payload"] = Payload(marker)
    torch.save(evil, tmp_path / "evil.pth")
    with pytest.raises(PretrainedWeightsError, match=r"evil\.pth: it needs arbitrary pickled Python objects \(it "
                                                     r"pickles posix\.mkdir\)"):
        start(nnUNetTrainerACNorm, tmp_path / "evil.pth", command_line=False)
    assert not marker.exists()


def test_encoder_only_trainers_load_encoder_and_keep_decoder_norms_plain(start, tmp_path):
    from nnunet_acnorm.norms import acnorm_modules
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm_encoderOnly, nnUNetTrainerFinetune_encoderOnly

    path = _source(tmp_path / "checkpoint_final.pth")
    file = safe_torch_load(path)["network_weights"]
    acnorm = start(nnUNetTrainerACNorm_encoderOnly, path)
    state, layers = acnorm.network.state_dict(), acnorm_modules(acnorm.network)
    assert layers and all(name.startswith("encoder.") for name in layers)
    assert isinstance(acnorm.network.decoder.stages[0].convs[0].norm, torch.nn.InstanceNorm3d)  # plain
    for name, layer in layers.items():
        assert torch.equal(layer.source_weight, file[f"{name}.weight"]), name
    assert torch.equal(state["encoder.stages.2.0.convs.1.conv.weight"], file["encoder.stages.2.0.convs.1.conv.weight"])
    for key in ("decoder.stages.0.convs.0.conv.weight", "decoder.stages.0.convs.0.norm.weight",
                "decoder.transpconvs.0.weight"):
        assert not torch.equal(state[key], file[key]), key  # fresh
    vanilla = start(nnUNetTrainerFinetune_encoderOnly, path).network.state_dict()
    assert not acnorm_modules_of(vanilla)
    assert torch.equal(vanilla["encoder.stages.0.0.convs.0.norm.weight"], file["encoder.stages.0.0.convs.0.norm.weight"])
    assert not torch.equal(vanilla["decoder.stages.1.convs.1.norm.weight"], file["decoder.stages.1.convs.1.norm.weight"])


def acnorm_modules_of(state: dict) -> list[str]:
    return [k for k in state if k.endswith(".source_weight")]


def test_encoder_only_needs_only_the_encoder_in_the_file(start, tmp_path):
    """An encoder-only file (nnssl SimCLR-type, or a decoder of another depth) starts the _encoderOnly
    trainers; the all-parts trainer names the first missing decoder key."""
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm, nnUNetTrainerACNorm_encoderOnly

    checkpoint = safe_torch_load(_source(tmp_path / "full.pth"))
    checkpoint["network_weights"] = {k: v for k, v in checkpoint["network_weights"].items() if k.startswith("encoder.")}
    torch.save(checkpoint, tmp_path / "encoder.pth")
    trainer = start(nnUNetTrainerACNorm_encoderOnly, tmp_path / "encoder.pth")
    assert torch.equal(trainer.network.state_dict()["encoder.stages.1.0.convs.1.norm.source_bias"],
                       checkpoint["network_weights"]["encoder.stages.1.0.convs.1.norm.bias"])
    with pytest.raises(SystemExit, match=r"key 'decoder\..*' .* is missing in the checkpoint"):
        start(nnUNetTrainerACNorm, tmp_path / "encoder.pth")


def test_imported_fresh_norms_are_named_in_the_log(start, tmp_path):
    """A checkpoint of nnUNetv2_acnorm_import whose decoder was initialised fresh (an encoder-only
    file) given to nnUNetTrainerACNorm: the log names the AC-Norm layers whose source is that
    initialisation and points to the _encoderOnly trainers."""
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm

    checkpoint = safe_torch_load(_source(tmp_path / "full.pth"))
    fresh = [k for k in checkpoint["network_weights"] if k.startswith("decoder.stages.")]
    checkpoint["acnorm_import"] = {"plans": "nnUNetPlans", "fresh_keys": fresh}
    torch.save(checkpoint, tmp_path / "imported.pth")
    trainer = start(nnUNetTrainerACNorm, tmp_path / "imported.pth")
    log = open(trainer.log_file).read()
    assert "WARNING: 4 AC-Norm layer(s) (first: decoder.stages.0.convs.0.norm) have affines in this checkpoint that " \
           "nnUNetv2_acnorm_import initialised fresh" in log and "The _encoderOnly trainers" in log


def test_kernel_sizes_are_bridged_and_widths_refused(start, tmp_path):
    """Target plans with [1, 3, 3] kernels in the first stage (anisotropic spacing), a checkpoint with
    [3, 3, 3]: the kernels are summed over the dropped axis (same response to an input constant along
    it); a checkpoint of other widths is refused with one line."""
    from nnunet_acnorm.nnunet.trainers import nnUNetTrainerACNorm

    path = _source(tmp_path / "iso.pth")
    file = safe_torch_load(path)["network_weights"]
    anisotropic = _plans(kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3]])
    state = start(nnUNetTrainerACNorm, path, anisotropic).network.state_dict()
    key = "encoder.stages.0.0.convs.1.conv.weight"
    assert state[key].shape == (4, 4, 1, 3, 3)
    assert torch.allclose(state[key], file[key].sum(dim=2, keepdim=True))
    assert torch.equal(state["encoder.stages.1.0.convs.0.conv.weight"], file["encoder.stages.1.0.convs.0.conv.weight"])
    log = open(next((tmp_path / "results").rglob("training_log_*.txt"))).read()
    assert f"kernel bridged: {key}: kernel [3, 3, 3] -> [1, 3, 3]" in log
    wide = _source(tmp_path / "wide.pth", _plans(features=(8, 16, 32)))
    with pytest.raises(SystemExit, match=r"first mismatching key 'encoder\.stages\.0\.0\.convs\.0\.conv\.weight' has "
                                         r"shape \(8, 1, 3, 3, 3\) in the checkpoint but \(4, 1, 3, 3, 3\)"):
        start(nnUNetTrainerACNorm, wide)


def test_acnorm_trainer_refuses_a_layernorm_only_network(start, tmp_path):
    """A trainer whose network has LayerNorm only (a Primus, as nnU-Net's Primus trainers build it)
    stops with the line that says AC-Norm cannot apply and which trainer to use."""
    from dynamic_network_architectures.architectures.primus import Primus

    from nnunet_acnorm.nnunet.trainers import _acnorm_builder, nnUNetTrainerACNorm

    def primus(plans_manager, configuration_manager, num_input_channels, num_output_channels,
               enable_deep_supervision=True):
        return Primus(num_input_channels, 48, (8, 8, 8), num_output_channels, eva_depth=1, eva_numheads=2,
                      input_shape=(16, 16, 16))

    class nnUNetTrainerACNormPrimusTest(nnUNetTrainerACNorm):
        build_network_architecture = _acnorm_builder(primus, 1.0)

        def set_deep_supervision_enabled(self, enabled):  # Primus has no deep supervision
            pass

    path = tmp_path / "primus.pth"
    torch.save({"network_weights": primus(None, None, 1, 3).state_dict()}, path)
    with pytest.raises(SystemExit, match="AC-Norm cannot apply: the planned network \\(Primus\\) has 6 LayerNorm/RMSNorm "
                                         "layer.*nnUNetTrainerFinetune"):
        start(nnUNetTrainerACNormPrimusTest, path)
    assert not list((tmp_path / "results").rglob("training_log_*"))  # the refused start left nothing behind
