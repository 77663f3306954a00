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
        self.latest: StepProgress | None = None
        self.events: list[RunEvent] = []

    def progress(self, progress: StepProgress) -> None:
        self.latest = progress

    def record(self, event: RunEvent) -> None:
        self.events.append(event)

    def poll(self, seen: int) -> tuple[StepProgress | None, list[RunEvent]]:
        """The latest step progress and the events after the first `seen`."""
        return self.latest, self.events[seen:]
