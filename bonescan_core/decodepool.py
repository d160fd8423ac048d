"""Worker processes that run one function over many inputs, results in submission order, where
a killed worker is an error at once and never a hang.

Used by :mod:`bonescan_core.ingest` to decode files in parallel.

Why not ``concurrent.futures.ProcessPoolExecutor``: its workers share one result pipe. In
Python 3.11, a worker killed while it sends a result (the kernel's out-of-memory killer, a
user's ``kill``) leaves half a message in that pipe; the executor's manager thread then waits in
``recv()`` for the rest forever, and ``shutdown(wait=True)`` waits for the manager thread. That
hung the dead-worker import test about one run in ten on a loaded machine, and CI twice
(stack: ``wait_result_broken_or_wakeup`` -> ``Connection.recv``). Here each worker has a pipe of
its own and the parent keeps only its end, so a dead worker's pipe reads as end-of-file.

Workers are always spawned, never forked: a fork copies every other thread's held locks, and the
process may hold native threads (TensorFlow's, the app's) that ``threading`` cannot see.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from bonescan_core.errors import Unavailable

START_METHOD = "spawn"
JOIN_TIMEOUT_S = 5.0  # a worker told to stop that has not ended by then is killed


class WorkerDied(Unavailable):
    """A worker process ended before it returned a result (killed, out of memory). The import
    turns it into ``ingest.DecoderStopped``, which says what to do."""


def _serve(connection: Connection, function: Callable[..., Any]) -> None:
    """A worker's loop: receive an argument tuple, send back ``(True, result)`` or
    ``(False, exception)``; ``None`` ends it."""
    while True:
        try:
            arguments = connection.recv()
        except EOFError:  # the parent is gone
            return
        if arguments is None:
            return
        try:
            reply = (True, function(*arguments))
        except Exception as error:  # noqa: BLE001 - handed to the parent, which re-raises it
            reply = (False, error)
        try:
            connection.send(reply)
        except Exception as error:  # noqa: BLE001 - a result or exception that cannot be pickled
            connection.send((False, RuntimeError(f"the worker could not send its result back: {error!r}")))


class DecodePool:
    """``processes`` spawned workers running ``function``; tasks go round-robin. The workers
    start at the first :meth:`submit`.

    Results come back in the order tasks were submitted (:meth:`next_result`). The caller
    bounds how many tasks are in flight; each worker's task pipe only ever holds small
    argument tuples, so :meth:`submit` does not block on a busy worker.

    Args:
        function: a module-level function (pickled by reference into each worker).
        processes: number of worker processes, >= 1.
    """

    def __init__(self, function: Callable[..., Any], processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self._function = function
        self._size = processes
        self.processes: list[multiprocessing.process.BaseProcess] = []  # started at the first submit
        self._connections: list[Connection] = []
        self._in_flight: collections.deque[int] = collections.deque()  # worker index per task, oldest first
        self._next_worker = 0

    def _start(self) -> None:
        """Spawn the workers (at the first task: a re-run whose files are all stored starts none)."""
        context = multiprocessing.get_context(START_METHOD)
        try:
            for _ in range(self._size):
                parent_end, child_end = context.Pipe(duplex=True)
                process = context.Process(target=_serve, args=(child_end, self._function), daemon=True)
                process.start()
                child_end.close()  # only the worker holds its end: its death reads as end-of-file here
                self.processes.append(process)
                self._connections.append(parent_end)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(self, *arguments: Any) -> None:
        """Hand ``function(*arguments)`` to the next worker. Raises :class:`WorkerDied` when
        that worker is gone."""
        if not self.processes:
            self._start()
        index = self._next_worker
        self._next_worker = (index + 1) % len(self.processes)
        try:
            self._connections[index].send(arguments)
        except OSError as error:  # BrokenPipeError: the worker ended
            raise WorkerDied(self._died(index)) from error
        self._in_flight.append(index)

    def next_result(self) -> Any:
        """The oldest submitted task's result (its exception re-raised). Raises
        :class:`WorkerDied` when its worker ended first, and IndexError when nothing is in flight."""
        index = self._in_flight.popleft()
        try:
            succeeded, value = self._connections[index].recv()
        except (EOFError, OSError) as error:  # the worker died, perhaps half-way through sending
            raise WorkerDied(self._died(index)) from error
        if not succeeded:
            raise value
        return value

    def _died(self, index: int) -> str:
        process = self.processes[index]
        process.join(timeout=JOIN_TIMEOUT_S)
        return f"decode worker {index} (pid {process.pid}) ended with exit code {process.exitcode}"

    def close(self) -> None:
        """Stop every worker. Idle workers are asked to stop (and killed if they have not after
        :data:`JOIN_TIMEOUT_S`); with tasks still in flight (an error, a caller that stopped
        early) they are killed at once, as a worker blocked sending a result nobody will read
        cannot stop by itself. Never blocks on a dead or stuck worker; safe to call twice."""
        if self._in_flight:
            for process in self.processes:
                process.kill()
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(None)
        for process in self.processes:
            process.join(timeout=JOIN_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self._connections:
            connection.close()
        self._connections = []
        self._in_flight.clear()
