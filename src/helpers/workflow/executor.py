"""Where the tasks of a multi-run command (batch, and any sweep built on it) execute.

`Sequential` runs them here, one after another, in the order given: what `tablora batch` does
without flags. `Dask` sends them to a Dask distributed cluster: one that is running
(`dask scheduler` on one machine, `dask worker tcp://HOST:8786 --nthreads 1 --resources model=1`
on each) or a `LocalCluster` of N worker processes started here. Both have one interface:

    with connect(cluster, workers) as ex:
        ex.submit(fn, *args, label="llama-seed0")   # fn: a module-level function
        for event in ex.events():                   # "started" and "done", as they happen
            ...

On Dask a task asks for the `model` resource, so a worker started with `--resources model=1`
runs one model at a time whatever its thread count (and the executor hands Dask only as many
tasks as there are such slots, so none waits behind a long one on a busy worker); a worker
that dies mid-task (killed, out of memory, its machine gone) has its task run again on another
worker, up to the scheduler's `distributed.scheduler.allowed-failures` times; a task that
raises is retried `RETRIES` times.
What a task sends and returns must pickle: it may run on another machine, with nothing of this
one but its arguments.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# Dask resource every task asks for: workers declare `--resources model=1` (one model at a time).
RESOURCE = "model"
# A task that raises (not one whose worker died: see ALLOWED_FAILURES) runs again this often.
RETRIES = 1
# How often a worker may die under the same task before it is given up (LocalCluster; a
# scheduler started with `dask scheduler` reads distributed.scheduler.allowed-failures).
ALLOWED_FAILURES = 2
# Seconds between looks at which tasks started, while none finishes.
POLL_SECONDS = 2.0
WORKER_COMMAND = "dask worker {address} --nthreads 1 --resources model=1"
TOPIC = "tablora-task-started"  # the Dask event a task logs when a worker starts it


class ClusterError(RuntimeError):
    """The cluster cannot run the tasks (unreachable, no suitable worker); says how to fix it."""

    user_facing = True


@dataclass
class Event:
    """A task started (Dask only) or is done: its result, or why it never returned one."""

    kind: str  # "started" or "done"
    label: str
    result: Any = None
    error: str = ""  # the task raised (after its retries), or its workers kept dying
    worker: str = ""  # where it ran (see where())


def where() -> str:
    """This process as a place that runs tasks: 'tcp://10.0.0.5:40123 (mac-mini-2, pid 4711)'
    on a Dask worker, 'mac-mini-2, pid 4711' elsewhere."""
    here = f"{socket.gethostname()}, pid {os.getpid()}"
    if "distributed" in sys.modules:  # only a Dask worker has it imported before a task runs
        from distributed import get_worker

        try:
            return f"{get_worker().address} ({here})"
        except ValueError:  # not inside a worker's task
            pass
    return here


def _call(fn: Callable[..., Any], *args: Any) -> tuple[Any, str]:
    """What a Dask worker runs: says it started, runs the task, returns the result and where
    it ran."""
    from distributed import get_worker

    worker = get_worker()
    here = where()
    worker.log_event(TOPIC, {"key": str(worker.get_current_task()), "where": here})
    return fn(*args), here


class Executor:
    """Runs submitted tasks; events() yields them as they start and finish."""

    parallel = False

    def submit(self, fn: Callable[..., Any], *args: Any, label: str) -> None:
        raise NotImplementedError

    def events(self) -> Iterator[Event]:
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        """Tasks not yet done: {"running": n, "waiting": m}."""
        return {"running": 0, "waiting": 0}

    def describe(self) -> str:
        return "sequential, in this process"

    def close(self) -> None:
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Sequential(Executor):
    """One task after another, here, in the order submitted; a task's exception is its result's
    error (KeyboardInterrupt still stops everything)."""

    def __init__(self) -> None:
        self._tasks: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], *args: Any, label: str) -> None:
        self._tasks.append((label, fn, args))

    def events(self) -> Iterator[Event]:
        while self._tasks:
            label, fn, args = self._tasks.pop(0)
            try:
                result = fn(*args)
            except Exception as e:  # isolation: one task's failure is not the batch's
                yield Event("done", label, error=f"{type(e).__name__}: {e}", worker=where())
            else:
                yield Event("done", label, result=result, worker=where())

    def counts(self) -> dict[str, int]:
        return {"running": 0, "waiting": len(self._tasks)}


class Dask(Executor):
    """Tasks on a Dask distributed cluster: `address` (tcp://HOST:8786) of a running scheduler,
    or `workers` > 0 for a LocalCluster of that many single-threaded worker processes here."""

    parallel = True

    def __init__(self, address: str = "", workers: int = 0, retries: int = RETRIES,
                 poll_seconds: float = POLL_SECONDS, connect_timeout: float = 20) -> None:
        import dask
        from distributed import Client, LocalCluster

        self.retries, self.poll_seconds = retries, poll_seconds
        self.cluster: Any = None
        self._backlog: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []
        self._futures: dict[Any, str] = {}  # future handed to Dask -> label
        self._started: queue.Queue[dict[str, str]] = queue.Queue()  # filled by Dask's thread
        self._running: dict[str, str] = {}  # label -> worker, of tasks started and not done
        if address:
            try:
                self.client = Client(address, timeout=connect_timeout)
            except OSError as e:
                raise ClusterError(
                    f"--cluster {address}: no Dask scheduler answers there ({e}). Start one "
                    "with `dask scheduler` on that machine (port 8786), and workers with "
                    f"`{WORKER_COMMAND.format(address=address)}`.") from None
        else:
            if workers < 1:
                raise ValueError(f"--workers {workers}: give 1 or more worker processes")
            with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
                # Processes, not threads: each task starts notebook kernels and MLX; one thread
                # and one `model` each, so a worker runs one model at a time.
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                                            processes=True, host="127.0.0.1",
                                            dashboard_address="127.0.0.1:8787",
                                            resources={RESOURCE: 1})
            self.client = Client(self.cluster)
        try:
            self._check_workers()
            self.client.subscribe_topic(TOPIC, lambda event: self._started.put(event[1]))
        except BaseException:
            self.close()
            raise

    def _check_workers(self) -> None:
        """Tasks ask for the `model` resource: a worker without it would never get one."""
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        if workers and not any(RESOURCE in (w.get("resources") or {})
                               for w in workers.values()):
            address = self.client.scheduler.address
            raise ClusterError(
                f"none of the {len(workers)} worker(s) of {address} declares the "
                f"`{RESOURCE}` resource, so no task could start: restart them as "
                f"`{WORKER_COMMAND.format(address=address)}`")

    def submit(self, fn: Callable[..., Any], *args: Any, label: str) -> None:
        self._backlog.append((label, fn, args))

    def _slots(self) -> int:
        """How many tasks the workers can run at once: their `model` resources, summed."""
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        return int(sum((w.get("resources") or {}).get(RESOURCE, 0) for w in workers.values()))

    def _hand_over(self) -> None:
        """Give Dask as many tasks as there are free slots. Dask places a task that asks for a
        resource on a worker as soon as it has it, so a batch handed over at once queues tasks
        behind long ones while another worker idles (seen here: a 3-model batch left one of two
        workers idle for its last model); retries and lost workers stay Dask's."""
        free = self._slots() - len(self._futures)
        while self._backlog and free > 0:
            label, fn, args = self._backlog.pop(0)
            key = f"{label}-{uuid.uuid4().hex[:8]}"  # readable in the dashboard, unique
            future = self.client.submit(_call, fn, *args, key=key, pure=False,
                                        retries=self.retries, resources={RESOURCE: 1})
            self._futures[future] = label
            free -= 1

    def _new_starts(self) -> Iterator[Event]:
        labels = {str(f.key): label for f, label in self._futures.items()}
        while True:
            try:
                msg = self._started.get_nowait()
            except queue.Empty:
                return
            label = labels.get(msg.get("key", ""))
            if label is not None:  # a retry starts again: say so again
                self._running[label] = msg.get("where", "")
                yield Event("started", label, worker=self._running[label])

    def events(self) -> Iterator[Event]:
        from distributed import wait

        while self._backlog or self._futures:
            self._hand_over()
            done: set[Any] = set()
            if self._futures:
                try:
                    done = wait(list(self._futures), timeout=self.poll_seconds,
                                return_when="FIRST_COMPLETED").done
                except TimeoutError:
                    pass
            else:  # no worker (with a `model` slot) yet
                time.sleep(self.poll_seconds)
            # Finished first: the next task of a worker starts after its previous one ended.
            for future in done:
                yield self._done(future)
            yield from self._new_starts()

    def _done(self, future: Any) -> Event:
        label = self._futures.pop(future)
        self._running.pop(label, None)
        if future.status == "finished":
            result, worker = future.result()
            return Event("done", label, result=result, worker=worker)
        try:
            exc = future.exception()
        except BaseException as e:  # a cancelled future raises instead of returning it  # noqa: BLE001
            exc = e
        return Event("done", label, error=f"{type(exc).__name__}: {exc}")

    def counts(self) -> dict[str, int]:
        running = len(self._running)
        return {"running": running,
                "waiting": len(self._futures) - running + len(self._backlog)}

    def describe(self) -> str:
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        where_ = "a LocalCluster here" if self.cluster is not None else "the cluster"
        text = (f"Dask: {len(workers)} worker(s) on {where_} at {self.client.scheduler.address}"
                f"; dashboard: {self.client.dashboard_link}")
        if not workers:
            text += ("\nno worker has joined yet: tasks wait until one does "
                     f"(`{WORKER_COMMAND.format(address=self.client.scheduler.address)}`)")
        return text

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> process id (for tests and diagnostics)."""
        return self.client.run(os.getpid)

    def close(self) -> None:
        # Unfinished tasks are cancelled; a LocalCluster's workers (and their kernels) stop.
        for future in list(self._futures):
            future.cancel()
        self._futures.clear()
        self._backlog.clear()
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
                self.cluster = None


def connect(cluster: str = "", workers: int = 0) -> Executor:
    """The executor the flags ask for: --cluster ADDRESS, --workers N, or neither (here)."""
    if cluster and workers:
        raise ValueError("--cluster and --workers: give one (--workers starts a cluster here)")
    if cluster or workers:
        return Dask(address=cluster, workers=workers)
    return Sequential()

