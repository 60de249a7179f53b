"""Hostile names in /dev/shm: planted files, squatters of another user, a full /dev/shm,
recycled names and stale handles.

/dev/shm is writable by every local user.  Under every kind of name a heap uses
(control, index generation, arena, map, liveness, semaphore, temporary arena)
these tests plant a FIFO, a directory, a symbolic link, a file of another user
and a file of the wrong size.  No call may hang (an alarm turns a hang into a
failure), raise anything but a ShmHeapError, or quietly use what was planted.
Another user is real: a forked child that drops to uid 65534, or a file chowned to
it; those tests skip where that is impossible (not root).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Callable, Iterator
from types import FrameType

import posix_ipc
import pytest
from children import run_child

import shmheap
from shmheap import arenas, names
from shmheap.pytest_plugin import HeapFactory, shm_leftovers
from shmheap.segments import ForeignObjectError
from shmheap.tools import collect

ARENA = 64 * 1024
NOBODY = 65534
#: Seconds any one planted-name case may take before it counts as a hang.
HANG = 10

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def shm(entry: str) -> str:
    return f"{names.SHM_DIR}/{entry}"


class Hung(Exception):
    """A call did not return within HANG seconds."""


@contextlib.contextmanager
def no_hang(what: str) -> Iterator[None]:
    """Fail with Hung if the body takes more than HANG seconds (e.g. blocked on a FIFO)."""
    def alarm(_signum: int, _frame: FrameType | None) -> None:
        raise Hung(f"{what} hung for {HANG} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def typed_or_works(call: Callable[[], object]) -> BaseException | None:
    """Run ``call``; return the ShmHeapError it raised, None if it worked.  Anything else fails."""
    try:
        call()
    except shmheap.ShmHeapError as exc:
        return exc
    return None


def as_nobody(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` (dedented) in a child process that is uid/gid 65534.

    The child is forked and drops root's identity itself rather than exec'ing a fresh
    interpreter as that user: the interpreter may live where another user cannot read it
    (pyenv under a 0700 home), and what matters here is the kernel's owner checks on a real
    process of another user.  Its stdout and stderr are captured through files.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:
            os._exit(run_as_nobody(textwrap.dedent(code), out.fileno(), err.fileno()))
        exited = os.pidfd_open(pid)  # readable once the child has exited
        try:
            if not select.select([exited], [], [], timeout)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(["as_nobody", code], timeout)
        finally:
            os.close(exited)
        out.seek(0)
        err.seek(0)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        return subprocess.CompletedProcess(["as_nobody", code], status, out.read(), err.read())


def import_all_of_shmheap() -> None:
    """Import every module of shmheap and what it imports, while still root: 65534 may be
    unable to read the interpreter's standard library (pyenv under a 0700 home)."""
    for module in pkgutil.walk_packages(shmheap.__path__, "shmheap."):
        with contextlib.suppress(ImportError):
            importlib.import_module(module.name)


def run_as_nobody(code: str, out: int, err: int) -> int:
    """In the forked child: become uid/gid 65534, run ``code``, return its exit status."""
    try:
        import_all_of_shmheap()
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (lives until os._exit)
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        exec(compile(code, "<as_nobody>", "exec"), {"__name__": "__main__"})
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return status


def shmheap_cli_as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return as_nobody("import sys; from shmheap.tools.cli import main; "
                     f"sys.exit(main({list(argv)!r}))")


def remove_planted(path: str) -> None:
    """Remove what a test planted, whatever it is."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


# -- the planted-name matrix --------------------------------------------------------------

KINDS = ("fifo", "directory", "symlink", "other-user", "wrong-size")
#: name kind -> suffix of the entry under the heap's name ("sem" is the semaphore's file)
TARGETS = ("control", "index", "arena", "unused-arena", "map", "live", "sem", "temporary")


def entry_of(name: str, target: str) -> str:
    return {
        "control": names.control_name(name), "index": names.index_name(name, 0),
        "arena": names.arena_name(name, 1), "unused-arena": names.arena_name(name, 5),
        "map": names.map_name(name), "live": names.live_name(name),
        "sem": names.semaphore_file(name), "temporary": names.temp_arena_name(name, 0),
    }[target]


def plant(kind: str, path: str, content: bytes, tmp: str) -> None:
    """Put a ``kind`` thing at ``path``; ``content`` is what a real segment there holds."""
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "directory":
        os.mkdir(path, 0o700)
    elif kind == "symlink":
        target = f"{tmp}/segment"
        with open(target, "wb") as out:
            out.write(content)  # a perfect copy: only following the link would "work"
        os.symlink(target, path)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(content if kind == "other-user" else content[:len(content) // 2 or 1])
        if kind == "other-user":
            os.chown(path, NOBODY, NOBODY)


def planted_heap(factory: HeapFactory, target: str, kind: str, tmp: str) -> str:
    """A closed heap with arenas 1 and 2 and an object, ``kind`` planted at ``target``."""
    heap = factory(reserve=False)
    heap.grow()
    heap.grow()
    heap.alloc(100)
    name = heap.name
    heap.close()
    entry = entry_of(name, target)
    content = b"\0" * 4096
    if os.path.lexists(shm(entry)):
        with open(shm(entry), "rb") as seg:
            content = seg.read()
        os.unlink(shm(entry))
    elif target == "temporary":
        content = b"\0" * arenas.segment_size(ARENA)
    plant(kind, shm(entry), content, tmp)
    return name


def every_call(name: str) -> None:
    """Every public call on heap ``name``: each works or raises a ShmHeapError."""
    typed_or_works(lambda: shmheap.Heap.create(name, arena_size=ARENA).close())
    typed_or_works(lambda: collect.survey([name]))
    typed_or_works(lambda: collect.collect(dry_run=True, names=[name]))
    for readonly in (True, False):
        try:
            heap = shmheap.Heap.attach(name, readonly=readonly, timeout=1)
        except shmheap.ShmHeapError:
            continue
        try:
            use(heap)
        finally:
            heap.close()


def use(heap: shmheap.Heap) -> None:
    """Read, allocate, grow, scavenge and repair ``heap``: each works or raises a ShmHeapError."""
    for call in (lambda: list(heap.arenas(timeout=2)), lambda: heap.info(timeout=2),
                 heap.stats, lambda: list(heap.walk()), lambda: heap.check(timeout=2),
                 lambda: heap.alloc(100), lambda: heap.grow(timeout=2),
                 lambda: heap.grow(at=5, timeout=2), heap.scavenge,
                 lambda: heap.check(repair=True, timeout=2)):
        typed_or_works(call)


def expect(name: str, target: str, kind: str) -> None:
    """What must happen with ``kind`` planted at ``target``, beyond working-or-typed."""
    if target in ("control", "map", "live", "sem"):
        # a part every attach opens: never used, always a typed refusal
        with pytest.raises(shmheap.HeapCorruptError) as caught:
            shmheap.Heap.attach(name, timeout=1).close()
        if kind != "wrong-size":
            assert isinstance(caught.value, ForeignObjectError), caught.value
            assert "remove it" in str(caught.value)
        return
    with shmheap.Heap.attach(name) as heap:
        if target == "index":
            with pytest.raises(shmheap.HeapCorruptError):
                heap.snapshot()
        elif target == "arena":
            with pytest.raises(shmheap.HeapCorruptError):
                heap.arena(1)
            assert any(f.fatal for f in heap.check())
        elif target == "unused-arena":
            with pytest.raises(shmheap.ArenaCollisionError):
                heap.grow(at=5)
            assert heap.grow().index == 3
            findings = [f for f in heap.check(repair=True) if f.code != "abandoned-spans"]
            assert [f.code for f in findings] == ["foreign-object"], findings
            assert not any(f.fatal for f in findings)
        elif target == "temporary":
            assert heap._live is not None and heap._live.slot == 0
            if kind == "wrong-size":  # our own leftover: attach removed it
                assert heap.grow().index == 3
            else:
                with pytest.raises(ForeignObjectError, match=entry_of(name, target)):
                    heap.grow()
                findings = [f for f in heap.check(repair=True) if f.code != "abandoned-spans"]
                assert [f.code for f in findings] == ["foreign-object"], findings
                assert not findings[0].fatal and os.path.lexists(shm(entry_of(name, target)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", TARGETS)
def test_planted_names(shm_heap_factory: HeapFactory, tmp_path: object, target: str,
                       kind: str) -> None:
    if kind == "other-user" and os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    name = planted_heap(shm_heap_factory, target, kind, str(tmp_path))
    entry = entry_of(name, target)
    try:
        with no_hang(f"{kind} at {target}"):
            expect(name, target, kind)
            every_call(name)
            if kind == "directory":  # the one thing destroy may not remove
                with pytest.raises(shmheap.HeapRemovalError) as caught:
                    shmheap.destroy(name)
                assert caught.value.remaining == [entry]
                assert "\n" not in str(caught.value)
            else:
                shmheap.destroy(name)
        assert shm_leftovers(name) == ([entry] if kind == "directory" else [])
    finally:
        remove_planted(shm(entry))


def test_fifo_at_an_unused_arena_name_does_not_hang_crash_recovery(
        shm_heap: shmheap.Heap) -> None:
    shm_heap.grow()
    os.mkfifo(shm(names.arena_name(shm_heap.name, 2)), 0o600)
    proc = run_child(f"""
        import shmheap
        heap = shmheap.Heap.attach({shm_heap.name!r})
        held = heap.locked()
        held.__enter__()  # and die holding the lock: the next holder recovers it
        import os; os._exit(0)
        """)
    assert proc.returncode == 0, proc.stderr
    with no_hang("crash recovery with a FIFO at an arena name"):
        assert len(shm_heap.snapshot()) == 1
        assert shm_heap.info().recoveries == 1
        assert shm_heap.grow().index == 3
        assert [f.code for f in shm_heap.check()] == ["foreign-object"]
        assert [s.state for s in collect.survey([shm_heap.name])] == ["ready"]
    os.unlink(shm(names.arena_name(shm_heap.name, 2)))


def test_a_directory_under_an_arena_name_does_not_stop_destroy(
        shm_heap_factory: HeapFactory) -> None:
    heap = shm_heap_factory(reserve=False)
    heap.grow()
    name = heap.name
    heap.close()
    planted = names.arena_name(name, 7)
    os.mkdir(shm(planted))
    try:
        with pytest.raises(shmheap.HeapRemovalError) as caught:
            shmheap.destroy(name)
        assert caught.value.remaining == [planted]
        assert "is a directory" in str(caught.value) and shm(planted) in str(caught.value)
        assert len(caught.value.removed) == 8
        assert shm_leftovers(name) == [planted]
        result = subprocess.run(["shmheap", "gc", name], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "could not remove" in result.stdout and shm(planted) in result.stdout
    finally:
        os.rmdir(shm(planted))


# -- squatters of another user --------------------------------------------------------------


@needs_root
def test_create_refuses_a_semaphore_planted_by_another_user(shm_heap_name: str) -> None:
    squat = as_nobody(f"""
        import posix_ipc
        posix_ipc.Semaphore({names.semaphore_name(shm_heap_name)!r}, posix_ipc.O_CREX, 0o644, 1)
        """)
    assert squat.returncode == 0, squat.stderr
    sem_file = names.semaphore_file(shm_heap_name)
    try:
        with pytest.raises(ForeignObjectError, match="another user"):
            shmheap.Heap.create(shm_heap_name, arena_size=ARENA)
        assert shm_leftovers(shm_heap_name) == [sem_file]
        assert os.stat(shm(sem_file)).st_uid == NOBODY  # someone else's: left alone
    finally:
        posix_ipc.unlink_semaphore(names.semaphore_name(shm_heap_name))


@needs_root
def test_create_as_another_user_blocked_by_a_squatter_leaves_nothing(
        shm_heap_name: str) -> None:
    sem = posix_ipc.Semaphore(names.semaphore_name(shm_heap_name), posix_ipc.O_CREX, 0o600, 1)
    try:
        result = shmheap_cli_as_nobody("create", shm_heap_name, "--arena-size", "64KiB")
        assert result.returncode == 1, result
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert shm(names.semaphore_file(shm_heap_name)) in result.stderr
        assert shm_leftovers(shm_heap_name) == [names.semaphore_file(shm_heap_name)]
    finally:
        sem.unlink()


@needs_root
def test_create_refuses_a_control_segment_of_another_user(shm_heap_name: str) -> None:
    squat = as_nobody(f"open({shm(names.control_name(shm_heap_name))!r}, 'wb').close()")
    assert squat.returncode == 0, squat.stderr
    try:
        with pytest.raises(shmheap.HeapExistsError, match="another user"):
            shmheap.Heap.create(shm_heap_name, arena_size=ARENA)
        with pytest.raises(ForeignObjectError, match="another user"):
            shmheap.Heap.attach(shm_heap_name)
    finally:
        os.unlink(shm(names.control_name(shm_heap_name)))


@needs_root
def test_destroy_without_permission_is_one_line_and_removes_what_it_may(
        shm_heap_name: str) -> None:
    made = shmheap_cli_as_nobody("create", shm_heap_name, "--arena-size", "64KiB")
    assert made.returncode == 0, made.stderr
    grown = shmheap_cli_as_nobody("grow", shm_heap_name)
    assert grown.returncode == 0, grown.stderr
    planted = names.arena_name(shm_heap_name, 9)
    with open(shm(planted), "wb"):
        pass  # root's file in a sticky /dev/shm: nobody may not remove it
    try:
        result = shmheap_cli_as_nobody("destroy", shm_heap_name)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert shm(planted) in result.stderr and "could not remove" in result.stderr
        assert shm_leftovers(shm_heap_name) == [planted]
    finally:
        os.unlink(shm(planted))


# -- a full /dev/shm ----------------------------------------------------------------------------


def in_small_shm(code: str, size: str = "1M") -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` in a private mount namespace whose /dev/shm is a tmpfs of ``size``."""
    script = f"mount -t tmpfs -o size={size} tmpfs /dev/shm && exec \"$0\" -c \"$1\""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable,
         textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_create_in_a_full_dev_shm_raises_out_of_shared_memory_and_leaves_nothing() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare for a private, small /dev/shm")
    result = in_small_shm("""
        import os
        import shmheap
        outcomes = set()
        for pages in range(0, 24):
            free = os.statvfs("/dev/shm")
            fd = os.open("/dev/shm/filler", os.O_RDWR | os.O_CREAT, 0o600)
            os.posix_fallocate(fd, 0, free.f_bavail * free.f_frsize - pages * 4096)
            try:
                heap = shmheap.Heap.create("full", arena_size=64 * 1024, max_arenas=64)
            except shmheap.OutOfSharedMemoryError:
                outcomes.add("full")
            else:
                heap.destroy()
                outcomes.add("made")
            left = sorted(os.listdir("/dev/shm"))
            assert left == ["filler"], (pages, left)
            os.close(fd)
            os.unlink("/dev/shm/filler")
        assert outcomes == {"full", "made"}, outcomes
        """)
    if result.returncode and ("unshare:" in result.stderr or "mount:" in result.stderr):
        pytest.skip(f"cannot mount a private /dev/shm here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr


# -- recycled names and stale handles ------------------------------------------------------------


def recreate_elsewhere(name: str, fill: bytes) -> int:
    """In another process: destroy heap ``name``, create it again and store ``fill`` in it."""
    proc = run_child(f"""
        import shmheap
        shmheap.destroy({name!r}, force=True)
        heap = shmheap.Heap.create({name!r}, arena_size={ARENA}, reserve=False)
        ref = heap.alloc({len(fill)})
        heap.view(ref)[:{len(fill)}] = {fill!r}
        print(ref)
        heap.close()
        """)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def test_a_stale_handle_never_punches_holes_in_the_new_heap_of_its_name(
        shm_heap_name: str) -> None:
    stale = shmheap.Heap.create(shm_heap_name, arena_size=ARENA, reserve=False)
    try:
        stale.grow()
        pages = stale._objects().pages_of(1)
        fill = bytes(range(256)) * 16
        ref = recreate_elsewhere(shm_heap_name, fill)
        with pytest.raises(shmheap.HeapNotFoundError, match="attach"):
            stale.scavenge()
        pages.punch(0, pages.pages)  # below the identity check: uses this handle's mapping
        with pytest.raises(shmheap.HeapNotFoundError, match="re-created"):
            pages.reserve(0, 1)
        with shmheap.Heap.attach(shm_heap_name) as fresh:
            assert bytes(fresh.view(ref)[:len(fill)]) == fill
            assert fresh.check() == []
    finally:
        stale.close()


MUTATIONS: dict[str, Callable[[shmheap.Heap, int], object]] = {
    "grow": lambda heap, big: heap.grow(),
    "alloc": lambda heap, big: heap.alloc(100),
    "alloc large": lambda heap, big: heap.alloc(5 * 8192),
    "free large": lambda heap, big: heap.free(big),
    "start_cycle": lambda heap, big: heap.start_cycle(),
    "sweep": lambda heap, big: heap.sweep(),
    "scavenge": lambda heap, big: heap.scavenge(),
    "repair": lambda heap, big: heap.check(repair=True),
    "destroy": lambda heap, big: heap.destroy(),
}


@pytest.mark.parametrize("recreate", [False, True], ids=["destroyed", "recreated"])
def test_a_stale_handle_cannot_mutate_or_create_anything(shm_heap_factory: HeapFactory,
                                                         recreate: bool) -> None:
    heap = shm_heap_factory(reserve=False)
    heap.grow()
    big = heap.alloc(5 * 8192)
    name = heap.name
    if recreate:
        recreate_elsewhere(name, b"x" * 64)
        before = shm_leftovers(name)
    else:
        proc = run_child(f"import shmheap; shmheap.destroy({name!r}, force=True)")
        assert proc.returncode == 0, proc.stderr
        before = []
    for what, mutate in MUTATIONS.items():
        with pytest.raises(shmheap.HeapNotFoundError, match="attach"):
            mutate(heap, big)
        assert shm_leftovers(name) == before, what
    if recreate:
        with shmheap.Heap.attach(name) as fresh:
            assert len(fresh.snapshot()) == 1 and fresh.check() == []


# -- lifecycle ---------------------------------------------------------------------------------


def test_a_readonly_handle_cannot_destroy_the_heap(shm_heap: shmheap.Heap) -> None:
    with (shmheap.Heap.attach(shm_heap.name, readonly=True) as reader,
          pytest.raises(shmheap.ReadOnlyError, match=r"shmheap\.destroy")):
        reader.destroy()
    assert shm_heap.snapshot() == []
    assert len(shm_leftovers(shm_heap.name)) == 7


def test_a_missing_arena_is_a_typed_key_error(shm_heap: shmheap.Heap) -> None:
    shm_heap.grow()
    with pytest.raises(shmheap.ArenaNotFoundError, match="no arena 2") as caught:
        shm_heap.arena(2)
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, shmheap.ShmHeapError)
    assert str(caught.value).startswith("heap ")  # not KeyError's quoted repr
    for bad in (1.0, True, "1", None):
        with pytest.raises(shmheap.InvalidParameterError, match="int"):
            shm_heap.arena(bad)  # type: ignore[arg-type]
    assert True not in shm_heap
    assert shm_heap.arena(1).index == 1


def test_create_no_reserve_warns_once_about_sigbus(shm_heap_name: str) -> None:
    result = subprocess.run(["shmheap", "create", shm_heap_name, "--arena-size", "64KiB",
                             "--no-reserve"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("SIGBUS") == 1 and result.stderr.count("\n") == 1
    shmheap.destroy(shm_heap_name)
    plain = subprocess.run(["shmheap", "create", shm_heap_name, "--arena-size", "64KiB"],
                           capture_output=True, text=True)
    assert plain.returncode == 0 and plain.stderr == ""
