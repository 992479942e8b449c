"""Worker pools end with the job that started them: an error or SIGTERM in the parent terminates the
workers instead of waiting for queued work or leaving them running without a parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from forcecentric.workers import process_pool, sigterm_unwinds


def _children(pid: int) -> set[int]:
    """Spawned multiprocessing workers whose parent is ``pid`` (read from /proc, Linux only; not the
    resource tracker, which lives as long as its parent by design)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return {p for p in pids if _alive(p)}


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")


def test_an_error_in_the_block_terminates_busy_workers_and_cancels_the_queue():
    others = _children(os.getpid())  # workers of anything else this process runs are not ours
    t0 = time.time()
    with pytest.raises(RuntimeError, match="stop"):
        with process_pool(2) as pool:
            futures = [pool.submit(time.sleep, 120) for _ in range(6)]
            while len(_children(os.getpid()) - others) < 2 and time.time() - t0 < 60:
                time.sleep(0.1)
            workers = _children(os.getpid()) - others
            assert len(workers) == 2
            raise RuntimeError("stop")
    assert time.time() - t0 < 60, "the pool waited for its queued sleeps"
    assert not _wait_gone(workers, 10)
    assert all(f.cancelled() or f.done() for f in futures)


def test_a_normal_exit_waits_for_the_results():
    with process_pool(2) as pool:
        futures = [pool.submit(pow, 2, k) for k in range(5)]
    assert [f.result() for f in futures] == [1, 2, 4, 8, 16]


def test_sigterm_unwinds_and_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        with sigterm_unwinds():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs before this returns
    assert exc.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


_PARENT = textwrap.dedent("""
    import sys, time
    from forcecentric.workers import process_pool
    with process_pool(2) as pool:
        futures = [pool.submit(time.sleep, 120) for _ in range(4)]
        print("submitted", flush=True)
        for f in futures:
            f.result()
""")


def test_sigterm_to_the_parent_terminates_its_workers():
    proc = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "submitted"
        deadline = time.time() + 60
        while time.time() < deadline and len(_children(proc.pid)) < 2:
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert not _wait_gone(workers, 10), "workers ran on after their parent was killed"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_to_forcecentric_label_terminates_its_workers(tmp_path):
    """The command that made the hour-long corpus: killed, it leaves no xTB worker computing on, and
    no shard is half written."""
    pytest.importorskip("tblite")
    pytest.importorskip("rdkit")
    smi = tmp_path / "molecules.smi"
    smi.write_text("CCCCO butanol\nCCOCC ether\nCC(C)CO isobutanol\nCCCCC pentane\n")
    out = tmp_path / "labels"
    # long MD per molecule, so the workers are busy for minutes when the signal arrives
    cmd = [sys.executable, "-m", "forcecentric.cli", "label", str(smi), "--out", str(out), "--workers", "2",
           "--conformers", "1", "--screen", "0", "--md-frames", "50", "--md-interval", "200", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(_children(proc.pid)) < 2:
            time.sleep(0.2)
        time.sleep(3)  # the workers import and start labelling
        workers = _children(proc.pid)
        assert len(workers) >= 2, "the label command never started its workers"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) != 0
        assert not _wait_gone(workers, 15), "xTB workers ran on after `forcecentric label` was killed"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(out.glob("shard-*.extxyz")) if out.exists() else True
