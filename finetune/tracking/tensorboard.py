"""TensorBoard event files in <run dir>/tensorboard, written with tensorboardX (Ray Tune's own
TensorBoard writer, so no further package); the hyperparameters and test metrics go to its
HParams view at the end."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tensorboardX import SummaryWriter

if TYPE_CHECKING:
    from finetune.config import PipelineConfig


class TensorBoardTracker:
    def __init__(self, logdir: Path, cfg: PipelineConfig) -> None:
        from finetune.tracking import flat_params

        self.params = flat_params(cfg)
        self.writer = SummaryWriter(str(logdir))  # a resumed run adds an event file beside the first

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def finish(self, summary: dict, best_dir: Path | None) -> None:
        hparams = {k: v for k, v in self.params.items() if isinstance(v, (int, float, str, bool))}
        tested = {f"hparam/{k}": v for k, v in summary.items() if k.startswith("test_") and isinstance(v, (int, float))}
        self.writer.add_hparams(hparams, tested, name="hparams")
        self.writer.close()

    def fail(self, interrupted: bool) -> None:
        self.writer.close()
