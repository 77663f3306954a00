"""A tiny actor the workers push progress and metrics to, and the driver polls.

It lives beside the driver for the whole run, so it survives worker restarts and works
when workers sit on other nodes (nothing is read from a worker's local disk).
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class RunMonitor:
    def __init__(self) -> None:
        self.latest: dict | None = None
        self.events: list[tuple[str, dict]] = []

    def progress(self, epoch: int, step: int, steps: int, loss: float, samples_per_s: float) -> None:
        self.latest = {"epoch": epoch, "step": step, "steps": steps, "loss": loss, "samples_per_s": samples_per_s}

    def record(self, kind: str, metrics: dict) -> None:
        self.events.append((kind, metrics))

    def poll(self, seen: int) -> tuple[dict | None, list[tuple[str, dict]]]:
        """The latest step progress and the events after the first `seen`."""
        return self.latest, self.events[seen:]
