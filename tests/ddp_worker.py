"""Run by torch.distributed.run in tests: two DDP training steps of an AC-Norm network on CPU/gloo,
set up as nnU-Net does (convert_sync_batchnorm, then DDP). Each rank saves its final state."""
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_acnorm import acnorm_modules, acnorm_sync_batchnorm, convert_to_acnorm


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


if __name__ == "__main__":
    main(sys.argv[1])
