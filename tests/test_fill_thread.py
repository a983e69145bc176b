"""FillThread: the helper that runs a grammar fill beside the engine's own work."""

import threading

import pytest

from kiln.structured.fill_thread import FillThread


def test_runs_jobs_in_turn_and_returns_their_results():
    helper = FillThread()
    try:
        for i in range(200):
            helper.start(lambda a, b: a * b, i, 3)
            assert helper.result() == 3 * i
    finally:
        helper.shutdown()


def test_the_job_runs_beside_the_caller():
    # start() returns while the job is still running: the job waits for what the caller does next
    helper = FillThread()
    go = threading.Event()
    try:
        helper.start(go.wait, 10)
        go.set()
        assert helper.result() is True
    finally:
        helper.shutdown()


def test_a_failing_job_raises_in_result_and_the_thread_goes_on():
    helper = FillThread()
    try:
        helper.start(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            helper.result()
        helper.start(sum, [1, 2])
        assert helper.result() == 3
    finally:
        helper.shutdown()


def test_misuse_is_refused():
    helper = FillThread()
    with pytest.raises(RuntimeError, match="no job was started"):
        helper.result()
    helper.start(int)
    with pytest.raises(RuntimeError, match="result\\(\\) was not taken"):
        helper.start(int)
    assert helper.result() == 0
    helper.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        helper.start(int)


def test_shutdown_ends_the_thread_even_with_a_job_not_taken():
    helper = FillThread(name="kiln-test-fill")
    helper.start(lambda: 1 / 0)
    helper.shutdown()
    helper.shutdown()  # twice is fine
    assert not any(t.name == "kiln-test-fill" for t in threading.enumerate())
