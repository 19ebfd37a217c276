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


class LockstepStepper:
    """Runs ``step_fns[e]()`` for every env with their training phases batched."""

    def __init__(self) -> None:
        self.last_batched = False  # whether the last step's training ran batched
        self.last_reason: str | None = None  # why not, when it did not

    def run(self, envs: Sequence[Any], step_fns: Sequence[Callable[[], Any]]) -> list[Any]:
        E = len(envs)
        turn = [threading.Semaphore(0) for _ in range(E)]  # main -> worker e: run
        yielded = threading.Semaphore(0)  # worker -> main: paused or done
        results: list[Any] = [None] * E
        errors: list[BaseException | None] = [None] * E
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
                yielded.release()
                turn[e].acquire()
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

        def work(e: int) -> None:
            turn[e].acquire()
            try:
                results[e] = step_fns[e]()
            except BaseException as err:  # re-raised in the main thread
                errors[e] = err
            finally:
                yielded.release()

        threads = [threading.Thread(target=work, args=(e,), daemon=True) for e in range(E)]
        try:
            for e, thread in enumerate(threads):
                thread.start()
                turn[e].release()
                yielded.acquire()  # worker e paused at train_step or finished
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
                turn[e].release()
                yielded.acquire()
            for thread in threads:
                thread.join()
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
        for err in errors:
            if err is not None:
                raise err
        return results
