"""Dead-holder recovery: who is robbed, who is not, and what a failed repair does."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import posix_ipc
import pytest

import shmheap
from shmheap import liveness
from shmheap.names import semaphore_name
from shmheap.pytest_plugin import HeapFactory


@pytest.fixture
def heap(shm_heap_factory: HeapFactory) -> shmheap.Heap:
    return shm_heap_factory(reserve=False)


class LockHolder:
    """A child process that takes the heap lock and holds it until told to let go."""

    def __init__(self, name: str) -> None:
        code = textwrap.dedent(f"""
            import sys, shmheap
            h = shmheap.Heap.attach({name!r})
            with h.locked():
                print("locked", flush=True)
                sys.stdin.readline()
            print("released", flush=True)
            h.close()
            """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    def let_go(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "released"
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def test_stopped_holder_is_not_robbed(heap: shmheap.Heap) -> None:
    holder = LockHolder(heap.name)
    try:
        os.kill(holder.proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(shmheap.LockTimeoutError, match="alive"):
            heap.snapshot(timeout=0.3)
        assert time.monotonic() - start >= 0.3
        with pytest.raises(shmheap.LockTimeoutError):
            heap.grow(timeout=0.2)
        os.kill(holder.proc.pid, signal.SIGCONT)
        holder.let_go()
        assert len(heap.snapshot(timeout=30)) == 0
        assert heap.info().recoveries == 0, "a live holder must never be robbed"
    finally:
        holder.kill()


def test_killed_holder_is_recovered(heap: shmheap.Heap) -> None:
    published = [heap.grow().index for _ in range(2)]
    holder = LockHolder(heap.name)
    holder.proc.kill()
    holder.kill()
    assert list(heap.snapshot(timeout=30)) == published
    info = heap.info()
    assert info.recoveries == 1
    assert info.last_recovery_ns > 0
    assert heap.check() == []


def _stamp_slot(heap: shmheap.Heap, slot: int, pid: int, epoch: int) -> int:
    """Write a slot record by hand (as a process that then vanished would have) -> its token."""
    live = heap._live
    assert live is not None
    liveness._SLOT.pack_into(live._seg.buf, liveness.slot_offset(slot), pid, epoch, 1)
    return (slot + 1) << 32 | epoch


def test_live_pid_in_a_dead_slot_does_not_fool_the_check(heap: shmheap.Heap) -> None:
    """The owner record names a slot whose stamped pid is alive (ours) but whose lock is free."""
    slot = liveness.NSLOTS - 1
    token = _stamp_slot(heap, slot, os.getpid(), 7)
    sem = posix_ipc.Semaphore(semaphore_name(heap.name))
    try:
        sem.acquire()  # the "holder" takes the semaphore ...
        heap._live.owner[0] = token  # type: ignore[union-attr]  # ... records itself, vanishes
        assert len(heap.snapshot(timeout=30)) == 0
        assert heap.info().recoveries == 1
    finally:
        sem.close()


def test_foreign_pid_of_a_live_holder_does_not_get_it_robbed(heap: shmheap.Heap) -> None:
    """A holder whose stamped pid means nothing here (another pid namespace) is still alive."""
    holder = LockHolder(heap.name)
    try:
        live = heap._live
        assert live is not None
        owner = int(live.owner[0])
        slot, epoch = (owner >> 32) - 1, owner & 0xFFFFFFFF
        _stamp_slot(heap, slot, 4_000_000, epoch)  # no such pid on this host
        with pytest.raises(shmheap.LockTimeoutError):
            heap.snapshot(timeout=0.3)
        holder.let_go()
        assert heap.info().recoveries == 0
    finally:
        holder.kill()


def test_reused_slot_makes_an_old_token_dead(heap: shmheap.Heap) -> None:
    """A token minted by a slot's earlier claimant is dead even though the slot is held now."""
    live = heap._live
    assert live is not None
    stale = live.token ^ 1  # same slot (ours, alive), another epoch
    sem = posix_ipc.Semaphore(semaphore_name(heap.name))
    try:
        sem.acquire()
        live.owner[0] = stale
        assert len(heap.snapshot(timeout=30)) == 0
        assert heap.info().recoveries == 1
    finally:
        sem.close()


def test_failed_repair_marks_the_heap_broken_until_fixed(heap: shmheap.Heap) -> None:
    lost = heap.grow().index
    heap.grow()
    path = f"/dev/shm/shmheap.{heap.name}.a{lost:x}"
    backup = f"/tmp/{heap.name}.a{lost:x}.bak"
    shutil.copyfile(path, backup)
    try:
        os.unlink(path)
        findings = heap.check(repair=True)
        assert [f.code for f in findings if f.fatal] == ["arena-lost"]
        with pytest.raises(shmheap.HeapCorruptError, match="fsck --repair"):
            heap.snapshot()
        with pytest.raises(shmheap.HeapCorruptError):
            heap.grow()
        other = shmheap.Heap.attach(heap.name)  # attaches, so that fsck can repair it
        with pytest.raises(shmheap.HeapCorruptError, match="broken"):
            other.info()
        other.close()
        shutil.copyfile(backup, path)
        findings = heap.check(repair=True)
        assert [f.code for f in findings] == ["heap-broken"] and findings[0].fixed
        assert heap.check() == []
        assert len(heap.snapshot()) == 2
        shmheap.Heap.attach(heap.name).close()
    finally:
        if os.path.exists(backup):
            os.unlink(backup)


def test_readonly_attacher_recovers_a_dead_holder(heap: shmheap.Heap) -> None:
    heap.grow()
    reader = shmheap.Heap.attach(heap.name, readonly=True)
    try:
        holder = LockHolder(heap.name)
        holder.proc.kill()
        holder.kill()
        assert len(reader.snapshot(timeout=30)) == 1
        assert reader.info().recoveries == 1
    finally:
        reader.close()
    assert heap.check() == []


def test_forked_child_does_not_keep_a_dead_parent_alive(heap: shmheap.Heap) -> None:
    """A child forked from an attached process must not inherit its parent's slot lock.

    Parent and child report on separate pipes (each line one write), so their
    reports cannot interleave even with PYTHONUNBUFFERED=1; both run in a
    session of their own that the test kills whatever happens.
    """
    child_r, child_w = os.pipe()
    code = textwrap.dedent(f"""
        import os, signal, sys, shmheap
        h = shmheap.Heap.attach({heap.name!r})
        if os.fork() == 0:
            os.write({child_w}, b"child %d\\n" % os.getpid())
            sys.stdin.readline()
            os.write({child_w}, b"child-snapshot %d\\n" % len(h.snapshot(timeout=30)))
            h.close()
            os._exit(0)
        os.close({child_w})
        held = h.locked()
        held.__enter__()
        os.write(1, b"locked\\n")
        signal.pause()
        """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, pass_fds=(child_w,), start_new_session=True)
    os.close(child_w)
    child_out = os.fdopen(child_r, "rb")
    assert parent.stdout is not None and parent.stdin is not None
    try:
        child_line = child_out.readline().split()
        assert child_line[0] == b"child"
        assert parent.stdout.readline() == b"locked\n"
        child_pid = int(child_line[1])
        parent.kill()
        parent.wait(timeout=30)
        assert len(heap.snapshot(timeout=30)) == 0, "the dead parent's lock must be recovered"
        assert heap.info().recoveries == 1
        assert child_pid in {a.pid for a in heap._live.attachments()}  # type: ignore[union-attr]
        parent.stdin.write(b"\n")
        parent.stdin.flush()
        assert child_out.readline().split() == [b"child-snapshot", b"0"]
        assert child_out.readline() == b"", "the child exits after its snapshot"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)  # the parent and its forked child
        parent.wait(timeout=30)
        parent.stdin.close()
        parent.stdout.close()
        child_out.close()
    assert heap.check() == []
