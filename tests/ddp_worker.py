"""Run by torch.distributed.run in tests: two DDP training steps of an AC-Norm network on CPU/gloo,
set up as nnU-Net does (convert_sync_batchnorm, then DDP). Each rank saves its final state.

``ddp_worker.py OUT_DIR sync-cuda`` (tests/test_gpu.py): AC-BatchNorm with synchronised batch
statistics on CUDA (NCCL with one GPU per rank, or gloo with both ranks on one GPU): one forward and
backward of each rank's share of a batch against one process holding the whole batch; each rank
writes the largest differences to OUT_DIR/sync_rank<r>.json."""
import copy
import json
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_acnorm import acnorm_modules, acnorm_sync_batchnorm, convert_to_acnorm
from nnunet_acnorm.norms import ACBatchNorm3d


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                          nn.Conv3d(8, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True), nn.ReLU(),
                          nn.Conv3d(8, 2, 1))
    convert_to_acnorm(model)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # what nnU-Net's DDP set-up does
    assert len(acnorm_modules(model)) == 2, "AC-Norm was dropped by convert_sync_batchnorm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acnorm_sync_batchnorm(model)
        ddp = DDP(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(100 + rank)  # different data on each rank
        for _ in range(2):
            optimizer.zero_grad()
            x = torch.randn(2, 1, 8, 8, 8)
            ddp(x).square().mean().backward()
            optimizer.step()
        ddp.eval()
        with torch.no_grad():
            ddp(torch.randn(1, 1, 8, 8, 8))  # DDP broadcasts rank 0's buffers before each forward
    torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def sync_cuda_main(out_dir: str) -> None:
    """The synchronised AC-BatchNorm branch (``torch.nn.modules._functions.SyncBatchNorm`` with the
    recalibrated affine) against the plain AC-BatchNorm of one process on the concatenated batch."""
    n_gpus = torch.cuda.device_count()
    dist.init_process_group("nccl" if n_gpus >= 2 else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % n_gpus)
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    plain = nn.BatchNorm3d(8)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.normal_()
    layer = ACBatchNorm3d.from_norm(plain, tau=1.0)
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn(8))   # target != source: S is not the identity's
    reference = copy.deepcopy(layer).to(device).train()
    local = copy.deepcopy(layer).to(device).train()   # this rank's statistics only
    model = copy.deepcopy(layer).to(device).train()
    assert acnorm_sync_batchnorm(model) == 1
    ddp = DDP(model, device_ids=[device.index])
    generator = torch.Generator().manual_seed(7)
    xs = [torch.randn(2, 8, 4, 4, 4, generator=generator) * (1 + r) + r for r in range(world)]   # other statistics
    ws = [torch.randn(2, 8, 4, 4, 4, generator=generator) for _ in range(world)]
    y = ddp(xs[rank].to(device))
    (y * ws[rank].to(device)).sum().backward()
    y_ref = reference(torch.cat(xs).to(device))
    ((y_ref * torch.cat(ws).to(device)).sum() / world).backward()   # DDP averages the ranks' gradients
    mine = slice(2 * rank, 2 * rank + 2)
    diff = lambda a, b: float((a - b).abs().max())  # noqa: E731
    result = {"world_size": world, "backend": dist.get_backend(),
              "output": diff(y, y_ref[mine]), "running_mean": diff(model.running_mean, reference.running_mean),
              "running_var": diff(model.running_var, reference.running_var),
              "weight_grad": diff(model.weight.grad, reference.weight.grad),
              "bias_grad": diff(model.bias.grad, reference.bias.grad),
              "local_statistics_differ": diff(y, local(xs[rank].to(device))) > 1e-3}
    with torch.autocast("cuda", dtype=torch.float16):   # nnU-Net's mixed precision: float16 activations
        y16 = ddp(xs[rank].to(device).half())
    y16.float().sum().backward()
    result["autocast_output_dtype"] = str(y16.dtype)
    result["autocast_finite"] = bool(torch.isfinite(y16).all())
    with open(f"{out_dir}/sync_rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[2:] == ["sync-cuda"]:
        sync_cuda_main(sys.argv[1])
    else:
        main(sys.argv[1])
