"""The benchmark scripts run and print their tables (quick settings; figures are in the README)."""
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
        ratios = [float(cell) for cell in row.strip("|").split("|")[3:7]]
        assert all(r > 0 for r in ratios), row
