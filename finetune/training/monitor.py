"""A tiny actor the workers push their events to (`training.events`), and the driver polls.

It lives beside the driver for the whole run, so it survives worker restarts and works
when workers sit on other nodes (nothing is read from a worker's local disk).

A sweep trial's driver (its Tune actor) can be stopped by Tune as soon as Tune sees a report
(ASHA's rung, max_t). `EventsHandled` holds each report back until that driver has handled every
event sent before it, so a trial's record and tracker runs never miss the epoch Tune stopped it at.
"""

from __future__ import annotations

import asyncio

import ray
import ray.train

from finetune.training.events import RunEvent, StepProgress, WorkProgress

WAIT_S = 60.0  # the longest a report waits for the driver (one that stopped polling never answers)


@ray.remote(num_cpus=0)
class RunMonitor:
    def __init__(self) -> None:
        self.items: list[RunEvent | StepProgress | WorkProgress] = []  # rank 0 sends all but WorkerStarted: in its order
        self.handled = 0  # items the driver has handled
        self.changed: asyncio.Condition | None = None  # made in the actor's event loop

    def _condition(self) -> asyncio.Condition:
        self.changed = self.changed or asyncio.Condition()
        return self.changed

    async def progress(self, progress: StepProgress | WorkProgress) -> None:
        self.items.append(progress)

    async def record(self, event: RunEvent) -> None:
        self.items.append(event)

    async def poll(self, seen: int) -> list[RunEvent | StepProgress | WorkProgress]:
        """The events and step progress after the first `seen`."""
        return self.items[seen:]

    async def mark_handled(self, count: int) -> None:
        """The driver has handled the first `count` items."""
        async with self._condition():
            self.handled = max(self.handled, count)
            self._condition().notify_all()

    async def wait_handled(self, timeout_s: float) -> bool:
        """Wait until the driver has handled every item received so far; False after `timeout_s`."""
        target = len(self.items)
        async with self._condition():
            try:
                await asyncio.wait_for(self._condition().wait_for(lambda: self.handled >= target), timeout_s)
            except asyncio.TimeoutError:
                return False
        return True


class EventsHandled(ray.train.UserCallback):
    """Runs on the Ray Train controller after each report, before the callbacks after it (a sweep
    trial's TuneReportCallback): waits until the run's driver has handled the events the workers
    sent before that report. Workers send events synchronously (`events.EventSink`), so by then
    the monitor holds them."""

    def __init__(self, monitor) -> None:
        self.monitor = monitor

    def after_report(self, run_context, metrics, checkpoint) -> None:
        ray.get(self.monitor.wait_handled.remote(WAIT_S))
