"""The decode pool: results in submission order, a worker's exception re-raised, and a worker
killed half-way through sending a result is an error at once, never a hang (the failure that
hung concurrent.futures' pool, and CI with it)."""

from __future__ import annotations

import os
import signal

import pytest

from bonescan_core.decodepool import DecodePool, WorkerDied


def square_or_fail(value: int) -> int:
    if value < 0:
        raise ValueError(f"negative: {value}")
    return value * value


def payload(size: int) -> bytes:
    return b"x" * size


def test_results_come_back_in_submission_order_from_spawned_workers():
    with DecodePool(square_or_fail, 3) as pool:
        assert pool.processes == []  # none until there is work
        for value in range(10):
            pool.submit(value)
        assert [process._start_method for process in pool.processes] == ["spawn"] * 3
        assert [pool.next_result() for _ in range(10)] == [value * value for value in range(10)]
    assert all(process.exitcode == 0 for process in pool.processes)  # asked to stop, they stopped


def test_a_workers_exception_is_raised_in_order_and_the_pool_goes_on():
    with DecodePool(square_or_fail, 2) as pool:
        for value in (2, -1, 3):
            pool.submit(value)
        assert pool.next_result() == 4
        with pytest.raises(ValueError, match="negative: -1"):
            pool.next_result()
        assert pool.next_result() == 9


@pytest.mark.timeout(120)
def test_a_worker_killed_while_sending_a_result_is_an_error_not_a_hang():
    pool = DecodePool(payload, 2)
    try:
        pool.submit(64 * 1024 * 1024)  # far more than a pipe holds: the worker blocks mid-send
        assert pool._connections[0].poll(60), "the worker never started sending"
        os.kill(pool.processes[0].pid, signal.SIGKILL)
        with pytest.raises(WorkerDied, match="exit code -9"):
            pool.next_result()  # half a message, then end-of-file
    finally:
        pool.close()
    assert [process.is_alive() for process in pool.processes] == [False, False]


@pytest.mark.timeout(120)
def test_closing_with_results_unread_kills_the_workers_instead_of_waiting():
    pool = DecodePool(payload, 2)
    for _ in range(4):
        pool.submit(16 * 1024 * 1024)  # each worker blocks sending a result nobody reads
    pool.close()
    assert [process.is_alive() for process in pool.processes] == [False, False]
    pool.close()  # twice is harmless


def test_submitting_to_a_dead_worker_is_an_error():
    with DecodePool(square_or_fail, 1) as pool:
        pool.submit(1)
        assert pool.next_result() == 1
        os.kill(pool.processes[0].pid, signal.SIGKILL)
        pool.processes[0].join()
        with pytest.raises(WorkerDied):
            for value in range(100_000):  # a pipe takes a few sends before it reports the dead end
                pool.submit(value)


def test_a_pool_needs_a_worker():
    with pytest.raises(ValueError, match="at least 1"):
        DecodePool(square_or_fail, 0)
