"""Does a higher AC-Corr predict a better fine-tuned model? (method.md section 2, "the direction")

A small zoo of source models is built from the bundled real CT/MR data (TotalSegmentator
examples, ``nnunet_acnorm/demo/data``), each one is actually fine-tuned with AC-Norm on ONE target
task (MR abdominal organs), and the fine-tuned Dice on held-out MR slices is compared with the
estimators computed before fine-tuning:

- AC-Corr after 1 step (the paper's single backpropagation step), at step 0, its change, and
  after 10 steps; deepest encoder norm, tau = 1;
- LogME (You et al. 2021) on the deepest encoder norm's features at labelled voxels.

Zoo (all nnU-Net PlainConvUNet, InstanceNorm, same architecture; the head is always fresh):
  ct_organs          supervised on CT, the target's organs (other modality, same task)
  ct_organs_short    the same with 1/6 of the pretraining steps
  ct_other_labels    supervised on CT, four other structures (other modality, other task)
  mr_other_labels    supervised on the MR training slabs, four other structures (same modality, other task)
  ct_inverted        ct_organs' recipe on intensity-inverted CT (synthetic variant)
  noise              supervised on smoothed noise with thresholded noise labels (synthetic)
  random_init        no pretraining

Target: the liver on MR (117 x 91 x 20 voxels, 3 mm). Slabs of 4 slices alternate between
training (slices 0-3, 8-11, 16-19) and test (4-7, 12-15); patches are 4 x 48 x 48. The sources
with organ labels learn liver, spleen, kidneys and stomach.

Small by default so that it runs in a few minutes on a 2-core CPU: the evidence from 7 models,
one target volume and label maps that are model predictions is weak, and the script says so.
Prints a Markdown table; writes JSON, CSV and a scatter plot to ``--out``.

    python benchmarks/acnorm_direction_experiment.py [--pretrain_steps 200] [--finetune_steps 40] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nnunet_acnorm.norms import convert_to_acnorm  # noqa: E402
from nnunet_acnorm.ranking.estimators import ac_corr_after_steps, logme_of_layer  # noqa: E402

DEMO_DATA = ROOT / "nnunet_acnorm" / "demo" / "data"
#: TotalSegmentator ids -> source ids: liver, spleen, kidneys (right, left), stomach
ORGANS = {5: 1, 1: 2, 2: 3, 3: 3, 6: 4}
#: the target task: the liver on MR
TARGET = {5: 1}
N_CLASSES = 2
PATCH = (4, 48, 48)
STRIDES = [[1, 1, 1], [1, 2, 2], [1, 2, 2]]
FEATURES = [8, 16, 32]
SLAB = 4


# -- data -------------------------------------------------------------------------------------------
def read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (z, y, x)


def normalise_ct(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [0.5, 99.5])
    image = np.clip(image.astype(np.float32), lo, hi)
    return (image - image.mean()) / (image.std() + 1e-8)


def normalise_mr(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32)
    return (image - image.mean()) / (image.std() + 1e-8)


def remap(seg: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = np.zeros(seg.shape, dtype=np.int64)
    for old, new in mapping.items():
        out[seg == old] = new
    return out


def other_labels(seg: np.ndarray, exclude, n: int = 4) -> dict[int, int]:
    """The ``n`` most frequent labels outside ``exclude`` -> 1..n."""
    values, counts = np.unique(seg, return_counts=True)
    ranked = [int(v) for v, _ in sorted(zip(values, counts), key=lambda t: -t[1]) if v != 0 and v not in exclude]
    return {v: i + 1 for i, v in enumerate(ranked[:n])}


def smooth_noise(shape, rng: np.random.RandomState, sigma: float = 3.0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.normal(size=shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def load_data(data_dir: Path, seed: int) -> dict:
    ct, ct_seg = normalise_ct(read(data_dir / "ct_abdomen.nii.gz")), read(data_dir / "ct_abdomen_seg.nii.gz")
    mr, mr_seg = normalise_mr(read(data_dir / "mr_abdomen.nii.gz")), read(data_dir / "mr_abdomen_seg.nii.gz")
    z = np.arange(mr.shape[0])
    train_z, test_z = z[(z // SLAB) % 2 == 0], z[(z // SLAB) % 2 == 1]
    rng = np.random.RandomState(seed)
    noise_shape = (24, 96, 96)
    noise_image = smooth_noise(noise_shape, rng, 2.0).astype(np.float32)
    noise_seg = np.digitize(smooth_noise(noise_shape, rng, 4.0), [-0.8, 0.0, 0.8]).astype(np.int64)
    noise_image += noise_seg.astype(np.float32)  # labels visible in the image, as in real data
    mr_other = other_labels(mr_seg[train_z], ORGANS)
    return {
        "ct_organs": ([ct], [remap(ct_seg, ORGANS)]),
        "ct_inverted": ([-ct], [remap(ct_seg, ORGANS)]),
        "ct_other_labels": ([ct], [remap(ct_seg, other_labels(ct_seg, ORGANS))]),
        "mr_other_labels": (slabs(mr, train_z), slabs(remap(mr_seg, mr_other), train_z)),
        "noise": ([noise_image], [noise_seg]),
        "target_train": (slabs(mr, train_z), slabs(remap(mr_seg, TARGET), train_z)),
        "target_test": (slabs(mr, test_z), slabs(remap(mr_seg, TARGET), test_z)),
    }


def slabs(volume: np.ndarray, zs: np.ndarray) -> list[np.ndarray]:
    """Consecutive runs of ``zs`` as separate volumes (patches never straddle a gap)."""
    runs, start = [], 0
    for i in range(1, len(zs) + 1):
        if i == len(zs) or zs[i] != zs[i - 1] + 1:
            runs.append(volume[zs[start]:zs[i - 1] + 1])
            start = i
    return runs


def sample_batches(images, segs, n: int, batch_size: int, seed: int, fg_fraction: float = 0.5) -> list[dict]:
    """Random patches (half of them centred on a foreground voxel), with nnU-Net-style deep
    supervision targets."""
    rng = np.random.RandomState(seed)
    batches = []
    for _ in range(n):
        data, target = [], []
        for b in range(batch_size):
            k = rng.randint(len(images))
            image, seg = images[k], segs[k]
            pad = [(max(0, (p - s + 1) // 2), max(0, p - s - (p - s + 1) // 2)) for p, s in zip(PATCH, image.shape)]
            image, seg = np.pad(image, pad), np.pad(seg, pad)
            if rng.rand() < fg_fraction and (seg > 0).any():
                fg = np.argwhere(seg > 0)
                centre = fg[rng.randint(len(fg))]
                start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, PATCH, image.shape)]
            else:
                start = [rng.randint(0, s - p + 1) for p, s in zip(PATCH, image.shape)]
            window = tuple(slice(a, a + p) for a, p in zip(start, PATCH))
            data.append(image[window][None])
            target.append(seg[window][None])
        seg_t = torch.from_numpy(np.stack(target)).float()
        batches.append({"data": torch.from_numpy(np.stack(data)).float(), "target": ds_targets(seg_t)})
    return batches


def ds_targets(seg: torch.Tensor) -> list[torch.Tensor]:
    scales = np.cumprod(np.array(STRIDES), axis=0)[:-1]
    return [seg if (s == 1).all() else
            F.interpolate(seg, size=[d // int(f) for d, f in zip(seg.shape[2:], s)], mode="nearest") for s in scales]


# -- network, loss, training ------------------------------------------------------------------------
def build_network(num_classes: int) -> torch.nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    n = len(FEATURES)
    return PlainConvUNet(1, n, FEATURES, torch.nn.Conv3d, [[1, 3, 3]] + [[3, 3, 3]] * (n - 1), STRIDES, [2] * n,
                         num_classes, [2] * (n - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


@functools.lru_cache(maxsize=None)
def _trainer():
    """nnU-Net's trainer for the plans of :func:`build_network`'s PlainConvUNet (batch Dice): its loss
    and optimiser (:mod:`nnunet_acnorm.nnunet.training_step`). The loss does not depend on the number
    of classes."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_acnorm.nnunet.plain_unet_plans import default_dataset_json, default_plans
    from nnunet_acnorm.nnunet.training_step import construct_trainer

    plans = default_plans(PATCH, FEATURES, 3)
    configuration = plans["configurations"]["bench"]
    configuration["batch_dice"] = True
    configuration["architecture"]["arch_kwargs"].update(
        kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * (len(FEATURES) - 1), strides=STRIDES)
    return construct_trainer(nnUNetTrainer, plans, "bench", default_dataset_json(N_CLASSES))


def build_loss() -> torch.nn.Module:
    from nnunet_acnorm.nnunet.training_step import build_loss as trainer_loss

    return trainer_loss(_trainer())


def make_step(network, loss, optimizer):
    from nnunet_acnorm.nnunet.training_step import make_train_step

    return make_train_step(network, loss, optimizer)


def sgd(network, lr: float):
    from nnunet_acnorm.nnunet.training_step import build_optimizer

    return build_optimizer(_trainer(), network, lr)


def train(network, batches: list[dict], lr: float) -> float:
    """SGD with nnU-Net's poly schedule over ``len(batches)`` steps; returns seconds per step."""
    optimizer = sgd(network, lr)
    step = make_step(network, build_loss(), optimizer)
    network.train()
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - i / len(batches)) ** 0.9
        step(batch)
    return (time.perf_counter() - start) / max(1, len(batches))


def transfer(source: torch.nn.Module | None, seed: int) -> torch.nn.Module:
    """A target network (fresh head) with every non-head tensor of ``source`` (nnU-Net's rule)."""
    torch.manual_seed(seed)
    network = build_network(N_CLASSES)
    if source is not None:
        state = {k: v for k, v in source.state_dict().items() if ".seg_layers." not in k}
        network.load_state_dict(state, strict=False)
    return network


@torch.no_grad()
def dice_on(network, images, segs) -> float:
    """Mean Dice over the target classes on the test slabs (whole slabs, one forward each)."""
    from sklearn.metrics import f1_score

    network.eval()
    truth, pred = [], []
    for image, seg in zip(images, segs):
        shape = image.shape
        padded = [int(np.ceil(s / d) * d) for s, d in zip(shape, np.prod(np.array(STRIDES), axis=0))]
        x = torch.zeros(1, 1, *padded)
        x[0, 0, :shape[0], :shape[1], :shape[2]] = torch.from_numpy(image)
        out = network(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        pred.append(out[0].argmax(0)[:shape[0], :shape[1], :shape[2]].numpy().reshape(-1))
        truth.append(seg.reshape(-1))
    network.train()
    scores = f1_score(np.concatenate(truth), np.concatenate(pred), labels=list(range(1, N_CLASSES)), average=None,
                      zero_division=0)
    return float(np.mean(scores))


# -- the experiment --------------------------------------------------------------------------------
def run(args) -> dict:
    torch.set_num_threads(max(1, args.threads))
    data = load_data(Path(args.data), args.seed)
    pretrain_plan = {
        "ct_organs": ("ct_organs", args.pretrain_steps),
        "ct_organs_short": ("ct_organs", max(1, args.pretrain_steps // 6)),
        "ct_other_labels": ("ct_other_labels", args.pretrain_steps),
        "mr_other_labels": ("mr_other_labels", args.pretrain_steps),
        "ct_inverted": ("ct_inverted", args.pretrain_steps),
        "noise": ("noise", args.pretrain_steps),
        "random_init": (None, 0),
    }
    target_train, target_test = data["target_train"], data["target_test"]
    finetune_batches = sample_batches(*target_train, args.finetune_steps, 2, args.seed + 1)
    estimator_batches = finetune_batches[:max(10, args.logme_batches)]  # the same first batches for every model
    rows = []
    for name, (task, steps) in pretrain_plan.items():
        t0 = time.perf_counter()
        source = None
        if task is not None:
            images, segs = data[task]
            n_classes = int(max(s.max() for s in segs)) + 1
            torch.manual_seed(args.seed)
            source = build_network(n_classes)
            train(source, sample_batches(images, segs, steps, 2, args.seed + 2), args.lr)
        pretrain_seconds = time.perf_counter() - t0

        # estimators (before any fine-tuning); every one starts from the same transferred network
        def acnorm_copy():
            net = transfer(source, args.seed)
            convert_to_acnorm(net, tau=1.0, set_source=True)
            return net

        t0 = time.perf_counter()
        net = acnorm_copy()
        one = ac_corr_after_steps(net, make_step(net, build_loss(), sgd(net, args.lr)), estimator_batches, 1)
        ac_corr_seconds = time.perf_counter() - t0
        net = acnorm_copy()
        ten = ac_corr_after_steps(net, make_step(net, build_loss(), sgd(net, args.lr)), estimator_batches, 10)
        t0 = time.perf_counter()
        plain = transfer(source, args.seed)
        layer = list(one.per_layer)[0]
        logme_value = logme_of_layer(plain, layer, estimator_batches[:args.logme_batches], per_class=200,
                                     seed=args.seed)
        logme_seconds = time.perf_counter() - t0

        # the truth: AC-Norm fine-tuning on the target, Dice on the held-out slabs
        finetuned = acnorm_copy()
        seconds_per_step = train(finetuned, finetune_batches, args.lr)
        dice = dice_on(finetuned, *target_test)
        rows.append({"model": name, "pretrain_steps": steps, "dice": dice, "ac_corr_1": one.score,
                     "ac_corr_0": one.score_at_start, "ac_corr_change_1": one.score - one.score_at_start,
                     "ac_corr_10": ten.score, "logme": logme_value, "layer": layer,
                     "seconds_ac_corr": ac_corr_seconds, "seconds_logme": logme_seconds,
                     "seconds_per_finetune_step": seconds_per_step, "seconds_pretrain": pretrain_seconds})
        print(f"  {name}: Dice {dice:.3f}  AC-Corr(1) {one.score:.4f}  AC-Corr(0) {one.score_at_start:.4f}  "
              f"AC-Corr(10) {ten.score:.4f}  LogME {logme_value:.4f}", flush=True)
    return {"rows": rows, "settings": vars(args), "correlations": correlations(rows)}


def correlations(rows: list[dict]) -> dict:
    from scipy.stats import kendalltau, pearsonr

    dice = [r["dice"] for r in rows]
    out = {}
    for key in ("ac_corr_1", "ac_corr_0", "ac_corr_change_1", "ac_corr_10", "logme"):
        values = [r[key] for r in rows]
        if np.ptp(values) == 0 or np.ptp(dice) == 0:
            out[key] = {"kendall_tau": float("nan"), "kendall_p": float("nan"), "pearson_r": float("nan"),
                        "pearson_p": float("nan")}
            continue
        tau, tau_p = kendalltau(values, dice)
        r, r_p = pearsonr(values, dice)
        out[key] = {"kendall_tau": float(tau), "kendall_p": float(tau_p), "pearson_r": float(r),
                    "pearson_p": float(r_p)}
    return out


LABELS = {"ac_corr_1": "AC-Corr, 1 step", "ac_corr_0": "AC-Corr at step 0", "ac_corr_change_1": "AC-Corr change in 1 step",
          "ac_corr_10": "AC-Corr, 10 steps", "logme": "LogME"}


def markdown(result: dict) -> str:
    rows = result["rows"]
    epoch = np.median([r["seconds_per_finetune_step"] for r in rows]) * 250
    lines = ["| source model | fine-tuned Dice | AC-Corr (1 step) | AC-Corr (step 0) | change | AC-Corr (10 steps) | LogME |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["dice"]):
        lines.append(f"| {r['model']} | {r['dice']:.3f} | {r['ac_corr_1']:.4f} | {r['ac_corr_0']:.4f} | "
                     f"{r['ac_corr_change_1']:+.2e} | {r['ac_corr_10']:.4f} | {r['logme']:.4f} |")
    lines += ["", "| estimator | Kendall tau (p) | Pearson r (p) |", "|---|---|---|"]
    for key, c in result["correlations"].items():
        lines.append(f"| {LABELS[key]} | {c['kendall_tau']:+.2f} ({c['kendall_p']:.2f}) | "
                     f"{c['pearson_r']:+.2f} ({c['pearson_p']:.2f}) |")
    ac = np.median([r["seconds_ac_corr"] for r in rows])
    lm = np.median([r["seconds_logme"] for r in rows])
    lines += ["", "| cost (median per candidate) | seconds | fraction of one fine-tuning epoch |", "|---|---|---|",
              f"| AC-Corr, 1 step (incl. building the network) | {ac:.2f} | {ac / epoch:.4f} |",
              f"| LogME | {lm:.2f} | {lm / epoch:.4f} |",
              f"| one fine-tuning epoch (250 iterations at the measured step time) | {epoch:.1f} | 1 |"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    keys = ("ac_corr_1", "ac_corr_10", "logme")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    for ax, key in zip(axes, keys):
        ax.scatter([r[key] for r in rows], [r["dice"] for r in rows])
        for r in rows:
            ax.annotate(r["model"], (r[key], r["dice"]), fontsize=6)
        c = result["correlations"][key]
        ax.set_title(f"{LABELS[key]}: tau {c['kendall_tau']:+.2f}, r {c['pearson_r']:+.2f}", fontsize=8)
        ax.set_xlabel(LABELS[key], fontsize=8)
        ax.set_ylabel("fine-tuned Dice (held-out MR slabs)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEMO_DATA), help="folder with ct_abdomen*.nii.gz and mr_abdomen*.nii.gz")
    p.add_argument("--pretrain_steps", type=int, default=200)
    p.add_argument("--finetune_steps", type=int, default=40)
    p.add_argument("--logme_batches", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-2, help="SGD learning rate of pretraining, fine-tuning and the "
                   "AC-Corr steps (nnU-Net's 1e-2; poly decay)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="folder for direction.json/.csv/.png (default: print only)")
    args = p.parse_args(argv)
    for needed in ("ct_abdomen.nii.gz", "ct_abdomen_seg.nii.gz", "mr_abdomen.nii.gz", "mr_abdomen_seg.nii.gz"):
        if not (Path(args.data) / needed).is_file():
            sys.exit(f"acnorm_direction_experiment: error: {Path(args.data) / needed} not found; pass --data with the "
                     "bundled demo data folder")
    start = time.perf_counter()
    result = run(args)
    result["seconds_total"] = time.perf_counter() - start
    table = markdown(result)
    print()
    print(table)
    print(f"\nTotal: {result['seconds_total']:.0f} s. Evidence is weak: {len(result['rows'])} source models, one target "
          "volume, label maps that are model predictions; p-values above say how weak.")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "direction.json").write_text(json.dumps(result, indent=2))
        with open(out / "direction.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
            writer.writeheader()
            writer.writerows(result["rows"])
        (out / "direction.md").write_text(table + "\n")
        plot(result, out / "direction.png")


if __name__ == "__main__":
    main()
