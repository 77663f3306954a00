"""Training: the Ray Train worker loop, its plain-PyTorch steps, and the driver."""


class Interrupted(Exception):
    """Ctrl-C stopped a run or a sweep; the message says where it can continue from."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the weights after that step are garbage."""

    def __init__(self, step: int, epoch: int | None = None) -> None:
        """`step`: 0-based, within the epoch when `epoch` is None, else counted from the run's start."""
        where = f"optimizer step {step + 1} of the epoch" if epoch is None else f"optimizer step {step + 1} (epoch {epoch + 1})"
        super().__init__(f"the training loss became NaN or infinite at {where}")
        self.step, self.epoch = step, epoch
