"""CUDA-only checks (skipped without a CUDA device; run by scripts/gpu_check.sh on a GPU machine):
what cannot be seen on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from nnunet_acnorm.norms import convert_to_acnorm
from tests.factories.norms import pretrained_affines

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _acnorm_network() -> nn.Module:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(1, 16, 3, padding=1), nn.InstanceNorm3d(16, affine=True), nn.LeakyReLU(),
                            nn.Conv3d(16, 16, 3, padding=1), nn.BatchNorm3d(16), nn.LeakyReLU(), nn.Conv3d(16, 3, 1))
    for norm in (network[1], network[4]):
        pretrained_affines(norm)
    convert_to_acnorm(network, tau="auto")
    return network.cuda().train()


def test_cuda_synchronised_acbatchnorm_matches_one_process():
    """G6: the SyncBatchNorm branch of AC-BatchNorm (never run on the CPU: torch has no CPU kernels
    for it): 2 ranks (NCCL on 2 GPUs, else gloo on one) against one process with the whole batch."""
    import socket
    import tempfile

    worker = Path(__file__).with_name("ddp_worker.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(worker.parent.parent), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_addr", "127.0.0.1", "--master_port", str(port), str(worker), out, "sync-cuda"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results = [json.loads(Path(out, f"sync_rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["world_size"] == 2 and result["local_statistics_differ"]
        for key in ("output", "running_mean", "running_var", "weight_grad", "bias_grad"):
            assert result[key] < 1e-4, (key, result)
        assert result["autocast_output_dtype"] == "torch.float16" and result["autocast_finite"]


def test_cuda_acnorm_amp_step_reads_nothing_back_from_the_gpu():
    """The AC-Norm forward and backward under nnU-Net's autocast make no host synchronisation."""
    network = _acnorm_network()
    x = torch.randn(2, 1, 16, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):   # warm-up (cuDNN algorithm choice)
        network(x).float().square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            y = network(x)
            loss = y.float().square().mean()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert y.dtype == torch.float16 and network[1].weight.grad.dtype == torch.float32


def _synchronisations(run) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def test_cuda_classification_step_synchronises_only_in_the_grad_scaler(tmp_path):
    """G8: the step tested the loss on the host and read it (.item()): two syncs per step on top of
    the GradScaler's own (its step reads whether a gradient overflowed)."""
    from nnunet_acnorm.classification.trainer import ClassificationTrainer

    config = {"architecture": "resnet", "dim": 2, "depth": 18, "num_classes": 3, "tau": 1.0, "initial_lr": 0.01,
              "weight_decay": 3e-5, "num_epochs": 1, "pretrained_family": None}
    trainer = ClassificationTrainer(config, 0, str(tmp_path), torch.device("cuda"), show_progress=False)
    trainer.print_to_log_file = lambda *a, **k: None
    trainer.initialize(None)
    trainer.loss = nn.CrossEntropyLoss().cuda()
    trainer.network.train()
    images = torch.randn(8, 3, 64, 64, device="cuda")
    labels = torch.randint(0, 3, (8,), device="cuda")
    trainer.train_step(images, labels)   # warm-up
    losses = []
    syncs = _synchronisations(lambda: losses.extend(trainer.train_step(images, labels) for _ in range(3)))
    assert syncs <= 3, f"{syncs} host synchronisations in 3 steps (the GradScaler makes one per step)"
    assert trainer._epoch_loss(losses) > 0


def test_cuda_ranking_steps_are_reproducible_and_leave_the_settings():
    """G9: the ranking's steps (deterministic float32) give bit-identical weights in two runs, with
    cudnn.benchmark and TF32 switched on around them as nnU-Net and torch leave them."""
    from nnunet_acnorm.nnunet.training_step import make_train_step

    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = True, True
    states = []
    for _ in range(2):
        network = _acnorm_network()
        optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True)
        step = make_train_step(network, lambda out, target: (out.float() - target).square().mean(), optimizer,
                               torch.device("cuda"), deterministic=True)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            step({"data": torch.randn(2, 1, 16, 16, 16, generator=generator),
                  "target": torch.randn(2, 3, 16, 16, 16, generator=generator)})
        states.append({k: v.detach().cpu().clone() for k, v in network.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32


def test_cuda_sorted_path_matches_the_dense_one():
    """The torch implementation of the sorted path (float64 on the GPU) against the dense formula."""
    from nnunet_acnorm.norms.functional import recalibrated_affine

    generator = torch.Generator().manual_seed(0)
    sw = torch.empty(512).uniform_(0.5, 1.5, generator=generator).cuda()
    sb = torch.randn(512, generator=generator).cuda()
    tw = (sw + 0.05 * torch.randn(512, generator=generator).cuda()).requires_grad_(True)
    tb = (sb + 0.05 * torch.randn(512, generator=generator).cuda()).requires_grad_(True)
    results = []
    for method in ("dense", "sorted"):
        weight, bias = recalibrated_affine(sw, sb, tw, tb, 1.0, method=method)
        grads = torch.autograd.grad((weight.square().sum() + bias.sum()), (tw, tb))
        results.append((weight.detach(), bias.detach(), *grads))
    for dense, fast in zip(*results):
        torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)
