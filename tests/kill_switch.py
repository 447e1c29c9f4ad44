"""A test-only callback that ends its process with SIGKILL, as a lost node or an OOM killer would."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL the process when training step ``step`` is about to start (the step checkpoint of the previous
    step is complete by then: ``ModelCheckpoint`` saves in ``on_train_batch_end``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class NaNImagesOnRank(L.Callback):
    """Make the training images NaN on global rank ``rank`` at step ``step`` only (a fault on one GPU)."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            batch[0].fill_(float("nan"))
