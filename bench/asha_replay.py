"""Replay Ray's ASHA rule on a FIFO sweep's recorded curves: what each grace period / reduction
factor would have cost (trial-epochs) and found (best validation accuracy), without training.

Ray's AsyncHyperBand, one trial at a time in the sweep's order: at each rung (grace * rf^k
epochs, below max_t) a trial stops when its metric is below the (1 - 1/rf) percentile of the
results already recorded at that rung (its own not counted; the first trial at a rung goes
on). Real ASHA runs differ slightly (bf16 CPU curves are not bit-exact between runs).

    .venv/bin/python bench/asha_replay.py /tmp/tunebench2/fifo [--max-t 9]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def curves(fifo_dir: Path, metric: str) -> list[list[float]]:
    """Each trial's metric per epoch, in trial order."""
    out = []
    for path in sorted((fifo_dir / "sweep").glob("run_trial_*/result.json")):
        reports = [json.loads(line) for line in path.read_text().splitlines()]
        by_epoch = {r["epochs_done"]: r[metric] for r in reports if "epochs_done" in r}
        out.append([by_epoch[e] for e in sorted(by_epoch)])
    return out


def replay(trials: list[list[float]], grace: int, rf: float, max_t: int) -> dict:
    rungs = int(math.log(max_t / grace) / math.log(rf) + 1)
    milestones = [grace * rf**k for k in reversed(range(rungs))]
    recorded: dict[float, dict[int, float]] = {m: {} for m in milestones}  # rung -> trial -> result
    epochs_run = []
    for trial, curve in enumerate(trials):
        ran = len(curve)
        for epoch, value in enumerate(curve, start=1):
            stop = False
            for milestone in milestones:  # highest first, as Ray checks them
                if epoch >= milestone and trial not in recorded[milestone]:
                    seen = list(recorded[milestone].values())
                    stop = bool(seen) and value < np.nanpercentile(seen, (1 - 1 / rf) * 100)
                    recorded[milestone][trial] = value
                    break
            if stop or epoch >= max_t:
                ran = epoch
                break
        epochs_run.append(ran)
    best = max(max(curve[:ran]) for curve, ran in zip(trials, epochs_run))
    fifo_best = max(max(curve) for curve in trials)
    return {"grace": grace, "reduction_factor": rf, "trial_epochs": sum(epochs_run),
            # FIFO runs every trial to max_t (a resumed trial's result.json may hold only its last epochs)
            "ratio": round(sum(epochs_run) / (len(trials) * max_t), 3), "best": best,
            "points_behind": round(100 * (fifo_best - best), 2), "epochs_run": epochs_run}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fifo_dir", type=Path, help="a FIFO sweep folder kept by bench/tune.py --keep")
    parser.add_argument("--metric", default="val/accuracy")
    parser.add_argument("--max-t", type=int, default=9)
    args = parser.parse_args()
    trials = curves(args.fifo_dir, args.metric)
    for grace, rf in ((1, 3), (1, 4), (1, 5), (2, 3), (2, 4)):
        print(json.dumps(replay(trials, grace, rf, args.max_t)))


if __name__ == "__main__":
    main()
