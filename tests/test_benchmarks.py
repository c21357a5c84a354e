"""The benchmark scripts run and print their tables (quick settings; figures are in the README)."""
import math
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_norm_layer_benchmark_quick_run():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "benchmark_norm_layers.py"), "--quick",
                             "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 3D") or line.startswith("| 2D")]
    assert len(rows) == 8
    for row in rows:
        time_plain, time_two_pass, memory_plain, memory_two_pass = (float(c) for c in row.strip("|").split("|")[3:7])
        assert math.isfinite(time_plain) and math.isfinite(time_two_pass), row  # timings: figures, not claims
        # saved-activation memory is deterministic: the fused layer keeps what the plain norm keeps
        # (one normalised tensor), the two-pass formula keeps more
        assert 0.99 <= memory_plain <= 1.01, row
        assert memory_two_pass < 0.8, row
