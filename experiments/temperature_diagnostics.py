"""What the temperature does to S: per-layer spread of the domain indicator and the correlation it gives.

    python experiments/temperature_diagnostics.py --output OUT \\
        --checkpoint IN_short=/path/checkpoint_final.pth --checkpoint BN_short=/path/... \\
        [--finetuned acnorm_tau1=/path/fold_0/checkpoint_final.pth ...]

For every pretrained checkpoint (nnU-Net ``checkpoint_final.pth`` or a plain state dict) and each
of its norm layers: the number of channels C, the standard deviation of the source indicators
y = beta / (|gamma| + 1e-5), the mean step-0 diagonal of A at the paper's tau = 1 (1/C means a
uniform row: S carries no information) and the calibrated temperature of ``tau="auto"``.

For every fine-tuned AC-Norm checkpoint (``--finetuned``; its source buffers are the pretrained
affines) and each layer, at the layer's own temperature: the mean diagonal S[i, i], the mean
number of entries kept per row of S, and the applied affine relative to the target,
mean_i ((I + S) gamma_t)_i / gamma_t_i.

Writes ``temperature.json``, ``temperature.md`` and ``indicator_spread.png`` into OUT.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from nnunet_acnorm.norms.ac_corr import norm_affines
from nnunet_acnorm.norms import calibrated_tau, domain_indicator, source_diagonal, sparse_correlation
from nnunet_acnorm.checkpoints.io import safe_torch_load


def _state_dict(path: Path) -> dict:
    checkpoint = safe_torch_load(path)
    state = checkpoint.get("network_weights", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def pretrained_rows(name: str, path: Path) -> list[dict]:
    rows = []
    for layer, (weight, bias) in norm_affines(_state_dict(path)).items():
        y = domain_indicator(weight.double(), bias.double())
        tau = calibrated_tau(weight, bias)
        rows.append({"network": name, "layer": layer, "C": y.numel(), "std_y": float(y.std()) if y.numel() > 1 else 0.0,
                     "diag_tau1": source_diagonal(weight, bias, 1.0), "uniform": 1.0 / y.numel(),
                     "tau_auto": tau})
    return rows


def finetuned_rows(name: str, path: Path) -> list[dict]:
    state = _state_dict(path)
    rows = []
    for key in state:
        if not key.endswith(".source_weight"):
            continue
        prefix = key[: -len("source_weight")]
        if "decoder.encoder." in prefix or "all_modules" in prefix:
            continue
        sw, sb = state[prefix + "source_weight"], state[prefix + "source_bias"]
        tw, tb = state[prefix + "weight"], state[prefix + "bias"]
        tau = 1.0 if "tau1" in name else (calibrated_tau(sw, sb) or 1.0)
        s = sparse_correlation(sw, sb, tw, tb, tau).double()
        applied = (tw.double() + s @ tw.double()) / tw.double()
        rows.append({"network": name, "layer": prefix[:-1], "C": sw.numel(), "tau": tau,
                     "S_diag": float(s.diagonal().mean()), "kept_per_row": float((s > 0).sum(1).double().mean()),
                     "applied_over_target": float(applied.mean()),
                     "target_drift": float(((tw - sw).abs() / sw.abs().clamp_min(1e-8)).mean())})
    return rows


def _summary(rows: list[dict], keys: list[str]) -> dict:
    out = {}
    for key in keys:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--finetuned", action="append", default=[], metavar="NAME=PATH")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    pre = {n: pretrained_rows(n, Path(p)) for n, p in (a.split("=", 1) for a in args.checkpoint)}
    fin = {n: finetuned_rows(n, Path(p)) for n, p in (a.split("=", 1) for a in args.finetuned)}
    result = {"pretrained": {n: {"layers": r, "summary": _summary(r, ["std_y", "diag_tau1", "tau_auto"])}
                             for n, r in pre.items()},
              "finetuned": {n: {"layers": r, "summary": _summary(r, ["S_diag", "kept_per_row",
                                                                     "applied_over_target"])}
                            for n, r in fin.items()}}
    (args.output / "temperature.json").write_text(json.dumps(result, indent=2))

    lines = ["| network | layers | std of y (min / median / max) | step-0 diag at tau=1 (median; uniform 1/C) | "
             "calibrated tau (min / median / max) |", "|---|---|---|---|---|"]
    for n, rows in pre.items():
        s = result["pretrained"][n]["summary"]
        uniform = statistics.median(r["uniform"] for r in rows)
        tau = s["tau_auto"]
        tau_text = f"{tau['min']:.3g} / {tau['median']:.3g} / {tau['max']:.3g}" if tau else "not calibrated"
        lines.append(f"| {n} | {len(rows)} | {s['std_y']['min']:.3g} / {s['std_y']['median']:.3g} / "
                     f"{s['std_y']['max']:.3g} | {s['diag_tau1']['median']:.3f} ({uniform:.3f}) | {tau_text} |")
    if fin:
        lines += ["", "| fine-tuned model | layers | S[i,i] (median over layers) | entries kept per row (median) | "
                  "applied / target affine (min / median / max) |", "|---|---|---|---|---|"]
        for n, rows in fin.items():
            s = result["finetuned"][n]["summary"]
            a = s["applied_over_target"]
            lines.append(f"| {n} | {len(rows)} | {s['S_diag']['median']:.3f} | {s['kept_per_row']['median']:.1f} | "
                         f"{a['min']:.3f} / {a['median']:.3f} / {a['max']:.3f} |")
    (args.output / "temperature.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for n, rows in pre.items():
        ax.plot(range(len(rows)), [r["std_y"] for r in rows], marker="o", label=n)
    ax.axhline(1.0, color="grey", linestyle="--", label="paper's tau = 1")
    ax.set_yscale("log")
    ax.set_xlabel("norm layer (network order)")
    ax.set_ylabel("std of y = beta / |gamma| across channels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output / "indicator_spread.png", dpi=120)


if __name__ == "__main__":
    main()
