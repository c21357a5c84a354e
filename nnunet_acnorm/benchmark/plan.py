"""What a benchmark runs: the options that define it (:class:`BenchmarkSpec`), checked and expanded into
one ``nnUNetv2_train`` call per method, seed and fold (:func:`make_plan`).

Every check happens here, before anything is written: the dataset must be planned and preprocessed for
the configuration (:func:`nnunet_acnorm.nnunet.dataset.read_preprocessed_dataset`), every method an
alias or a trainer nnU-Net finds (:mod:`nnunet_acnorm.benchmark.methods`), the pretrained checkpoint
loadable as nnU-Net's loader needs it (:func:`nnunet_acnorm.nnunet.pretrained.load_nnunet_checkpoint`),
the folds folds of the dataset's cross-validation split. The plan records, besides the runs, the
versions of the packages and the environment the runs get; ``what`` holds the options that define
the runs, which a later call on the same folder must repeat (or omit).
"""
from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field

from nnunet_acnorm.benchmark.methods import Method, resolve_methods
from nnunet_acnorm.errors import InputError
from nnunet_acnorm.inputs import sha256_file

PLAN_FORMAT = "nnunet_acnorm.benchmark/1"
DEFAULT_FOLDS = ("0", "1", "2", "3", "4")
DEVICES = ("cuda", "cpu", "mps")
#: environment variables the runner sets for every run itself (not settable through ``env``)
RUNNER_ENV = ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_acnorm_seed", "nnUNet_extTrainer",
              "CUDA_VISIBLE_DEVICES")
#: environment variables recorded in the plan for information (they change how nnU-Net trains)
RECORDED_ENV = ("nnUNet_raw", "nnUNet_n_proc_DA", "nnUNet_def_n_proc", "nnUNet_compile", "OMP_NUM_THREADS")
MAX_SEED = 2 ** 31 - 64  # nnunet/seeding.py's range


class BenchmarkError(InputError):
    """Bad input to a benchmark, or a benchmark folder that cannot take this call (one line)."""


@dataclass
class BenchmarkSpec:
    """The options of a benchmark, as a user gives them (``nnUNetv2_acnorm_benchmark``'s options).

    Args:
        dataset: dataset id or name (planned and preprocessed)
        configuration: nnU-Net configuration, e.g. ``3d_fullres``
        methods: aliases or nnU-Net trainer names (:mod:`~nnunet_acnorm.benchmark.methods`), or
            :class:`~nnunet_acnorm.benchmark.methods.Method` objects (a script's own names)
        pretrained_weights: checkpoint for every method except the ``scratch*`` ones
        plans: plans identifier
        folds: folds of the cross-validation split (``"all"`` too), as ``nnUNetv2_train`` takes them
        seeds: ``nnUNet_acnorm_seed`` of the runs; each seed is one replicate of every method and fold
        device: ``cuda``, ``cpu`` or ``mps``
        env: extra environment variables of every run (e.g. ``nnUNet_n_proc_DA``); part of the plan
        trainer_folders: folders added to ``nnUNet_extTrainer`` (users' own trainers)
        epochs: the budget as nnU-Net names it: every alias or trainer name ``X`` becomes ``X_<epochs>epochs``
    """
    dataset: str
    configuration: str
    methods: list
    pretrained_weights: str | None = None
    plans: str = "nnUNetPlans"
    folds: list = field(default_factory=lambda: list(DEFAULT_FOLDS))
    seeds: list = field(default_factory=lambda: [0])
    device: str = "cuda"
    env: dict = field(default_factory=dict)
    trainer_folders: list = field(default_factory=list)
    epochs: int | None = None


@dataclass(frozen=True)
class PlannedRun:
    """One ``nnUNetv2_train`` call: a method on one fold with one seed, in its own ``nnUNet_results``."""
    id: str
    method: str
    trainer: str
    pretrained: bool
    fold: str
    seed: int
    results_root: str
    model_folder: str

    @property
    def fold_folder(self) -> str:
        return os.path.join(self.model_folder, f"fold_{self.fold}")

    @property
    def summary_file(self) -> str:
        """nnU-Net's validation result; a run is finished when it exists."""
        return os.path.join(self.fold_folder, "validation", "summary.json")


@dataclass
class Plan:
    """A checked benchmark: ``what`` defines the runs (compared between calls), ``runs`` expands it,
    ``environment`` and ``versions`` say how they run (recorded, not compared)."""
    what: dict
    runs: list
    environment: dict
    versions: dict
    created: str = ""
    format: str = PLAN_FORMAT

    @property
    def methods(self) -> list[Method]:
        return [Method(**m) for m in self.what["methods"]]

    def run(self, run_id: str) -> PlannedRun:
        for run in self.runs:
            if run.id == run_id:
                return run
        raise BenchmarkError(f"the plan has no run {run_id!r}")

    def to_json(self) -> str:
        return json.dumps({"format": self.format, "created": self.created, "what": self.what,
                           "runs": [asdict(r) for r in self.runs], "environment": self.environment,
                           "versions": self.versions}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> "Plan":
        try:
            data = json.loads(text)
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {PLAN_FORMAT}")
            runs = [PlannedRun(**r) for r in data["runs"]]
            return cls(data["what"], runs, data["environment"], data["versions"], data.get("created", ""))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BenchmarkError(f"{source} is not a plan of nnUNetv2_acnorm_benchmark ({e}); use another -o") from None


def run_id(method: str, seed: int, fold: str) -> str:
    return f"{method}__seed{seed}__fold{fold}"


def parse_folds(folds) -> list[str]:
    out = []
    for f in folds:
        f = str(f)
        if f != "all" and not (f.isdigit() and len(f) < 4):
            raise BenchmarkError(f"-f {f}: a fold is a number (0, 1, ...) or 'all'")
        f = f if f == "all" else str(int(f))
        if f in out:
            raise BenchmarkError(f"-f {f} is given twice")
        out.append(f)
    if not out:
        raise BenchmarkError("-f: give at least one fold")
    if "all" in out and len(out) > 1:
        raise BenchmarkError("-f all trains on every case: it cannot be combined with cross-validation folds")
    return out


def parse_seeds(seeds) -> list[int]:
    out = []
    for s in seeds:
        try:
            seed = int(s)
        except (TypeError, ValueError):
            raise BenchmarkError(f"--seeds {s}: a seed is an integer") from None
        if not 0 <= seed < MAX_SEED:
            raise BenchmarkError(f"--seeds {seed}: a seed is in [0, 2**31 - 64)")
        if seed in out:
            raise BenchmarkError(f"--seeds {seed} is given twice")
        out.append(seed)
    if not out:
        raise BenchmarkError("--seeds: give at least one seed")
    return out


def parse_env(env: dict) -> dict:
    for key in env:
        if key in RUNNER_ENV:
            raise BenchmarkError(f"--env {key}: the benchmark sets {key} for every run itself")
        if not key or "=" in key or not key.replace("_", "a").isalnum():
            raise BenchmarkError(f"--env {key!r}: not an environment variable name")
    return {str(k): str(v) for k, v in sorted(env.items())}


def _check_preprocessed(dataset, configuration: str, plans: str):
    """(PreprocessedDataset, folder of the configuration's preprocessed cases), or BenchmarkError."""
    from nnunet_acnorm.nnunet.dataset import read_preprocessed_dataset

    ds = read_preprocessed_dataset(str(dataset), configuration, plans)
    data_identifier = ds.plans["configurations"][configuration].get("data_identifier")
    if data_identifier is None:  # a configuration that inherits from another
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        data_identifier = PlansManager(ds.plans).get_configuration(configuration).data_identifier
    data_folder = os.path.join(ds.folder, data_identifier)
    if not os.path.isdir(data_folder) or not os.listdir(data_folder):
        raise BenchmarkError(f"configuration {configuration} of {ds.name} is planned but not preprocessed "
                             f"({data_folder} is missing or empty): run nnUNetv2_preprocess -d {dataset} -c "
                             f"{configuration} -plans_name {plans}")
    return ds, data_folder


def _check_folds(folds: list[str], dataset_folder: str) -> int:
    """The number of folds of the split; a fold outside it (nnU-Net would train a random 80:20 split) is refused."""
    splits_file = os.path.join(dataset_folder, "splits_final.json")
    n = 5  # nnU-Net creates a 5-fold split when there is none
    if os.path.isfile(splits_file):
        try:
            with open(splits_file) as f:
                n = len(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise BenchmarkError(f"cannot read {splits_file}: {e}") from None
    outside = [f for f in folds if f != "all" and int(f) >= n]
    if outside:
        raise BenchmarkError(f"-f {' '.join(outside)}: the cross-validation split has folds 0-{n - 1} "
                             f"({splits_file if os.path.isfile(splits_file) else 'the 5-fold split nnU-Net creates'})")
    return n


def _check_pretrained(path: str | None, methods: list[Method]) -> dict | None:
    """The checkpoint's identity (path, sha256), after nnU-Net-checkpoint checks; None without one."""
    needs = [m.name for m in methods if m.pretrained]
    if path is None:
        if needs:
            raise BenchmarkError(f"-pretrained_weights is needed: {', '.join(needs)} fine-tune(s) from it "
                                 "(only the scratch* methods train without)")
        return None
    from nnunet_acnorm.nnunet.pretrained import PretrainedWeightsError, load_network_weights

    path = os.path.abspath(path)
    try:
        load_network_weights(path)
    except PretrainedWeightsError as e:
        raise BenchmarkError(f"-pretrained_weights: {e}") from None
    return {"path": path, "sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def software_versions() -> dict:
    """Python, platform and the versions of the packages that decide a run's numbers (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("nnunet-acnorm", "nnunetv2", "torch", "dynamic-network-architectures", "batchgeneratorsv2",
                    "numpy", "SimpleITK", "submitit"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def ext_trainer_path(trainer_folders=(), environ=None) -> str:
    """``nnUNet_extTrainer`` of the runs: the caller's, this package's trainers, then ``trainer_folders``."""
    from nnunet_acnorm.nnunet.discovery import trainer_shim_folder, with_trainer_folder

    environ = os.environ if environ is None else environ
    value = with_trainer_folder(environ.get("nnUNet_extTrainer"), trainer_shim_folder())
    for folder in trainer_folders:
        if not os.path.isdir(folder):
            raise BenchmarkError(f"--trainer-folder {folder} is not a folder")
        value = with_trainer_folder(value, os.path.abspath(folder))
    return value


def make_plan(spec: BenchmarkSpec, out: str, environ=None) -> Plan:
    """Check ``spec`` and expand it into runs under ``out`` (nothing is written). Raises :class:`BenchmarkError`
    (or another :class:`~nnunet_acnorm.errors.InputError`) with one line."""
    from datetime import datetime, timezone

    environ = os.environ if environ is None else environ
    if spec.device not in DEVICES:
        raise BenchmarkError(f"-device {spec.device}: one of {', '.join(DEVICES)}")
    folds, seeds, env = parse_folds(spec.folds), parse_seeds(spec.seeds), parse_env(spec.env)
    ext = ext_trainer_path(spec.trainer_folders, environ)
    ds, data_folder = _check_preprocessed(spec.dataset, spec.configuration, spec.plans)
    _check_folds(folds, ds.folder)
    if spec.epochs is not None and spec.epochs < 1:
        raise BenchmarkError(f"--epochs {spec.epochs}: at least 1")
    methods = resolve_methods(list(spec.methods), ext, spec.epochs)
    pretrained = _check_pretrained(spec.pretrained_weights, methods)
    what = {"dataset": ds.name, "configuration": spec.configuration, "plans": spec.plans,
            "preprocessed_folder": os.path.abspath(ds.folder), "pretrained_weights": pretrained,
            "methods": [asdict(m) for m in methods], "folds": folds, "seeds": seeds, "device": spec.device,
            "env": env}
    runs = expand_runs(what, os.path.abspath(out))
    environment = {"nnUNet_preprocessed": os.path.dirname(os.path.abspath(ds.folder)), "nnUNet_extTrainer": ext,
                   "trainer_folders": [os.path.abspath(f) for f in spec.trainer_folders],
                   "python": sys.executable, "recorded": {k: environ.get(k) for k in RECORDED_ENV}}
    return Plan(what, runs, environment, software_versions(), datetime.now(timezone.utc).isoformat(timespec="seconds"))


def expand_runs(what: dict, out: str) -> list[PlannedRun]:
    """One run per seed, method and fold (in that order), each method and seed in its own results root."""
    runs = []
    for seed in what["seeds"]:
        for m in what["methods"]:
            root = os.path.join(out, "runs", f"seed{seed}", m["name"])
            folder = os.path.join(root, what["dataset"], f"{m['trainer']}__{what['plans']}__{what['configuration']}")
            for fold in what["folds"]:
                runs.append(PlannedRun(run_id(m["name"], seed, fold), m["name"], m["trainer"], m["pretrained"], fold,
                                       seed, root, folder))
    return runs


def plan_differences(old: dict, new: dict) -> list[str]:
    """The options of ``what`` that differ, as ``key: old -> new`` phrases."""
    def show(v):
        if isinstance(v, list):
            return ",".join(m["name"] if isinstance(m, dict) and "name" in m else str(m) for m in v) or "-"
        if isinstance(v, dict) and "path" in v:
            return f"{v['path']} (sha256 {v['sha256'][:12]})"
        return json.dumps(v) if isinstance(v, dict) else str(v)

    return [f"{k}: {show(old.get(k))} -> {show(new.get(k))}" for k in new if old.get(k) != new.get(k)]
