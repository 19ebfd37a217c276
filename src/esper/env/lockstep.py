"""Stepping E envs with their host training batched (``VectorMorphogenesisEnv(batched=True)``).

`MorphogenesisEnv.step` applies the action, calls ``trainer.train_step()`` and turns its
result into reward and observation. To train all envs' hosts as one computation
(`esper.training.batched`) without a second copy of that logic, each env's ``step`` runs
in a worker thread that pauses when it reaches ``train_step``:

1. the workers run one at a time until each has applied its action and reached its
   trainer (or finished: an error, or an env that does not train);
2. the main thread runs the training phase of every paused env as one batched call
   (`train_batched`), or, when `batched_support` objects, leaves each env to its own
   loop (the per-env path, so results never depend on which path ran);
3. the workers resume one at a time, each finishing its ``train_step`` (validation,
   credit, governor, lifecycle) and ``step``.

Only one thread runs at any moment, so the order of all work, random draws included,
is the per-env loop's, and no more cores are used than that loop uses. A static twin
(``reward_mode="twin"``) still trains on its own inside its env's step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from esper.training.batched import batched_support, train_batched, validate_batched


class _Paused(Exception):
    """Raised into a paused worker when the batched phase failed."""


class _Worker:
    """A thread that runs one job per `LockstepStepper.run` (kept between steps:
    starting 16 threads per step costs more than the steps' own Python)."""

    def __init__(self, yielded: threading.Semaphore) -> None:
        self.turn = threading.Semaphore(0)  # main -> this worker: start or resume
        self.yielded = yielded  # this worker -> main: paused or done
        self.job: Callable[[], Any] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.turn.acquire()
            if self.job is None:  # closed
                return
            try:
                self.result = self.job()  # type: ignore[misc]
            except BaseException as err:  # re-raised in the main thread
                self.error = err
            finally:
                self.yielded.release()

    def start(self, job: Callable[[], Any]) -> None:
        self.job, self.result, self.error = job, None, None
        self.turn.release()
        self.yielded.acquire()

    def resume(self) -> None:
        self.turn.release()
        self.yielded.acquire()

    def stop(self) -> None:
        self.job = None
        self.turn.release()

    def pause(self) -> None:
        """Called on the worker's thread: hand control back until `resume`."""
        self.yielded.release()
        self.turn.acquire()


class LockstepStepper:
    """Runs ``step_fns[e]()`` for every env with their training phases batched."""

    def __init__(self) -> None:
        self.last_batched = False  # whether the last step's training ran batched
        self.last_reason: str | None = None  # why not, when it did not
        self._yielded = threading.Semaphore(0)
        self._workers: list[_Worker] = []

    def close(self) -> None:
        """End the worker threads (a later `run` starts new ones)."""
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def run(self, envs: Sequence[Any], step_fns: Sequence[Callable[[], Any]]) -> list[Any]:
        E = len(envs)
        while len(self._workers) < E:
            self._workers.append(_Worker(self._yielded))
        workers = self._workers[:E]
        arrived: dict[int, Any] = {}  # env index -> its trainer, paused at train_step
        trained: dict[int, Any] = {}
        validated: dict[int, Any] = {}
        failure: list[BaseException] = []
        saved = []

        def pause_at_train_step(e: int, trainer, original):
            def train_step(*args, **kwargs):
                if args or kwargs:  # a nested call with its own arguments
                    return original(*args, **kwargs)
                arrived[e] = trainer
                workers[e].pause()
                if failure:
                    raise _Paused("the batched training phase failed") from failure[0]
                return original(trained=trained.get(e), validated=validated.get(e))

            return train_step

        for e, env in enumerate(envs):
            trainer = env.trainer
            if trainer is None:
                saved.append(None)
                continue
            own = vars(trainer).get("train_step")  # e.g. a bench's timing wrapper
            saved.append((trainer, own))
            trainer.train_step = pause_at_train_step(e, trainer, trainer.train_step)
        try:
            for worker, fn in zip(workers, step_fns, strict=True):
                worker.start(fn)  # returns when it paused at train_step or finished
            paused = sorted(arrived)
            trainers = [arrived[e] for e in paused]
            self.last_reason = batched_support(trainers) if len(trainers) > 1 else "one env"
            self.last_batched = self.last_reason is None
            if self.last_batched:
                try:
                    trained.update(zip(paused, train_batched(trainers), strict=True))
                    validated.update(zip(paused, validate_batched(trainers), strict=True))
                except BaseException as err:
                    failure.append(err)
            for e in paused:
                workers[e].resume()  # returns when its step finished
        finally:
            for item in saved:
                if item is None:
                    continue
                trainer, own = item
                if own is None:
                    del trainer.train_step
                else:
                    trainer.train_step = own
        if failure:
            raise failure[0]
        for worker in workers:
            if worker.error is not None:
                raise worker.error
        return [worker.result for worker in workers]
