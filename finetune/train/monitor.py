"""A tiny actor the workers push their events to (`train.events`), and the driver polls.

It lives beside the driver for the whole run, so it survives worker restarts and works
when workers sit on other nodes (nothing is read from a worker's local disk).
"""

from __future__ import annotations

import ray

from finetune.train.events import RunEvent, StepProgress


@ray.remote(num_cpus=0)
class RunMonitor:
    def __init__(self) -> None:
        self.items: list[RunEvent | StepProgress] = []  # rank 0 sends all but WorkerStarted: in its order

    def progress(self, progress: StepProgress) -> None:
        self.items.append(progress)

    def record(self, event: RunEvent) -> None:
        self.items.append(event)

    def poll(self, seen: int) -> list[RunEvent | StepProgress]:
        """The events and step progress after the first `seen`."""
        return self.items[seen:]
