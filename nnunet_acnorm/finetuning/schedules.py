"""Learning-rate schedules of the fine-tuning trainers: linear warm-up, then nnU-Net's poly decay
(:class:`WarmupPolyLRScheduler`), and the same curve as nnU-Net master's ``PretrainedTrainer``
(:class:`PretrainedTrainerLRScheduler`)."""
from __future__ import annotations

from torch.optim.lr_scheduler import _LRScheduler


class WarmupPolyLRScheduler(_LRScheduler):
    """Linear warm-up to ``peak_lr`` over ``warmup_epochs``, then poly decay to 0 at ``max_epochs``.

    Stepped once per epoch with the epoch index, like nnU-Net's ``PolyLRScheduler``
    (``scheduler.step(current_epoch)``), so that ``--c`` resumes on the same curve. Epoch ``e`` of
    the warm-up uses ``peak_lr * (e + 1) / (warmup_epochs + 1)`` (never 0: the first epoch trains);
    afterwards ``peak_lr * (1 - (e - warmup_epochs) / (max_epochs - warmup_epochs)) ** exponent``.
    """

    def __init__(self, optimizer, peak_lr: float, max_epochs: int, warmup_epochs: int,
                 exponent: float = 0.9, current_step: int | None = None):
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
        if not 0 <= warmup_epochs < max_epochs:
            raise ValueError(f"warmup_epochs must be in [0, max_epochs={max_epochs}), got {warmup_epochs}")
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.max_epochs = max_epochs
        self.warmup_epochs = warmup_epochs
        self.exponent = exponent
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.peak_lr * (epoch + 1) / (self.warmup_epochs + 1)
        progress = (epoch - self.warmup_epochs) / (self.max_epochs - self.warmup_epochs)
        return self.peak_lr * max(0.0, 1.0 - progress) ** self.exponent

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        new_lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


class PretrainedTrainerLRScheduler(WarmupPolyLRScheduler):
    """The learning rate of nnU-Net master's ``PretrainedTrainer`` (``nnunetv2/training/lr_scheduler/
    warmup.py``: ``Lin_incr_LRScheduler`` over the warm-up, then ``PolyLRScheduler_offset``), as one
    scheduler stepped with the epoch index.

    Epoch ``e`` of the warm-up uses ``peak_lr * (e + 1) / warmup_epochs`` (the peak is reached in
    its last epoch, as nnU-Net's); afterwards the poly decay of :class:`WarmupPolyLRScheduler`,
    ``peak_lr * (1 - (e - warmup_epochs) / (max_epochs - warmup_epochs)) ** exponent``.
    """

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.peak_lr * (epoch + 1) / self.warmup_epochs
        return super().lr_at(epoch)
