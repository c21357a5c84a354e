"""nnUNetv2_acnorm_rank through the real console script on a tiny generated nnU-Net dataset, with
candidates of three families (nnU-Net v2, Models Genesis, nnssl) and three that do not fit (other
input channels, unknown family, corrupt file); plus the in-process ranking's determinism and the
AC-Corr it reports against a direct computation.

One tiny MR dataset is planned and preprocessed once for the module (MR: the imports of the
Genesis and nnssl candidates keep the dataset's z-score normalisation, so nothing is preprocessed
again).
"""
import csv
import json
from pathlib import Path

import pytest
import torch

from tests.factories import checkpoints as cf
from tests.factories.nnunet import make_tiny_dataset, nnunet_env, run_console

from nnunet_acnorm.ranking.direction import DIRECTION, reliable

pytestmark = pytest.mark.integration
DATASET = 581


def assert_wording_follows_the_decision_record(stdout: str, rank_by: str) -> None:
    """What the command says about its order is what DIRECTION says (the experiment's evidence), and it
    recommends a candidate only where DIRECTION has settled on ``rank_by``."""
    assert DIRECTION["evidence"][:60] in stdout
    if reliable(rank_by):
        assert "cannot be relied on" not in stdout and "Recommended (" in stdout and "not a recommendation" not in stdout
    else:
        assert "cannot be relied on" in stdout and "Recommended" not in stdout
        assert "not a recommendation" in stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("rank")
    env_plan = nnunet_env(base, training=False)
    make_tiny_dataset(Path(env_plan["nnUNet_raw"]), DATASET, n_cases=4, shape=(20, 20, 20), n_labels=3,
                      name="TinyRank")
    run_console("nnUNetv2_plan_and_preprocess", "-d", DATASET, "-c", "3d_fullres", "-np", "1", env=env_plan)
    pre = Path(env_plan["nnUNet_preprocessed"]) / f"Dataset{DATASET:03d}_TinyRank"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    c = base / "candidates"
    files = {
        "nnunet_v2": cf.save_nnunet_v2_checkpoint(c / "nnunet" / "checkpoint_final.pth", architecture=arch, seed=1),
        "genesis": cf.save_genesis_checkpoint(c / "Genesis_Chest_CT.pt", base_features=4, seed=2),
        "nnssl": cf.save_nnssl_checkpoint(c / "nnssl_mae.pth", seed=3),
        "two_channels": cf.save_nnunet_v2_checkpoint(c / "two" / "checkpoint_final.pth", architecture=arch,
                                                     input_channels=2, seed=4),
    }
    torch.save({"model": {"w": torch.zeros(2)}}, c / "unknown.pth")
    files["unknown"] = str(c / "unknown.pth")
    (c / "corrupt.pth").write_bytes(Path(files["nnunet_v2"]).read_bytes()[:4096])
    files["corrupt"] = str(c / "corrupt.pth")
    return {"base": base, "env": nnunet_env(base, training=True), "pre": pre, "files": files}


def test_rank_command_ranks_three_families_and_skips_misfits(workspace, tmp_path):
    ws, files = workspace, workspace["files"]
    out = tmp_path / "ranking"
    order = ["nnunet_v2", "corrupt", "genesis", "unknown", "nnssl", "two_channels"]
    proc = run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", "3d_fullres", "-i", *[files[k] for k in order],
                       "--steps", "2", "--logme", "-o", out, "-device", "cpu", "--seed", "3", env=ws["env"])
    stdout = proc.stdout
    way = "highest" if DIRECTION["higher_is_better"] else "lowest"
    assert "Transferability estimates on Dataset581_TinyRank" in stdout and f"ordered by {way} ac_corr" in stdout
    assert "Cost:" in stdout
    assert_wording_follows_the_decision_record(stdout, "ac_corr")
    assert "Ranking:" in proc.stderr and "candidate" in proc.stderr  # the tqdm progress bar

    result = json.loads((out / "ranking.json").read_text())
    assert result["estimators"] == ["ac_corr", "logme"] and result["rank_by"] == "ac_corr"  # --logme: an alias
    assert result["reliable"] is reliable("ac_corr") and result["direction"] == DIRECTION
    by_family = {c["family"]: c for c in result["candidates"] if c["status"] == "ranked"}
    assert set(by_family) == {"nnunet_v2", "genesis", "nnssl"}
    assert sorted(c["rank"] for c in by_family.values()) == [1, 2, 3]
    scores = [c["ac_corr"] for c in sorted(by_family.values(), key=lambda c: c["rank"])]
    assert scores == sorted(scores, reverse=True)  # higher AC-Corr first, the direction the tool states
    assert by_family["genesis"]["per_layer"].keys() == {"down_tr512.ops.1.bn1"}
    for c in by_family.values():
        assert c["steps"] == 2 and len(c["losses"]) == 2 and c["seconds"] > 0
        assert len(c["per_layer"]) == 1 and c["ac_corr"] > 0 and c["ac_corr_at_start"] > 0
        assert c["logme"] is not None and c["scores"] == {"ac_corr": c["ac_corr"], "logme": c["logme"]}
    assert "fits the target plans as it is" in by_family["nnunet_v2"]["notes"][0]
    assert by_family["genesis"]["plans_identifier"].startswith("nnUNetPlans__rank_genesis_")

    skipped = {Path(c["path"]).name if "two" not in c["path"] else "two": c["reason"]
               for c in result["candidates"] if c["status"] == "skipped"}
    assert "input channel" in skipped["two"] and "--adapt_input_channels" in skipped["two"]
    assert "no known pretrained family" in skipped["unknown.pth"]
    assert "corrupted or truncated" in skipped["corrupt.pth"]
    for name in ("corrupt.pth", "unknown.pth"):
        assert f"skipped: {name}" in stdout

    rows = list(csv.DictReader((out / "ranking.csv").open()))
    assert len(rows) == 6 and [r["rank"] for r in rows[:3]] == ["1", "2", "3"]
    assert {"ac_corr", "ac_corr_at_start", "logme"} <= set(rows[0])
    assert {r["status"] for r in rows[3:]} == {"skipped"}
    for png in ("ranking.png", "sparse_correlations.png"):
        assert (out / png).stat().st_size > 1000
    import numpy as np
    matrices = np.load(out / "sparse_correlations.npz")
    for c in by_family.values():
        (layer,) = c["per_layer"]
        assert matrices[f"{c['name']}::{layer}"].sum() == pytest.approx(c["per_layer"][layer], rel=1e-9)

    # an earlier ranking is never replaced silently: refused before any work, files untouched
    before = (out / "ranking.json").read_bytes()
    again = run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", "3d_fullres", "-i", files["nnunet_v2"],
                        "-o", out, env=ws["env"], check=False)
    assert again.returncode != 0 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert (out / "ranking.json").read_bytes() == before


def test_rank_command_errors_are_one_line(workspace, tmp_path):
    ws = workspace
    bad_dataset = run_console("nnUNetv2_acnorm_rank", "-d", "599", "-c", "3d_fullres", "-i", ws["files"]["nnunet_v2"],
                              "-o", tmp_path / "x", env=ws["env"], check=False)
    assert bad_dataset.returncode != 0 and "Traceback" not in bad_dataset.stderr
    assert "nnUNetv2_acnorm_rank: error: dataset 599" in bad_dataset.stderr
    bad_layer = run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", "3d_fullres", "-i",
                            ws["files"]["nnunet_v2"], "--layers", "no.such.layer", "-o", tmp_path / "y",
                            "--no_progress", env=ws["env"], check=False)
    assert bad_layer.returncode == 1 and "Traceback" not in bad_layer.stderr
    # issue 31: refused before any candidate is prepared (it was: every candidate "skipped", files written)
    assert "--layers: no.such.layer is not a norm layer" in bad_layer.stderr and not (tmp_path / "y").exists()
    for option in (["--estimators", "ac_corr,bogus"], ["--rank_by", "bogus"]):
        bad_estimator = run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", "3d_fullres", "-i",
                                    ws["files"]["nnunet_v2"], *option, "-o", tmp_path / "z", env=ws["env"], check=False)
        assert bad_estimator.returncode == 1 and "Traceback" not in bad_estimator.stderr
        (line,) = bad_estimator.stderr.strip().splitlines()
        assert line.startswith("nnUNetv2_acnorm_rank: error: --estimators / --rank_by: unknown estimator(s) bogus")
        assert "known: ac_corr, ac_corr_all, logme, hscore" in line
        assert not (tmp_path / "z").exists()  # refused before any work


def test_seeded_ranking_is_deterministic_and_equals_a_direct_computation(workspace, monkeypatch):
    ws = workspace
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, ws["env"][var])
    from nnunet_acnorm.norms.ac_corr import ac_corr_from_state_dicts
    from nnunet_acnorm.ranking.nnunet_target import load_target
    from nnunet_acnorm.ranking.rank import rank_candidates

    target = load_target(str(DATASET), "3d_fullres")
    files = [ws["files"]["nnunet_v2"], ws["files"]["unknown"]]
    # the paper's AC-Corr (tau 1) at the direction experiment's lr, so that the direct computation below applies
    first = rank_candidates(files, target, steps=1, seed=5, progress=False, tau=1.0, lr=1e-3)
    second = rank_candidates(files, target, steps=1, seed=5, progress=False, tau=1.0, lr=1e-3)
    (a,), (b,) = first.ranked, second.ranked
    assert a.ac_corr == b.ac_corr and a.per_layer == b.per_layer and a.losses == b.losses
    assert [c.status for c in first.candidates] == ["ranked", "skipped"]
    other_seed = rank_candidates(files[:1], target, steps=1, seed=6, progress=False, tau=1.0, lr=1e-3).ranked[0]
    assert other_seed.losses != a.losses  # the seed does choose the batches

    # the reported AC-Corr equals AC-Corr computed directly from the pretrained and the updated affines
    from nnunet_acnorm.ranking.nnunet_target import (build_loss, finetune_optimizer, fixed_batches,
                                                     nnunet_train_step, prepare_candidate)
    prepared = prepare_candidate(files[0], target, seed=5, tau=1.0)
    pretrained = {k: v.clone() for k, v in torch.load(files[0], weights_only=False)["network_weights"].items()}
    torch.manual_seed(5)
    step = nnunet_train_step(prepared.network, build_loss(target.plans, target),
                             finetune_optimizer(prepared.network, 1e-3), torch.device("cpu"))
    prepared.network.train()
    for batch in fixed_batches(target, target.plans, 1, seed=5):
        step(batch)
    finetuned = {k: v for k, v in prepared.network.state_dict().items() if not k.endswith(("source_weight",
                                                                                           "source_bias"))}
    direct = ac_corr_from_state_dicts(pretrained, finetuned, layers=list(a.per_layer))
    assert direct.score == pytest.approx(a.ac_corr, rel=1e-5)


def test_an_untrained_candidate_is_never_ranked_first(workspace, tmp_path):
    """The zoo of the issue: a trained nnU-Net checkpoint, the same architecture never trained (norm
    affines 1 / 0: every domain indicator equal, S full, AC-Corr = C by construction) and a Models
    Genesis file. The untrained one gets the highest AC-Corr, and is listed apart, not ranked."""
    ws, files = workspace, workspace["files"]
    plans = json.loads((ws["pre"] / "nnUNetPlans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    untrained = cf.save_nnunet_v2_checkpoint(tmp_path / "random_init" / "checkpoint_final.pth", architecture=arch,
                                             seed=5, untrained_norms=True)
    out = tmp_path / "ranking"
    proc = run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", "3d_fullres", "-i", untrained,
                       files["nnunet_v2"], files["genesis"], "--steps", "1", "-o", out, "-device", "cpu",
                       "--no_progress", env=ws["env"])
    result = json.loads((out / "ranking.json").read_text())
    by_path = {Path(c["path"]).parent.name if c["family"] == "nnunet_v2" else c["family"]: c
               for c in result["candidates"]}
    excluded, trained = by_path["random_init"], by_path["nnunet"]
    assert excluded["status"] == "excluded" and excluded["rank"] is None
    assert "by construction" in excluded["reason"] and "untrained" in excluded["reason"]
    # it has the largest AC-Corr of all (S full in the deepest layer) and still does not come first
    assert excluded["ac_corr"] > max(trained["ac_corr"], by_path["genesis"]["ac_corr"])
    assert {trained["rank"], by_path["genesis"]["rank"]} == {1, 2}
    first = trained if trained["rank"] == 1 else by_path["genesis"]
    table = proc.stdout.split("Transferability estimates on", 1)[1]
    assert table.splitlines()[3].split()[:2] == ["1", first["name"]]
    assert f"excluded: {excluded['name']}" in proc.stdout
    top_line = next(line for line in proc.stdout.splitlines()
                    if line.startswith(("Recommended (", "Highest ac_corr:", "Lowest ac_corr:")))
    assert first["name"] in top_line and "random_init" not in top_line
    rows = list(csv.DictReader((out / "ranking.csv").open()))
    assert [r["status"] for r in rows] == ["ranked", "ranked", "excluded"] and rows[2]["rank"] == ""


def test_estimators_side_by_side_in_one_run(workspace, tmp_path):
    """--estimators with three estimators: one table with a column each, every estimator in the CSV and
    JSON, one panel each in ranking.png; the order follows --rank_by; a recommendation only where the
    decision record has settled on hscore (it has not)."""
    ws, files = workspace, workspace["files"]
    out = tmp_path / "ranking"
    proc = run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", "3d_fullres", "-i", files["nnunet_v2"],
                       files["genesis"], files["nnssl"], "--estimators", "ac_corr,logme,hscore", "--rank_by", "hscore",
                       "--steps", "1", "-o", out, "--no_progress", env=ws["env"])
    stdout = proc.stdout
    assert "estimates on Dataset581_TinyRank 3d_fullres" in stdout and "ac_corr, logme, hscore" in stdout
    table = stdout.split("Transferability estimates on", 1)[1].splitlines()[1:]
    header = table[0]
    for column in ("AC-Corr", "at step 0", "LogME", "H-score (order)"):
        assert column in header
    assert stdout.count("H-score (order)") == 1  # one table
    assert_wording_follows_the_decision_record(stdout, "hscore")

    result = json.loads((out / "ranking.json").read_text())
    assert result["estimators"] == ["ac_corr", "logme", "hscore"] and result["rank_by"] == "hscore"
    ranked = sorted((c for c in result["candidates"] if c["status"] == "ranked"), key=lambda c: c["rank"])
    assert len(ranked) == 3
    for c in ranked:
        assert set(c["scores"]) == {"ac_corr", "logme", "hscore"}
        assert all(isinstance(v, float) for v in c["scores"].values())
        assert c["scores"]["ac_corr"] == c["ac_corr"] and c["scores"]["hscore"] >= 0
    hscores = [c["scores"]["hscore"] for c in ranked]
    assert hscores == sorted(hscores, reverse=True)  # ordered by --rank_by, higher first
    assert table[2].split()[:2] == ["1", ranked[0]["name"]]

    rows = list(csv.DictReader((out / "ranking.csv").open()))
    assert [r["candidate"] for r in rows] == [c["name"] for c in ranked]
    for r, c in zip(rows, ranked):
        for est in ("ac_corr", "logme", "hscore"):
            assert float(r[est]) == pytest.approx(c["scores"][est], abs=1e-6)
    from PIL import Image

    with Image.open(out / "ranking.png") as png:
        width, height = png.size
    assert width > 2.5 * height  # three panels side by side
    assert (out / "sparse_correlations.png").stat().st_size > 1000


def test_fold_draws_the_batches_from_the_folds_training_cases_only(workspace, tmp_path, monkeypatch):
    """--fold F: nnU-Net's split (splits_final.json) decides the cases; the fold's validation case never
    enters a batch (in-process: the batches' keys), and the console script reports the fold and its
    cases; a fold the split does not define and a fold that is not a number are one-line errors."""
    ws, files = workspace, workspace["files"]
    pre = ws["pre"]
    cases = sorted(p.name.split(".")[0] for p in (pre / "nnUNetPlans_3d_fullres").glob("*.pkl"))
    assert len(cases) == 4
    split = [{"train": cases[:3], "val": cases[3:]}]
    (pre / "splits_final.json").write_text(json.dumps(split))
    try:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            monkeypatch.setenv(var, ws["env"][var])
        from nnunet_acnorm.ranking.nnunet_target import epoch_steps, fixed_batches, load_target

        target = load_target(str(DATASET), "3d_fullres", fold=0)
        assert target.cases == tuple(cases[:3])
        keys = {k for batch in fixed_batches(target, target.plans, 6, seed=1) for k in batch["keys"]}
        assert keys == set(cases[:3])  # 6 batches of 2: every training case, never the validation case
        everything = load_target(str(DATASET), "3d_fullres")
        assert everything.cases is None
        assert cases[3] in {k for b in fixed_batches(everything, everything.plans, 6, seed=1) for k in b["keys"]}
        assert load_target(str(DATASET), "3d_fullres", fold="all").cases == tuple(cases)
        assert epoch_steps(target) == 2  # ceil(3 cases / batch 2)

        out = tmp_path / "ranking"
        proc = run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", "3d_fullres", "-i", files["nnunet_v2"],
                           "--fold", "0", "-o", out, "--no_progress", env=ws["env"])
        assert "batches from the 3 training cases of fold 0" in proc.stdout
        result = json.loads((out / "ranking.json").read_text())
        assert result["fold"] == 0 and result["cases"] == cases[:3]

        for fold, message in (("1", "defines folds 0-0; pass one of them or 'all'"),
                              ("x", "--fold takes a fold number (0, 1, ...) or 'all', got 'x'")):
            bad = run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", "3d_fullres", "-i", files["nnunet_v2"],
                              "--fold", fold, "-o", tmp_path / f"bad{fold}", "--no_progress", env=ws["env"],
                              check=False)
            assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
            assert bad.stderr.startswith("nnUNetv2_acnorm_rank: error: ") and message in bad.stderr
            assert not (tmp_path / f"bad{fold}").exists()
    finally:
        (pre / "splits_final.json").unlink()


def test_fold_of_a_dataset_with_fewer_cases_than_folds_is_one_line(workspace, tmp_path):
    """4 cases and no splits_final.json: nnU-Net's default 5-fold split cannot be made (scikit-learn
    raised inside nnU-Net); one line naming the case count and what to do, nothing written."""
    ws = workspace
    assert not (ws["pre"] / "splits_final.json").exists()
    out = tmp_path / "ranking"
    proc = run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", "3d_fullres", "-i", ws["files"]["nnunet_v2"],
                       "--fold", "0", "-o", out, "--no_progress", env=ws["env"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("nnUNetv2_acnorm_rank: error: --fold 0: the dataset has 4 training case(s), fewer than")
    assert "--fold all" in line and "splits_final.json" in line
    assert not out.exists() and not (ws["pre"] / "splits_final.json").exists()


def _nnssl_at_spacing(path, spacing, seed):
    """An nnssl checkpoint pretrained at ``spacing``: its import resamples, so it is preprocessed."""
    file = cf.save_nnssl_checkpoint(path, seed=seed)
    checkpoint = torch.load(file, weights_only=False)
    checkpoint["nnssl_adaptation_plan"]["pretrain_plan"]["configurations"]["onemmiso"]["spacing"] = spacing
    torch.save(checkpoint, file)
    return file


def test_defaults_reuse_of_imports_and_names(workspace, tmp_path):
    """Issue 30: the steps take nnUNetTrainerACNorm's lr and temperature unless told otherwise, and the
    command says so; a file imported before with nnUNetv2_acnorm_import is reused, not imported again;
    two imports with the same preprocessing share one preprocessed copy; two trainings' checkpoints
    are named by their model folders (not 'fold_0/checkpoint_final.pth'); S is drawn."""
    ws, pre = workspace, workspace["pre"]
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    runs = [cf.save_nnunet_v2_checkpoint(tmp_path / f"{t}__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth",
                                         architecture=arch, seed=s) for t, s in (("TrainerA", 11), ("TrainerB", 12))]
    genesis = cf.save_genesis_checkpoint(tmp_path / "Genesis_user.pt", base_features=4, seed=13)
    run_console("nnUNetv2_acnorm_import", "-d", DATASET, "-c", "3d_fullres", "-i", genesis, "-pl",
                "nnUNetPlans_userGenesis", env=ws["env"])
    nnssl = [_nnssl_at_spacing(tmp_path / f"nnssl_{k}.pth", [2.0, 2.0, 2.0], seed) for k, seed in (("a", 14), ("b", 15))]
    plans_before = {p.name for p in pre.glob("*.json")}
    data_before = {p.name for p in pre.iterdir() if p.is_dir()}

    out = tmp_path / "ranking"
    proc = run_console("nnUNetv2_acnorm_rank", "-d", DATASET, "-c", "3d_fullres", "-i", *runs, genesis, *nnssl,
                       "-o", out, "--no_progress", env=ws["env"])
    assert ("Steps: lr 0.01 (nnUNetTrainerACNorm's peak lr; --lr to change), temperature calibrated per layer "
            "(nnUNetTrainerACNorm's; --tau 1 for the paper's AC-Corr)") in proc.stdout
    result = json.loads((out / "ranking.json").read_text())
    assert result["lr"] == 0.01 and result["tau"] == "auto" and result["trainer_defaults"] == ["lr", "tau"]
    by_name = {c["name"]: c for c in result["candidates"]}
    assert {c["status"] for c in by_name.values()} == {"ranked"}, by_name
    assert {"TrainerA__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth",
            "TrainerB__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth", "Genesis_user.pt"} <= set(by_name)

    user = by_name["Genesis_user.pt"]
    assert user["plans_identifier"] == "nnUNetPlans_userGenesis"
    assert any("reused the earlier import" in note for note in user["notes"])
    assert user["pretrained_weights"].endswith("nnUNetPlans_userGenesis__3d_fullres.pth")
    new_plans = {p.name for p in pre.glob("*.json")} - plans_before
    assert len(new_plans) == 2 and all("__rank_nnssl_" in p for p in new_plans)   # only the two nnssl files
    identifiers = {json.loads((pre / p).read_text())["configurations"]["3d_fullres"]["data_identifier"]
                   for p in new_plans}
    assert len(identifiers) == 1 and {p.name for p in pre.iterdir() if p.is_dir()} - data_before == identifiers
    notes = [" ".join(by_name[f"nnssl_{k}.pth"]["notes"]) for k in "ab"]
    assert sum("preprocessed now" in n for n in notes) == 1 and sum("not copied" in n for n in notes) == 1
    assert (out / "sparse_correlations.png").stat().st_size > 1000
