"""``-d -c -p`` of the import and ranking commands on datasets that are not (fully) planned: one
clean error line that names what is missing and what to run, through the real console scripts."""
import json

import pytest

from nnunet_acnorm.nnunet.plain_unet_plans import default_plans
from tests.factories.nnunet import nnunet_env, run_console

COMMANDS = ("nnUNetv2_acnorm_import", "nnUNetv2_acnorm_rank")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("planless")
    env = nnunet_env(base, training=False)
    pre = base / "preprocessed"
    (pre / "Dataset583_Unplanned").mkdir()
    (pre / "Dataset583_Unplanned" / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}}))
    (pre / "Dataset584_Only2d").mkdir()
    (pre / "Dataset584_Only2d" / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}}))
    (pre / "Dataset584_Only2d" / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"2d": {}}}))
    (pre / "Dataset585_Planned").mkdir()
    (pre / "Dataset585_Planned" / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "MR"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
         "file_ending": ".nii.gz"}))
    plans = default_plans((16, 16, 16), (4, 8, 16), 3, configuration="3d_fullres")
    (pre / "Dataset585_Planned" / "nnUNetPlans.json").write_text(json.dumps(plans))
    (base / "candidate.pth").write_bytes(b"never read")
    env["CANDIDATE"] = str(base / "candidate.pth")
    return env


def error_line(script, env, *args) -> str:
    proc = run_console(script, *args, "-i", env["CANDIDATE"], env=env, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("script", COMMANDS)
def test_unknown_dataset(script, env):
    line = error_line(script, env, "-d", "599", "-c", "3d_fullres")
    assert "dataset 599" in line, line


@pytest.mark.parametrize("script", COMMANDS)
def test_missing_plans_names_the_file_and_the_command(script, env):
    line = error_line(script, env, "-d", "583", "-c", "3d_fullres")
    assert "Dataset583_Unplanned/nnUNetPlans.json not found" in line, line
    assert "nnUNetv2_plan_and_preprocess -d 583 -c 3d_fullres" in line, line


@pytest.mark.parametrize("script", COMMANDS)
def test_unplanned_configuration_lists_the_planned_ones(script, env):
    line = error_line(script, env, "-d", "584", "-c", "3d_fullres")
    assert "configuration '3d_fullres' is not in" in line and "(has: 2d)" in line, line


@pytest.mark.parametrize("script", COMMANDS)
@pytest.mark.parametrize("value", [None, ""])
def test_unset_preprocessed_folder(script, value, env):
    env = {k: v for k, v in env.items() if k != "nnUNet_preprocessed"}
    if value is not None:
        env["nnUNet_preprocessed"] = value
    line = error_line(script, env, "-d", "583", "-c", "3d_fullres")
    assert "nnUNet_preprocessed is not set" in line, line


@pytest.mark.parametrize("value", [None, ""])
def test_rank_needs_an_output_folder(value, env):
    env = {k: v for k, v in env.items() if k != "nnUNet_results"}
    if value is not None:
        env["nnUNet_results"] = value
    line = error_line("nnUNetv2_acnorm_rank", env, "-d", "585", "-c", "3d_fullres")
    assert "nnUNet_results is not set (or empty): pass -o OUTDIR" in line, line
