"""What runs where users train, checked on the CPU: the reload cost of calibrated temperatures,
a classification step without host reads, the ranking's float32 determinism guard, the
benchmarks' nnU-Net-like precision defaults, and scripts/gpu_check.sh (its no-GPU refusal and its
report format). The CUDA-only checks are tests/test_gpu.py (run by scripts/gpu_check.sh)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nnunet_acnorm.norms import functional

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def _benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


# -- G5: the calibrated temperature is computed once per source ----------------------------------
def test_reloading_the_same_weights_runs_no_calibration(monkeypatch):
    """nnU-Net's predictor loads the weights per case and fold; an nnU-Net network reaches each
    encoder layer under two names. Only the first load of a source calibrates (bisects)."""
    bench = _benchmark_module("benchmark_tau_reload")
    networks, state = bench.build_networks([4, 8, 16], [16, 16, 16])
    calls = []
    original = functional.source_diagonal
    monkeypatch.setattr(functional, "source_diagonal", lambda *a: calls.append(1) or original(*a))
    getattr(functional, "_CALIBRATED", {}).clear()   # nothing calibrated yet
    networks["auto"].load_state_dict(state)
    first = len(calls)
    taus = [m.tau for m in networks["auto"].modules() if hasattr(m, "tau_calibrated") and m.tau_calibrated]
    networks["auto"].load_state_dict(state)
    assert first > 0 and len(taus) > 0
    assert len(calls) == first, f"a reload of the same weights ran {len(calls) - first} diagonal evaluations"
    assert taus == [m.tau for m in networks["auto"].modules() if hasattr(m, "tau_calibrated") and m.tau_calibrated]


def test_tau_reload_benchmark_reports_the_ratio_in_one_run():
    bench = _benchmark_module("benchmark_tau_reload")
    result = bench.run(bench.QUICK["features"][:3], [16, 16, 16], repetitions=2)
    assert result["layer_loads"] > result["layers"] > 0, "the network reaches no layer under two names"
    assert result["new_calibrations_per_reload"] == 0
    low, high = result["reload_ratio_interval"]
    assert low <= result["reload_ratio_auto_over_tau1"] <= high and math.isfinite(result["reload_ratio_auto_over_tau1"])


# -- G8: a classification training step reads nothing back from the device ------------------------
@pytest.mark.parametrize("method", ["acnorm", "bss"])
def test_classification_train_step_makes_no_host_read(tmp_path, method):
    """On the meta device every value read on the host raises: the step (forward, penalty, backward,
    clipping, SGD) must not read one (it tested isfinite and called .item() each step)."""
    from nnunet_acnorm.classification.trainer import TRAINERS, ClassificationTrainer

    cls = ClassificationTrainer if method == "acnorm" else next(
        t for t in TRAINERS.values() if getattr(t, "method_name", None) == method)
    config = {"architecture": "resnet", "dim": 2, "depth": 18, "num_classes": 3, "tau": 1.0, "initial_lr": 0.01,
              "weight_decay": 3e-5, "num_epochs": 1, "pretrained_family": None}
    trainer = cls(config, 0, str(tmp_path), torch.device("meta"), show_progress=False)
    trainer.print_to_log_file = lambda *a, **k: None
    trainer.initialize(None)
    trainer.loss = nn.CrossEntropyLoss().to("meta")
    trainer.network.train()
    losses = [trainer.train_step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])) for _ in range(2)]
    assert all(isinstance(loss, torch.Tensor) and loss.device.type == "meta" and loss.dim() == 0 for loss in losses)


def test_classification_epoch_loss_is_read_once_and_a_non_finite_one_stops_the_run(tmp_path):
    from nnunet_acnorm.classification.trainer import ClassificationTrainer

    trainer = ClassificationTrainer({"num_epochs": 1}, 0, str(tmp_path), torch.device("cpu"), show_progress=False)
    assert trainer._epoch_loss([torch.tensor(1.0), torch.tensor(2.0)]) == 1.5
    trainer.current_epoch = 3
    with pytest.raises(FloatingPointError, match="the training loss became nan at epoch 3: lower -initial_lr"):
        trainer._epoch_loss([torch.tensor(1.0), torch.tensor(float("nan"))])


# -- G9: the ranking's steps in float32 without TF32, with fixed cuDNN algorithms ------------------
class _FlagRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen = []

    def forward(self, x):
        self.seen.append(_float32_flags())
        return self.linear(x)


def _float32_flags() -> tuple:
    cudnn = torch.backends.cudnn
    return (cudnn.benchmark, cudnn.allow_tf32, cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision())


@pytest.fixture
def fast_float32_flags():
    """torch's flags as nnU-Net leaves them on a GPU (cuDNN benchmark and TF32 on); restored afterwards.
    Yields the flags the code under test must find again when it returns."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = _float32_flags()
    try:
        torch.set_float32_matmul_precision("high")
        cudnn.benchmark, cudnn.allow_tf32, cudnn.deterministic = True, True, False
        yield _float32_flags()
    finally:
        torch.set_float32_matmul_precision(saved[4])
        cudnn.benchmark, cudnn.allow_tf32, cudnn.deterministic = saved[:3]
        matmul.allow_tf32 = saved[3]


def test_ranking_steps_run_without_tf32_and_with_fixed_kernels_and_restore_the_settings(fast_float32_flags):
    """nnU-Net turns cudnn.benchmark on and cuDNN uses TF32 by default: the ranking's float32 steps
    were neither float32 nor reproducible on Ampere/Hopper GPUs. The flags are torch's, settable
    without a GPU: the step must see them off, and find them as they were afterwards."""
    from nnunet_acnorm.ranking.nnunet_target import nnunet_train_step

    assert fast_float32_flags[:3] == (True, True, False) and fast_float32_flags[4] == "high"
    network = _FlagRecorder()
    step = nnunet_train_step(network, nn.MSELoss(), torch.optim.SGD(network.parameters(), lr=0.1),
                             torch.device("cpu"))
    value = step({"data": torch.randn(3, 4), "target": torch.zeros(3, 2)})
    assert math.isfinite(value)
    assert network.seen == [(False, False, True, False, "highest")]
    assert _float32_flags() == fast_float32_flags


def test_ranking_features_for_logme_run_without_tf32_and_restore_the_settings(fast_float32_flags):
    """LogME and H-score score the features of one forward pass: it runs under the same float32
    settings as the ranking's steps (TF32 off, fixed cuDNN kernels), and the flags are restored."""
    from nnunet_acnorm.ranking.estimators import norm_features_at_labels

    network = nn.Sequential(_FlagRecorder(), nn.BatchNorm1d(2))
    features, labels = norm_features_at_labels(network, "1", [{"data": torch.randn(3, 4),
                                                                "target": torch.zeros(3, 1)}])
    assert features.shape == (3, 2) and labels.tolist() == [0, 0, 0]
    assert network[0].seen == [(False, False, True, False, "highest")]
    assert _float32_flags() == fast_float32_flags


# -- G10: the benchmarks run what nnUNetv2_train runs on the device, unless told otherwise ----------
def test_benchmarks_default_to_nnunets_precision_and_compilation(monkeypatch, capsys):
    from nnunet_acnorm.nnunet.training_step import nnunet_precision

    monkeypatch.delenv("nnUNet_compile", raising=False)
    assert nnunet_precision(torch.device("cuda")) == (True, True)
    assert nnunet_precision(torch.device("cpu")) == (False, False)
    assert nnunet_precision(torch.device("mps")) == (False, False)
    monkeypatch.setenv("nnUNet_compile", "false")
    assert nnunet_precision(torch.device("cuda")) == (True, False)
    layers = _benchmark_module("benchmark_norm_layers")
    for module in (_benchmark_module("benchmark_trainer"), layers):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--device", "cpu", "--amp"])
        assert exit_info.value.code == 2
        assert "--amp: nnU-Net's mixed precision (autocast + GradScaler) is CUDA's" in capsys.readouterr().err
    layers.main(["--device", "cpu", "--quick", "--repeats", "1", "--shapes", "2d", "--measured", "norm"])
    out = capsys.readouterr().out
    assert "device: cpu, float32, eager" in out
    assert len([line for line in out.splitlines() if line.startswith("| 2D")]) == 2


# -- scripts/gpu_check.sh ------------------------------------------------------------------------------
def _gpu_visible() -> bool:
    import shutil
    if shutil.which("nvidia-smi") is None:
        return False
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return any(line.startswith("GPU ") for line in listed.stdout.splitlines())


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_touches_nothing(tmp_path):
    if _gpu_visible() or torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot be seen here")
    work, venv = tmp_path / "work", tmp_path / "venv"
    work.mkdir()
    env = {**os.environ, "NNUNET_ACNORM_VENV": str(venv)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("gpu_check: error: no NVIDIA GPU on this machine") and proc.stderr.count("\n") == 1
    assert not venv.exists() and list(work.iterdir()) == [], "the refused check installed or wrote something"
    # the Python part refuses too (a machine with nvidia-smi but a CPU-only torch), before writing
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--output", str(work / "report")],
                          cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "finds no CUDA device" in proc.stderr
    assert list(work.iterdir()) == []


def test_gpu_check_report_format_on_the_cpu_with_the_cuda_parts_skipped(tmp_path):
    """--allow-cpu: the real command writes its two reports, every CUDA part skipped by the script."""
    env = {**os.environ, "NNUNET_ACNORM_VENV": str(Path(sys.executable).parent.parent)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--allow-cpu", "--output",
                           str(tmp_path / "report")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    names = ["cuda_tests", "dataset", "train", "layers", "inference", "ddp"]
    assert [p["name"] for p in data["parts"]] == names
    assert all(p["status"] == "skipped" and p["reason"] for p in data["parts"])
    assert data["ok"] is True and data["environment"]["torch"] == torch.__version__ and data["seconds"] >= 0
    assert data["environment"]["gpus"] == [] and data["environment"]["nnunetv2"]
    markdown = (tmp_path / "report" / "gpu_check.md").read_text()
    assert markdown.startswith("# GPU check (")
    for name in names:
        assert f"| {name} | skipped |" in markdown
