"""AC-Norm and the plugin's trainers inside DistributedDataParallel: 2 CPU processes with the gloo
backend (nnU-Net's -num_gpus path, run on the CPU)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_steps_keep_ranks_identical(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(worker.parent.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
         "127.0.0.1", "--master_port", str(_free_port()), str(worker), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert any(k.endswith("source_weight") for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ in {key}"
    assert int(rank0["1.num_batches_tracked"]) == 2, "running statistics: one update per step"
    assert not torch.equal(rank0["1.weight"], rank0["1.source_weight"]), "targets did not train"


# -- nnU-Net's DDP path with the plugin's trainers (tests/ddp_trainer_worker.py) -------------------
DDP_DATASET_ID = 937
DDP_DATASET = f"Dataset{DDP_DATASET_ID:03d}_TinyDDP"


@pytest.fixture(scope="module")
def ddp_trainer_results(tmp_path_factory):
    """Every scenario of tests/ddp_trainer_worker.py, run once by 2 gloo processes (CPU) on a tiny
    planned dataset; {scenario: [rank 0 result, rank 1 result]}."""
    from tests.factories.nnunet import acnorm_trainer_env, make_tiny_dataset, run_console

    base = tmp_path_factory.mktemp("ddp_trainers")
    env = acnorm_trainer_env(base, training=False)
    make_tiny_dataset(env["nnUNet_raw"], DDP_DATASET_ID, n_cases=5, shape=(20, 20, 20), name="TinyDDP", seed=1)
    run_console("nnUNetv2_plan_and_preprocess", "-d", DDP_DATASET_ID, "-c", "3d_fullres", "-np", 1, "-npfp", 1,
                env=env)
    out = base / "out"
    out.mkdir()
    worker = Path(__file__).with_name("ddp_trainer_worker.py")
    env.update(ACNORM_DDP_DATASET=DDP_DATASET, PYTHONPATH=os.pathsep.join(
        [str(worker.parent.parent), os.environ.get("PYTHONPATH", "")]))
    scenarios = ["lpft", "bss", "save", "loaders"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(worker), str(out), *scenarios],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return {name: [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)] for name in scenarios}


def _ok(results: list[dict]) -> list[dict]:
    for rank, result in enumerate(results):
        assert result["ok"], f"rank {rank}: {result['error']}\n{result.get('traceback', '')}"
    return results


def test_lpft_freezes_and_releases_the_encoder_under_ddp(ddp_trainer_results):
    """G1: freezing after nnU-Net's DDP wrap made the reducer wait for the encoder's gradients
    ("Expected to have finished reduction in the prior iteration") at the second step."""
    for result in _ok(ddp_trainer_results["lpft"]):
        assert result["frozen_epochs"] == 1
        assert not result["encoder_changed_after_epoch0"], "the frozen encoder trained"
        assert result["encoder_changed_after_epoch1"], "the released encoder did not train"
        assert result["ranks_identical"]


def test_seeded_ddp_ranks_draw_different_patches(ddp_trainer_results):
    """G2: a seeded run seeded every rank's data loading alike: every GPU trained on the same patches."""
    for result in _ok(ddp_trainer_results["loaders"]):
        for mode in ("n_proc_DA=0", "n_proc_DA=1"):
            rank0, rank1 = result[mode]
            assert rank0[0] != rank1[0] and rank0[1] != rank1[1], f"{mode}: both ranks drew the same batches"
            assert rank0[0] != rank0[1]


def test_only_rank_0_touches_the_checkpoint_files(ddp_trainer_results):
    """G3: rank 1's save_checkpoint renamed rank 0's half-written temporary file onto the checkpoint."""
    for result in _ok(ddp_trainer_results["save"]):
        assert result["tmp_intact"], "another rank moved or removed rank 0's temporary file"
        assert not result["target_written"], "another rank put a checkpoint in place"


def test_bss_under_ddp_is_the_penalty_of_the_global_batch(ddp_trainer_results):
    """G7: nnU-Net's batch 2 on 2 ranks is 1 sample per rank; BSS gathers the rows of all ranks, so
    the penalty and its gradients are those of one process with both samples (not a feature norm)."""
    for result in _ok(ddp_trainer_results["bss"]):
        assert result["batch_size"] == 1
        assert result["penalty"] == pytest.approx(result["expected"], rel=1e-5)
        assert result["worst_relative_gradient_error"] < 1e-4
        assert "all 2 ranks" in result["described"]
