/* shmheap._native: the native core, the hot paths of shmheap in C.
 *
 * It is the twin of pure-Python code that stays (as CPython keeps heapq beside
 * _heapq): every protocol here is the one its Python module documents, on
 * the same shared memory, so native and pure processes share a heap.
 *
 *   Mutex         a handle's reentrant thread lock (a futex word, no GIL needed),
 *                 held around every hold of the heap lock and by the allocator's
 *                 fast paths (see its section).
 *   Lock          lock.py's HeapLock: acquire with the owner record and the
 *                 lock sequence, release, timed waits that adopt a dead
 *                 holder's lock, the repair of a dirty journal by writers.
 *                 Everything between sem_trywait and recording the owner,
 *                 and between clearing it and sem_post, is C: no Python
 *                 signal handler can run there.  A wait interrupted by a
 *                 signal (EINTR) runs the Python handlers; if one raises,
 *                 the exception propagates and nothing is held.
 *   ArenaSnapshot index.py's ArenaSnapshot: an immutable sequence of uint32
 *                 over a generation's mapping (which it keeps alive).
 *   Snapshots     Heap.snapshot(): the header word read under the lock and
 *                 the snapshot built from it, cached while the word holds.
 *   Cache, Alloc, Free   allocator.py's fast paths: a small object from the
 *                 span this process caches, and the free of a small object,
 *                 with C11-style atomic loads and stores (acquire/release);
 *                 anything else goes back to the Python slow path.
 *   Mapping       arenas.py's map_run: a run of arenas mapped back to back
 *                 into one reserved range, a buffer that unmaps it in its
 *                 dealloc (views of a giant object, giant.py).
 *   rename_noreplace   arenas.py's link: a new arena moved to its final name
 *                 unless that name is taken (renameat2), one system call.
 *   nonzero_every liveness.py's scan of the slots' building bytes (grow).
 *   futex_wait, futex_wake, Counter   waits.py's futex calls and coord.py's
 *                 counter add: one atomic instruction while no pure-core
 *                 process has added to the counter.
 *   Queue         coord.py's Queue.put and get, one call each under the heap
 *                 lock (this Lock's), for items kept in their node.
 *   RootReader    roots.py's lock-free lookup of heap.roots[name] in one call;
 *                 anything it is unsure of goes back to the Python path.
 *   RootWriter    roots.py's bind and unbind of a root in one call (lock, journal,
 *                 probe, stores, unlock); anything unsure goes back to Python.
 *
 * Shared layouts are in _layout.h.  Memory ordering: the semaphore's
 * operations are full barriers; stores that publish (owner, seq, alloc
 * bytes, sequence words) are release stores, the loads that read them are
 * acquire loads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <semaphore.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "_layout.h"

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
/* A spinning reader's hint to the core (it lets the sibling hyperthread run). */
#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/* -- errors: the classes of shmheap.errors, looked up when first needed ---------------- */

static PyObject *
error_class(const char *name)
{
    PyObject *module = PyImport_ImportModule("shmheap.errors");
    if (module == NULL)
        return NULL;
    PyObject *cls = PyObject_GetAttrString(module, name);
    Py_DECREF(module);
    return cls;
}

static void
raise_error(const char *name, PyObject *message)
{
    PyObject *cls = error_class(name);
    if (cls != NULL) {
        PyErr_SetObject(cls, message);
        Py_DECREF(cls);
    }
    Py_XDECREF(message);
}

/* HeapClosedError for a call on an object the garbage collector cleared (tp_clear: its
 * handle was dropped without close(), in a reference cycle). */
static PyObject *
collected_error(void)
{
    raise_error("HeapClosedError", PyUnicode_FromString(
        "this heap handle was garbage-collected without close(); attach the heap again"));
    return NULL;
}

static double
monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A deadline argument: None for ever, else a monotonic time in seconds. */
static int
parse_deadline(PyObject *arg, double *deadline, int *has_deadline)
{
    if (arg == NULL || arg == Py_None) {
        *has_deadline = 0;
        return 0;
    }
    *deadline = PyFloat_AsDouble(arg);
    if (*deadline == -1.0 && PyErr_Occurred())
        return -1;
    *has_deadline = 1;
    return 0;
}

/* -- OFD locks on the liveness segment (liveness.py) ---------------------------------- */

static int
ofd_probe_locked(int fd, off_t start)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_RDLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = 1;
    if (fcntl(fd, F_OFD_GETLK, &fl) != 0)
        return 1; /* cannot tell: count it alive, never rob */
    return fl.l_type != F_UNLCK;
}

static int
ofd_set(int fd, off_t start, short type)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = 1;
    return fcntl(fd, F_OFD_SETLK, &fl);
}

/* -- Mutex: a handle's thread lock -------------------------------------------------------
 *
 * Every per-handle state a thread may change (span caches, pending lists, the arena cache,
 * the heap lock's hold) is changed by the thread holding its handle's Mutex.  It is
 * reentrant (a holder may take it again), held from before the heap semaphore is taken to
 * after it is posted (a second thread waits for the first thread's hold, never piggy-backs
 * on it), and a plain futex word, so it needs no GIL:
 *
 *   state   0 free, 1 taken, 2 taken and somebody may be waiting (Drepper's mutex)
 *   owner   thread ident of the holder (written and cleared by the holder only)
 *   depth   how many times the holder took it
 *
 * A waiter sleeps in FUTEX_WAIT without the GIL, in slices of at most MUTEX_SLICE after
 * each of which (and after a signal that woke it) it runs the signal handlers (their
 * exception propagates, nothing taken), until it has the mutex or its deadline passed (a
 * lock operation's deadline: LockTimeoutError; acquire(True, timeout): False, as
 * threading.RLock's).  The allocator's fast paths only try it
 * (mutex_try); with the GIL they need not even take it: code that calls no Python runs
 * alone, and only has to keep out while another thread holds the mutex in a slow path
 * (FAST_ENTER below).  A forked child resets it (_at_fork_reinit): the parent's holder
 * thread does not exist there. */

typedef struct {
    PyObject_HEAD
    uint32_t state;
    unsigned long owner;
    long depth;
} Mutex;

static PyTypeObject MutexType;

static inline int
mutex_try(Mutex *m, unsigned long me)
{
    if (__atomic_load_n(&m->owner, __ATOMIC_RELAXED) == me) {
        m->depth++;
        return 1;
    }
    uint32_t expected = 0;
    if (!__atomic_compare_exchange_n(&m->state, &expected, 1, 0, __ATOMIC_ACQUIRE,
                                     __ATOMIC_RELAXED))
        return 0;
    __atomic_store_n(&m->owner, me, __ATOMIC_RELAXED);
    m->depth = 1;
    return 1;
}

/* Seconds a waiter for a Mutex sleeps at most before it runs the signal handlers: a signal
 * that arrives just before the sleep interrupts nothing. */
#define MUTEX_SLICE 0.05
/* What a lock operation whose deadline passed while it waited for the mutex says (the same
 * words as lock.py's MUTEX_TIMEOUT). */
#define MUTEX_TIMEOUT "another thread of this process holds this heap handle (inside " \
    "`with heap.locked():` or a call on it) and did not let go in time; give a longer " \
    "timeout, or give each thread a handle of its own (Heap.attach)"

/* Take the mutex by the monotonic ``deadline`` (``has_deadline`` 0: whenever it is free),
 * waiting without the GIL: 1 taken, 0 not by the deadline, -1 a signal handler raised. */
static int
mutex_wait(Mutex *m, int has_deadline, double deadline)
{
    unsigned long me = PyThread_get_thread_ident();
    if (mutex_try(m, me))
        return 1;
    for (;;) {
        double wait = MUTEX_SLICE;
        if (has_deadline) {
            double left = deadline - monotonic();
            if (left <= 0)
                return 0;
            if (left < wait)
                wait = left;
        }
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        long ns = until.tv_nsec + (long)(wait * 1e9);
        until.tv_sec += ns / 1000000000L;
        until.tv_nsec = ns % 1000000000L;
        int taken = 0;
        Py_BEGIN_ALLOW_THREADS
        while (!(taken = __atomic_exchange_n(&m->state, 2, __ATOMIC_ACQUIRE) == 0)) {
            /* (FUTEX_WAIT_BITSET: an absolute CLOCK_MONOTONIC time) */
            if (syscall(SYS_futex, &m->state, FUTEX_WAIT_BITSET_PRIVATE, 2, &until, NULL,
                        FUTEX_BITSET_MATCH_ANY) != 0 && errno != EAGAIN)
                break;  /* the slice is over, or a signal came */
        }
        Py_END_ALLOW_THREADS
        if (taken) {
            __atomic_store_n(&m->owner, me, __ATOMIC_RELAXED);
            m->depth = 1;
            return 1;
        }
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
}

/* Take the mutex, waiting without the GIL; 0 taken, -1 a signal handler raised. */
static int
mutex_acquire(Mutex *m)
{
    return mutex_wait(m, 0, 0) < 0 ? -1 : 0;
}

/* What a lock operation's wait (for the mutex, or for the heap lock) returns when its
 * deadline passed: LockTimeoutError set, nothing held (-1 is any other exception: a signal
 * handler's, say). */
#define LOCK_DEADLINE (-2)

/* Take the mutex for a lock operation with a deadline: 0 taken, LOCK_DEADLINE (another
 * thread held it until the deadline; lock.py MUTEX_TIMEOUT says the same) or -1 with the
 * exception. */
static int
mutex_acquire_by(Mutex *m, int has_deadline, double deadline)
{
    int taken = mutex_wait(m, has_deadline, deadline);
    if (taken == 0)
        raise_error("LockTimeoutError", PyUnicode_FromString(MUTEX_TIMEOUT));
    return taken > 0 ? 0 : taken == 0 ? LOCK_DEADLINE : -1;
}

static inline void
mutex_release(Mutex *m)
{
    if (m->depth > 1) {
        m->depth--;
        return;
    }
    if (m->depth == 0)
        return;  /* not taken (a forked child's inherited block): nothing to give back */
    m->depth = 0;
    __atomic_store_n(&m->owner, 0UL, __ATOMIC_RELAXED);
    if (__atomic_exchange_n(&m->state, 0, __ATOMIC_RELEASE) == 2)
        syscall(SYS_futex, &m->state, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

#ifdef Py_GIL_DISABLED
#define FAST_ENTER(m) mutex_try((m), PyThread_get_thread_ident())
#define FAST_LEAVE(m) mutex_release(m)
#else
/* With the GIL the fast path (no Python call inside) runs alone: it may go on unless
 * another thread holds the mutex (in a slow path that may have let the GIL go). */
#define FAST_ENTER(m) (__atomic_load_n(&(m)->state, __ATOMIC_ACQUIRE) == 0 \
                       || __atomic_load_n(&(m)->owner, __ATOMIC_RELAXED) \
                          == PyThread_get_thread_ident())
#define FAST_LEAVE(m) ((void)0)
#endif

/* threading.RLock's acquire(blocking=True, timeout=-1): True once taken, False if
 * ``timeout`` seconds (-1: for ever) passed first or it was not free for a non-blocking call. */
static PyObject *
Mutex_acquire(Mutex *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"blocking", "timeout", NULL};
    int blocking = 1;
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|pd", names, &blocking, &timeout))
        return NULL;
    if (!blocking && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
        return NULL;
    }
    if (timeout < 0 && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
        return NULL;
    }
    if (!blocking)
        return PyBool_FromLong(mutex_try(self, PyThread_get_thread_ident()));
    int taken = mutex_wait(self, timeout >= 0, monotonic() + timeout);
    return taken < 0 ? NULL : PyBool_FromLong(taken);
}

static PyObject *
Mutex_enter(Mutex *self, PyObject *Py_UNUSED(ignored))
{
    if (mutex_acquire(self) < 0)
        return NULL;
    Py_RETURN_TRUE;
}

static PyObject *
Mutex_release(Mutex *self, PyObject *Py_UNUSED(ignored))
{
    if (self->depth == 0
            || __atomic_load_n(&self->owner, __ATOMIC_RELAXED) != PyThread_get_thread_ident()) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return NULL;
    }
    mutex_release(self);
    Py_RETURN_NONE;
}

static PyObject *
Mutex_exit(Mutex *self, PyObject *Py_UNUSED(args))
{
    return Mutex_release(self, NULL);
}

static PyObject *
Mutex_is_owned(Mutex *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->depth > 0 && __atomic_load_n(&self->owner, __ATOMIC_RELAXED)
                           == PyThread_get_thread_ident());
}

static PyObject *
Mutex_at_fork_reinit(Mutex *self, PyObject *Py_UNUSED(ignored))
{
    self->state = 0;
    self->owner = 0;
    self->depth = 0;
    Py_RETURN_NONE;
}

/* threading.Condition's protocol: give up every hold while waiting, then take them back. */
static PyObject *
Mutex_release_save(Mutex *self, PyObject *Py_UNUSED(ignored))
{
    if (self->depth == 0
            || __atomic_load_n(&self->owner, __ATOMIC_RELAXED) != PyThread_get_thread_ident()) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return NULL;
    }
    long depth = self->depth;
    self->depth = 1;
    mutex_release(self);
    return PyLong_FromLong(depth);
}

static PyObject *
Mutex_acquire_restore(Mutex *self, PyObject *state)
{
    long depth = PyLong_AsLong(state);
    if (depth == -1 && PyErr_Occurred())
        return NULL;
    if (mutex_acquire(self) < 0)
        return NULL;
    self->depth = depth > 0 ? depth : 1;
    Py_RETURN_NONE;
}

static PyMethodDef Mutex_methods[] = {
    {"_release_save", (PyCFunction)Mutex_release_save, METH_NOARGS, NULL},
    {"_acquire_restore", (PyCFunction)Mutex_acquire_restore, METH_O, NULL},
    {"acquire", (PyCFunction)(void (*)(void))Mutex_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1): take the mutex (again, if this thread holds it); "
     "False if not within timeout seconds (-1: for ever)"},
    {"release", (PyCFunction)Mutex_release, METH_NOARGS, "give back one hold"},
    {"__enter__", (PyCFunction)Mutex_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Mutex_exit, METH_VARARGS, NULL},
    {"_is_owned", (PyCFunction)Mutex_is_owned, METH_NOARGS, "True if this thread holds it"},
    {"_at_fork_reinit", (PyCFunction)Mutex_at_fork_reinit, METH_NOARGS,
     "free it (in a forked child, where its holder thread does not exist)"},
    {NULL}
};

static PyTypeObject MutexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.Mutex",
    .tp_basicsize = sizeof(Mutex),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A handle's reentrant thread lock (a futex word; threading.RLock's methods).",
    .tp_new = PyType_GenericNew,
    .tp_methods = Mutex_methods,
};

/* -- Lock ------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Mutex *mutex;            /* the handle's thread lock, held around every hold */
    sem_t *sem;
    Py_buffer live;          /* the liveness segment, writable */
    Py_buffer journal;       /* the control segment's journal word */
    Py_buffer header;        /* the control segment's index header word */
    PyObject *header_obj;    /* the view the header buffer came from */
    int live_fd;
    long nslots;
    long slot;
    uint64_t token;
    int held;
    long adoptions;
    PyObject *outer;         /* weak reference to the outermost open locked() block */
    PyObject *repair;        /* run by a writable holder that finds the journal dirty */
    PyObject *heap_name;
    double first_poll, poll, grace, yield_limit, yield_nap;
} Lock;

#define LIVE_U64(self, off) ((uint64_t *)((char *)(self)->live.buf + (off)))
#define SLOT_U32(self, slot, field) \
    ((uint32_t *)((char *)(self)->live.buf + LIVE_SLOTS_OFFSET + (slot) * LIVE_SLOT_SIZE + (field)))

static int
lock_slot_alive(Lock *self, long slot)
{
    if (slot == self->slot)
        return 1;
    return ofd_probe_locked(self->live_fd, LIVE_SLOTS_OFFSET + slot * LIVE_SLOT_SIZE);
}

/* The holder word of an object owned by liveness token ``token`` (allocator.holder_of):
 * (slot + 1) << 16 | epoch & 0xFFFF. */
static inline uint32_t
holder_of(uint64_t token)
{
    return (uint32_t)((token >> 32) << 16 | (token & 0xFFFF));
}

static int
lock_token_alive(Lock *self, uint64_t token)
{
    long slot = (long)(token >> 32) - 1;
    uint32_t epoch = (uint32_t)(token & 0xFFFFFFFFu);
    if (slot < 0 || slot >= self->nslots)
        return 0;
    if (LOAD(SLOT_U32(self, slot, LIVE_SLOT_EPOCH)) != epoch)
        return 0;
    return lock_slot_alive(self, slot);
}

static int
lock_dead_slot_exists(Lock *self)
{
    for (long slot = 0; slot < self->nslots; slot++) {
        if (LOAD(SLOT_U32(self, slot, LIVE_SLOT_PID)) != 0 && !lock_slot_alive(self, slot))
            return 1;
    }
    return 0;
}

static void
lock_record(Lock *self)
{
    uint64_t *seq = LIVE_U64(self, LIVE_LOCK_SEQ_OFFSET);
    STORE(LIVE_U64(self, LIVE_OWNER_OFFSET), self->token);
    STORE(seq, LOAD(seq) + 1);
}

static void
lock_release(Lock *self)
{
    if (!self->held)
        return;
    STORE(LIVE_U64(self, LIVE_OWNER_OFFSET), (uint64_t)0);
    sem_post(self->sem);
    self->held = 0;
}

/* LockTimeoutError for a wait whose deadline passed: LOCK_DEADLINE (-1 if even the message
 * could not be made). */
static int
lock_timeout(Lock *self)
{
    uint64_t token = LOAD(LIVE_U64(self, LIVE_OWNER_OFFSET));
    long slot = (long)(token >> 32) - 1;
    uint32_t pid = 0;
    if (token && slot >= 0 && slot < self->nslots)
        pid = LOAD(SLOT_U32(self, slot, LIVE_SLOT_PID));
    PyObject *holder = pid ? PyUnicode_FromFormat("process %u", (unsigned)pid)
                           : PyUnicode_FromString("a process that has not recorded itself yet");
    if (holder == NULL)
        return -1;
    raise_error("LockTimeoutError", PyUnicode_FromFormat(
        "heap %R: lock not acquired in time; it is held by %U, which is alive (stopped or "
        "slow); wait longer or investigate it", self->heap_name, holder));
    Py_DECREF(holder);
    return LOCK_DEADLINE;
}

/* Sleep ``seconds`` without the GIL; -1 if a signal handler raised meanwhile. */
static int
nap(double seconds)
{
    struct timespec ts = {0, (long)(seconds * 1e9)};
    Py_BEGIN_ALLOW_THREADS
    nanosleep(&ts, NULL);
    Py_END_ALLOW_THREADS
    return PyErr_CheckSignals();
}

/* Take over a dead holder's lock if nothing changed (lock.py _adopt): 1 adopted, 0 not,
 * LOCK_DEADLINE, -1 exception. */
static int
lock_adopt(Lock *self, uint64_t dead_owner, uint64_t seq, int has_deadline, double deadline)
{
    while (ofd_set(self->live_fd, LIVE_REPAIR_BYTE, F_WRLCK) != 0) {
        if (errno != EAGAIN && errno != EACCES) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (has_deadline && monotonic() >= deadline) {
            raise_error("LockTimeoutError", PyUnicode_FromFormat(
                "heap %R: another process is repairing it; try again later", self->heap_name));
            return LOCK_DEADLINE;
        }
        if (nap(0.001) < 0)
            return -1;
    }
    int value = 1;
    int adopt = LOAD(LIVE_U64(self, LIVE_OWNER_OFFSET)) == dead_owner
                && sem_getvalue(self->sem, &value) == 0 && value == 0;
    if (adopt && dead_owner)
        adopt = !lock_token_alive(self, dead_owner);
    if (adopt && !dead_owner)
        adopt = LOAD(LIVE_U64(self, LIVE_LOCK_SEQ_OFFSET)) == seq && lock_dead_slot_exists(self);
    if (adopt) {
        self->held = 1;
        STORE(LIVE_U64(self, LIVE_OWNER_OFFSET), self->token);
    }
    ofd_set(self->live_fd, LIVE_REPAIR_BYTE, F_UNLCK);
    if (adopt) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        uint64_t *recoveries = LIVE_U64(self, LIVE_RECOVERIES_OFFSET);
        STORE(recoveries, LOAD(recoveries) + 1);
        STORE(LIVE_U64(self, LIVE_LAST_RECOVERY_OFFSET),
              (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec);
        self->adoptions++;
    }
    return adopt;
}

/* Before an observer takes the lock, let an announced waiter have it first (lock.py
 * yield_to_waiters): 0, or -1 if a signal handler raised meanwhile. */
static int
lock_yield(Lock *self)
{
    uint64_t *word = LIVE_U64(self, LIVE_WAITER_OFFSET);
    uint64_t token = LOAD(word);
    if (!token || token == self->token || self->held)
        return 0;
    if (lock_token_alive(self, token)) {
        uint64_t seq = LOAD(LIVE_U64(self, LIVE_LOCK_SEQ_OFFSET));
        double until = monotonic() + self->yield_limit;
        while (LOAD(word) == token && LOAD(LIVE_U64(self, LIVE_LOCK_SEQ_OFFSET)) == seq) {
            if (monotonic() >= until)
                break;
            if (nap(self->yield_nap) < 0)
                return -1;
        }
        if (LOAD(word) != token || LOAD(LIVE_U64(self, LIVE_LOCK_SEQ_OFFSET)) != seq)
            return 0;
    }
    __atomic_compare_exchange_n(word, &token, (uint64_t)0, 0, __ATOMIC_ACQ_REL,
                                __ATOMIC_ACQUIRE);
    return 0;
}

static int lock_wait_announced(Lock *self, int has_deadline, double deadline);

/* The slow path of taking the lock (lock.py _wait): 0 holding, LOCK_DEADLINE or -1 exception
 * holding nothing.  The waiter word names this process while it waits (fairness, lock.py). */
static int
lock_wait(Lock *self, int has_deadline, double deadline)
{
    uint64_t *word = LIVE_U64(self, LIVE_WAITER_OFFSET);
    int rc = lock_wait_announced(self, has_deadline, deadline);
    uint64_t mine = self->token;
    __atomic_compare_exchange_n(word, &mine, (uint64_t)0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return rc;
}

static int
lock_wait_announced(Lock *self, int has_deadline, double deadline)
{
    uint64_t *word = LIVE_U64(self, LIVE_WAITER_OFFSET);
    double slice = self->first_poll, unowned_since = -1.0;
    uint64_t unowned_seq = 0;
    for (;;) {
        if (LOAD(word) != self->token)
            STORE(word, self->token);
        slice = slice * 2 < self->poll ? slice * 2 : self->poll;
        double wait = slice;
        if (has_deadline) {
            double left = deadline - monotonic();
            if (left < wait)
                wait = left;
            if (wait <= 0)
                return lock_timeout(self);
        }
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        long ns = until.tv_nsec + (long)(wait * 1e9);
        until.tv_sec += ns / 1000000000L;
        until.tv_nsec = ns % 1000000000L;
        int rc, err;
        Py_BEGIN_ALLOW_THREADS
        rc = sem_clockwait(self->sem, CLOCK_MONOTONIC, &until);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc == 0) {
            self->held = 1;
            return 0;
        }
        /* A signal that arrived outside the wait (between two slices) interrupted
         * nothing: its handler runs here, or not until the lock is taken. */
        if (PyErr_CheckSignals() < 0)
            return -1;
        if (err == EINTR)
            continue;
        if (err != ETIMEDOUT && err != EAGAIN) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        uint64_t owner = LOAD(LIVE_U64(self, LIVE_OWNER_OFFSET));
        if (owner) {
            unowned_since = -1.0;
            if (!lock_token_alive(self, owner)) {
                int adopted = lock_adopt(self, owner, 0, has_deadline, deadline);
                if (adopted)
                    return adopted < 0 ? adopted : 0;
            }
            continue;
        }
        uint64_t seq = LOAD(LIVE_U64(self, LIVE_LOCK_SEQ_OFFSET));
        double now = monotonic();
        if (unowned_since < 0 || seq != unowned_seq) {
            unowned_since = now;
            unowned_seq = seq;
        }
        else if (now - unowned_since >= self->grace) {
            int adopted = lock_adopt(self, 0, seq, has_deadline, deadline);
            if (adopted)
                return adopted < 0 ? adopted : 0;
        }
    }
}

/* 0 if the lock is open; else -1 with HeapClosedError (Lock_close released its memory). */
static int
lock_check_open(Lock *self)
{
    if (self->sem != NULL)
        return 0;
    raise_error("HeapClosedError", PyUnicode_FromFormat(
        "heap %R is closed; attach it again to use it", self->heap_name));
    return -1;
}

/* Hold the lock (a leftover hold of this handle counts); 0 holding, LOCK_DEADLINE or -1
 * exception. */
static int
lock_take(Lock *self, int has_deadline, double deadline)
{
    if (lock_check_open(self) < 0)
        return -1;
    if (!self->held) {
        if (sem_trywait(self->sem) == 0)
            self->held = 1;
        else if (errno != EAGAIN) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        else {
            int waited = lock_wait(self, has_deadline, deadline);
            if (waited < 0)
                return waited;
        }
    }
    lock_record(self);
    return 0;
}

/* Holding the lock: repair a dirty journal (the heap's repair does nothing for a read-only
 * handle); on failure release and return -1.  ``for_read``: a snapshot's repair (lock.py
 * read_word), where a repair that fails with a ShmHeapError (a full /dev/shm) leaves the
 * journal to the next holder and the read goes on. */
static int
lock_repair(Lock *self, int for_read)
{
    if (!LOAD((uint64_t *)self->journal.buf))
        return 0;
    PyObject *done = PyObject_CallNoArgs(self->repair);
    if (done != NULL) {
        Py_DECREF(done);
        return 0;
    }
    if (for_read) {
        PyObject *type, *value, *trace;
        PyErr_Fetch(&type, &value, &trace);  /* no call with an exception pending */
        PyObject *cls = error_class("ShmHeapError");
        int ours = cls != NULL && type != NULL && PyErr_GivenExceptionMatches(type, cls);
        Py_XDECREF(cls);
        if (ours) {
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(trace);
            return 0;
        }
        PyErr_Restore(type, value, trace);
    }
    lock_release(self);
    return -1;
}

/* Take the lock and, for a writer, repair a dirty journal first; release on failure: 0,
 * LOCK_DEADLINE or -1. */
static int
lock_enter(Lock *self, int has_deadline, double deadline, int write)
{
    int taken = lock_take(self, has_deadline, deadline);
    if (taken < 0)
        return taken;
    return write ? lock_repair(self, 0) : 0;
}

static int
lock_in_outer_block(Lock *self)
{
    if (self->outer == NULL)
        return 0;
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *block;
    int alive = PyWeakref_GetRef(self->outer, &block);
    if (alive < 0)
        PyErr_Clear();
    Py_XDECREF(block);
    return alive == 1;
#else
    PyObject *block = PyWeakref_GetObject(self->outer);
    return block != NULL && block != Py_None;
#endif
}

/* What lock_hold took: the lock (and the mutex), or the mutex only. */
#define LOCK_TAKEN 0
#define LOCK_NESTED 1

/* Every native hold of the lock: the handle's mutex, then the lock unless this thread's own
 * locked() block holds it already (LOCK_NESTED: the mutex only), a writer repairing a dirty
 * journal first (LOCK_TAKEN).  On failure nothing is held: LOCK_DEADLINE (the deadline
 * passed in either wait) or -1, with the exception (a signal handler's from either wait
 * propagates). */
static int
lock_hold(Lock *self, int has_deadline, double deadline, int write)
{
    int taken = mutex_acquire_by(self->mutex, has_deadline, deadline);
    if (taken < 0)
        return taken;
    if (lock_in_outer_block(self))
        return LOCK_NESTED;
    int entered = lock_enter(self, has_deadline, deadline, write);
    if (entered < 0) {
        mutex_release(self->mutex);
        return entered;
    }
    return LOCK_TAKEN;
}

/* Give back what lock_hold took (``held``: its answer). */
static inline void
lock_unhold(Lock *self, int held)
{
    if (held == LOCK_TAKEN)
        lock_release(self);
    mutex_release(self->mutex);
}

/* body(arg) with the lock held, as Lock.run holds it: under the handle's mutex, inside this
 * thread's own locked() block or in a hold taken (a writer repairing first) and released. */
static PyObject *
lock_run_with(Lock *self, PyObject *(*body)(void *), void *arg, int has_deadline,
              double deadline, int write)
{
    int held = lock_hold(self, has_deadline, deadline, write);
    if (held < 0)
        return NULL;
    PyObject *result = body(arg);
    lock_unhold(self, held);
    return result;
}

static PyObject *
call_body(void *body)
{
    return PyObject_CallNoArgs((PyObject *)body);
}

static PyObject *
Lock_run(Lock *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"body", "deadline", "write", NULL};
    PyObject *body, *deadline_arg = Py_None;
    int write = 0, has_deadline;
    double deadline = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|Op", names, &body, &deadline_arg, &write))
        return NULL;
    if (parse_deadline(deadline_arg, &deadline, &has_deadline) < 0)
        return NULL;
    return lock_run_with(self, call_body, body, has_deadline, deadline, write);
}

static inline int
lock_read_held(Lock *self, const uint64_t *word, PyObject *deadline_arg, uint64_t *out)
{
    if (lock_check_open(self) < 0)
        return -1;
    if (self->outer != NULL && lock_in_outer_block(self)) {
        *out = LOAD(word);  /* inside this handle's own locked() block */
        return 0;
    }
    if (LOAD(LIVE_U64(self, LIVE_WAITER_OFFSET)) && lock_yield(self) < 0)
        return -1;
    if (!self->held && sem_trywait(self->sem) == 0)
        self->held = 1;
    else {
        int has_deadline;
        double deadline = 0;
        if (parse_deadline(deadline_arg, &deadline, &has_deadline) < 0)
            return -1;
        if (lock_take(self, has_deadline, deadline) < 0 || lock_repair(self, 1) < 0)
            return -1;
        *out = LOAD(word);
        lock_release(self);
        return 0;
    }
    lock_record(self);
    if (lock_repair(self, 1) < 0)
        return -1;
    *out = LOAD(word);
    lock_release(self);
    return 0;
}

/* ``*word`` read under the lock, this handle's mutex held around it: 0, or -1 exception. */
static int
lock_read(Lock *self, const uint64_t *word, PyObject *deadline_arg, uint64_t *out)
{
    int has_deadline;
    double deadline = 0;
    if (parse_deadline(deadline_arg, &deadline, &has_deadline) < 0
            || mutex_acquire_by(self->mutex, has_deadline, deadline) < 0)
        return -1;
    int rc = lock_read_held(self, word, deadline_arg, out);
    mutex_release(self->mutex);
    return rc;
}

static PyObject *
Lock_read_word(Lock *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "read_word(view, deadline=None)");
        return NULL;
    }
    uint64_t word;
    if (args[0] == self->header_obj) {
        if (lock_read(self, (const uint64_t *)self->header.buf, nargs > 1 ? args[1] : Py_None,
                      &word) < 0)
            return NULL;
        return PyLong_FromUnsignedLongLong(word);
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int rc = view.len >= 8 ? lock_read(self, (const uint64_t *)view.buf,
                                       nargs > 1 ? args[1] : Py_None, &word) : -1;
    if (view.len < 8)
        PyErr_SetString(PyExc_ValueError, "read_word: the view is shorter than a word");
    PyBuffer_Release(&view);
    return rc < 0 ? NULL : PyLong_FromUnsignedLongLong(word);
}

static PyObject *
Lock_enter(Lock *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"block", "deadline", "write", NULL};
    PyObject *block, *deadline_arg = Py_None;
    int write = 0, has_deadline;
    double deadline = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|Op", names, &block, &deadline_arg, &write))
        return NULL;
    if (parse_deadline(deadline_arg, &deadline, &has_deadline) < 0)
        return NULL;
    PyObject *ref = PyWeakref_NewRef(block, NULL);
    if (ref == NULL)
        return NULL;
    int held = lock_hold(self, has_deadline, deadline, write);
    if (held != LOCK_TAKEN) {  /* failed, or nested in this thread's own block */
        if (held == LOCK_NESTED)
            lock_unhold(self, held);
        Py_DECREF(ref);
        return held < 0 ? NULL : Py_NewRef(Py_False);
    }
    Py_XSETREF(self->outer, ref);  /* the mutex stays taken until leave() */
    Py_RETURN_TRUE;
}

static PyObject *
Lock_leave(Lock *self, PyObject *Py_UNUSED(ignored))
{
    int had_block = self->outer != NULL;
    Py_CLEAR(self->outer);
    lock_release(self);
    if (had_block)
        mutex_release(self->mutex);
    Py_RETURN_NONE;
}

static PyObject *
Lock_after_fork(Lock *self, PyObject *Py_UNUSED(ignored))
{
    /* In a forked child: the hold and the open block were the parent's (maybe another
     * thread's); forget them, posting nothing.  The mutex is reset by its owner. */
    self->held = 0;
    Py_CLEAR(self->outer);
    Py_RETURN_NONE;
}

static PyObject *
Lock_release(Lock *self, PyObject *Py_UNUSED(ignored))
{
    lock_release(self);
    Py_RETURN_NONE;
}

static PyObject *
Lock_semaphore_value(Lock *self, PyObject *Py_UNUSED(ignored))
{
    int value = 0;
    if (lock_check_open(self) < 0)
        return NULL;
    if (sem_getvalue(self->sem, &value) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(value);
}

static PyObject *
Lock_drain_one(Lock *self, PyObject *Py_UNUSED(ignored))
{
    if (lock_check_open(self) < 0)
        return NULL;
    sem_trywait(self->sem);
    Py_RETURN_NONE;
}

static PyObject *
Lock_rebind(Lock *self, PyObject *args)
{
    PyObject *live;
    int fd;
    long slot;
    unsigned long long token;
    if (!PyArg_ParseTuple(args, "OilK", &live, &fd, &slot, &token))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(live, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (self->live.obj != NULL)
        PyBuffer_Release(&self->live);
    self->live = view;
    self->live_fd = fd;
    self->slot = slot;
    self->token = token;
    Py_RETURN_NONE;
}

static PyObject *
Lock_detach(Lock *self, PyObject *Py_UNUSED(ignored))
{
    if (self->live.obj != NULL)
        PyBuffer_Release(&self->live);
    Py_RETURN_NONE;
}

static PyObject *
Lock_close(Lock *self, PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(self->outer);
    lock_release(self);
    /* the heap's repair points back at the heap, which holds this lock: a cycle through an
     * object the garbage collector cannot see into (every closed heap would stay in memory) */
    Py_CLEAR(self->repair);
    if (self->sem != NULL) {
        sem_close(self->sem);
        self->sem = NULL;
    }
    if (self->live.obj != NULL)
        PyBuffer_Release(&self->live);
    if (self->journal.obj != NULL)
        PyBuffer_Release(&self->journal);
    if (self->header.obj != NULL)
        PyBuffer_Release(&self->header);
    Py_RETURN_NONE;
}

static int
Lock_init(Lock *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"semaphore", "live", "live_fd", "nslots", "slot", "token",
                            "journal", "header", "repair", "heap_name", "timing", "mutex",
                            NULL};
    const char *sem_name;
    PyObject *live, *journal, *header, *repair, *heap_name, *mutex;
    int fd;
    long nslots, slot;
    unsigned long long token;
    double first_poll, poll, grace, yield_limit, yield_nap;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sOillKOOOU(ddddd)O!", names, &sem_name,
                                     &live, &fd, &nslots, &slot, &token, &journal, &header,
                                     &repair, &heap_name, &first_poll, &poll, &grace,
                                     &yield_limit, &yield_nap, &MutexType, &mutex))
        return -1;
    Py_INCREF(mutex);
    Py_XSETREF(self->mutex, (Mutex *)mutex);
    if (PyObject_GetBuffer(live, &self->live, PyBUF_WRITABLE) < 0)
        return -1;
    if (self->live.len < LIVE_SLOTS_OFFSET + nslots * LIVE_SLOT_SIZE) {
        PyErr_SetString(PyExc_ValueError, "the liveness segment is too short for its slots");
        return -1;
    }
    if (PyObject_GetBuffer(journal, &self->journal, PyBUF_SIMPLE) < 0
            || PyObject_GetBuffer(header, &self->header, PyBUF_SIMPLE) < 0)
        return -1;
    if (self->journal.len < 8 || self->header.len < 8) {
        PyErr_SetString(PyExc_ValueError, "the journal and header views must hold a word");
        return -1;
    }
    self->sem = sem_open(sem_name, 0);
    if (self->sem == SEM_FAILED) {
        self->sem = NULL;
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, sem_name);
        return -1;
    }
    Py_INCREF(header);
    self->header_obj = header;
    self->live_fd = fd;
    self->nslots = nslots;
    self->slot = slot;
    self->token = token;
    Py_INCREF(repair);
    self->repair = repair;
    Py_INCREF(heap_name);
    self->heap_name = heap_name;
    self->first_poll = first_poll;
    self->poll = poll;
    self->grace = grace;
    self->yield_limit = yield_limit;
    self->yield_nap = yield_nap;
    return 0;
}

/* The garbage collector sees the references that can lead back to the handle.  Not the
 * exporters of the buffers held (nor header_obj, one of them): views of mappings, which
 * reference nothing of the handle, and a memoryview cleared while exported breaks (its
 * tp_clear drops its managed buffer, its dealloc then reads it).  Clearing closes the
 * lock: its calls raise HeapClosedError. */
static int
Lock_traverse(Lock *self, visitproc visit, void *arg)
{
    Py_VISIT(self->outer);
    Py_VISIT(self->repair);
    return 0;
}

static int
Lock_clear(Lock *self)
{
    Py_XDECREF(Lock_close(self, NULL));
    Py_CLEAR(self->header_obj);
    return 0;
}

static void
Lock_dealloc(Lock *self)
{
    PyObject_GC_UnTrack(self);
    PyObject *ignored = Lock_close(self, NULL);
    Py_XDECREF(ignored);
    Py_CLEAR(self->header_obj);
    Py_CLEAR(self->mutex);
    Py_CLEAR(self->repair);
    Py_CLEAR(self->heap_name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Lock_get_holding(Lock *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->held);
}

static PyMethodDef Lock_methods[] = {
    {"run", (PyCFunction)(void (*)(void))Lock_run, METH_VARARGS | METH_KEYWORDS,
     "run(body, deadline=None, write=False): body() with the lock held"},
    {"read_word", (PyCFunction)(void (*)(void))Lock_read_word, METH_FASTCALL,
     "read_word(view, deadline=None): view's first word read under the lock"},
    {"enter", (PyCFunction)(void (*)(void))Lock_enter, METH_VARARGS | METH_KEYWORDS,
     "enter(block, deadline, write): open a locked() block; False if an outer one holds"},
    {"leave", (PyCFunction)Lock_leave, METH_NOARGS, "close the outermost locked() block"},
    {"release", (PyCFunction)Lock_release, METH_NOARGS, "release the lock if held"},
    {"semaphore_value", (PyCFunction)Lock_semaphore_value, METH_NOARGS, NULL},
    {"drain_one", (PyCFunction)Lock_drain_one, METH_NOARGS, NULL},
    {"rebind", (PyCFunction)Lock_rebind, METH_VARARGS,
     "rebind(live, live_fd, slot, token): after a fork re-claimed a slot"},
    {"detach", (PyCFunction)Lock_detach, METH_NOARGS,
     "let go of the liveness segment (a forked child, before it maps it again)"},
    {"after_fork", (PyCFunction)Lock_after_fork, METH_NOARGS,
     "in a forked child: forget the parent's hold and open block without posting"},
    {"close", (PyCFunction)Lock_close, METH_NOARGS, NULL},
    {NULL}
};

static PyMemberDef Lock_members[] = {
    {"adoptions", T_LONG, offsetof(Lock, adoptions), READONLY, "dead holders' locks adopted"},
    {NULL}
};

static PyGetSetDef Lock_getset[] = {
    {"holding", (getter)Lock_get_holding, NULL, "True while this handle holds the semaphore"},
    {NULL}
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.Lock",
    .tp_basicsize = sizeof(Lock),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A heap's lock (lock.py's protocol, in C).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lock_init,
    .tp_dealloc = (destructor)Lock_dealloc,
    .tp_traverse = (traverseproc)Lock_traverse,
    .tp_clear = (inquiry)Lock_clear,
    .tp_methods = Lock_methods,
    .tp_members = Lock_members,
    .tp_getset = Lock_getset,
};

/* -- Pin: a buffer export held for as long as objects point into it ------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
} Pin;

static void
Pin_dealloc(Pin *self)
{
    if (self->view.obj != NULL)
        PyBuffer_Release(&self->view);
    PyObject_Free(self);
}

static PyTypeObject PinType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.Pin",
    .tp_basicsize = sizeof(Pin),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A buffer export kept while memory it exports is pointed into.",
    .tp_dealloc = (destructor)Pin_dealloc,
};

/* A Pin on ``exporter``'s buffer: while it lives, so does the memory (a mapping cannot
 * be closed under it). */
static Pin *
pin_new(PyObject *exporter, int flags)
{
    Pin *pin = PyObject_New(Pin, &PinType);
    if (pin == NULL)
        return NULL;
    pin->view.obj = NULL;
    if (PyObject_GetBuffer(exporter, &pin->view, flags) < 0) {
        Py_DECREF(pin);
        return NULL;
    }
    return pin;
}

/* -- ArenaSnapshot ---------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *owner;         /* a Pin: keeps the mapping of the entries alive */
    const uint32_t *entries;
    Py_ssize_t len;
    long generation;
} Snap;

static PyTypeObject SnapType;

static PyObject *
snap_new(PyObject *owner, const uint32_t *entries, Py_ssize_t len, long generation)
{
    Snap *snap = PyObject_New(Snap, &SnapType);
    if (snap == NULL)
        return NULL;
    Py_INCREF(owner);
    snap->owner = owner;
    snap->entries = entries;
    snap->len = len;
    snap->generation = generation;
    return (PyObject *)snap;
}

static PyObject *
Snap_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"entries", "generation", NULL};
    PyObject *entries;
    long generation;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Ol", names, &entries, &generation))
        return NULL;
    Pin *pin = pin_new(entries, PyBUF_C_CONTIGUOUS);
    if (pin == NULL)
        return NULL;
    PyObject *snap = snap_new((PyObject *)pin, (const uint32_t *)pin->view.buf,
                              pin->view.len / 4, generation);
    Py_DECREF(pin);
    return snap;
}

static void
Snap_dealloc(Snap *self)
{
    Py_CLEAR(self->owner);
    PyObject_Free(self);
}

static Py_ssize_t
Snap_length(Snap *self)
{
    return self->len;
}

static PyObject *
Snap_item(Snap *self, Py_ssize_t i)
{
    if (i < 0 || i >= self->len) {
        PyErr_SetString(PyExc_IndexError, "ArenaSnapshot index out of range");
        return NULL;
    }
    return PyLong_FromUnsignedLong(self->entries[i]);
}

static PyObject *
snap_list(const uint32_t *entries, Py_ssize_t start, Py_ssize_t step, Py_ssize_t count)
{
    PyObject *list = PyList_New(count);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *item = PyLong_FromUnsignedLong(entries[start + k * step]);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, item);
    }
    return list;
}

static PyObject *
Snap_subscript(Snap *self, PyObject *key)
{
    if (PySlice_Check(key)) {
        Py_ssize_t start, stop, step;
        if (PySlice_Unpack(key, &start, &stop, &step) < 0)
            return NULL;
        Py_ssize_t count = PySlice_AdjustIndices(self->len, &start, &stop, step);
        return snap_list(self->entries, start, step, count);
    }
    Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0)
        i += self->len;
    return Snap_item(self, i);
}

static int
Snap_getbuffer(Snap *self, Py_buffer *view, int flags)
{
    if (flags & PyBUF_WRITABLE) {
        PyErr_SetString(PyExc_BufferError, "an ArenaSnapshot is read-only");
        return -1;
    }
    view->obj = (PyObject *)self;
    Py_INCREF(self);
    view->buf = (void *)self->entries;
    view->len = self->len * 4;
    view->readonly = 1;
    view->itemsize = 4;
    view->format = (flags & PyBUF_FORMAT) ? "I" : NULL;
    view->ndim = 1;
    view->shape = (flags & PyBUF_ND) ? &self->len : NULL;
    view->strides = (flags & PyBUF_STRIDES) ? &view->itemsize : NULL;
    view->suboffsets = NULL;
    view->internal = NULL;
    return 0;
}

/* ``value`` as an entry (0 .. 2**32-1): 1 and *out set, 0 if it cannot be one, -1 error. */
static int
snap_entry(PyObject *value, uint32_t *out)
{
    if (!PyLong_Check(value))
        return 0;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow || v < 0 || v > 0xFFFFFFFFLL)
        return 0;
    *out = (uint32_t)v;
    return 1;
}

static int
Snap_contains(Snap *self, PyObject *value)
{
    uint32_t entry;
    int ok = snap_entry(value, &entry);
    if (ok <= 0)
        return ok;
    for (Py_ssize_t i = 0; i < self->len; i++)
        if (self->entries[i] == entry)
            return 1;
    return 0;
}

static PyObject *
Snap_index(Snap *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t start = 0, stop = self->len;
    uint32_t entry;
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "index(value, start=0, stop=len)");
        return NULL;
    }
    if (nargs > 1 && (start = PyNumber_AsSsize_t(args[1], NULL)) == -1 && PyErr_Occurred())
        return NULL;
    if (nargs > 2 && (stop = PyNumber_AsSsize_t(args[2], NULL)) == -1 && PyErr_Occurred())
        return NULL;
    PySlice_AdjustIndices(self->len, &start, &stop, 1);
    int ok = snap_entry(args[0], &entry);
    if (ok < 0)
        return NULL;
    for (Py_ssize_t i = start; ok && i < stop; i++)
        if (self->entries[i] == entry)
            return PyLong_FromSsize_t(i);
    PyErr_Format(PyExc_ValueError, "%R is not in the snapshot", args[0]);
    return NULL;
}

static PyObject *
Snap_count(Snap *self, PyObject *value)
{
    uint32_t entry;
    Py_ssize_t found = 0;
    int ok = snap_entry(value, &entry);
    if (ok < 0)
        return NULL;
    for (Py_ssize_t i = 0; ok && i < self->len; i++)
        found += self->entries[i] == entry;
    return PyLong_FromSsize_t(found);
}

static PyObject *
Snap_reversed(Snap *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = snap_list(self->entries, self->len - 1, -1, self->len);
    if (list == NULL)
        return NULL;
    PyObject *it = PyObject_GetIter(list);
    Py_DECREF(list);
    return it;
}

static PyObject *
Snap_view(Snap *self, PyObject *Py_UNUSED(ignored))
{
    return PyMemoryView_FromObject((PyObject *)self);
}

static PyObject *
Snap_tolist(Snap *self, PyObject *Py_UNUSED(ignored))
{
    return snap_list(self->entries, 0, 1, self->len);
}

static PyObject *
Snap_richcompare(Snap *self, PyObject *other, int op)
{
    if (op != Py_EQ && op != Py_NE)
        Py_RETURN_NOTIMPLEMENTED;
    int equal;
    if (Py_IS_TYPE(other, &SnapType)) {
        Snap *them = (Snap *)other;
        equal = self->len == them->len
                && memcmp(self->entries, them->entries, self->len * 4) == 0;
    }
    else if (PySequence_Check(other) && !PyUnicode_Check(other) && !PyBytes_Check(other)
             && !PyByteArray_Check(other)) {
        PyObject *mine = Snap_tolist(self, NULL);
        if (mine == NULL)
            return NULL;
        PyObject *theirs = PySequence_List(other);
        if (theirs == NULL) {
            Py_DECREF(mine);
            return NULL;
        }
        equal = PyObject_RichCompareBool(mine, theirs, Py_EQ);
        Py_DECREF(mine);
        Py_DECREF(theirs);
        if (equal < 0)
            return NULL;
    }
    else
        Py_RETURN_NOTIMPLEMENTED;
    return PyBool_FromLong(op == Py_EQ ? equal : !equal);
}

static PyObject *
Snap_repr(Snap *self)
{
    PyObject *head = snap_list(self->entries, 0, 1, self->len < 8 ? self->len : 8);
    if (head == NULL)
        return NULL;
    PyObject *text = PyUnicode_FromFormat("ArenaSnapshot(%R%s, len=%zd, generation=%ld)", head,
                                          self->len > 8 ? " + ..." : "", self->len,
                                          self->generation);
    Py_DECREF(head);
    return text;
}

typedef struct {
    PyObject_HEAD
    Snap *snap;
    Py_ssize_t next;
} SnapIter;

static PyTypeObject SnapIterType;

static PyObject *
Snap_iter(Snap *self)
{
    SnapIter *it = PyObject_New(SnapIter, &SnapIterType);
    if (it == NULL)
        return NULL;
    Py_INCREF(self);
    it->snap = self;
    it->next = 0;
    return (PyObject *)it;
}

static PyObject *
SnapIter_next(SnapIter *it)
{
    if (it->next >= it->snap->len)
        return NULL;
    return PyLong_FromUnsignedLong(it->snap->entries[it->next++]);
}

static void
SnapIter_dealloc(SnapIter *it)
{
    Py_CLEAR(it->snap);
    PyObject_Free(it);
}

static PyTypeObject SnapIterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.SnapshotIterator",
    .tp_basicsize = sizeof(SnapIter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)SnapIter_dealloc,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)SnapIter_next,
};

static PySequenceMethods Snap_as_sequence = {
    .sq_length = (lenfunc)Snap_length,
    .sq_item = (ssizeargfunc)Snap_item,
    .sq_contains = (objobjproc)Snap_contains,
};

static PyMappingMethods Snap_as_mapping = {
    .mp_length = (lenfunc)Snap_length,
    .mp_subscript = (binaryfunc)Snap_subscript,
};

static PyBufferProcs Snap_as_buffer = {
    .bf_getbuffer = (getbufferproc)Snap_getbuffer,
};

static PyMethodDef Snap_methods[] = {
    {"view", (PyCFunction)Snap_view, METH_NOARGS,
     "A read-only uint32 memoryview of the entries; no copy."},
    {"tolist", (PyCFunction)Snap_tolist, METH_NOARGS, NULL},
    {"index", (PyCFunction)(void (*)(void))Snap_index, METH_FASTCALL, NULL},
    {"count", (PyCFunction)Snap_count, METH_O, NULL},
    {"__reversed__", (PyCFunction)Snap_reversed, METH_NOARGS, NULL},
    {NULL}
};

static PyMemberDef Snap_members[] = {
    {"generation", T_LONG, offsetof(Snap, generation), READONLY,
     "the index generation this snapshot was taken from"},
    {NULL}
};

static PyTypeObject SnapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap.ArenaSnapshot",
    .tp_basicsize = sizeof(Snap),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_SEQUENCE,
    .tp_doc = "The arena indices of the heap at one instant, in creation order (immutable).",
    .tp_new = Snap_new,
    .tp_dealloc = (destructor)Snap_dealloc,
    .tp_as_sequence = &Snap_as_sequence,
    .tp_as_mapping = &Snap_as_mapping,
    .tp_as_buffer = &Snap_as_buffer,
    .tp_iter = (getiterfunc)Snap_iter,
    .tp_richcompare = (richcmpfunc)Snap_richcompare,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_repr = (reprfunc)Snap_repr,
    .tp_methods = Snap_methods,
    .tp_members = Snap_members,
};

/* -- Snapshots: Heap.snapshot() ------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Lock *lock;
    PyObject *reader;        /* reader(word) -> (full view of the word's generation, cap) */
    PyObject *check_timeout; /* lock.deadline_of */
    uint64_t word;           /* the header word of ``last`` */
    PyObject *last;
    long generation;         /* the generation ``pin`` maps, or -1 */
    Pin *pin;
    Py_ssize_t capacity;
} Snapshots;

static PyObject *snapshots_take(Snapshots *self, PyObject *deadline);

static PyObject *
Snapshots_call(Snapshots *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *timeout = nargs > 0 ? args[0] : Py_None;
    if (self->lock == NULL)
        return collected_error();
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        if (nargs > 0 || PyTuple_GET_SIZE(kwnames) != 1
                || PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0),
                                                    "timeout") != 0) {
            PyErr_SetString(PyExc_TypeError, "snapshot(timeout=None)");
            return NULL;
        }
        timeout = args[0];
    }
    PyObject *deadline = Py_None;
    int has_deadline = 0;
    double until = 0;
    if (timeout != Py_None) {
        deadline = PyObject_CallOneArg(self->check_timeout, timeout);
        if (deadline == NULL)
            return NULL;
    }
    if (parse_deadline(deadline, &until, &has_deadline) < 0
            || mutex_acquire_by(self->lock->mutex, has_deadline, until) < 0) {
        if (deadline != Py_None)
            Py_DECREF(deadline);
        return NULL;
    }
    PyObject *snap = snapshots_take(self, deadline);
    mutex_release(self->lock->mutex);
    if (deadline != Py_None)
        Py_DECREF(deadline);
    return snap;
}

/* Snapshots_call with the handle's mutex held (its cache is the handle's). */
static PyObject *
snapshots_take(Snapshots *self, PyObject *deadline)
{
    uint64_t word;
    if (lock_read_held(self->lock, (const uint64_t *)self->lock->header.buf, deadline,
                       &word) < 0)
        return NULL;
    if (self->last != NULL && word == self->word) {
        Py_INCREF(self->last);
        return self->last;
    }
    long generation = (long)(word >> 32);
    Py_ssize_t len = (Py_ssize_t)(word & 0xFFFFFFFFu);
    if (generation != self->generation || len > self->capacity) {
        PyObject *got = PyObject_CallFunction(self->reader, "K", (unsigned long long)word);
        if (got == NULL)
            return NULL;
        PyObject *view;
        Py_ssize_t capacity;
        if (!PyArg_ParseTuple(got, "On", &view, &capacity)) {
            Py_DECREF(got);
            return NULL;
        }
        Pin *pin = pin_new(view, PyBUF_SIMPLE);
        Py_DECREF(got);
        if (pin == NULL)
            return NULL;
        if (pin->view.len < capacity * 4) {
            Py_DECREF(pin);
            PyErr_SetString(PyExc_ValueError, "snapshot reader: a view shorter than its capacity");
            return NULL;
        }
        Py_XSETREF(self->pin, pin);
        self->generation = generation;
        self->capacity = capacity;
    }
    const uint32_t *entries = (const uint32_t *)self->pin->view.buf;
    if (self->last != NULL && Py_REFCNT(self->last) == 1) {
        /* Nobody but us holds the last snapshot: it becomes the new one (no allocation). */
        Snap *reused = (Snap *)self->last;
        if (reused->owner != (PyObject *)self->pin) {
            Py_INCREF(self->pin);
            Py_SETREF(reused->owner, (PyObject *)self->pin);
        }
        reused->entries = entries;
        reused->len = len;
        reused->generation = generation;
    } else {
        PyObject *snap = snap_new((PyObject *)self->pin, entries, len, generation);
        if (snap == NULL)
            return NULL;
        Py_XSETREF(self->last, snap);
    }
    self->word = word;
    Py_INCREF(self->last);
    return self->last;
}

static int
Snapshots_init(Snapshots *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"lock", "reader", "check_timeout", NULL};
    PyObject *lock, *reader, *check_timeout;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OO", names, &LockType, &lock, &reader,
                                     &check_timeout))
        return -1;
    Py_INCREF(lock);
    self->lock = (Lock *)lock;
    Py_INCREF(reader);
    self->reader = reader;
    Py_INCREF(check_timeout);
    self->check_timeout = check_timeout;
    self->generation = -1;
    self->vectorcall = (vectorcallfunc)Snapshots_call;
    return 0;
}

static int
Snapshots_traverse(Snapshots *self, visitproc visit, void *arg)
{
    Py_VISIT(self->lock);
    Py_VISIT(self->reader);
    Py_VISIT(self->check_timeout);
    Py_VISIT(self->last);
    Py_VISIT(self->pin);
    return 0;
}

static int
Snapshots_clear(Snapshots *self)
{
    Py_CLEAR(self->lock);
    Py_CLEAR(self->reader);
    Py_CLEAR(self->check_timeout);
    Py_CLEAR(self->last);
    Py_CLEAR(self->pin);
    return 0;
}

static void
Snapshots_dealloc(Snapshots *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->reader);
    Py_CLEAR(self->check_timeout);
    Py_CLEAR(self->last);
    Py_CLEAR(self->pin);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Snapshots_forget(Snapshots *self, PyObject *Py_UNUSED(ignored))
{
    /* No header word is all ones (a generation is < 32): the next call builds a snapshot,
       in the last one's object if nobody else holds it. */
    self->word = UINT64_MAX;
    Py_RETURN_NONE;
}

static PyObject *
Snapshots_close(Snapshots *self, PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(self->last);
    Py_CLEAR(self->pin);
    self->generation = -1;
    self->capacity = 0;
    Py_RETURN_NONE;
}

static PyMethodDef Snapshots_methods[] = {
    {"forget", (PyCFunction)Snapshots_forget, METH_NOARGS,
     "drop the cached snapshot: the next call builds one as if the header had changed"},
    {"close", (PyCFunction)Snapshots_close, METH_NOARGS,
     "let go of the index generation's mapping (the heap is closed: calls raise)"},
    {NULL}
};

static PyTypeObject SnapshotsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.Snapshots",
    .tp_basicsize = sizeof(Snapshots),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Heap.snapshot(): the header word read under the lock, the snapshot cached.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Snapshots_init,
    .tp_dealloc = (destructor)Snapshots_dealloc,
    .tp_traverse = (traverseproc)Snapshots_traverse,
    .tp_clear = (inquiry)Snapshots_clear,
    .tp_vectorcall_offset = offsetof(Snapshots, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_methods = Snapshots_methods,
};

/* -- Cache: a span this process owns (allocator.py's _Cache) ----------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *pages;         /* the arena's ArenaPages */
    PyObject *cls;           /* its SizeClass */
    Pin *pin;                /* the arena's mapping */
    unsigned char *data;     /* the arena's first data byte */
    Py_ssize_t start, a0, m0, o0, size, nelems;
    Py_ssize_t s0, wide, h0; /* slacks (wide bytes each) and holder words of the slots */
    uint32_t holder;         /* this process's holder word (allocator.py holder_of) */
    long long base;          /* heap address of the arena's first byte */
    int32_t *free;           /* slots seen free, the next one to give out last */
    Py_ssize_t nfree;
} Cache;

static PyTypeObject CacheType;

static Py_ssize_t
attr_ssize(PyObject *obj, const char *name)
{
    PyObject *value = PyObject_GetAttrString(obj, name);
    if (value == NULL)
        return -1;
    Py_ssize_t n = PyNumber_AsSsize_t(value, PyExc_OverflowError);
    Py_DECREF(value);
    return n;
}

static void
cache_rescan(Cache *self)
{
    self->nfree = 0;
    for (Py_ssize_t k = self->nelems - 1; k >= 0; k--)
        if (LOAD(self->data + self->a0 + k) == 0)
            self->free[self->nfree++] = (int32_t)k;
}

static int
Cache_init(Cache *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"pages", "start", "cls", "fresh", "holder", NULL};
    PyObject *pages, *cls;
    Py_ssize_t start;
    int fresh;
    unsigned int holder;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OnOpI", names, &pages, &start, &cls, &fresh,
                                     &holder))
        return -1;
    Py_ssize_t shift = attr_ssize(pages, "page_shift");
    Py_ssize_t nelems = attr_ssize(cls, "nelems");
    Py_ssize_t size = attr_ssize(cls, "size");
    Py_ssize_t objects_at = attr_ssize(cls, "objects_at");
    Py_ssize_t slack_at = attr_ssize(cls, "slack_at");
    Py_ssize_t wide = attr_ssize(cls, "wide");
    Py_ssize_t holder_at = attr_ssize(cls, "holder_at");
    Py_ssize_t base = attr_ssize(pages, "base");
    if (PyErr_Occurred())
        return -1;
    PyObject *arena = PyObject_GetAttrString(pages, "arena");
    if (arena == NULL)
        return -1;
    PyObject *mapping = PyObject_GetAttrString(arena, "mapping");
    Py_DECREF(arena);
    if (mapping == NULL)
        return -1;
    Pin *pin = pin_new(mapping, PyBUF_SIMPLE);
    Py_DECREF(mapping);
    if (pin == NULL)
        return -1;
    Py_ssize_t a0 = start << shift;
    if (nelems <= 0 || a0 + objects_at + nelems * size > pin->view.len || (wide != 1 && wide != 2)
            || slack_at + wide * nelems > holder_at || holder_at % SPAN_HOLDER_SIZE
            || holder_at + SPAN_HOLDER_SIZE * nelems > objects_at) {
        Py_DECREF(pin);
        PyErr_SetString(PyExc_ValueError, "Cache: the span does not fit its arena");
        return -1;
    }
    self->free = PyMem_New(int32_t, nelems);
    if (self->free == NULL) {
        Py_DECREF(pin);
        PyErr_NoMemory();
        return -1;
    }
    Py_INCREF(pages);
    self->pages = pages;
    Py_INCREF(cls);
    self->cls = cls;
    self->pin = pin;
    self->data = (unsigned char *)pin->view.buf;
    self->start = start;
    self->a0 = a0;
    self->m0 = a0 + nelems;
    self->o0 = a0 + objects_at;
    self->size = size;
    self->nelems = nelems;
    self->s0 = a0 + slack_at;
    self->wide = wide;
    self->h0 = a0 + holder_at;
    self->holder = (uint32_t)holder;
    self->base = base;
    if (fresh) {
        for (Py_ssize_t k = 0; k < nelems; k++)
            self->free[k] = (int32_t)(nelems - 1 - k);
        self->nfree = nelems;
    }
    else
        cache_rescan(self);
    return 0;
}

/* No tp_clear (as a tuple has none): a cycle through a cache passes through the
 * allocator's list of caches, which the collector clears; the cache stays whole. */
static int
Cache_traverse(Cache *self, visitproc visit, void *arg)
{
    Py_VISIT(self->pages);
    Py_VISIT(self->cls);
    Py_VISIT(self->pin);
    return 0;
}

static void
Cache_dealloc(Cache *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->pages);
    Py_CLEAR(self->cls);
    Py_CLEAR(self->pin);
    PyMem_Free(self->free);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
cache_free_list(Cache *self)
{
    PyObject *list = PyList_New(self->nfree);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->nfree; i++) {
        PyObject *k = PyLong_FromLong(self->free[i]);
        if (k == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, k);
    }
    return list;
}

static PyObject *
Cache_rescan(Cache *self, PyObject *Py_UNUSED(ignored))
{
    cache_rescan(self);
    return PyLong_FromSsize_t(self->nfree);
}

static PyObject *
Cache_get_free(Cache *self, void *Py_UNUSED(closure))
{
    return cache_free_list(self);
}

static int
Cache_set_free(Cache *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || !PyList_Check(value) || PyList_GET_SIZE(value) > self->nelems) {
        PyErr_SetString(PyExc_TypeError, "Cache.free must be a list of at most nelems slots");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(value);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t k = PyNumber_AsSsize_t(PyList_GET_ITEM(value, i), PyExc_OverflowError);
        if (k == -1 && PyErr_Occurred())
            return -1;
        if (k < 0 || k >= self->nelems) {
            PyErr_SetString(PyExc_ValueError, "Cache.free: a slot out of range");
            return -1;
        }
        self->free[i] = (int32_t)k;
    }
    self->nfree = n;
    return 0;
}

static PyMethodDef Cache_methods[] = {
    {"rescan", (PyCFunction)Cache_rescan, METH_NOARGS,
     "give out the slots free now (read from the span's alloc bytes) from here on; how many"},
    {NULL}
};

static PyMemberDef Cache_members[] = {
    {"pages", T_OBJECT, offsetof(Cache, pages), READONLY, NULL},
    {"cls", T_OBJECT, offsetof(Cache, cls), READONLY, NULL},
    {"start", T_PYSSIZET, offsetof(Cache, start), READONLY, NULL},
    {"a0", T_PYSSIZET, offsetof(Cache, a0), READONLY, NULL},
    {"m0", T_PYSSIZET, offsetof(Cache, m0), READONLY, NULL},
    {"o0", T_PYSSIZET, offsetof(Cache, o0), READONLY, NULL},
    {"size", T_PYSSIZET, offsetof(Cache, size), READONLY, NULL},
    {"base", T_LONGLONG, offsetof(Cache, base), READONLY, NULL},
    {NULL}
};

static PyGetSetDef Cache_getset[] = {
    {"free", (getter)Cache_get_free, (setter)Cache_set_free,
     "the slots this cache will give out, the next one last"},
    {NULL}
};

static PyTypeObject CacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.Cache",
    .tp_basicsize = sizeof(Cache),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Cache(pages, start, cls, fresh, holder): a span this process owns "
              "(allocator.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Cache_init,
    .tp_dealloc = (destructor)Cache_dealloc,
    .tp_traverse = (traverseproc)Cache_traverse,
    .tp_methods = Cache_methods,
    .tp_members = Cache_members,
    .tp_getset = Cache_getset,
};

/* The timeout argument of a native call (positional at ``at``, or the only keyword): 1 if
 * absent, None or a finite number of seconds >= 0; else 0, and the Python path says what is
 * wrong (lock.check_timeout).  Given ``deadline``, it sets *has_deadline and the monotonic
 * *deadline too (the fast paths never wait: they pass NULL). */
static inline int
timeout_ok(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, Py_ssize_t at,
           int *has_deadline, double *deadline)
{
    PyObject *timeout = nargs > at ? args[at] : NULL;
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) == 1) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0)
            return 0;
        timeout = args[nargs];
    }
    if (deadline != NULL)
        *has_deadline = 0;
    if (timeout == NULL || timeout == Py_None)
        return 1;
    double t;
    if (PyFloat_CheckExact(timeout))
        t = PyFloat_AS_DOUBLE(timeout);
    else if (PyLong_CheckExact(timeout)) {
        t = PyLong_AsDouble(timeout);
        if (t == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
    }
    else
        return 0;
    if (!(t >= 0 && t <= 1e300))
        return 0;
    if (deadline != NULL) {
        *has_deadline = 1;
        *deadline = monotonic() + t;
    }
    return 1;
}

/* -- Alloc: Allocator.alloc's fast path -------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *caches;        /* the allocator's list of Cache or None, one per class */
    unsigned char *lookup;   /* class of size n at (n + 15) >> 4 */
    Py_ssize_t lookup_len, max_small;
    PyObject *slow;          /* slow(nbytes, timeout): refill or large, in Python */
    Mutex *mutex;            /* the handle's thread lock (FAST_ENTER) */
} Alloc;

static PyObject *
Alloc_call(Alloc *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    /* (nbytes) or (nbytes, timeout): the fast path never waits, so it ignores the timeout */
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t given = nargs + (kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0);
    if (self->slow == NULL)
        return collected_error();
    if (nargs >= 1 && given <= 2 && PyLong_CheckExact(args[0])
            && timeout_ok(args, nargs, kwnames, 1, NULL, NULL)) {
        Py_ssize_t n = PyLong_AsSsize_t(args[0]);
        if (n >= 0 && n <= self->max_small && ((n + 15) >> 4) < self->lookup_len
                && FAST_ENTER(self->mutex)) {
            long long ref = 0;
            Py_ssize_t c = self->lookup[(n + 15) >> 4];
            PyObject *item = c < PyList_GET_SIZE(self->caches)
                             ? PyList_GET_ITEM(self->caches, c) : Py_None;
            if (Py_IS_TYPE(item, &CacheType) && ((Cache *)item)->nfree > 0) {
                Cache *cache = (Cache *)item;
                Py_ssize_t k = cache->free[--cache->nfree];
                Py_ssize_t offset = cache->o0 + k * cache->size;
                STORE(cache->data + cache->m0 + k, (unsigned char)1); /* born marked */
                memset(cache->data + offset, 0, cache->size);
                Py_ssize_t slack = cache->size - n;  /* the length: size - slack */
                unsigned char *at = cache->data + cache->s0 + k * cache->wide;
                at[0] = (unsigned char)slack;
                if (cache->wide == 2)
                    at[1] = (unsigned char)(slack >> 8);
                memcpy(cache->data + cache->h0 + k * SPAN_HOLDER_SIZE, &cache->holder,
                       SPAN_HOLDER_SIZE);  /* little-endian, as everything shared */
                STORE(cache->data + cache->a0 + k, (unsigned char)1); /* published last */
                ref = cache->base + offset;
            }
            FAST_LEAVE(self->mutex);
            if (ref)
                return PyLong_FromLongLong(ref);
        }
        else if (n == -1 && PyErr_Occurred())
            PyErr_Clear();  /* too big for a Py_ssize_t: the slow path says what is wrong */
    }
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

static int
Alloc_init(Alloc *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"caches", "lookup", "max_small", "slow", "mutex", NULL};
    PyObject *caches, *slow, *mutex;
    Py_buffer lookup;
    Py_ssize_t max_small;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!y*nOO!", names, &PyList_Type, &caches,
                                     &lookup, &max_small, &slow, &MutexType, &mutex))
        return -1;
    Py_INCREF(mutex);
    Py_XSETREF(self->mutex, (Mutex *)mutex);
    self->lookup = PyMem_Malloc(lookup.len ? lookup.len : 1);
    if (self->lookup == NULL) {
        PyBuffer_Release(&lookup);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(self->lookup, lookup.buf, lookup.len);
    self->lookup_len = lookup.len;
    PyBuffer_Release(&lookup);
    Py_INCREF(caches);
    self->caches = caches;
    self->max_small = max_small;
    Py_INCREF(slow);
    self->slow = slow;
    self->vectorcall = (vectorcallfunc)Alloc_call;
    return 0;
}

static int
Alloc_traverse(Alloc *self, visitproc visit, void *arg)
{
    Py_VISIT(self->caches);
    Py_VISIT(self->slow);
    return 0;
}

static int
Alloc_clear(Alloc *self)
{
    Py_CLEAR(self->caches);
    Py_CLEAR(self->slow);
    return 0;
}

static void
Alloc_dealloc(Alloc *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->caches);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->mutex);
    PyMem_Free(self->lookup);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject AllocType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.Alloc",
    .tp_basicsize = sizeof(Alloc),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Alloc(caches, lookup, max_small, slow): Allocator.alloc's fast path.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Alloc_init,
    .tp_dealloc = (destructor)Alloc_dealloc,
    .tp_traverse = (traverseproc)Alloc_traverse,
    .tp_clear = (inquiry)Alloc_clear,
    .tp_vectorcall_offset = offsetof(Alloc, vectorcall),
    .tp_call = PyVectorcall_Call,
};

/* -- Record: an arena's page metadata as raw pointers (pages.py's layout) ---------------- */

typedef struct {
    PyObject_HEAD
    Pin *pin;
    unsigned char *data, *used, *sclass, *marks;
    uint32_t *span, *npages;
    uint64_t *owner, *seq;
    Py_ssize_t pages;
} Record;

static int
Record_init(Record *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"mapping", "meta", "pages", "used", "sclass", "span", "npages",
                            "owner", "marks", NULL};
    PyObject *mapping;
    Py_ssize_t meta, pages, used, sclass, span, npages, owner, marks;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Onnnnnnnn", names, &mapping, &meta, &pages,
                                     &used, &sclass, &span, &npages, &owner, &marks))
        return -1;
    Pin *pin = pin_new(mapping, PyBUF_SIMPLE);
    if (pin == NULL)
        return -1;
    if (meta + owner + 8 * pages > pin->view.len || meta + META_SEQ_OFFSET + 8 > pin->view.len
            || meta + marks + (pages + 7) / 8 > pin->view.len) {
        Py_DECREF(pin);
        PyErr_SetString(PyExc_ValueError, "Record: the metadata does not fit the mapping");
        return -1;
    }
    unsigned char *base = (unsigned char *)pin->view.buf;
    self->pin = pin;
    self->data = base;
    self->used = base + meta + used;
    self->sclass = base + meta + sclass;
    self->marks = base + meta + marks;
    self->span = (uint32_t *)(base + meta + span);
    self->npages = (uint32_t *)(base + meta + npages);
    self->owner = (uint64_t *)(base + meta + owner);
    self->seq = (uint64_t *)(base + meta + META_SEQ_OFFSET);
    self->pages = pages;
    return 0;
}

static void
Record_dealloc(Record *self)
{
    Py_CLEAR(self->pin);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject RecordType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.Record",
    .tp_basicsize = sizeof(Record),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Record(mapping, meta, pages, used, sclass, span, npages, owner, marks): an "
              "arena's page metadata, for Free and RootWriter.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Record_init,
    .tp_dealloc = (destructor)Record_dealloc,
};

/* -- Free: Allocator.free's fast path (a small object, lock-free) ------------------------
 *
 * Its arena records, shifts and class tables are also where the queue's nodes and the root
 * writer's objects are found (free_locate). */

#define READ_RETRIES 100

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *records;       /* arena index -> Record, of the arenas mapped now */
    PyObject *slow;          /* slow(ref, timeout): everything else, in Python */
    Mutex *mutex;            /* the handle's thread lock (FAST_ENTER) */
    Pin *summary;            /* the summary segment's mapping */
    int arena_shift, page_shift;
    long long arena_mask;
    Py_ssize_t nclasses;
    Py_ssize_t *nelems, *size, *objects_at, *holder_at, *npages;   /* per size class */
    Py_ssize_t *tree_levels;                    /* per class: its first level's index */
    Py_ssize_t *level_offset, *level_size;      /* every level of every partial tree */
    Py_ssize_t nlevels;
} Free;

/* Mark arena ``leaf`` in the partial tree of class ``c`` (summary.py ByteTree.mark). */
static void
free_mark_partial(Free *self, Py_ssize_t c, long long leaf)
{
    unsigned char *base = (unsigned char *)self->summary->view.buf;
    Py_ssize_t first = self->tree_levels[c], last = self->tree_levels[c + 1];
    long long index = leaf;
    for (Py_ssize_t level = first; level < last; level++) {
        if (index >= self->level_size[level])
            return;
        unsigned char *node = base + self->level_offset[level] + index;
        if (!LOAD(node))
            STORE(node, (unsigned char)1);
        index /= 64;
    }
}

/* Where small object ``ref`` lies (its arena's record, span's first page, size class and
 * slot), read between two equal reads of the arena's sequence word: 1 found, 0 if this
 * handle cannot tell (not mapped here, changing, a large object, garbage), -1 exception.
 * Inlined into its callers (free, the queue's nodes, the root writer's objects): a call
 * cost the writer's bind+unbind 2-3% when it stopped reading the records itself. */
static inline __attribute__((always_inline)) int
free_locate(Free *self, long long ref, Record **found_rec, Py_ssize_t *found_start,
            unsigned char *found_c, long long *found_slot)
{
    if (self->summary == NULL)
        return 0;  /* closed (Free_close): the slow path says so */
    PyObject *key = PyLong_FromLongLong(ref >> self->arena_shift);
    if (key == NULL)
        return -1;
    PyObject *found = PyDict_GetItemWithError(self->records, key);
    Py_DECREF(key);
    if (found == NULL || !Py_IS_TYPE(found, &RecordType))
        return PyErr_Occurred() ? -1 : 0;
    Record *rec = (Record *)found;
    long long offset = ref & self->arena_mask;
    Py_ssize_t page = (Py_ssize_t)(offset >> self->page_shift);
    if (page >= rec->pages)
        return 0;
    int steady = 0;
    unsigned char used = 0, c = 0;
    Py_ssize_t start = 0;
    for (int tries = 0; tries < READ_RETRIES && !steady; tries++) {
        uint64_t before = LOAD(rec->seq);
        if (before & 1)
            continue;
        used = LOAD(rec->used + page);
        start = (Py_ssize_t)LOAD(rec->span + page) - 1;
        c = (start >= 0 && start <= page) ? LOAD(rec->sclass + start) : 0;
        steady = LOAD(rec->seq) == before;
    }
    if (!steady || !used || start < 0 || start > page || c == 0 || c >= self->nclasses)
        return 0;  /* changing, free pages, a large object, garbage: Python says or does it */
    long long in_span = offset - ((long long)start << self->page_shift) - self->objects_at[c];
    if (in_span < 0 || in_span % self->size[c])
        return 0;
    long long slot = in_span / self->size[c];
    if (slot >= self->nelems[c])
        return 0;
    *found_rec = rec;
    *found_start = start;
    *found_c = c;
    *found_slot = slot;
    return 1;
}

/* The free of small object ``ref`` (the handle's mutex entered): 1 done, 0 for the slow
 * path, -1 exception. */
static int
free_fast(Free *self, long long ref)
{
    Record *rec;
    Py_ssize_t start;
    unsigned char c;
    long long slot;
    int located = free_locate(self, ref, &rec, &start, &c, &slot);
    if (located <= 0)
        return located;
    unsigned char *alloc = rec->data + ((long long)start << self->page_shift) + slot;
    unsigned char one = 1;
    /* 1 -> 0 in one atomic step: a root bound meanwhile (1 -> 2, by the lock holder) makes
     * it fail, and Python says BoundObjectError; 0 is a double free (design.md) */
    if (!__atomic_compare_exchange_n(alloc, &one, (unsigned char)0, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
        return 0;
    if (LOAD(rec->owner + start) == 0)
        free_mark_partial(self, c, ref >> self->arena_shift);
    return 1;
}

static PyObject *
Free_call(Free *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    /* (ref) or (ref, timeout): the fast path never waits, so it ignores the timeout */
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t given = nargs + (kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0);
    if (self->slow == NULL)
        return collected_error();
    if (nargs >= 1 && given <= 2 && PyLong_CheckExact(args[0])
            && timeout_ok(args, nargs, kwnames, 1, NULL, NULL)) {
        long long ref = PyLong_AsLongLong(args[0]);
        if (ref <= 0)
            PyErr_Clear();
        else if (FAST_ENTER(self->mutex)) {
            int done = free_fast(self, ref);
            FAST_LEAVE(self->mutex);
            if (done < 0)
                return NULL;
            if (done)
                Py_RETURN_NONE;
        }
    }
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

static Py_ssize_t *
ssize_array(PyObject *seq, Py_ssize_t *len)
{
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of ints");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    Py_ssize_t *out = PyMem_New(Py_ssize_t, n ? n : 1);
    if (out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyNumber_AsSsize_t(PySequence_Fast_GET_ITEM(fast, i), PyExc_OverflowError);
        if (out[i] == -1 && PyErr_Occurred()) {
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
    }
    Py_DECREF(fast);
    *len = n;
    return out;
}

static int
Free_init(Free *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"records", "slow", "summary", "arena_shift", "page_shift",
                            "nelems", "size", "objects_at", "holder_at", "npages",
                            "tree_levels", "level_offset", "level_size", "mutex", NULL};
    PyObject *records, *slow, *summary, *nelems, *size, *objects_at, *holder_at, *npages,
             *tree_levels, *offsets, *sizes, *mutex;
    int arena_shift, page_shift;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OOiiOOOOOOOOO!", names, &PyDict_Type,
                                     &records, &slow, &summary, &arena_shift, &page_shift,
                                     &nelems, &size, &objects_at, &holder_at, &npages,
                                     &tree_levels, &offsets, &sizes, &MutexType, &mutex))
        return -1;
    Py_INCREF(mutex);
    Py_XSETREF(self->mutex, (Mutex *)mutex);
    Py_ssize_t n1, n2, n3, n4, n5, n6, n7, n8;
    self->nelems = ssize_array(nelems, &n1);
    self->size = self->nelems ? ssize_array(size, &n2) : NULL;
    self->objects_at = self->size ? ssize_array(objects_at, &n3) : NULL;
    self->holder_at = self->objects_at ? ssize_array(holder_at, &n7) : NULL;
    self->npages = self->holder_at ? ssize_array(npages, &n8) : NULL;
    self->tree_levels = self->npages ? ssize_array(tree_levels, &n4) : NULL;
    self->level_offset = self->tree_levels ? ssize_array(offsets, &n5) : NULL;
    self->level_size = self->level_offset ? ssize_array(sizes, &n6) : NULL;
    if (self->level_size == NULL)
        return -1;
    if (n2 != n1 || n3 != n1 || n7 != n1 || n8 != n1 || n4 != n1 + 1 || n6 != n5
            || self->tree_levels[n1] > n5) {
        PyErr_SetString(PyExc_ValueError, "Free: the class and tree tables disagree");
        return -1;
    }
    self->summary = pin_new(summary, PyBUF_WRITABLE);
    if (self->summary == NULL)
        return -1;
    for (Py_ssize_t level = 0; level < n5; level++)
        if (self->level_offset[level] + self->level_size[level] > self->summary->view.len) {
            PyErr_SetString(PyExc_ValueError, "Free: a tree level past the summary segment");
            return -1;
        }
    self->nclasses = n1;
    self->nlevels = n5;
    Py_INCREF(records);
    self->records = records;
    Py_INCREF(slow);
    self->slow = slow;
    self->arena_shift = arena_shift;
    self->page_shift = page_shift;
    self->arena_mask = (1LL << arena_shift) - 1;
    self->vectorcall = (vectorcallfunc)Free_call;
    return 0;
}

static int
Free_traverse(Free *self, visitproc visit, void *arg)
{
    Py_VISIT(self->records);
    Py_VISIT(self->slow);
    Py_VISIT(self->summary);
    return 0;
}

static int
Free_clear(Free *self)
{
    Py_CLEAR(self->summary);
    Py_CLEAR(self->records);
    Py_CLEAR(self->slow);
    return 0;
}

static void
Free_dealloc(Free *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->records);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->mutex);
    Py_CLEAR(self->summary);
    PyMem_Free(self->nelems);
    PyMem_Free(self->size);
    PyMem_Free(self->objects_at);
    PyMem_Free(self->holder_at);
    PyMem_Free(self->npages);
    PyMem_Free(self->tree_levels);
    PyMem_Free(self->level_offset);
    PyMem_Free(self->level_size);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Free_close(Free *self, PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(self->summary);
    if (self->records != NULL)
        PyDict_Clear(self->records);
    Py_RETURN_NONE;
}

static PyMethodDef Free_methods[] = {
    {"close", (PyCFunction)Free_close, METH_NOARGS,
     "let go of the mappings (the heap is closed): every call takes the slow path"},
    {NULL}
};

static PyTypeObject FreeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.Free",
    .tp_basicsize = sizeof(Free),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Free(...): Allocator.free's fast path for small objects.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Free_init,
    .tp_dealloc = (destructor)Free_dealloc,
    .tp_traverse = (traverseproc)Free_traverse,
    .tp_clear = (inquiry)Free_clear,
    .tp_vectorcall_offset = offsetof(Free, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_methods = Free_methods,
};

/* -- Mapping: a run of arenas mapped as one buffer (arenas.py map_run) ------------------- */

typedef struct {
    PyObject_HEAD
    unsigned char *addr;     /* the reserved range, every byte of it mapped; NULL until init */
    Py_ssize_t size;
    int writable;
    PyObject *weakrefs;
} Mapping;

static int
Mapping_init(Mapping *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"size", "parts", "writable", NULL};
    Py_ssize_t size;
    PyObject *parts;
    int writable;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nOp", names, &size, &parts, &writable))
        return -1;
    if (self->addr != NULL) {
        PyErr_SetString(PyExc_TypeError, "Mapping: already mapped");
        return -1;
    }
    PyObject *fast = PySequence_Fast(parts, "Mapping: parts must be a sequence of (fd, length)");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), total = 0;
    int *fds = PyMem_New(int, n ? n : 1);
    Py_ssize_t *lengths = PyMem_New(Py_ssize_t, n ? n : 1);
    int ok = fds != NULL && lengths != NULL;
    if (!ok)
        PyErr_NoMemory();
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        ok = PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "in", &fds[i], &lengths[i]);
        if (ok && (lengths[i] <= 0 || lengths[i] % sysconf(_SC_PAGESIZE)
                   || lengths[i] > PY_SSIZE_T_MAX - total)) {
            PyErr_SetString(PyExc_ValueError, "Mapping: a part's length is not a positive "
                            "multiple of the page size");
            ok = 0;
        }
        if (ok)
            total += lengths[i];
    }
    Py_DECREF(fast);
    if (ok && (size <= 0 || total != size)) {
        PyErr_SetString(PyExc_ValueError, "Mapping: the parts' lengths do not add up to size");
        ok = 0;
    }
    unsigned char *base = MAP_FAILED;
    if (ok) {
        base = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        ok = base != MAP_FAILED;
        if (!ok)
            PyErr_SetFromErrno(PyExc_OSError);
    }
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    for (Py_ssize_t i = 0, offset = 0; ok && i < n; offset += lengths[i++]) {
        if (mmap(base + offset, lengths[i], prot, MAP_SHARED | MAP_FIXED, fds[i], 0)
                == MAP_FAILED) {
            int err = errno;
            munmap(base, size);
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            ok = 0;
        }
    }
    PyMem_Free(fds);
    PyMem_Free(lengths);
    if (!ok)
        return -1;
    self->addr = base;
    self->size = size;
    self->writable = writable;
    return 0;
}

static int
Mapping_getbuffer(Mapping *self, Py_buffer *view, int flags)
{
    if (self->addr == NULL) {
        PyErr_SetString(PyExc_BufferError, "Mapping: nothing is mapped");
        view->obj = NULL;
        return -1;
    }
    return PyBuffer_FillInfo(view, (PyObject *)self, self->addr, self->size, !self->writable,
                             flags);
}

static void
Mapping_dealloc(Mapping *self)
{
    if (self->weakrefs != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->addr != NULL)
        munmap(self->addr, self->size);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyBufferProcs Mapping_as_buffer = {
    .bf_getbuffer = (getbufferproc)Mapping_getbuffer,
};

static PyMemberDef Mapping_members[] = {
    {"size", T_PYSSIZET, offsetof(Mapping, size), READONLY, "bytes mapped"},
    {NULL}
};

static PyTypeObject MappingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.Mapping",
    .tp_basicsize = sizeof(Mapping),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Mapping(size, parts, writable): ``size`` bytes of address space reserved and "
              "filled with each (fd, length) of ``parts`` mapped (MAP_SHARED, from offset 0) "
              "back to back; a buffer of them all, unmapped when the last view of it goes.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Mapping_init,
    .tp_dealloc = (destructor)Mapping_dealloc,
    .tp_as_buffer = &Mapping_as_buffer,
    .tp_members = Mapping_members,
    .tp_weaklistoffset = offsetof(Mapping, weakrefs),
};

/* -- rename_noreplace: an arena's move to its final name (arenas.py link) ------------------ */

#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE 1
#endif

static PyObject *
native_rename_noreplace(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "rename_noreplace(old, new) takes two str paths");
        return NULL;
    }
    const char *old = PyUnicode_AsUTF8(args[0]);
    const char *new = old == NULL ? NULL : PyUnicode_AsUTF8(args[1]);
    if (new == NULL)
        return NULL;
    long rc;
    Py_BEGIN_ALLOW_THREADS
    rc = syscall(SYS_renameat2, AT_FDCWD, old, AT_FDCWD, new, RENAME_NOREPLACE);
    Py_END_ALLOW_THREADS
    if (rc == 0)
        Py_RETURN_TRUE;
    if (errno == EEXIST)
        Py_RETURN_FALSE;
    return PyErr_SetFromErrnoWithFilenameObjects(PyExc_OSError, args[0], args[1]);
}

/* -- nonzero_every: the slots whose building byte is set (liveness.py) --------------------- */

static PyObject *
native_nonzero_every(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "nonzero_every(buffer, start, stride, count)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    Py_ssize_t stride = PyLong_AsSsize_t(args[2]);
    Py_ssize_t count = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (start < 0 || stride < 1 || count < 0
            || (count > 0 && (start >= view.len || count - 1 > (view.len - 1 - start) / stride))) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "nonzero_every: the bytes lie outside the buffer");
        return NULL;
    }
    PyObject *found = PyList_New(0);
    const unsigned char *bytes = (const unsigned char *)view.buf + start;
    for (Py_ssize_t i = 0; found != NULL && i < count; i++) {
        if (__atomic_load_n(bytes + i * stride, __ATOMIC_RELAXED) == 0)
            continue;
        PyObject *position = PyLong_FromSsize_t(i);
        if (position == NULL || PyList_Append(found, position) < 0)
            Py_CLEAR(found);
        Py_XDECREF(position);
    }
    PyBuffer_Release(&view);
    return found;
}

/* -- the module --------------------------------------------------------------------------- */

/* -- coordination (coord.py, waits.py): futex waits and wakes, the counter's atomic add ---- */

static int
word_of(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (view->len < 4 || ((uintptr_t)view->buf & 3)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "a futex word is 4 aligned bytes");
        return -1;
    }
    return 0;
}

static PyObject *
native_futex_wait(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    /* futex_wait(word, seen, seconds) -> False if the time ran out (waits.wait) */
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "futex_wait(word, seen, seconds)");
        return NULL;
    }
    unsigned long seen = PyLong_AsUnsignedLongMask(args[1]);
    double seconds = PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (word_of(args[0], &view) < 0)
        return NULL;
    uint32_t *word = (uint32_t *)view.buf;
    long result = 0;
    int err = 0;
    if (seconds <= 0) {
        result = LOAD(word) != (uint32_t)seen;
        PyBuffer_Release(&view);
        return PyBool_FromLong(result);
    }
    struct timespec ts = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    Py_BEGIN_ALLOW_THREADS
    result = syscall(SYS_futex, word, FUTEX_WAIT, (uint32_t)seen, &ts, NULL, 0);
    err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (result == 0 || err == EAGAIN)
        Py_RETURN_TRUE;
    if (err == ETIMEDOUT)
        Py_RETURN_FALSE;
    if (err == EINTR) {
        if (PyErr_CheckSignals() < 0)
            return NULL;
        Py_RETURN_TRUE;
    }
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *
native_futex_wake(PyObject *module, PyObject *obj)
{
    /* futex_wake(word): wake every sleeper on it (waits.wake) */
    Py_buffer view;
    if (word_of(obj, &view) < 0)
        return NULL;
    syscall(SYS_futex, (uint32_t *)view.buf, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* Counter(buffer, base_offset, pure_offset, slow_add): coord.Counter's add.  While the
 * record's ``pure`` word is 0 an add is one atomic instruction on ``base``; once a
 * pure-core process has added, ``slow_add(k)`` (the locked path) runs instead. */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    uint64_t *base;
    uint64_t *pure;
    PyObject *slow;
} Counter;

static int
Counter_init(Counter *self, PyObject *args, PyObject *kwds)
{
    PyObject *buffer, *slow;
    Py_ssize_t base, pure;
    if (!PyArg_ParseTuple(args, "OnnO", &buffer, &base, &pure, &slow))
        return -1;
    if (self->have_view) {
        PyErr_SetString(PyExc_TypeError, "Counter is initialised already");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    self->have_view = 1;
    if (base < 0 || pure < 0 || base % 8 || pure % 8 || base + 8 > self->view.len
            || pure + 8 > self->view.len) {
        PyErr_SetString(PyExc_ValueError, "Counter: offsets outside the buffer");
        return -1;
    }
    self->base = (uint64_t *)((char *)self->view.buf + base);
    self->pure = (uint64_t *)((char *)self->view.buf + pure);
    Py_INCREF(slow);
    Py_XSETREF(self->slow, slow);
    return 0;
}

/* (the buffer's exporter is not visited: see Lock_traverse) */
static int
Counter_traverse(Counter *self, visitproc visit, void *arg)
{
    Py_VISIT(self->slow);
    return 0;
}

static PyObject *Counter_release(Counter *self, PyObject *unused);

static int
Counter_clear(Counter *self)
{
    Py_XDECREF(Counter_release(self, NULL));  /* add raises HeapClosedError from now on */
    Py_CLEAR(self->slow);
    return 0;
}

static void
Counter_dealloc(Counter *self)
{
    PyObject_GC_UnTrack(self);
    if (self->have_view)
        PyBuffer_Release(&self->view);
    Py_XDECREF(self->slow);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Counter_add(Counter *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "add(k=1)");
        return NULL;
    }
    if (!self->have_view) {
        raise_error("HeapClosedError",
                    PyUnicode_FromString("the heap of this counter is closed; attach it again"));
        return NULL;
    }
    long long k = 1;
    if (nargs == 1) {
        int overflow = 0;
        k = PyLong_Check(args[0]) && !PyBool_Check(args[0])
            ? PyLong_AsLongLongAndOverflow(args[0], &overflow) : 0;
        if (!PyLong_Check(args[0]) || PyBool_Check(args[0]) || overflow)
            return PyObject_CallOneArg(self->slow, args[0]);  /* its error */
        if (k == -1 && PyErr_Occurred())
            return NULL;
    }
    if (LOAD(self->pure)) {
        PyObject *arg = nargs ? Py_NewRef(args[0]) : PyLong_FromLong(1);
        if (arg == NULL)
            return NULL;
        PyObject *result = PyObject_CallOneArg(self->slow, arg);
        Py_DECREF(arg);
        return result;
    }
    uint64_t value = __atomic_add_fetch(self->base, (uint64_t)k, __ATOMIC_SEQ_CST);
    return PyLong_FromLongLong((long long)value);
}

static PyObject *
Counter_release(Counter *self, PyObject *unused)
{
    if (self->have_view) {
        self->have_view = 0;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static PyMethodDef Counter_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Counter_add, METH_FASTCALL,
     "add(k=1) -> the new value"},
    {"release", (PyCFunction)Counter_release, METH_NOARGS, "let go of the mapping"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CounterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.Counter",
    .tp_basicsize = sizeof(Counter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Counter(buffer, base_offset, pure_offset, slow_add): coord.Counter's add.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Counter_init,
    .tp_dealloc = (destructor)Counter_dealloc,
    .tp_traverse = (traverseproc)Counter_traverse,
    .tp_clear = (inquiry)Counter_clear,
    .tp_methods = Counter_methods,
};

/* Queue(lock, coord, record, control, alloc, free, encode, loads, slow_put, slow_get,
 * slice, scan_interval): coord.Queue's put and get in one call each, for the items a node
 * holds itself (an int, or a pickle that encode() returns).  The protocol is coord.py's,
 * word for word: under the heap lock (the Lock's own acquire, repair of a dirty journal
 * included) the intent record is written, then the journal's COORD op, then the links,
 * the count, the node's holder word (the queue's, or the getter's), the futex word; the
 * journal is cleared and the sleepers, if the futex word's flag says there are any, woken
 * after the lock is released.  A getter frees its node after that.  Whatever this call is
 * not sure of -- a closed queue, a look for dead leasers (due when leased items wait
 * and the queue is empty, or ``scan_interval`` seconds after this handle's last one: in
 * Python), a node in an arena this handle has not mapped, an item stored with put(), a
 * timeout that ran out, a thread inside a locked() block -- it leaves to the Python path,
 * slow_put(item, time left) or slow_get(time left), before it has changed anything.  A
 * process with a crash point armed has no native Lock (lock.py), so no Queue either: the
 * Python path reaches the points, with the same stores in the same order as here.
 *
 * Waiting: with the futex word's sleepers flag set and the lock released, it watches the
 * word for at most ``spin_ns`` (adaptive: NQUEUE_SPIN_MAX_NS after a watch that saw the
 * word move, halved down to NQUEUE_SPIN_MIN_NS after one that did not), then sleeps on it
 * in slices of at most ``slice`` seconds, as coord.py's wait_for (coord.py's docstring
 * says why the watch, and what it costs). */
typedef struct {
    PyObject_HEAD
    Lock *lock;
    Py_buffer coord, control;
    int have_views;
    uint64_t *words, *rec, *journal, *journal_arg;
    uint32_t *futex;
    long record;
    Free *free;
    PyObject *alloc, *encode, *loads, *slow_put, *slow_get;
    double slice, scan_interval;
    double scanned;          /* when this handle last left a look for dead leasers to Python */
    long spin_ns;            /* how long the next wait watches the word before it sleeps */
} NQueue;

/* Bounds of a queue wait's watch of the futex word before it sleeps (NQueue.spin_ns). */
#define NQUEUE_SPIN_MAX_NS 50000
#define NQUEUE_SPIN_MIN_NS 2000

/* The words of the queue node at ``ref`` (a live small object of at least ``need`` bytes),
 * its holder word and, given ``room``, its size; NULL if this handle cannot tell (the Python
 * path decides), or NULL with an exception. */
static uint64_t *
nqueue_node(NQueue *self, uint64_t ref, uint64_t need, unsigned char **holder, uint64_t *room)
{
    Record *rec;
    Py_ssize_t start;
    unsigned char c;
    long long slot;
    if (ref == 0 || ref & 7 || ref >> 62)
        return NULL;
    if (free_locate(self->free, (long long)ref, &rec, &start, &c, &slot) <= 0)
        return NULL;
    Free *free = self->free;
    long long offset = (long long)ref & free->arena_mask;
    long long span = (long long)start << free->page_shift;
    if (need > (uint64_t)free->size[c]
            || offset + free->size[c] > rec->pin->view.len || !LOAD(rec->data + span + slot))
        return NULL;
    *holder = rec->data + span + free->holder_at[c] + slot * SPAN_HOLDER_SIZE;
    if (room != NULL)
        *room = (uint64_t)free->size[c];
    return (uint64_t *)(rec->data + offset);
}

static inline void
nqueue_set_holder(unsigned char *holder, uint32_t word)
{
    for (int i = 0; i < SPAN_HOLDER_SIZE; i++)  /* little-endian, as everything shared */
        STORE(holder + i, (unsigned char)(word >> (8 * i)));
}

/* The intent record of ``op``, then the journal (coord.py CoordTable.begin). */
static void
nqueue_begin(NQueue *self, uint64_t op, uint64_t node_a, uint64_t *a, uint64_t free,
             uint64_t hold)
{
    uint64_t *w = self->words + COORD_INTENT;
    STORE(&w[0], (uint64_t)self->record);
    STORE(&w[1], op);
    for (int i = 0; i < 6; i++)
        STORE(&w[2 + i], LOAD(&self->rec[COORD_HEAD + i]));
    STORE(&w[8], node_a);
    STORE(&w[9], a != NULL ? LOAD(&a[0]) : (uint64_t)0);
    STORE(&w[10], (uint64_t)0);
    STORE(&w[11], (uint64_t)0);
    STORE(&w[12], free);
    STORE(&w[13], self->lock->token);
    STORE(&w[14], hold);
    STORE(self->journal_arg, op);
    STORE(self->journal, (uint64_t)CONTROL_COORD_OP << 56 | (uint64_t)(self->record + 1));
}

/* Bump the futex word and clear the journal (CoordTable.end); 1 if sleepers are due a wake. */
static int
nqueue_end(NQueue *self)
{
    uint64_t word = LOAD(&self->rec[COORD_FUTEX]);
    STORE(&self->rec[COORD_FUTEX], (word + 1) & 0xFFFFFFFFu);
    STORE(self->journal, (uint64_t)0);
    return (word >> 32) != 0;
}

/* Say a waiter will sleep (CoordTable.sleep_on, lock held): the futex value to sleep on. */
static uint32_t
nqueue_sleep_on(NQueue *self)
{
    uint64_t word = LOAD(&self->rec[COORD_FUTEX]);
    STORE(&self->rec[COORD_FUTEX], word | (uint64_t)1 << 32);
    return (uint32_t)word;
}

static void
nqueue_leave(NQueue *self, int wake)
{
    lock_unhold(self->lock, LOCK_TAKEN);
    if (wake)
        syscall(SYS_futex, self->futex, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

/* Until the futex word moves off ``seen``, the deadline or a slice: 0, or -1 if a signal
 * handler raised. */
static int
nqueue_wait(NQueue *self, uint32_t seen, int has_deadline, double deadline)
{
    double wait = self->slice;
    if (has_deadline && deadline - monotonic() < wait)
        wait = deadline - monotonic();
    if (wait <= 0)
        return 0;
    struct timespec ts = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
    double watch_until = monotonic() + (double)self->spin_ns * 1e-9;
    int moved = 0;
    Py_BEGIN_ALLOW_THREADS
    while (!moved && monotonic() < watch_until) {
        for (int i = 0; i < 64 && !moved; i++) {
            moved = LOAD(self->futex) != seen;
            CPU_RELAX();
        }
    }
    if (!moved)
        syscall(SYS_futex, self->futex, FUTEX_WAIT, seen, &ts, NULL, 0);
    Py_END_ALLOW_THREADS
    long next = moved ? self->spin_ns * 2 : self->spin_ns / 2;
    self->spin_ns = next > NQUEUE_SPIN_MAX_NS ? NQUEUE_SPIN_MAX_NS
                    : next < NQUEUE_SPIN_MIN_NS ? NQUEUE_SPIN_MIN_NS : next;
    /* Handlers run after every sleep: a signal that arrived just before it interrupted
     * nothing, and the caller's loop never returns to the interpreter. */
    return PyErr_CheckSignals();
}

/* The seconds left until the deadline, a timeout for a Python call (None: for ever). */
static PyObject *
nqueue_left(int has_deadline, double deadline)
{
    return has_deadline ? PyFloat_FromDouble(deadline > monotonic() ? deadline - monotonic()
                                                                    : 0.0)
                        : Py_NewRef(Py_None);
}

static PyObject *
nqueue_fallback(PyObject *slow, PyObject *item, int has_deadline, double deadline)
{
    PyObject *left = nqueue_left(has_deadline, deadline);
    if (left == NULL)
        return NULL;
    PyObject *result = item != NULL ? PyObject_CallFunctionObjArgs(slow, item, left, NULL)
                                    : PyObject_CallOneArg(slow, left);
    Py_DECREF(left);
    return result;
}

/* Take the lock for a change (0), or leave it to Python (1: nothing taken), or -1.  Only
 * the wait's own deadline goes to Python: a signal handler's exception propagates, from
 * either wait (its TimeoutError too). */
static int
nqueue_enter(NQueue *self, int has_deadline, double deadline)
{
    if (!self->have_views || lock_check_open(self->lock) < 0) {
        PyErr_Clear();
        return 1;  /* closed: Python says so */
    }
    int held = lock_hold(self->lock, has_deadline, deadline, 1);
    if (held == LOCK_NESTED) {  /* this thread's own locked() block holds it */
        lock_unhold(self->lock, held);
        return 1;
    }
    if (held == LOCK_DEADLINE) {  /* (another thread's hold of the handle, or a process's) */
        PyErr_Clear();
        return 1;  /* Python tries once more, and says queue.Full or queue.Empty */
    }
    if (held < 0)
        return -1;
    if (!self->have_views) {  /* closed by the repair, say */
        nqueue_leave(self, 0);
        return 1;
    }
    return 0;
}

static int
nqueue_free(NQueue *self, uint64_t node)
{
    PyObject *ref = PyLong_FromUnsignedLongLong(node);
    if (ref == NULL)
        return -1;
    PyObject *done = PyObject_CallOneArg((PyObject *)self->free, ref);
    Py_DECREF(ref);
    Py_XDECREF(done);
    return done == NULL ? -1 : 0;
}

/* A new node holding ``item``: its ref, 0 for the Python path, or -1 with an exception (a
 * TimeoutError once the deadline passed while another thread held the handle). */
static long long
nqueue_store(NQueue *self, PyObject *item, int has_deadline, double deadline)
{
    PyObject *payload = NULL;
    long long number = 0;
    uint64_t kind = COORD_KIND_INT, length = 8;
    int overflow = 0;
    if (PyLong_CheckExact(item)) {
        number = PyLong_AsLongLongAndOverflow(item, &overflow);
        if (overflow)
            return 0;
    }
    else {
        payload = PyObject_CallOneArg(self->encode, item);
        if (payload == NULL)
            return -1;
        if (!PyBytes_CheckExact(payload)) {
            Py_DECREF(payload);
            return 0;  /* stored with put(): Python does it */
        }
        kind = COORD_KIND_PICKLE;
        length = (uint64_t)PyBytes_GET_SIZE(payload);
    }
    /* (the deadline bounds the slow path's wait for another thread of the handle) */
    PyObject *alloc_args[2] = {PyLong_FromUnsignedLongLong(COORD_NODE_HEADER + length),
                               nqueue_left(has_deadline, deadline)};
    PyObject *got = alloc_args[0] != NULL && alloc_args[1] != NULL
                    ? PyObject_Vectorcall(self->alloc, alloc_args, 2, NULL) : NULL;
    Py_XDECREF(alloc_args[0]);
    Py_XDECREF(alloc_args[1]);
    long long ref = got != NULL ? PyLong_AsLongLong(got) : -1;
    Py_XDECREF(got);
    if (ref == -1 && PyErr_Occurred()) {
        Py_XDECREF(payload);
        return -1;
    }
    unsigned char *holder;
    uint64_t *node = nqueue_node(self, (uint64_t)ref, COORD_NODE_HEADER + length, &holder,
                                 NULL);
    if (node == NULL) {
        Py_XDECREF(payload);
        if (PyErr_Occurred() || nqueue_free(self, (uint64_t)ref) < 0)
            return -1;
        return 0;
    }
    node[0] = 0;
    node[2] = 0;
    if (payload != NULL)
        memcpy(node + 3, PyBytes_AS_STRING(payload), length);
    else
        memcpy(node + 3, &number, 8);
    node[1] = kind << 56 | length;
    Py_XDECREF(payload);
    return ref;
}

static PyObject *
NQueue_put(NQueue *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t given = nargs + (kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0);
    int has_deadline = 0;
    double deadline = 0;
    if (self->slow_put == NULL)
        return collected_error();  /* (NQueue_clear) */
    if (nargs < 1 || given > 2 || !self->have_views
            || !timeout_ok(args, nargs, kwnames, 1, &has_deadline, &deadline))
        return PyObject_Vectorcall(self->slow_put, args, nargsf, kwnames);
    PyObject *item = args[0];
    long long node = nqueue_store(self, item, has_deadline, deadline);
    if (node < 0 && !(has_deadline && monotonic() >= deadline
                      && PyErr_ExceptionMatches(PyExc_TimeoutError)))
        return NULL;  /* (a TimeoutError before the deadline is a signal handler's) */
    if (node <= 0) {  /* (the deadline: Python tries once more, and says queue.Full) */
        PyErr_Clear();
        return nqueue_fallback(self->slow_put, item, has_deadline, deadline);
    }
    for (;;) {
        int entered = nqueue_enter(self, has_deadline, deadline);
        if (entered != 0) {
            if (nqueue_free(self, (uint64_t)node) < 0 || entered < 0)
                return NULL;
            return nqueue_fallback(self->slow_put, item, has_deadline, deadline);
        }
        uint64_t *rec = self->rec;
        uint64_t count = LOAD(&rec[COORD_HEAD + 2]), capacity = LOAD(&rec[COORD_PARAM]);
        if (capacity && count >= capacity && !LOAD(&rec[COORD_HEAD + 5])) {
            uint32_t seen = nqueue_sleep_on(self);
            nqueue_leave(self, 0);
            if (has_deadline && monotonic() >= deadline) {
                if (nqueue_free(self, (uint64_t)node) < 0)
                    return NULL;
                return nqueue_fallback(self->slow_put, item, has_deadline, deadline);
            }
            if (nqueue_wait(self, seen, has_deadline, deadline) < 0) {
                PyObject *type, *value, *trace;
                PyErr_Fetch(&type, &value, &trace);
                nqueue_free(self, (uint64_t)node);
                PyErr_Restore(type, value, trace);  /* (the signal's error wins) */
                return NULL;
            }
            continue;
        }
        uint64_t tail = LOAD(&rec[COORD_HEAD + 1]);
        unsigned char *holder, *tail_holder;
        uint64_t *tail_words = tail ? nqueue_node(self, tail, COORD_NODE_HEADER, &tail_holder,
                                                  NULL) : NULL;
        uint64_t *words = nqueue_node(self, (uint64_t)node, COORD_NODE_HEADER, &holder, NULL);
        if (LOAD(&rec[COORD_HEAD + 5]) || words == NULL || (tail && tail_words == NULL)) {
            nqueue_leave(self, 0);  /* closed, or a node Python must look at */
            if (PyErr_Occurred() || nqueue_free(self, (uint64_t)node) < 0)
                return NULL;
            return nqueue_fallback(self->slow_put, item, has_deadline, deadline);
        }
        nqueue_begin(self, COORD_OP_PUT, tail, tail_words, (uint64_t)node, 0);
        nqueue_set_holder(holder, 0);  /* HELD: the queue's (owners.hold_locked) */
        if (tail)
            STORE(&tail_words[0], (uint64_t)node);
        else
            STORE(&rec[COORD_HEAD], (uint64_t)node);
        STORE(&rec[COORD_HEAD + 1], (uint64_t)node);
        STORE(&rec[COORD_HEAD + 2], count + 1);
        nqueue_leave(self, nqueue_end(self));
        Py_RETURN_NONE;
    }
}

static PyObject *
NQueue_get(NQueue *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t given = nargs + (kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0);
    int has_deadline = 0;
    double deadline = 0;
    if (self->slow_get == NULL)
        return collected_error();  /* (NQueue_clear) */
    if (given > 1 || !self->have_views
            || !timeout_ok(args, nargs, kwnames, 0, &has_deadline, &deadline))
        return PyObject_Vectorcall(self->slow_get, args, nargsf, kwnames);
    for (;;) {
        int entered = nqueue_enter(self, has_deadline, deadline);
        if (entered != 0)
            return entered < 0 ? NULL : nqueue_fallback(self->slow_get, NULL, has_deadline,
                                                        deadline);
        uint64_t *rec = self->rec;
        uint64_t count = LOAD(&rec[COORD_HEAD + 2]);
        int scan = LOAD(&rec[COORD_HEAD + 4])
                   && (!count || monotonic() - self->scanned >= self->scan_interval);
        if (scan || (!count && LOAD(&rec[COORD_HEAD + 5]))) {
            nqueue_leave(self, 0);  /* dead leasers to look for, or closed: Python does it */
            if (scan)
                self->scanned = monotonic();
            return nqueue_fallback(self->slow_get, NULL, has_deadline, deadline);
        }
        if (!count) {
            uint32_t seen = nqueue_sleep_on(self);
            nqueue_leave(self, 0);
            if (has_deadline && monotonic() >= deadline)
                return nqueue_fallback(self->slow_get, NULL, has_deadline, deadline);
            if (nqueue_wait(self, seen, has_deadline, deadline) < 0)
                return NULL;
            continue;
        }
        uint64_t node = LOAD(&rec[COORD_HEAD]);
        unsigned char *holder;
        uint64_t room = 0;
        uint64_t *words = nqueue_node(self, node, COORD_NODE_HEADER, &holder, &room);
        uint64_t tag = words != NULL ? LOAD(&words[1]) : 0;
        uint64_t kind = tag >> 56, length = tag & (((uint64_t)1 << 56) - 1);
        int tag_ok = (kind == COORD_KIND_INT && length == 8)
                     || (kind == COORD_KIND_PICKLE && length <= 1u << 30);
        if (words != NULL && (!tag_ok || COORD_NODE_HEADER + length > room))
            words = NULL;  /* a garbage tag, or an item longer than its node */
        if (words == NULL) {  /* an arena not mapped here, an item stored with put() */
            nqueue_leave(self, 0);
            return PyErr_Occurred() ? NULL : nqueue_fallback(self->slow_get, NULL,
                                                             has_deadline, deadline);
        }
        PyObject *item;
        if (kind == COORD_KIND_INT) {
            long long number;
            memcpy(&number, words + 3, 8);
            item = PyLong_FromLongLong(number);
        }
        else {  /* unpickled under the lock, as in Python: one that fails stays queued */
            PyObject *payload = PyBytes_FromStringAndSize((const char *)(words + 3),
                                                          (Py_ssize_t)length);
            item = payload != NULL ? PyObject_CallOneArg(self->loads, payload) : NULL;
            Py_XDECREF(payload);
            if (item != NULL)  /* (Python code ran: look the nodes up again) */
                words = nqueue_node(self, node, COORD_NODE_HEADER + length, &holder, NULL);
            if (item != NULL && (words == NULL || LOAD(&rec[COORD_HEAD]) != node)) {
                Py_CLEAR(item);
                nqueue_leave(self, 0);
                if (PyErr_Occurred())
                    return NULL;
                return nqueue_fallback(self->slow_get, NULL, has_deadline, deadline);
            }
        }
        if (item == NULL) {
            nqueue_leave(self, 0);
            return NULL;
        }
        uint64_t following = LOAD(&words[0]);
        nqueue_begin(self, COORD_OP_TAKE, 0, NULL, 0, node);
        STORE(&rec[COORD_HEAD], following);
        if (!following)
            STORE(&rec[COORD_HEAD + 1], (uint64_t)0);
        STORE(&rec[COORD_HEAD + 2], count - 1);
        uint64_t token = self->lock->token;  /* the getter's now (owners.adopt_locked) */
        nqueue_set_holder(holder, holder_of(token));
        nqueue_leave(self, nqueue_end(self));
        if (nqueue_free(self, node) < 0) {
            Py_DECREF(item);
            return NULL;
        }
        return item;
    }
}

static int
NQueue_init(NQueue *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"lock", "coord", "record", "control", "alloc", "free", "encode",
                            "loads", "slow_put", "slow_get", "slice", "scan_interval", NULL};
    PyObject *lock, *coord, *control, *alloc, *free, *encode, *loads, *slow_put, *slow_get;
    long record;
    double slice, scan_interval;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OlOOO!OOOOdd", names, &LockType, &lock,
                                     &coord, &record, &control, &alloc, &FreeType, &free,
                                     &encode, &loads, &slow_put, &slow_get, &slice,
                                     &scan_interval))
        return -1;
    if (self->have_views) {
        PyErr_SetString(PyExc_TypeError, "Queue is initialised already");
        return -1;
    }
    if (PyObject_GetBuffer(coord, &self->coord, PyBUF_WRITABLE) < 0)
        return -1;
    if (PyObject_GetBuffer(control, &self->control, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&self->coord);
        return -1;
    }
    self->have_views = 1;
    if (record < 0 || record >= COORD_RECORDS
            || self->coord.len < (COORD_HEADER_WORDS + COORD_RECORDS * COORD_RECORD_WORDS) * 8
            || self->control.len < CONTROL_JOURNAL_ARG_OFFSET + 8) {
        PyErr_SetString(PyExc_ValueError, "Queue: the segments are too short");
        return -1;
    }
    self->words = (uint64_t *)self->coord.buf;
    self->rec = self->words + COORD_HEADER_WORDS + record * COORD_RECORD_WORDS;
    self->futex = (uint32_t *)&self->rec[COORD_FUTEX];
    self->journal = (uint64_t *)((char *)self->control.buf + CONTROL_JOURNAL_OFFSET);
    self->journal_arg = (uint64_t *)((char *)self->control.buf + CONTROL_JOURNAL_ARG_OFFSET);
    self->record = record;
    self->slice = slice;
    self->scan_interval = scan_interval;
    self->spin_ns = NQUEUE_SPIN_MAX_NS;
    Py_XSETREF(self->lock, (Lock *)Py_NewRef(lock));
    Py_XSETREF(self->free, (Free *)Py_NewRef(free));
    Py_XSETREF(self->alloc, Py_NewRef(alloc));
    Py_XSETREF(self->encode, Py_NewRef(encode));
    Py_XSETREF(self->loads, Py_NewRef(loads));
    Py_XSETREF(self->slow_put, Py_NewRef(slow_put));
    Py_XSETREF(self->slow_get, Py_NewRef(slow_get));
    return 0;
}

static PyObject *
NQueue_release(NQueue *self, PyObject *Py_UNUSED(ignored))
{
    if (self->have_views) {
        self->have_views = 0;
        PyBuffer_Release(&self->coord);
        PyBuffer_Release(&self->control);
    }
    Py_RETURN_NONE;
}

static int
NQueue_traverse(NQueue *self, visitproc visit, void *arg)
{
    Py_VISIT(self->lock);
    Py_VISIT(self->free);
    Py_VISIT(self->alloc);
    Py_VISIT(self->encode);
    Py_VISIT(self->loads);
    Py_VISIT(self->slow_put);
    Py_VISIT(self->slow_get);
    return 0;
}

static int
NQueue_clear(NQueue *self)
{
    Py_CLEAR(self->lock);
    Py_CLEAR(self->free);
    Py_CLEAR(self->alloc);
    Py_CLEAR(self->encode);
    Py_CLEAR(self->loads);
    Py_CLEAR(self->slow_put);
    Py_CLEAR(self->slow_get);
    return 0;
}

static void
NQueue_dealloc(NQueue *self)
{
    PyObject_GC_UnTrack(self);
    PyObject *ignored = NQueue_release(self, NULL);
    Py_XDECREF(ignored);
    NQueue_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef NQueue_methods[] = {
    {"put", (PyCFunction)(void (*)(void))NQueue_put, METH_FASTCALL | METH_KEYWORDS,
     "put(item, timeout=None), as coord.Queue.put"},
    {"get", (PyCFunction)(void (*)(void))NQueue_get, METH_FASTCALL | METH_KEYWORDS,
     "get(timeout=None), as coord.Queue.get"},
    {"release", (PyCFunction)NQueue_release, METH_NOARGS,
     "let go of the segments (the heap is closed): every call takes the Python path"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject NQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.Queue",
    .tp_basicsize = sizeof(NQueue),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Queue(lock, coord, record, control, alloc, free, encode, loads, slow_put, "
              "slow_get, slice, scan_interval): coord.Queue's put and get.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)NQueue_init,
    .tp_dealloc = (destructor)NQueue_dealloc,
    .tp_traverse = (traverseproc)NQueue_traverse,
    .tp_clear = (inquiry)NQueue_clear,
    .tp_methods = NQueue_methods,
};

/* -- RootReader: roots.py's lock-free lookup of heap.roots[name] --------------------------
 *
 * RootReader(header, mutex): reader(name) is RootTable.lookup in one call, on the
 * regions the table has mapped and handed over (add_region): the table word, the
 * region's sequence word (odd: no answer), the probe from crc32(name), the name's
 * bytes against names_end, the value, the sequence word again.  It answers the ref
 * bound to name, 0 if none is, and None whenever it cannot be sure: a name that is no
 * str of 1-255 bytes of UTF-8, a region not handed over yet, a sequence word odd or
 * moved, a number out of bounds, another thread in the handle's slow paths, a closed
 * reader.  Then roots.py's Python path decides: its retries, its lock, its errors. */

static uint32_t crc32_table[256];

static void
crc32_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc32_table[n] = c;
    }
}

static uint32_t
crc32_of(const unsigned char *data, Py_ssize_t len)
{
    /* zlib.crc32(data), the hash of roots.py's keys */
    uint32_t c = 0xFFFFFFFFu;
    for (Py_ssize_t i = 0; i < len; i++)
        c = crc32_table[(c ^ data[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

#define ROOT_GARBAGE INT64_MIN

/* roots.py's Region.find in region ``number`` (mapped at ``region``): the slot holding the
 * key of ``name`` (crc32 ``h``), ~slot of the empty slot where it would go, or ROOT_GARBAGE
 * if a number read is out of bounds (a rebuild under a lock-free reader, or garbage). */
static int64_t
root_find(const unsigned char *region, uint64_t number, const char *name, Py_ssize_t len,
          uint64_t h)
{
    uint64_t *names_end = (uint64_t *)(region + ROOTS_NAMES_END_OFFSET);
    uint64_t cap = (uint64_t)ROOTS_FIRST_CAP << (number >> 1);
    uint64_t names_cap = (uint64_t)ROOTS_NAME_BYTES_PER_SLOT * cap;
    uint64_t *slots = (uint64_t *)(region + ROOTS_REGION_HEADER);
    const unsigned char *names = region + ROOTS_REGION_HEADER + ROOTS_SLOT_BYTES * cap;
    uint64_t want = h << 32 | (uint64_t)len << 24;
    uint64_t i = h & (cap - 1);
    for (uint64_t n = 0; n < cap; n++, i = (i + 1) & (cap - 1)) {
        uint64_t key = __atomic_load_n(&slots[2 * i], __ATOMIC_RELAXED);
        if (!key)
            return ~(int64_t)i;
        if ((key & ~(uint64_t)0xFFFFFF) != want)
            continue;
        uint64_t at = (key & 0xFFFFFF) << 3;
        uint64_t end = __atomic_load_n(names_end, __ATOMIC_RELAXED);
        if (at + (uint64_t)len > end || end > names_cap)
            return ROOT_GARBAGE;
        if (memcmp(names + at, name, (size_t)len) == 0)
            return (int64_t)i;
    }
    return ROOT_GARBAGE;  /* no empty slot: a table is at most half full */
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Py_buffer header;
    int have_header;
    Mutex *mutex;
    /* region r's mapping (its header, slots and names), NULL until handed over */
    Py_buffer regions[ROOTS_REGIONS];
    unsigned char *base[ROOTS_REGIONS];
} RootReader;

static PyObject *
RootReader_call(RootReader *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 || kwnames != NULL || !PyUnicode_CheckExact(args[0]) || !self->have_header)
        Py_RETURN_NONE;
    Py_ssize_t len;
    const char *name = PyUnicode_AsUTF8AndSize(args[0], &len);
    if (name == NULL) {
        PyErr_Clear();  /* not UTF-8 (a lone surrogate): roots.py says so */
        Py_RETURN_NONE;
    }
    if (len < 1 || len > ROOTS_MAX_NAME)
        Py_RETURN_NONE;
    uint64_t h = crc32_of((const unsigned char *)name, len);
    if (!FAST_ENTER(self->mutex))
        Py_RETURN_NONE;
    int decided = 0;
    uint64_t value = 0;
    uint64_t table = LOAD((uint64_t *)((char *)self->header.buf + ROOTS_TABLE_OFFSET));
    unsigned char *region = table < ROOTS_REGIONS ? self->base[table] : NULL;
    if (region != NULL) {
        uint64_t *seq = (uint64_t *)(region + ROOTS_SEQ_OFFSET);
        uint64_t *slots = (uint64_t *)(region + ROOTS_REGION_HEADER);
        uint64_t before = LOAD(seq);
        if (!(before & 1)) {
            /* out of bounds: the Python path tells garbage from a rebuild */
            int64_t i = root_find(region, table, name, len, h);
            decided = i != ROOT_GARBAGE;
            if (i >= 0)
                value = __atomic_load_n(&slots[2 * i + 1], __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (__atomic_load_n(seq, __ATOMIC_RELAXED) != before)
                decided = 0;  /* changed under us */
        }
    }
    FAST_LEAVE(self->mutex);
    if (!decided)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(value);
}

static int
RootReader_init(RootReader *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"header", "mutex", NULL};
    PyObject *header, *mutex;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!", names, &header, &MutexType, &mutex))
        return -1;
    if (self->have_header) {
        PyErr_SetString(PyExc_TypeError, "RootReader is initialised already");
        return -1;
    }
    if (PyObject_GetBuffer(header, &self->header, PyBUF_SIMPLE) < 0)
        return -1;
    self->have_header = 1;
    if (self->header.len < ROOTS_TABLE_OFFSET + 8) {
        PyErr_SetString(PyExc_ValueError, "RootReader: the header is shorter than its words");
        return -1;
    }
    Py_INCREF(mutex);
    Py_XSETREF(self->mutex, (Mutex *)mutex);
    self->vectorcall = (vectorcallfunc)RootReader_call;
    return 0;
}

static PyObject *
RootReader_add_region(RootReader *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* add_region(number, buffer): region ``number`` is mapped at ``buffer`` (whole) */
    Py_ssize_t number = nargs == 2 ? PyLong_AsSsize_t(args[0]) : -1;
    if (number == -1 && PyErr_Occurred())
        return NULL;
    if (nargs != 2 || number < 0 || number >= ROOTS_REGIONS) {
        PyErr_SetString(PyExc_ValueError, "add_region(number, buffer): no such region");
        return NULL;
    }
    if (!self->have_header || self->base[number] != NULL)
        Py_RETURN_NONE;  /* closed, or handed over already */
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t cap = (Py_ssize_t)ROOTS_FIRST_CAP << (number >> 1);
    if (view.len < ROOTS_REGION_HEADER + (ROOTS_SLOT_BYTES + ROOTS_NAME_BYTES_PER_SLOT) * cap) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "add_region: the buffer is shorter than the region");
        return NULL;
    }
    self->regions[number] = view;
    self->base[number] = (unsigned char *)view.buf;
    Py_RETURN_NONE;
}

static PyObject *
RootReader_close(RootReader *self, PyObject *Py_UNUSED(ignored))
{
    /* let go of every mapping; from now on every lookup answers None */
    for (int r = 0; r < ROOTS_REGIONS; r++)
        if (self->base[r] != NULL) {
            self->base[r] = NULL;
            PyBuffer_Release(&self->regions[r]);
        }
    if (self->have_header) {
        self->have_header = 0;
        PyBuffer_Release(&self->header);
    }
    Py_RETURN_NONE;
}

static void
RootReader_dealloc(RootReader *self)
{
    Py_XDECREF(RootReader_close(self, NULL));
    Py_CLEAR(self->mutex);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef RootReader_methods[] = {
    {"add_region", (PyCFunction)(void (*)(void))RootReader_add_region, METH_FASTCALL,
     "add_region(number, buffer): region number is mapped, whole, at buffer"},
    {"close", (PyCFunction)RootReader_close, METH_NOARGS, "let go of every mapping"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RootReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.RootReader",
    .tp_basicsize = sizeof(RootReader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "RootReader(header, mutex): reader(name) -> the ref bound to name, 0 if none, "
              "None if unsure (roots.py's lookup decides).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RootReader_init,
    .tp_dealloc = (destructor)RootReader_dealloc,
    .tp_methods = RootReader_methods,
    .tp_vectorcall_offset = offsetof(RootReader, vectorcall),
    .tp_call = PyVectorcall_Call,
};

/* -- RootWriter: roots.py's _bind_locked in one call -------------------------------------
 *
 * RootWriter(reader, lock, control, free, max_roots, reach): writer(name, ref, timeout)
 * binds name to the small object at ref (ref None: unbinds it) as roots.py's "Binding"
 * says, with the same intent record, journal (ROOTS), sequence word, root counts, marks and
 * holder words, so that repair.py's finish of a bind stopped anywhere is the same for both
 * cores.  Objects are found through ``free``, the allocator's native Free (free_locate).
 * One call takes the heap lock (the native Lock's run: the handle's mutex, a writer's
 * repair of a dirty journal), probes, stores and releases it.  held(name, ref, holder) is
 * the same change for a caller that holds the lock already (the pure lock, while crash
 * points are armed).  Crash points are reached through ``reach`` (crash.reach, None when
 * none is armed), so they fire at the same stores as the Python twin's.
 *
 * It answers True (done), False (an unbind of a name nothing is bound to) or None,
 * having changed nothing, whenever it cannot be sure: a heap whose control segment says
 * destroyed (the identity check is that load, no lstat), a name that is no str of 1-255
 * bytes of UTF-8, a bad timeout, an object that is not a small one in an arena this
 * process has mapped, or is free, or counts the most roots it may, a region not handed
 * over to the reader, a sequence word odd (the region's, or that of the span records of
 * the object's arena), a number out of bounds, a new name that needs a rebuilt table or
 * memory for its name.  Then roots.py's Python path decides, with its errors.  The bound
 * object's root count goes up in one compare-and-swap: a free() racing the bind (its own
 * 1 -> 0 compare-and-swap, in Free) makes one of the two fail. */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    RootReader *reader;      /* the table's header and the regions mapped */
    Lock *lock;              /* the heap lock; NULL while crash points are armed */
    Pin *control;            /* the control segment: the journal and the destroyed word */
    Free *free;              /* the allocator's: its arenas mapped and class tables */
    PyObject *reach;         /* crash.reach while a crash point is armed, else NULL */
    long max_roots;          /* allocator.MAX_ROOTS_PER_OBJECT */
} RootWriter;

/* A located small object (writer_locate): its arena's record (a reference) and slot. */
typedef struct {
    Record *rec;
    unsigned char *alloc, *mark;
    uint32_t *holder;
    Py_ssize_t start;
} RootObject;

static void
root_object_clear(RootObject *obj)
{
    Py_CLEAR(obj->rec);
}

/* The small object at ``ref`` in an arena this process has mapped (free_locate), in a span
 * laid out whole as its class says (the writer stores more than the alloc byte): 1 located
 * (allocated or not: see its alloc byte), 0 unsure, -1 exception. */
static int
writer_locate(RootWriter *self, uint64_t ref, RootObject *out)
{
    Free *free = self->free;
    Record *rec;
    Py_ssize_t start;
    unsigned char c;
    long long slot;
    int found = free_locate(free, (long long)ref, &rec, &start, &c, &slot);
    if (found <= 0)
        return found;
    Py_ssize_t page = (Py_ssize_t)(((long long)ref & free->arena_mask) >> free->page_shift);
    Py_ssize_t npages = free->npages[c];
    if ((Py_ssize_t)LOAD(rec->npages + start) != npages || start + npages > rec->pages
            || page >= start + npages
            || (Py_ssize_t)LOAD(rec->span + start + npages - 1) != start + 1)
        return 0;
    unsigned char *a0 = rec->data + ((long long)start << free->page_shift);
    Py_INCREF(rec);
    out->rec = rec;
    out->alloc = a0 + slot;
    out->mark = a0 + free->nelems[c] + slot;
    out->holder = (uint32_t *)(a0 + free->holder_at[c] + SPAN_HOLDER_SIZE * slot);
    out->start = start;
    return 1;
}

/* allocator.set_root_count's last steps: the object's mark byte and its span's pageMarks
 * bit (its alloc byte is the caller's). */
static void
root_object_mark(RootObject *obj)
{
    STORE(obj->mark, (unsigned char)1);
    __atomic_or_fetch(obj->rec->marks + (obj->start >> 3),
                      (unsigned char)(1 << (obj->start & 7)), __ATOMIC_ACQ_REL);
}

static int
writer_reach(RootWriter *self, const char *point)
{
    if (self->reach == NULL)
        return 0;
    PyObject *done = PyObject_CallFunction(self->reach, "s", point);
    Py_XDECREF(done);
    return done == NULL ? -1 : 0;
}

#define ROOT_UNSURE 2

/* _bind_locked (the writable lock holder): 1 done, 0 nothing to unbind, ROOT_UNSURE (nothing
 * changed), -1 exception (from a crash point: the journal says ROOTS, as the twin leaves it). */
static int
writer_bind_held(RootWriter *self, const char *name, Py_ssize_t len, uint64_t ref,
                 uint32_t holder)
{
    RootReader *reader = self->reader;
    if (self->control == NULL)
        return ROOT_UNSURE;  /* closed */
    unsigned char *control = (unsigned char *)self->control->view.buf;
    if (LOAD((uint64_t *)(control + CONTROL_DESTROYED_OFFSET)) || !reader->have_header)
        return ROOT_UNSURE;  /* roots.py raises HeapNotFoundError (or HeapClosedError) */
    uint64_t *head = (uint64_t *)reader->header.buf;
    uint64_t number = LOAD(head + ROOTS_TABLE_OFFSET / 8);
    if (number >= ROOTS_REGIONS || !(LOAD(head + ROOTS_BUILT_OFFSET / 8) >> number & 1)
            || reader->base[number] == NULL)
        return ROOT_UNSURE;
    unsigned char *region = reader->base[number];
    uint64_t *seq = (uint64_t *)(region + ROOTS_SEQ_OFFSET);
    uint64_t *live = (uint64_t *)(region + ROOTS_LIVE_OFFSET);
    uint64_t *used = (uint64_t *)(region + ROOTS_USED_OFFSET);
    uint64_t *names_end = (uint64_t *)(region + ROOTS_NAMES_END_OFFSET);
    uint64_t cap = (uint64_t)ROOTS_FIRST_CAP << (number >> 1);
    uint64_t names_cap = (uint64_t)ROOTS_NAME_BYTES_PER_SLOT * cap;
    uint64_t *slots = (uint64_t *)(region + ROOTS_REGION_HEADER);
    unsigned char *names = region + ROOTS_REGION_HEADER + ROOTS_SLOT_BYTES * cap;
    if (LOAD(seq) & 1)
        return ROOT_UNSURE;
    RootObject new_obj = {0}, old_obj = {0};
    int result = ROOT_UNSURE;
    unsigned char new_count = 0, old_count = 0;
    if (ref) {
        int found = writer_locate(self, ref, &new_obj);
        if (found <= 0)
            return found < 0 ? -1 : ROOT_UNSURE;
        unsigned char a = LOAD(new_obj.alloc);
        if (!a || a - 1 >= self->max_roots)
            goto out;  /* a freed object, or one bound to the most roots: Python says so */
        new_count = a - 1;
    }
    uint64_t h = crc32_of((const unsigned char *)name, len);
    int64_t i = root_find(region, number, name, len, h);
    if (i == ROOT_GARBAGE)
        goto out;
    uint64_t old = i >= 0 ? LOAD(&slots[2 * i + 1]) : 0;
    if (old == ref) {
        result = ref != 0;
        goto out;
    }
    uint64_t end = LOAD(names_end);
    uint64_t record = ((uint64_t)len + 7) & ~(uint64_t)7;
    if (i < 0) {
        /* needs_room, or a name past the memory it is known to have (the page holding the
         * last name byte, or the slots below): roots.py rebuilds or reserves */
        uint64_t at = ROOTS_REGION_HEADER + ROOTS_SLOT_BYTES * cap + end;  /* in the region */
        uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
        if (LOAD(used) >= cap / 2 || end > names_cap || record > names_cap - end
                || (at - 1) / page != (at + record - 1) / page)  /* (no sum that can wrap) */
            goto out;
    }
    if (old) {
        int found = writer_locate(self, old, &old_obj);
        if (found <= 0) {
            result = found < 0 ? -1 : ROOT_UNSURE;
            goto out;
        }
        unsigned char a = LOAD(old_obj.alloc);
        if (a)
            old_count = a - 1;
        else
            root_object_clear(&old_obj);  /* freed: no root count to change (as _located) */
    }
    uint64_t slot = i >= 0 ? (uint64_t)i : (uint64_t)~i;
    uint64_t key = i >= 0 ? LOAD(&slots[2 * i]) : h << 32 | (uint64_t)len << 24 | end >> 3;
    uint64_t intent[ROOTS_INTENT_WORDS] = {
        i >= 0 ? ROOTS_UPDATE : ROOTS_INSERT, number, slot, key, ref, old, LOAD(live),
        LOAD(used), end, new_count, old_count};
    for (int w = 0; w < ROOTS_INTENT_WORDS; w++)
        STORE(head + ROOTS_INTENT_OFFSET / 8 + w, intent[w]);
    uint64_t *journal = (uint64_t *)(control + CONTROL_JOURNAL_OFFSET);
    STORE((uint64_t *)(control + CONTROL_JOURNAL_ARG_OFFSET), (uint64_t)0);
    STORE(journal, (uint64_t)CONTROL_ROOTS_OP << 56 | 1);
    uint64_t begun = LOAD(seq);
    STORE(seq, (begun + 1) | 1);
    result = -1;
    if (ref) {
        unsigned char expected = new_count + 1;
        if (!__atomic_compare_exchange_n(new_obj.alloc, &expected,
                                         (unsigned char)(new_count + 2), 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE)) {
            /* freed just now, by a free() racing this bind: undo the journal's start (nothing
             * else changed) and let roots.py say InvalidRefError */
            STORE(seq, LOAD(seq) + 1);
            STORE(journal, (uint64_t)0);
            result = ROOT_UNSURE;
            goto out;
        }
        root_object_mark(&new_obj);
        if (writer_reach(self, "roots.counted") < 0)
            goto out;
    }
    if (i < 0) {
        memcpy(names + end, name, (size_t)len);
        STORE(&slots[2 * slot + 1], ref);
        STORE(names_end, end + record);
        if (writer_reach(self, "roots.entry_written") < 0)
            goto out;
        STORE(&slots[2 * slot], key);
        if (writer_reach(self, "roots.published") < 0)
            goto out;
        STORE(used, LOAD(used) + 1);
    }
    else {
        STORE(&slots[2 * slot + 1], ref);
        if (writer_reach(self, ref ? "roots.published" : "roots.removed") < 0)
            goto out;
    }
    STORE(live, LOAD(live) + (ref ? 1 : 0) - (old ? 1 : 0));
    if (old_obj.rec != NULL) {
        /* 1 + (its count - 1, at least 0); unless a free() took it meanwhile (a count of 0
         * it should not have had: fsck's finding) */
        unsigned char expected = old_count + 1;
        __atomic_compare_exchange_n(old_obj.alloc, &expected,
                                    (unsigned char)(old_count ? old_count : 1), 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
        root_object_mark(&old_obj);
    }
    if (ref && !new_count)
        STORE(new_obj.holder, (uint32_t)0);  /* HELD: its root holds it now, not its maker */
    if (old_obj.rec != NULL && old_count == 1)
        STORE(old_obj.holder, holder);  /* whoever unbinds it owns it */
    if (writer_reach(self, "roots.handed_over") < 0)
        goto out;
    if (LOAD(seq) & 1)
        STORE(seq, LOAD(seq) + 1);
    STORE(journal, (uint64_t)0);
    result = 1;
out:
    root_object_clear(&new_obj);
    root_object_clear(&old_obj);
    return result;
}

/* The name and ref arguments (ref None: an unbind): 1 parsed, 0 unsure (roots.py's Python
 * path says what is wrong), -1 exception. */
static int
writer_args(PyObject *name_arg, PyObject *ref_arg, const char **name, Py_ssize_t *len,
            uint64_t *ref)
{
    if (!PyUnicode_CheckExact(name_arg) || (ref_arg != Py_None && !PyLong_CheckExact(ref_arg)))
        return 0;
    *name = PyUnicode_AsUTF8AndSize(name_arg, len);
    if (*name == NULL) {
        PyErr_Clear();  /* not UTF-8 (a lone surrogate) */
        return 0;
    }
    if (*len < 1 || *len > ROOTS_MAX_NAME)
        return 0;
    if (ref_arg == Py_None) {
        *ref = 0;  /* an unbind */
        return 1;
    }
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(ref_arg, &overflow);
    if (value <= 0 || overflow) {
        PyErr_Clear();
        return 0;
    }
    *ref = (uint64_t)value;
    return 1;
}

static PyObject *
root_answer(int done)
{
    if (done < 0)
        return NULL;
    if (done == ROOT_UNSURE)
        Py_RETURN_NONE;
    return PyBool_FromLong(done);
}

typedef struct {
    RootWriter *writer;
    const char *name;
    Py_ssize_t len;
    uint64_t ref;
} RootChange;

static PyObject *
writer_body(void *arg)
{
    RootChange *change = (RootChange *)arg;
    Lock *lock = change->writer->lock;
    uint32_t holder = holder_of(lock->token);
    return root_answer(writer_bind_held(change->writer, change->name, change->len, change->ref,
                                        holder));
}

static PyObject *
RootWriter_call(RootWriter *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    /* writer(name, ref, timeout): ref None unbinds */
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    RootChange change = {self, NULL, 0, 0};
    if (nargs != 3 || kwnames != NULL || self->lock == NULL)
        Py_RETURN_NONE;
    int parsed = writer_args(args[0], args[1], &change.name, &change.len, &change.ref);
    int has_deadline;
    double deadline = 0;
    if (parsed <= 0 || !timeout_ok(args, nargs, NULL, 2, &has_deadline, &deadline))
        return parsed < 0 ? NULL : Py_NewRef(Py_None);
    return lock_run_with(self->lock, writer_body, &change, has_deadline, deadline, 1);
}

static PyObject *
RootWriter_held(RootWriter *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* held(name, ref, holder): the change for a writable holder of the lock */
    RootChange change = {self, NULL, 0, 0};
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "held(name, ref, holder)");
        return NULL;
    }
    int parsed = writer_args(args[0], args[1], &change.name, &change.len, &change.ref);
    if (parsed <= 0)
        return parsed < 0 ? NULL : Py_NewRef(Py_None);
    unsigned long holder = PyLong_AsUnsignedLong(args[2]);
    if (holder == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    return root_answer(writer_bind_held(self, change.name, change.len, change.ref,
                                        (uint32_t)holder));
}

static int
RootWriter_init(RootWriter *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"reader", "lock", "control", "free", "max_roots", "reach", NULL};
    PyObject *reader, *lock, *control, *free, *reach = NULL;
    long max_roots;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OOO!l|O", names, &RootReaderType,
                                     &reader, &lock, &control, &FreeType, &free, &max_roots,
                                     &reach))
        return -1;
    if (self->reader != NULL) {
        PyErr_SetString(PyExc_TypeError, "RootWriter is initialised already");
        return -1;
    }
    if (lock != Py_None && !Py_IS_TYPE(lock, &LockType)) {
        PyErr_SetString(PyExc_TypeError, "RootWriter: lock is a native Lock or None");
        return -1;
    }
    self->control = pin_new(control, PyBUF_WRITABLE);
    if (self->control == NULL)
        return -1;
    if (self->control->view.len < CONTROL_DESTROYED_OFFSET + 8) {
        PyErr_SetString(PyExc_ValueError, "RootWriter: the control segment is too short");
        return -1;
    }
    self->reader = (RootReader *)Py_NewRef(reader);
    self->lock = lock == Py_None ? NULL : (Lock *)Py_NewRef(lock);
    self->free = (Free *)Py_NewRef(free);
    self->reach = reach == NULL || reach == Py_None ? NULL : Py_NewRef(reach);
    self->max_roots = max_roots;
    self->vectorcall = (vectorcallfunc)RootWriter_call;
    return 0;
}

static PyObject *
RootWriter_close(RootWriter *self, PyObject *Py_UNUSED(ignored))
{
    /* let go of the control segment and the lock: every later call answers None */
    Py_CLEAR(self->control);
    Py_CLEAR(self->lock);
    Py_RETURN_NONE;
}

static int
RootWriter_traverse(RootWriter *self, visitproc visit, void *arg)
{
    Py_VISIT(self->reader);
    Py_VISIT(self->lock);
    Py_VISIT(self->control);
    Py_VISIT(self->free);
    Py_VISIT(self->reach);
    return 0;
}

static int
RootWriter_clear(RootWriter *self)
{
    /* control first: with it gone every call answers None before it looks at the rest */
    Py_XDECREF(RootWriter_close(self, NULL));
    Py_CLEAR(self->reader);
    Py_CLEAR(self->free);
    Py_CLEAR(self->reach);
    return 0;
}

static void
RootWriter_dealloc(RootWriter *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->reader);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->control);
    Py_CLEAR(self->free);
    Py_CLEAR(self->reach);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef RootWriter_methods[] = {
    {"held", (PyCFunction)(void (*)(void))RootWriter_held, METH_FASTCALL,
     "held(name, ref, holder): the bind (ref None: unbind) for a writable holder of the lock"},
    {"close", (PyCFunction)RootWriter_close, METH_NOARGS,
     "let go of the control segment and the lock"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RootWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmheap._native.RootWriter",
    .tp_basicsize = sizeof(RootWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "RootWriter(reader, lock, control, free, max_roots, reach): writer(name, ref, "
              "timeout) -> True, False (nothing to unbind) or None if unsure (roots.py's "
              "_bind_locked decides).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RootWriter_init,
    .tp_dealloc = (destructor)RootWriter_dealloc,
    .tp_traverse = (traverseproc)RootWriter_traverse,
    .tp_clear = (inquiry)RootWriter_clear,
    .tp_methods = RootWriter_methods,
    .tp_vectorcall_offset = offsetof(RootWriter, vectorcall),
    .tp_call = PyVectorcall_Call,
};

static PyMethodDef native_functions[] = {
    {"futex_wait", (PyCFunction)(void (*)(void))native_futex_wait, METH_FASTCALL,
     "futex_wait(word, seen, seconds) -> False if the time ran out"},
    {"futex_wake", (PyCFunction)native_futex_wake, METH_O, "futex_wake(word)"},
    {"rename_noreplace", (PyCFunction)(void (*)(void))native_rename_noreplace, METH_FASTCALL,
     "rename_noreplace(old, new) -> False if new exists (renameat2 RENAME_NOREPLACE)"},
    {"nonzero_every", (PyCFunction)(void (*)(void))native_nonzero_every, METH_FASTCALL,
     "nonzero_every(buffer, start, stride, count) -> the i whose byte start + i * stride is "
     "not 0"},
    {NULL, NULL, 0, NULL},
};

static int
add_layout(PyObject *module)
{
    PyObject *layout = Py_BuildValue(
        "{sisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisi}",
        "LIVE_OWNER_OFFSET", LIVE_OWNER_OFFSET,
        "LIVE_WAITER_OFFSET", LIVE_WAITER_OFFSET,
        "LIVE_RECOVERIES_OFFSET", LIVE_RECOVERIES_OFFSET,
        "LIVE_LAST_RECOVERY_OFFSET", LIVE_LAST_RECOVERY_OFFSET,
        "LIVE_REPAIRS_OFFSET", LIVE_REPAIRS_OFFSET,
        "LIVE_LOCK_SEQ_OFFSET", LIVE_LOCK_SEQ_OFFSET,
        "LIVE_SLOTS_OFFSET", LIVE_SLOTS_OFFSET,
        "LIVE_SLOT_SIZE", LIVE_SLOT_SIZE,
        "LIVE_SLOT_PID", LIVE_SLOT_PID,
        "LIVE_SLOT_EPOCH", LIVE_SLOT_EPOCH,
        "LIVE_REPAIR_BYTE", LIVE_REPAIR_BYTE,
        "CONTROL_HEADER_OFFSET", CONTROL_HEADER_OFFSET,
        "CONTROL_JOURNAL_OFFSET", CONTROL_JOURNAL_OFFSET,
        "CONTROL_JOURNAL_ARG_OFFSET", CONTROL_JOURNAL_ARG_OFFSET,
        "CONTROL_DESTROYED_OFFSET", CONTROL_DESTROYED_OFFSET,
        "CONTROL_ROOTS_OP", CONTROL_ROOTS_OP,
        "CONTROL_COORD_OP", CONTROL_COORD_OP,
        "COORD_HEADER_WORDS", COORD_HEADER_WORDS,
        "COORD_RECORD_WORDS", COORD_RECORD_WORDS,
        "COORD_RECORDS", COORD_RECORDS,
        "COORD_FUTEX", COORD_FUTEX,
        "COORD_PARAM", COORD_PARAM,
        "COORD_HEAD", COORD_HEAD,
        "COORD_INTENT", COORD_INTENT,
        "COORD_OP_PUT", COORD_OP_PUT,
        "COORD_OP_TAKE", COORD_OP_TAKE,
        "COORD_NODE_HEADER", COORD_NODE_HEADER,
        "COORD_KIND_INT", COORD_KIND_INT,
        "COORD_KIND_PICKLE", COORD_KIND_PICKLE,
        "META_SEQ_OFFSET", META_SEQ_OFFSET,
        "SPAN_HOLDER_SIZE", SPAN_HOLDER_SIZE,
        "ROOTS_TABLE_OFFSET", ROOTS_TABLE_OFFSET,
        "ROOTS_BUILT_OFFSET", ROOTS_BUILT_OFFSET,
        "ROOTS_INTENT_OFFSET", ROOTS_INTENT_OFFSET,
        "ROOTS_INTENT_WORDS", ROOTS_INTENT_WORDS,
        "ROOTS_INSERT", ROOTS_INSERT,
        "ROOTS_UPDATE", ROOTS_UPDATE,
        "ROOTS_REGIONS", ROOTS_REGIONS,
        "ROOTS_FIRST_CAP", ROOTS_FIRST_CAP,
        "ROOTS_REGION_HEADER", ROOTS_REGION_HEADER,
        "ROOTS_SEQ_OFFSET", ROOTS_SEQ_OFFSET,
        "ROOTS_LIVE_OFFSET", ROOTS_LIVE_OFFSET,
        "ROOTS_USED_OFFSET", ROOTS_USED_OFFSET,
        "ROOTS_NAMES_END_OFFSET", ROOTS_NAMES_END_OFFSET,
        "ROOTS_SLOT_BYTES", ROOTS_SLOT_BYTES,
        "ROOTS_NAME_BYTES_PER_SLOT", ROOTS_NAME_BYTES_PER_SLOT,
        "ROOTS_MAX_NAME", ROOTS_MAX_NAME);
    if (layout == NULL)
        return -1;
    return PyModule_AddObject(module, "LAYOUT", layout);
}

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmheap._native",
    .m_doc = "shmheap's native core: the lock, snapshots and the allocator's fast paths in C.",
    .m_size = -1,
    .m_methods = native_functions,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    PyTypeObject *types[] = {&PinType, &MutexType, &LockType, &SnapType, &SnapIterType,
                             &SnapshotsType, &CacheType, &AllocType, &RecordType, &FreeType,
                             &MappingType, &CounterType, &NQueueType, &RootReaderType,
                             &RootWriterType};
    crc32_init();
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (PyType_Ready(types[i]) < 0)
            return NULL;
    PyObject *module = PyModule_Create(&native_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Mutex", (PyObject *)&MutexType) < 0
            || PyModule_AddObjectRef(module, "Lock", (PyObject *)&LockType) < 0
            || PyModule_AddObjectRef(module, "ArenaSnapshot", (PyObject *)&SnapType) < 0
            || PyModule_AddObjectRef(module, "Snapshots", (PyObject *)&SnapshotsType) < 0
            || PyModule_AddObjectRef(module, "Cache", (PyObject *)&CacheType) < 0
            || PyModule_AddObjectRef(module, "Alloc", (PyObject *)&AllocType) < 0
            || PyModule_AddObjectRef(module, "Record", (PyObject *)&RecordType) < 0
            || PyModule_AddObjectRef(module, "Free", (PyObject *)&FreeType) < 0
            || PyModule_AddObjectRef(module, "Mapping", (PyObject *)&MappingType) < 0
            || PyModule_AddObjectRef(module, "Counter", (PyObject *)&CounterType) < 0
            || PyModule_AddObjectRef(module, "Queue", (PyObject *)&NQueueType) < 0
            || PyModule_AddObjectRef(module, "RootReader", (PyObject *)&RootReaderType) < 0
            || PyModule_AddObjectRef(module, "RootWriter", (PyObject *)&RootWriterType) < 0
            || add_layout(module) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
