"""`tune.max_concurrent_trials` for every trial of a sweep, restored ones included.

Tune limits concurrency where its search algorithm creates trials; a restored sweep
(`finetune tune --resume`) puts every unfinished trial back at once, and since a trial's actor
reserves almost nothing (its TorchTrainer's workers reserve the CPUs, after it starts) Tune
starts them all: on a small machine their workers then take the CPUs Ray Data needs and the
sweep waits forever. So each trial also takes one of `max_concurrent_trials` slots from an
actor the driver holds before it builds its trainer, and the driver gives the slot back when
Tune ends the trial (finished, stopped by the scheduler, or errored).
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray import tune

from finetune.ray_env import on_driver_node

logger = logging.getLogger(__name__)


def _slots_name() -> str:
    # one sweep per driver at a time, and a sweep's trial actors belong to the driver's job:
    # the job id names the slots for the driver (sweep, callback) and the trials alike
    return f"finetune-trial-slots-{ray.get_runtime_context().get_job_id()}"


@ray.remote(num_cpus=0)
class TrialSlots:
    def __init__(self, slots: int):
        self.slots = slots
        self.holders: set[str] = set()
        self.changed = asyncio.Condition()

    async def acquire(self, trial_id: str, wait: bool = True) -> bool:
        """Whether `trial_id` holds a slot (once one is free, with `wait`); a trial that holds one
        already (a retried trial) keeps it."""
        async with self.changed:
            def free() -> bool:
                return trial_id in self.holders or len(self.holders) < self.slots

            if wait:
                await self.changed.wait_for(free)
            elif not free():
                return False
            self.holders.add(trial_id)
            return True

    async def release(self, trial_id: str) -> None:
        async with self.changed:
            self.holders.discard(trial_id)
            self.changed.notify_all()

    async def held(self) -> list[str]:
        return sorted(self.holders)


def create_slots(max_concurrent: int):
    """The driver's slot actor for the sweep it is about to run (kill it when the sweep ends)."""
    return TrialSlots.options(name=_slots_name(), scheduling_strategy=on_driver_node()).remote(max_concurrent)


def wait_for_slot(trial_id: str) -> None:
    """In a trial, before it trains. The driver gives the slot back when Tune ends the trial
    (`ReleaseTrialSlot`): a trial the scheduler stops is killed, so the trial cannot."""
    slots = ray.get_actor(_slots_name())
    if not ray.get(slots.acquire.remote(trial_id, wait=False)):
        logger.warning("trial %s waits for another trial to end (tune.max_concurrent_trials)", trial_id)
        ray.get(slots.acquire.remote(trial_id))


class ReleaseTrialSlot(tune.Callback):
    """Gives an ended trial's slot back. Kept in the sweep's saved state, so it holds no handle:
    a resumed sweep's driver looks its own slots up by name."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        ray.get_actor(_slots_name()).release.remote(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)
