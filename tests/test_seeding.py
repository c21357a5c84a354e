"""Seeded fine-tuning through nnUNetv2_train: same seed, same run; another seed, another run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nnunet_acnorm.nnunet.seeding import SEED_ENV, SeedError, apply_cpu_thread_limit, resolve_seed
from tests.factories.nnunet import (TINY_CONFIG, TINY_ID, TINY_NAME, acnorm_trainer_env, copy_planned,
                                    planned_tiny_dataset, run_console)

pytestmark = pytest.mark.integration

DATASET_ID = TINY_ID
TRAINER = "nnUNetTrainerFinetune_tinyTest"
CONFIG = TINY_CONFIG


def test_resolve_seed(monkeypatch):
    monkeypatch.delenv(SEED_ENV, raising=False)
    assert resolve_seed(None) is None
    assert resolve_seed(7) == 7
    monkeypatch.setenv(SEED_ENV, " 12 ")
    assert resolve_seed(7) == 12
    monkeypatch.setenv(SEED_ENV, "")
    assert resolve_seed(None) is None
    for bad in ("abc", "1.5", "-3"):
        monkeypatch.setenv(SEED_ENV, bad)
        with pytest.raises(SeedError, match=SEED_ENV):  # the trainers' entry boundary makes it one line
            resolve_seed(None)


def test_thread_limit_follows_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        assert apply_cpu_thread_limit() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert apply_cpu_thread_limit() is None
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The shared planned dataset (5 cases of 24^3, seed 0), a private copy."""
    base = tmp_path_factory.mktemp("seeding")
    copy_planned(planned_tiny_dataset(tmp_path_factory), base)
    return base


def _train(base: Path, results: str, seed: str | None, n_proc_da: str = "0") -> dict:
    env = acnorm_trainer_env(base, nnUNet_results=str(base / results), nnUNet_n_proc_DA=n_proc_da,
                             ACNORM_TEST_SKIP_VALIDATION="1")
    env.pop(SEED_ENV, None)
    if seed is not None:
        env[SEED_ENV] = seed
    run_console("nnUNetv2_train", DATASET_ID, CONFIG, 0, "-tr", TRAINER, "-device", "cpu", env=env)
    fold = base / results / TINY_NAME / f"{TRAINER}__nnUNetPlans__{CONFIG}" / "fold_0"
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    return {"weights": weights, "debug": json.loads((fold / "debug.json").read_text()),
            "log": "".join(p.read_text() for p in fold.glob("training_log_*.txt"))}


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_other_seed_other_weights(planned):
    first, second = _train(planned, "r1", "3"), _train(planned, "r2", "3")
    other = _train(planned, "r3", "4")
    assert _identical(first["weights"], second["weights"])
    assert not _identical(first["weights"], other["weights"])
    assert first["debug"]["seed"] == "3" and other["debug"]["seed"] == "4"
    assert "Seed 3" in first["log"]


def test_seed_reaches_the_augmentation_workers(planned):
    """With two augmentation processes the batches come from seeded workers in a fixed order."""
    first, second = _train(planned, "w1", "5", n_proc_da="2"), _train(planned, "w2", "5", n_proc_da="2")
    assert _identical(first["weights"], second["weights"])


def test_bad_seed_is_one_line(planned):
    env = acnorm_trainer_env(planned, nnUNet_results=str(planned / "bad"), **{SEED_ENV: "zero"})
    proc = run_console("nnUNetv2_train", DATASET_ID, CONFIG, 0, "-tr", TRAINER, "-device", "cpu", env=env,
                       check=False)
    assert proc.returncode != 0
    assert f"{SEED_ENV}='zero' is not an integer" in proc.stderr
    assert "Traceback" not in proc.stderr
