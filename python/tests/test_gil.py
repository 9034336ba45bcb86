"""Planning and loading release the GIL; Ctrl-C stops a load cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import safeshard


@pytest.fixture(scope="module")
def big_sparse(tmp_path_factory):
    """A llama3-8b-shaped checkpoint with one layer, written sparse (holes, no disk)."""
    d = tmp_path_factory.mktemp("sparse") / "llama3-8b"
    safeshard.synth(d, "llama3-8b", sparse=True, layers=1)
    return d


def test_counter_thread_runs_during_a_load(big_sparse):
    plan = safeshard.plan(big_sparse, tp=8)
    stamps: list[float] = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())  # Python bytecode: needs the GIL
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    time.sleep(0.05)
    start = time.perf_counter()
    rank = plan.load(0, threads=1)
    end = time.perf_counter()
    stop.set()
    t.join()
    assert rank.nbytes > 250 << 20
    dur = end - start
    inside = [s for s in stamps if start + 0.1 * dur < s < end - 0.1 * dur]
    # Holding the GIL for the whole load would leave no sample inside it.
    assert dur > 0.02 and len(inside) >= 5, (dur, len(inside))


def test_ctrl_c_interrupts_a_load(big_sparse):
    # Only an interrupt raised inside `plan.load` counts. One that lands between two loads
    # (freeing the previous arena, the loop's jump back) is raised by Python at the next
    # bytecode, outside any load; the child reports it and the parent signals again.
    code = textwrap.dedent(
        f"""
        import signal, sys, traceback, safeshard
        # A shell runs background jobs with SIGINT ignored, and Python keeps an inherited
        # SIG_IGN; install Python's own handler as an interactive session has it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        plan = safeshard.plan({str(big_sparse)!r}, tp=8)
        print("ready", flush=True)
        while True:
            try:
                while True:
                    plan.load(0, threads=1)
            except KeyboardInterrupt as e:
                where = traceback.extract_tb(e.__traceback__)[-1].filename
                if where == safeshard.__file__:
                    print("interrupted in load", flush=True)
                    sys.exit(7)
                print("between loads", flush=True)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    line = ""
    for _ in range(10):
        sent = time.perf_counter()
        p.send_signal(signal.SIGINT)
        line = p.stdout.readline().strip()
        waited = time.perf_counter() - sent
        if line != "between loads":
            break
        time.sleep(0.3)
    if line != "interrupted in load":
        p.kill()  # never interrupted inside a load: fail below, leave no child behind
    rc = p.wait(timeout=60)
    assert rc == 7 and line == "interrupted in load", (rc, line)
    assert waited < 5, waited


def test_an_error_in_the_progress_callback_cancels_the_load(big_sparse):
    from safeshard._safeshard import live_arenas

    plan = safeshard.plan(big_sparse, tp=8)
    t = time.perf_counter()
    plan.load(0, threads=1)
    full = time.perf_counter() - t

    def stop(done: int) -> None:
        raise RuntimeError(f"stop at {done}")

    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="stop at"):
        plan._native.load(0, threads=1, progress=stop)
    cancelled = time.perf_counter() - t
    # The engine stops at its next task instead of finishing the load.
    assert cancelled < full / 2, (cancelled, full)
    assert live_arenas() == 0
