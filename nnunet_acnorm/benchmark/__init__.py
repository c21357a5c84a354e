"""The paper's comparison on the user's own data: every method x fold x seed as one ``nnUNetv2_train``
call, run here, on SLURM or by any scheduler, then compared with ``nnUNetv2_acnorm_compare``'s
statistics (``nnUNetv2_acnorm_benchmark``; docs/benchmark.md).

- :mod:`~nnunet_acnorm.benchmark.methods`: method names, aliases derived from the trainer registry;
- :mod:`~nnunet_acnorm.benchmark.plan`: the checked plan of runs (:class:`BenchmarkSpec`, :func:`make_plan`);
- :mod:`~nnunet_acnorm.benchmark.state`: the output folder and where each run stands;
- :mod:`~nnunet_acnorm.benchmark.worker`: one run (command, environment, log, state);
- :mod:`~nnunet_acnorm.benchmark.executors`: local, SLURM (submitit) and print executors;
- :mod:`~nnunet_acnorm.benchmark.report`: the comparison of the finished runs and the Markdown report;
- :mod:`~nnunet_acnorm.benchmark.runner`: :class:`Benchmark`, which ties them together.
"""
from nnunet_acnorm.benchmark.executors import LocalExecutor, PrintExecutor, SlurmExecutor
from nnunet_acnorm.benchmark.methods import Method, alias_table, resolve_methods
from nnunet_acnorm.benchmark.plan import BenchmarkError, BenchmarkSpec, Plan, PlannedRun, make_plan
from nnunet_acnorm.benchmark.runner import Benchmark

__all__ = ["Benchmark", "BenchmarkSpec", "BenchmarkError", "Plan", "PlannedRun", "make_plan", "Method", "alias_table",
           "resolve_methods", "LocalExecutor", "SlurmExecutor", "PrintExecutor"]
