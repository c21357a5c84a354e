"""The GPU check behind ``bash scripts/gpu_check.sh`` (docs/performance.md, "The GPU check").

On a CUDA machine it runs, in this order, each part with its own time limit and the whole within
``--budget`` seconds (a part that would start after the budget is skipped, and says so):

1. ``cuda_tests``: the CUDA-only tests (tests/test_gpu.py and the CUDA tests of test_norm_layers.py
   and test_classification.py);
2. ``train``: ``nnUNetv2_train`` of nnUNetTrainerACNorm and nnUNetTrainerFinetune with nnU-Net's
   defaults on the device (AMP, torch.compile) on a generated dataset (8 cases of 96^3 voxels,
   3d_fullres), 2 epochs of 20 steps: step time (epoch 1, after compilation) and peak memory,
   AC-Norm / vanilla; the final checkpoint reloads strictly;
3. ``layers``: benchmarks/benchmark_norm_layers.py under float16 and bfloat16 autocast, eager and
   compiled (3D nnU-Net shape, conv+norm);
4. ``inference``: benchmarks/benchmark_trainer.py: stock vs AC-Norm folded and not folded (eager,
   autocast, as nnU-Net's predictor), and the training step without compilation;
5. ``ddp`` (2 or more GPUs): ``nnUNetv2_train -num_gpus 2`` of AC-Norm, AC-Norm + LP-FT and the
   BatchNorm variant (synchronised AC-BatchNorm), seeded: the ranks drew different batches and the
   final checkpoints reload strictly.

It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--output``. Without a CUDA device it says so
in one line and exits 1 before writing anything; ``--allow-cpu`` instead writes the report on the
CPU with every CUDA part skipped (the report format's own test; not a GPU check).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINER_FOLDER = Path(__file__).resolve().parent / "gpu_check_trainers"
#: the parts --parts can choose (the dataset is prepared when train or ddp runs)
PARTS = ("cuda_tests", "train", "layers", "inference", "ddp")
DATASET_ID, DATASET_NAME = 990, "GpuCheck"
CUDA_TESTS = ["tests/test_gpu.py", "tests/test_norm_layers.py::test_cuda_autocast_matches_float32",
              "tests/test_classification.py::test_cuda_mixed_precision_train_step"]


class Report:
    """The parts' results, in order, with their status: passed, failed or skipped (and why)."""

    def __init__(self, output: Path, budget: float):
        self.output, self.budget, self.start = output, budget, time.monotonic()
        self.data = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv), "environment": environment(), "parts": []}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def run(self, name: str, function, skip_reason: str | None = None, estimate: float = 0.0) -> dict:
        part = {"name": name}
        if skip_reason is None and self.elapsed() + estimate > self.budget:
            skip_reason = f"time budget: {self.elapsed():.0f} s used of {self.budget:.0f} s, the part needs ~{estimate:.0f} s"
        if skip_reason is not None:
            part.update(status="skipped", reason=skip_reason, seconds=0.0)
        else:
            started = time.monotonic()
            try:
                results = function()
                part.update(status="failed" if results.pop("failed", False) else "passed", results=results)
            except Exception as e:  # noqa: BLE001 - a part's failure is a result of the check
                part.update(status="failed", reason=f"{type(e).__name__}: {str(e)[-2000:]}")
            part["seconds"] = round(time.monotonic() - started, 1)
        self.data["parts"].append(part)
        print(f"gpu_check: {name}: {part['status']}"
              + (f" ({part.get('reason')})" if part.get("reason") else "") + f", {part['seconds']:.0f} s", flush=True)
        return part

    def write(self) -> tuple[Path, Path]:
        self.data["seconds"] = round(self.elapsed(), 1)
        self.data["ok"] = all(p["status"] != "failed" for p in self.data["parts"])
        json_file, md_file = self.output / "gpu_check.json", self.output / "gpu_check.md"
        json_file.write_text(json.dumps(self.data, indent=2))
        md_file.write_text(markdown(self.data))
        return json_file, md_file


def environment() -> dict:
    import torch

    import nnunetv2

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "nnunetv2": getattr(nnunetv2, "__version__", None) or _distribution_version("nnunetv2"),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "cpu_count": os.cpu_count(), "platform": platform.platform()}


def _distribution_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run(command: list[str], env: dict | None = None, timeout: float = 600, log: Path | None = None,
        cwd: Path = REPO) -> str:
    """Run ``command``; its output goes to ``log``; a non-zero exit raises with the output's tail."""
    proc = subprocess.run([str(c) for c in command], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(output)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(str(c) for c in command[:4])} ... exited with {proc.returncode}: "
                           f"{output[-1500:]}")
    return output


# -- parts -----------------------------------------------------------------------------------------
def cuda_tests(out: Path) -> dict:
    junit = out / "cuda_tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           *CUDA_TESTS], cwd=REPO, capture_output=True, text=True, timeout=300)
    (out / "cuda_tests.log").write_text(proc.stdout + proc.stderr)
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [case.get("name") for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "failed_tests": failed, "failed": proc.returncode != 0 or counts["tests"] == 0}


def nnunet_env(base: Path, **extra) -> dict:
    from nnunet_acnorm.nnunet.discovery import trainer_shim_folder

    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (base / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(base / sub)
    folders = [str(TRAINER_FOLDER), trainer_shim_folder()] + [p for p in env.get("nnUNet_extTrainer", "").split(
        os.pathsep) if p]
    env["nnUNet_extTrainer"] = os.pathsep.join(dict.fromkeys(folders))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update({k: str(v) for k, v in extra.items()})
    return env


def prepare_dataset(out: Path) -> Path:
    """A generated dataset (tests/factories: labelled boxes on noise), planned and preprocessed."""
    sys.path.insert(0, str(REPO))
    from tests.factories.nnunet import make_tiny_dataset

    base = out / "nnunet"
    env = nnunet_env(base)
    make_tiny_dataset(env["nnUNet_raw"], DATASET_ID, n_cases=8, shape=(96, 96, 96), n_labels=3, name=DATASET_NAME)
    run([Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres",
         "-np", "4", "-npfp", "4"], env=env, timeout=600, log=out / "plan_and_preprocess.log")
    return base


def train(base: Path, trainer: str, out: Path, results: str, gpus: int = 1, **extra) -> dict:
    """One nnUNetv2_train run; the records of its ranks and whether its final checkpoint reloads."""
    env = nnunet_env(base, nnUNet_results=base / results, **extra)
    for key in ("nnUNet_n_proc_DA", "nnUNet_compile", "nnUNet_acnorm_seed"):   # nnU-Net's defaults unless given
        if key not in extra:
            env.pop(key, None)
    command = [Path(sys.executable).parent / "nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", trainer]
    if gpus > 1:
        command += ["-num_gpus", gpus]
    run(command, env=env, timeout=600, log=out / f"train_{results}.log")
    fold = next((base / results).glob(f"Dataset{DATASET_ID}_*/{trainer}__nnUNetPlans__3d_fullres/fold_0"))
    ranks = [json.loads((fold / f"gpu_check_rank{r}.json").read_text()) for r in range(gpus)]
    return {"ranks": ranks, "reload": strict_reload(fold, trainer)}


def strict_reload(fold: Path, trainer: str) -> str:
    """Load checkpoint_final.pth (weights only) into the network the trainer builds, strictly (an
    AC-Norm layer demands its source affines). Returns "ok" or the error."""
    from nnunet_acnorm.checkpoints.io import safe_torch_load
    from nnunet_acnorm.nnunet.trainer_registry import TRAINERS
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoint = safe_torch_load(fold / "checkpoint_final.pth")
    plans = PlansManager(json.loads((fold.parent / "plans.json").read_text()))
    dataset_json = json.loads((fold.parent / "dataset.json").read_text())
    cm = plans.get_configuration("3d_fullres")
    cls = TRAINERS[trainer.removesuffix("_gpuCheck")]
    network = cls.build_network_architecture(plans, cm, determine_num_input_channels(plans, cm, dataset_json),
                                             plans.get_label_manager(dataset_json).num_segmentation_heads, True)
    try:
        network.load_state_dict(checkpoint["network_weights"])
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return "ok"


def step_summary(record: dict) -> dict:
    steps = [seconds for epoch, seconds in record["steps"] if epoch >= 1]   # epoch 0 compiles
    return {"median_step_s": statistics.median(steps) if steps else None, "steps_timed": len(steps),
            "peak_cuda_mib": record["peak_cuda_bytes"] / 2 ** 20 if record["peak_cuda_bytes"] else None,
            "amp": record["amp"], "compiled": record["compiled"]}


def train_part(out: Path, base: Path) -> dict:
    runs = {name: train(base, f"{name}_gpuCheck", out, f"results_{name}")
            for name in ("nnUNetTrainerFinetune", "nnUNetTrainerACNorm")}
    summary = {name: {**step_summary(r["ranks"][0]), "reload": r["reload"]} for name, r in runs.items()}
    vanilla, acnorm = summary["nnUNetTrainerFinetune"], summary["nnUNetTrainerACNorm"]
    ratios = {"step_time_acnorm_over_vanilla": acnorm["median_step_s"] / vanilla["median_step_s"],
              "peak_memory_acnorm_over_vanilla": (acnorm["peak_cuda_mib"] / vanilla["peak_cuda_mib"]
                                                  if vanilla["peak_cuda_mib"] else None)}
    failed = any(s["reload"] != "ok" or not s["amp"] or not s["compiled"] for s in summary.values())
    return {"runs": summary, **ratios, "failed": failed}


TABLE_ROW = re.compile(r"^\| (3D|2D)[^|]*\|")


def layers_part(out: Path) -> dict:
    results = {}
    for dtype in ("float16", "bfloat16"):
        for compiled in (False, True):
            name = f"{dtype}, {'compiled' if compiled else 'eager'}"
            output = run([sys.executable, REPO / "benchmarks" / "benchmark_norm_layers.py", "--device", "cuda",
                          "--amp", "--amp-dtype", dtype, "--compile" if compiled else "--no-compile", "--shapes",
                          "3d", "--measured", "block", "--repeats", "5"], timeout=300,
                         log=out / f"layers_{dtype}_{'compiled' if compiled else 'eager'}.log")
            rows = [line for line in output.splitlines() if TABLE_ROW.match(line)]
            results[name] = [dict(zip(("shape", "norm", "measured", "time_fused_over_plain",
                                       "time_fused_over_two_pass", "memory_fused_over_plain",
                                       "memory_fused_over_two_pass", "plain_ms_mib"),
                                      (c.strip() for c in row.strip("|").split("|")))) for row in rows]
    return results


def inference_part(out: Path) -> dict:
    json_file = out / "inference.json"
    run([sys.executable, REPO / "benchmarks" / "benchmark_trainer.py", "--device", "cuda", "--amp", "--no-compile",
         "--same-process", "--repetitions", "5", "--steps", "3", "--inference-batches", "3", "--patch", "96", "96",
         "96", "--features", "32", "64", "128", "256", "320", "--json", json_file], timeout=400,
        log=out / "inference.log")
    result = json.loads(json_file.read_text())
    keep = ("setup", "train_step_ratio", "inference_ratio_unfolded", "inference_ratio_unfolded_interval",
            "inference_ratio_folded", "inference_ratio_folded_interval", "cuda_peak_bytes",
            "max_softmax_difference_folded")
    return {key: result[key] for key in keep}


def ddp_part(out: Path, base: Path) -> dict:
    runs, failed = {}, False
    for name in ("nnUNetTrainerACNorm", "nnUNetTrainerACNorm_LPFT", "nnUNetTrainerACNormBN"):
        run_ = train(base, f"{name}_gpuCheck", out, f"ddp_{name}", gpus=2, nnUNet_acnorm_seed=0,
                     nnUNet_compile="false")
        digests = [r["first_batches"] for r in run_["ranks"]]
        different = all(a != b for a, b in zip(*digests))
        runs[name] = {"ranks_drew_different_batches": different, "reload": run_["reload"],
                      "batch_size_per_rank": [r["batch_size"] for r in run_["ranks"]],
                      **step_summary(run_["ranks"][0])}
        failed |= not different or run_["reload"] != "ok"
    return {"runs": runs, "failed": failed}


# -- report ----------------------------------------------------------------------------------------
def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [f"# GPU check ({data['started']})", "",
             f"GPUs: {', '.join(env['gpus']) or 'none'}; torch {env['torch']} (CUDA {env['cuda']}, cuDNN "
             f"{env['cudnn']}), nnU-Net {env['nnunetv2']}, Python {env['python']}, {env['cpu_count']} CPUs. "
             f"Total {data['seconds']:.0f} s; {'all parts passed or were skipped' if data['ok'] else 'FAILED'}.", "",
             "| part | status | seconds | note |", "|---|---|---|---|"]
    for part in data["parts"]:
        lines.append(f"| {part['name']} | {part['status']} | {part['seconds']:.0f} | {part.get('reason', '')} |")
    for part in data["parts"]:
        if part.get("results"):
            lines += ["", f"## {part['name']}", "", "```json", json.dumps(part["results"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="report folder (default: ./gpu_check_<UTC time>)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all parts together (default 480)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without a CUDA device, write the report with every CUDA part skipped (tests the "
                             "report; not a GPU check)")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(f"gpu_check: error: torch {torch.__version__} finds no CUDA device on this machine; run the check "
              "on a machine with an NVIDIA GPU and a CUDA build of torch (nothing was written)", file=sys.stderr)
        return 1
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
    output = Path(args.output or f"gpu_check_{stamp}").resolve()
    output.mkdir(parents=True, exist_ok=True)
    report = Report(output, args.budget)
    no_cuda = None if cuda else "no CUDA device (--allow-cpu: the report's format only)"
    gpus = torch.cuda.device_count() if cuda else 0

    def reason(name: str, *conditions: str | None) -> str | None:
        return next((c for c in conditions if c), None) or (None if name in args.parts else "not in --parts")

    report.run("cuda_tests", lambda: cuda_tests(output), reason("cuda_tests", no_cuda), estimate=60)
    data = {}

    def dataset_part() -> dict:
        data["base"] = prepare_dataset(output)
        return {"folder": str(data["base"])}

    needs_data = reason("train", no_cuda) is None or reason("ddp", no_cuda) is None
    dataset = report.run("dataset", dataset_part, None if needs_data else "no part needs it", estimate=40)
    no_data = None if dataset["status"] == "passed" else "no planned dataset (see the dataset part)"
    report.run("train", lambda: train_part(output, data["base"]), reason("train", no_cuda, no_data), estimate=150)
    report.run("layers", lambda: layers_part(output), reason("layers", no_cuda), estimate=90)
    report.run("inference", lambda: inference_part(output), reason("inference", no_cuda), estimate=40)
    too_few = f"needs 2 GPUs, this machine has {gpus}" if gpus < 2 else None
    report.run("ddp", lambda: ddp_part(output, data["base"]), reason("ddp", no_cuda, too_few, no_data), estimate=150)
    if "base" in data:
        shutil.rmtree(data["base"] / "raw", ignore_errors=True)   # the generated images; the logs stay
    json_file, md_file = report.write()
    print(f"gpu_check: report in {json_file} and {md_file}")
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
