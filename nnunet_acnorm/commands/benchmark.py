"""``nnUNetv2_acnorm_benchmark``: every method x fold x seed as one ``nnUNetv2_train`` call, here, on SLURM or
printed for any scheduler, then ``nnUNetv2_acnorm_compare``'s paired statistics and a Markdown report
(:mod:`nnunet_acnorm.benchmark`; see docs/benchmark.md).

    nnUNetv2_acnorm_benchmark -d D -c C [-p PLANS] -pretrained_weights FILE -tr NAME [NAME ...] [-f FOLD ...]
                              [--seeds S ...] -o OUT [--executor local|slurm|print] [--jobs N] [-device cuda|cpu]
    nnUNetv2_acnorm_benchmark -o OUT [--status | --retry-failed | --executor ...]     (continue / gather)
    nnUNetv2_acnorm_benchmark --list-methods
"""
from __future__ import annotations

import argparse
import sys

from nnunet_acnorm.benchmark import Benchmark, BenchmarkError, BenchmarkSpec, LocalExecutor, PrintExecutor, SlurmExecutor
from nnunet_acnorm.benchmark.executors import parse_time
from nnunet_acnorm.benchmark.methods import alias_table
from nnunet_acnorm.benchmark.plan import DEFAULT_FOLDS, DEVICES
from nnunet_acnorm.benchmark.report import status_lines
from nnunet_acnorm.commands._cli import run_command

PROG = "nnUNetv2_acnorm_benchmark"
#: exit status when runs failed (bad input: 1, usage: 2)
EXIT_FAILED_RUNS = 3
SPEC_OPTIONS = ("dataset", "configuration", "methods", "pretrained_weights")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Compare fine-tuning methods on your planned dataset: each method x fold x seed is one "
                    "nnUNetv2_train run with its own nnUNet_results under -o and nnUNet_acnorm_seed, run here "
                    "(--executor local), as one SLURM job array (slurm; returns after submission) or printed (print); "
                    "then the paired comparison of nnUNetv2_acnorm_compare and OUT/report/report.md. A later call with "
                    "the same -o (and the same options, or only -o) skips finished runs, gathers and reports.")
    what = p.add_argument_group("what to run (fixed by the first call on -o)")
    what.add_argument("-d", dest="dataset", help="dataset name or id (planned and preprocessed)")
    what.add_argument("-c", dest="configuration", help="configuration, e.g. 3d_fullres")
    what.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    what.add_argument("-pretrained_weights", default=None,
                      help="checkpoint to fine-tune from (nnUNetv2_train's or nnUNetv2_acnorm_import's output)")
    what.add_argument("-tr", dest="methods", nargs="+",
                      help="methods: aliases (vanilla, acnorm, acnorm_tau1, l2sp, lpft, delta, bss, dlr, scratch, ...; "
                           "--list-methods) or any nnU-Net trainer name")
    what.add_argument("-f", dest="folds", nargs="+", default=list(DEFAULT_FOLDS),
                      help="folds (default 0 1 2 3 4; or all)")
    what.add_argument("--epochs", type=int, default=None,
                      help="the budget, as nnU-Net names it: each method X becomes its variant X_<N>epochs "
                           "(e.g. acnorm -> acnorm_100epochs = nnUNetTrainerACNorm_100epochs); refused where none exists")
    what.add_argument("--seeds", nargs="+", default=["0"], help="seeds, one replicate each (default 0)")
    what.add_argument("-device", dest="device", default="cuda", choices=DEVICES, help="device (default cuda)")
    what.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="environment variable of every run, e.g. nnUNet_n_proc_DA=12 (repeatable)")
    what.add_argument("--trainer-folder", action="append", default=[], metavar="DIR",
                      help="folder of your own trainers, added to nnUNet_extTrainer (repeatable)")
    p.add_argument("-o", dest="output", required=False, help="output folder of the benchmark")
    how = p.add_argument_group("how to run (may change between calls)")
    how.add_argument("--executor", choices=("local", "slurm", "print"), default="local", help="default local")
    how.add_argument("--jobs", type=int, default=None,
                     help="runs at a time (local default: one per visible GPU, or 1 on CPU; slurm: array limit %%N)")
    how.add_argument("--gpus", nargs="+", default=None, help="local, cuda: GPU ids to use (default: all visible)")
    how.add_argument("--retry-failed", action="store_true", help="start the failed runs again too")
    how.add_argument("--status", action="store_true", help="run nothing: show where the runs stand, write the report")
    how.add_argument("--baseline", default=None, help="method compared against (default: the first of -tr)")
    how.add_argument("--no-progress", action="store_true", help="no progress bar")
    how.add_argument("--list-methods", action="store_true", help="print the method aliases and exit")
    slurm = p.add_argument_group("SLURM (--executor slurm)")
    slurm.add_argument("--partition", default=None, help="partition (default: the cluster's)")
    slurm.add_argument("--time", default="24:00:00", help="time limit per run, SLURM format (default 24:00:00)")
    slurm.add_argument("--cpus-per-run", type=int, default=None, help="CPUs per run (default: the cluster's)")
    slurm.add_argument("--mem", type=float, default=None, help="memory per run in GB (default: the cluster's)")
    slurm.add_argument("--gpus-per-run", type=int, default=None, help="GPUs per run (default 1 with -device cuda)")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. account=abc, qos=high, gres=gpu:a100:1 (repeatable)")
    return p


def _pairs(values: list[str], flag: str) -> dict:
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise BenchmarkError(f"{flag} {value!r}: use KEY=VALUE")
        out[key] = val
    return out


def spec_from_args(args) -> BenchmarkSpec | None:
    given = [name for name in SPEC_OPTIONS if getattr(args, name) is not None]
    if not given:
        return None
    missing = [f"-{ {'dataset': 'd', 'configuration': 'c', 'methods': 'tr'}[n]}" for n in SPEC_OPTIONS[:3]
               if getattr(args, n) is None]
    if missing:
        raise BenchmarkError(f"missing {', '.join(missing)}: a benchmark needs -d, -c and -tr (or only -o to continue one)")
    return BenchmarkSpec(args.dataset, args.configuration, args.methods, args.pretrained_weights, args.plans,
                         args.folds, args.seeds, args.device, _pairs(args.env, "--env"), args.trainer_folder,
                         args.epochs)


#: options that only one executor reads (dest -> (flag, executor))
EXECUTOR_OPTIONS = {"gpus": ("--gpus", "local"), "partition": ("--partition", "slurm"),
                    "cpus_per_run": ("--cpus-per-run", "slurm"), "mem": ("--mem", "slurm"),
                    "gpus_per_run": ("--gpus-per-run", "slurm"), "sbatch": ("--sbatch", "slurm")}


def make_executor(args, device: str, output=print):
    for dest, (flag, executor) in EXECUTOR_OPTIONS.items():
        if getattr(args, dest) not in (None, []) and args.executor != executor:
            raise BenchmarkError(f"{flag} is for --executor {executor} (this call's executor is {args.executor})")
    if args.executor == "print":
        return PrintExecutor(output)
    if args.executor == "slurm":
        return SlurmExecutor(device, args.partition, parse_time(args.time), args.cpus_per_run, args.mem,
                             args.gpus_per_run, args.jobs, _pairs(args.sbatch, "--sbatch"), output)
    return LocalExecutor(device, args.jobs, args.gpus, progress=not args.no_progress, output=output)


def print_aliases(output=print) -> None:
    output(f"{'alias':28} {'trainer':40} initialisation")
    for alias, m in alias_table().items():
        output(f"{alias:28} {m.trainer:40} {'pretrained' if m.pretrained else 'random (scratch)'}")
    output("Any other -tr value is an nnU-Net trainer class name, trained from -pretrained_weights.")


def _summary(bench: Benchmark, statuses, summary: dict) -> None:
    print(f"\n{bench.folder.out}:")
    if bench.slurm_error:
        print(f"  (SLURM cannot be asked about the submitted jobs: {bench.slurm_error})")
    print("\n".join(status_lines(bench.folder, bench.plan, statuses)))
    if summary["table"] is not None:
        print("\n" + summary["table"])
    else:
        print(f"\n{summary['why']}")
    print(f"\nReport: {summary['report']}")


def _gather(bench: Benchmark, args, write: bool = True) -> int:
    statuses = bench.statuses()
    if write:
        summary = bench.report(args.baseline, statuses)
    else:
        summary = {"table": None, "why": "(another call is working on this folder: the report is left to it)",
                   "report": bench.folder.report}
    _summary(bench, statuses, summary)
    failed = [s for s in statuses if s.state == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed; start them again with: {PROG} -o {bench.folder.out} --retry-failed",
              file=sys.stderr)
    return EXIT_FAILED_RUNS if failed and not args.status else 0


def main(argv: list | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_methods:
        print_aliases()
        return 0
    if not args.output:
        raise BenchmarkError("-o OUT is required (the benchmark's folder)")
    bench = Benchmark.open(args.output, spec_from_args(args))
    if args.status and bench.is_new:
        raise BenchmarkError(f"{bench.folder.out} holds no benchmark yet: nothing to show (start it without --status)")
    executor = make_executor(args, bench.plan.what["device"])
    if args.status:
        with bench.locked(wait_for_others=False) as mine:
            return _gather(bench, args, write=mine)
    executor.check()
    with bench.locked():
        bench.start()
        bench.execute(executor, args.retry_failed)
        if args.executor == "print":
            return 0  # the runs are printed, not run: nothing to gather yet
        return _gather(bench, args)


def benchmark_entry(argv: list | None = None) -> None:
    """Exit status: 0, 1 for bad input (one line), 3 when runs failed, 130 on Ctrl-C."""
    status = []
    run_command(PROG, lambda a: status.append(main(a)), argv)
    sys.exit(status[0] if status else 0)


if __name__ == "__main__":
    benchmark_entry()
