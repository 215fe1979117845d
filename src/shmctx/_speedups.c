/* shmctx._speedups: the hot path in C, as a shortcut in front of the Python one.
 *
 * ContextManager.get_or_create_context / get_context / return_context are ``front``
 * descriptors (below): for a manager that chose this hot path they run HotPath's try_get
 * or try_return, which follow the numbered protocol of _hotpath.py (steps G0-G8,
 * R0-R6, L1-L3, cited at each step here, the same writes in the same order as
 * PyHotPath and _lock.RobustLock), or change nothing in the table but a stripe lock's
 * epoch (see test_differential.py) and call the Python method, which has the full semantics: a
 * busy stripe lock (spinning, waiting, taking over from a dead owner), a stale mapping,
 * the reference limit, armed failpoints, any error. So every decision beyond the common
 * case stays in Python, in one place.
 *
 * Why it exists: in pure Python the crash-safe pair (owner record, slot check,
 * per-process count, refcount, last-used stamp, handle) costs about 3x a bare semaphore
 * around one struct write (docs/performance.md); here it costs less than that floor.
 *
 * Offsets and sizes come from _layout.h, generated from _layout.py (the one
 * description of the table). The widths the code below reads and writes are checked
 * against it when this file is compiled, and HotPath refuses a table whose header does
 * not carry the fingerprint of the layout it was compiled with (LAYOUT_FINGERPRINT,
 * which the Python side compares with its own before it uses this module).
 * No Python code runs while a stripe semaphore is held here, so the GIL makes the
 * critical section atomic towards this process's other threads, as in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "_layout.h"

/* The widths rd32/rd64/wr32/wr64 below assume: a layout that changes one fails to
 * compile here rather than misreads the table. */
_Static_assert(SHMCTX_LOCK_PID_SIZE == 4 && SHMCTX_LOCK_EPOCH_SIZE == 4 &&
               SHMCTX_LOCK_START_SIZE == 8, "lock record: u32 pid, u32 epoch, u64 start");
_Static_assert(SHMCTX_SLOT_STATE_SIZE == 1 && SHMCTX_SLOT_REFCOUNT_SIZE == 4 &&
               SHMCTX_SLOT_INCARNATION_SIZE == 8 && SHMCTX_SLOT_LAST_USED_SIZE == 8,
               "slot: u8 state, u32 refcount, u64 incarnation, f64 last used");
_Static_assert(SHMCTX_REF_SIZE == 4 && SHMCTX_REF_COUNT_OFF == 0 && SHMCTX_REF_COUNT_SIZE == 4,
               "reference counts: one u32 per slot in each process entry's row");
/* The owner pid is stored with one aligned atomic store (lock_try). */
_Static_assert((SHMCTX_LOCKS_OFF + SHMCTX_LOCK_PID_OFF) % 4 == 0 && SHMCTX_LOCK_STRIDE % 4 == 0,
               "lock records' pids are 4-byte aligned");

/* Lock record k of the table: 0 the table lock, 1 + stripe for a stripe lock. */
#define LOCK_RECORD_OFF(k) (SHMCTX_LOCKS_OFF + SHMCTX_LOCK_STRIDE * (Py_ssize_t)(k))

typedef struct {
    PyObject_HEAD
    int enabled;
    int have_buffer;
    Py_buffer table;
    Py_ssize_t nstripes;
    sem_t **sems;
    uint32_t max_refs;
    Py_ssize_t capacity;  /* slots of the table (its header), so columns of its rows */
    /* this process, set by enable() once its process entry is registered */
    uint32_t pid;
    uint64_t start;
    Py_ssize_t row_off;   /* its row of reference counts: its count for slot s at + 4 s */
    PyObject *pid_obj;
    PyObject *mapped;   /* Mappings.mapped: name -> _Mapped */
    PyObject *owner;    /* the handles' owner: the Mappings object (``_context.HandleOwner``) */
    PyObject *handle_type;
    PyObject *d_owner, *d_mapped, *d_pid, *d_returned, *d_view; /* slot descriptors */
    PyObject *failpoints; /* _failpoints module dict: the "armed" flag */
    PyObject *dropped;    /* the owner's list of handles dropped unreturned */
} HotPath;

static PyObject *str_hot, *str_armed, *str_release_view, *str_dropped, *str_closed;

static int
descr_set(PyObject *descr, PyObject *obj, PyObject *value)
{
    return Py_TYPE(descr)->tp_descr_set(descr, obj, value);
}

static PyObject *
descr_get(PyObject *descr, PyObject *obj)
{
    return Py_TYPE(descr)->tp_descr_get(descr, obj, (PyObject *)Py_TYPE(obj));
}

static inline uint32_t
rd32(const char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t
rd64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline void
wr32(char *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

static inline void
wr64(char *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

/* How long a busy stripe is retried here before Python takes over (and, after its own
 * yields, sleeps in the kernel). A holder keeps a stripe for about 100 ns, so a short
 * spin usually wins; on a busy machine the holder may be runnable but not running, so
 * yielding the CPU comes next, as in RobustLock._spin. Bounded: the holder may be
 * another thread of this process, which needs the GIL that this loop keeps. */
#define SPIN_PAUSES 64
#define SPIN_YIELDS 4

static inline void
cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int
sem_take(sem_t *sem)
{
    if (sem_trywait(sem) == 0)
        return 1;
    for (int i = 0; i < SPIN_PAUSES; i++) {
        cpu_relax();
        if (sem_trywait(sem) == 0)
            return 1;
    }
    for (int i = 0; i < SPIN_YIELDS; i++) {
        sched_yield();
        if (sem_trywait(sem) == 0)
            return 1;
    }
    return 0;
}

/* RobustLock.acquire without its slow path: take the semaphore, then write the owner
 * record. Returns 0 if the semaphore stays taken: the caller defers to Python, which
 * waits properly (and takes the lock over from a dead owner).
 * ``enabled`` is checked here, after the caller's last step that can run Python code (an
 * allocation may start a collection whose finalizers, or another thread given the GIL,
 * close the manager, which frees ``sems`` and the buffer, or fork), and nothing between
 * this check and the table writes can run any. */
static int
lock_try(HotPath *self, Py_ssize_t stripe)
{
    if (!self->enabled || !sem_take(self->sems[stripe]))
        return 0;
    char *rec = (char *)self->table.buf + LOCK_RECORD_OFF(1 + stripe);
    uint32_t epoch = rd32(rec + SHMCTX_LOCK_EPOCH_OFF);
    wr32(rec + SHMCTX_LOCK_EPOCH_OFF, epoch + 1);
    wr64(rec + SHMCTX_LOCK_START_OFF, self->start);
    /* The pid last, in one aligned store the compiler may not move before the two
     * above: waiters and the sweeper read the record without the lock, and a pid beside
     * an epoch or start time nobody wrote with it would be judged wrongly. (Lock
     * records are 64-byte aligned: _layout.py.) */
    __atomic_store_n((uint32_t *)(rec + SHMCTX_LOCK_PID_OFF), self->pid, __ATOMIC_RELEASE);
    return 1;
}

/* RobustLock.release: clear the owner, then post. */
static void
lock_release(HotPath *self, Py_ssize_t stripe)
{
    wr32((char *)self->table.buf + LOCK_RECORD_OFF(1 + stripe) + SHMCTX_LOCK_PID_OFF, 0);
    sem_post(self->sems[stripe]);
}

static int
failpoints_armed(HotPath *self)
{
    PyObject *v = PyDict_GetItemWithError(self->failpoints, str_armed);
    return v == NULL || PyObject_IsTrue(v) != 0;
}

typedef struct {
    Py_ssize_t slot_off, stripe, ref_off;
    uint64_t inc;
} Where;

/* Where mapping ``m`` lives in the table, from its ``hot`` tuple (slot offset, stripe,
 * incarnation, slot): the slot, and this process's count for it, found by position in
 * its row (no lookup). 0: defer. */
static int
locate(HotPath *self, PyObject *m, Where *w)
{
    PyObject *hot = PyObject_GetAttr(m, str_hot);
    if (hot == NULL) {
        PyErr_Clear();
        return 0;
    }
    int ok = 0;
    if (PyTuple_CheckExact(hot) && PyTuple_GET_SIZE(hot) == 4) {
        Py_ssize_t off = PyLong_AsSsize_t(PyTuple_GET_ITEM(hot, 0));
        Py_ssize_t stripe = PyLong_AsSsize_t(PyTuple_GET_ITEM(hot, 1));
        unsigned long long inc = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(hot, 2));
        Py_ssize_t s = PyLong_AsSsize_t(PyTuple_GET_ITEM(hot, 3));
        /* A slot within the capacity keeps the count inside the row, which enable()
         * checked lies inside the table. */
        if (!PyErr_Occurred() && off >= 0 && off + SHMCTX_SLOT_SIZE <= self->table.len &&
            stripe >= 0 && stripe < self->nstripes && s >= 0 && s < self->capacity) {
            w->slot_off = off;
            w->stripe = stripe;
            w->inc = inc;
            w->ref_off = self->row_off + SHMCTX_REF_SIZE * s;
            ok = 1;
        }
        PyErr_Clear();
    }
    Py_DECREF(hot);
    return ok;
}

/* A new MemoryContext for mapping ``m``, made as MemoryContext.__init__ makes it, but
 * marked returned: it stands for no reference until try_get has counted one, so that
 * dropping it on the way to deferring does not queue a reference to give back
 * (handle_finalize). */
static PyObject *
new_handle(HotPath *self, PyObject *m)
{
    PyTypeObject *tp = (PyTypeObject *)self->handle_type;
    PyObject *h = tp->tp_alloc(tp, 0);
    if (h == NULL)
        return NULL;
    if (descr_set(self->d_owner, h, self->owner) < 0 ||
        descr_set(self->d_mapped, h, m) < 0 ||
        descr_set(self->d_pid, h, self->pid_obj) < 0 ||
        descr_set(self->d_returned, h, Py_True) < 0 ||
        descr_set(self->d_view, h, Py_None) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    return h;
}

/* Step G4's test: another incarnation, not READY, superseded by a newer version (the
 * name now means that one: the cold path finds it), or the reference limit reached. */
static int
get_defers(HotPath *self, const char *so, const Where *w)
{
    uint32_t rc = rd32(so + SHMCTX_SLOT_REFCOUNT_OFF);
    return rd64(so + SHMCTX_SLOT_INCARNATION_OFF) != w->inc ||
           (unsigned char)so[SHMCTX_SLOT_STATE_OFF] != SHMCTX_READY ||
           ((unsigned char)so[SHMCTX_SLOT_FLAGS_OFF] & SHMCTX_SLOT_SUPERSEDED) ||
           (self->max_refs && rc >= self->max_refs);
}

/* Get, steps G0-G8 of the protocol in _hotpath.py (PyHotPath.try_get does the same in
 * Python). New handle; NULL without an error: defer to Python. */
static PyObject *
try_get(HotPath *self, PyObject *name)
{
    if (!self->enabled || !PyUnicode_CheckExact(name) || failpoints_armed(self) ||
        PyList_GET_SIZE(self->dropped)) {  /* G0: Python gives dropped references back first */
        PyErr_Clear();
        return NULL;
    }
    PyObject *m = PyDict_GetItemWithError(self->mapped, name);  /* G1 */
    if (m == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_INCREF(m);
    Where w;
    /* G2: the handle is made first: once the counts are written nothing may fail. Making
     * it may run a collection (see lock_try), so the slot is located after it. G3: the
     * stripe lock. */
    PyObject *h = new_handle(self, m);
    if (h == NULL || !locate(self, m, &w))
        goto defer;
    char *so = (char *)self->table.buf + w.slot_off;
    char *ref = (char *)self->table.buf + w.ref_off;
    /* G4 read once before G3 as well, without the lock: a case that will defer defers
     * before taking the stripe lock, so that the Python method it defers to takes that
     * lock as often as the Python path does (the lock's epoch, which counts takes, then
     * ends equal on both). Only the read under the lock decides. */
    if (get_defers(self, so, &w) || !lock_try(self, w.stripe))
        goto defer;
    uint32_t rc = rd32(so + SHMCTX_SLOT_REFCOUNT_OFF);  /* G4 */
    if (get_defers(self, so, &w)) {
        lock_release(self, w.stripe);
        goto defer;
    }
    /* G5 the per-process count first (this process's row, the slot's column), G6 then
     * the refcount: the order Slots.add_ref keeps, so that a death in between is
     * repaired from the per-process counts. */
    wr32(ref + SHMCTX_REF_COUNT_OFF, rd32(ref + SHMCTX_REF_COUNT_OFF) + 1);
    wr32(so + SHMCTX_SLOT_REFCOUNT_OFF, rc + 1);
    lock_release(self, w.stripe);  /* G7 */
    /* G8: now it stands for the reference. Setting a slot runs no Python code, so nothing
     * (no signal handler, no other thread) can come between the count and this. */
    descr_set(self->d_returned, h, Py_False);
    Py_DECREF(m);
    return h;
defer:
    PyErr_Clear();
    Py_XDECREF(h);
    Py_DECREF(m);
    return NULL;
}

/* The arguments leave get_or_create_context on its hot path: a name, and config and
 * timeout None (by position or keyword), as in ContextManager.get_or_create_context;
 * init only matters when the context is created. Anything else: let Python judge it. */
static int
hot_arguments(PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1 || nargs > 2 || (nargs == 2 && args[1] != Py_None))
        return 0;
    if (kwnames == NULL)
        return 1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
        PyObject *kw = PyTuple_GET_ITEM(kwnames, i);
        PyObject *value = args[nargs + i];
        if (PyUnicode_CompareWithASCIIString(kw, "init") == 0)
            continue;
        if (value != Py_None || (PyUnicode_CompareWithASCIIString(kw, "timeout") != 0 &&
                                 (nargs == 2 ||
                                  PyUnicode_CompareWithASCIIString(kw, "config") != 0)))
            return 0;
    }
    return 1;
}

/* Step R3's test: another incarnation or FREE (closed since), or no count of this
 * process to give back; and C leaves a superseded version's returns to Python, which
 * frees it with its last reference. */
static int
return_defers(const char *so, const char *ref, const Where *w)
{
    return rd64(so + SHMCTX_SLOT_INCARNATION_OFF) != w->inc ||
           (unsigned char)so[SHMCTX_SLOT_STATE_OFF] == SHMCTX_FREE ||
           ((unsigned char)so[SHMCTX_SLOT_FLAGS_OFF] & SHMCTX_SLOT_SUPERSEDED) ||
           rd32(ref + SHMCTX_REF_COUNT_OFF) == 0;
}

/* Return, steps R0-R5 of the protocol in _hotpath.py (PyHotPath.try_return in Python;
 * R6, the view, is finish_return). 1 done, 0 defer. */
static int
try_return(HotPath *self, PyObject *ctx)
{
    if (!self->enabled || (PyObject *)Py_TYPE(ctx) != self->handle_type ||
        failpoints_armed(self) || PyList_GET_SIZE(self->dropped)) {  /* R0 */
        PyErr_Clear();
        return 0;
    }
    PyObject *owner = NULL, *pid = NULL, *returned = NULL, *m = NULL;
    int done = 0;
    Where w;
    if ((owner = descr_get(self->d_owner, ctx)) == NULL ||
        (pid = descr_get(self->d_pid, ctx)) == NULL ||
        (returned = descr_get(self->d_returned, ctx)) == NULL ||
        (m = descr_get(self->d_mapped, ctx)) == NULL)
        goto out;
    if (owner != self->owner || returned != Py_False ||  /* R1 */
        PyObject_RichCompareBool(pid, self->pid_obj, Py_EQ) != 1 || !locate(self, m, &w))
        goto out;
    char *so = (char *)self->table.buf + w.slot_off;
    char *ref = (char *)self->table.buf + w.ref_off;
    /* R3 read once before R2 as well, without the lock, for the reason given at G4. */
    if (return_defers(so, ref, &w) || !lock_try(self, w.stripe))  /* R2 */
        goto out;
    uint32_t count = rd32(ref + SHMCTX_REF_COUNT_OFF);  /* R3, then R4: marked returned */
    if (return_defers(so, ref, &w) || descr_set(self->d_returned, ctx, Py_True) < 0) {
        lock_release(self, w.stripe);
        goto out;
    }
    uint32_t rc = rd32(so + SHMCTX_SLOT_REFCOUNT_OFF);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    wr32(ref + SHMCTX_REF_COUNT_OFF, count - 1);  /* R5 */
    wr32(so + SHMCTX_SLOT_REFCOUNT_OFF, rc ? rc - 1 : 0);
    memcpy(so + SHMCTX_SLOT_LAST_USED_OFF, &now, SHMCTX_SLOT_LAST_USED_SIZE);
    lock_release(self, w.stripe);
    done = 1;
out:
    PyErr_Clear();
    Py_XDECREF(owner);
    Py_XDECREF(pid);
    Py_XDECREF(returned);
    Py_XDECREF(m);
    return done;
}

/* Return, step R6: the handle's ``buf`` view goes once the reference is given back. */
static PyObject *
finish_return(HotPath *self, PyObject *ctx)
{
    PyObject *view = descr_get(self->d_view, ctx);
    if (view == NULL)
        return NULL;
    int has_view = view != Py_None;
    Py_DECREF(view);
    if (has_view)  /* ctx.buf was used: MemoryContext._release_view lets go of it */
        return PyObject_CallMethodNoArgs(ctx, str_release_view);
    Py_RETURN_NONE;
}

/* One semaphore per stripe; stripe k's lock record is at LOCK_RECORD_OFF(1 + k). */
static int
open_sems(HotPath *self, PyObject *names)
{
    Py_ssize_t n = PyList_GET_SIZE(names);
    if (LOCK_RECORD_OFF(1 + n) > self->table.len) {
        PyErr_Format(PyExc_ValueError, "%zd stripe lock records do not fit in the table", n);
        return -1;
    }
    self->sems = PyMem_Calloc(n, sizeof(sem_t *));
    if (self->sems == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->nstripes = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *name = PyUnicode_AsUTF8(PyList_GET_ITEM(names, i));
        if (name == NULL)
            return -1;
        sem_t *s = sem_open(name, 0);
        if (s == SEM_FAILED) {
            PyErr_SetFromErrnoWithFilename(PyExc_OSError, name);
            return -1;
        }
        self->sems[i] = s;
    }
    return 0;
}

static void
release_resources(HotPath *self)
{
    self->enabled = 0;
    if (self->sems != NULL) {
        for (Py_ssize_t i = 0; i < self->nstripes; i++)
            if (self->sems[i] != NULL)
                sem_close(self->sems[i]);
        PyMem_Free(self->sems);
        self->sems = NULL;
    }
    self->nstripes = 0;
    if (self->have_buffer) {
        PyBuffer_Release(&self->table);
        self->have_buffer = 0;
    }
}

static int
HotPath_init(HotPath *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {
        "owner", "table", "sem_names", "max_refs", "mapped", "handle_type",
        "handle_fields", "failpoints", "dropped", NULL};
    PyObject *owner, *table, *names, *mapped, *htype, *fp, *dropped;
    PyObject *fields[5];
    unsigned int max_refs;
    if (self->have_buffer || self->owner != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "HotPath is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "OOO!IO!O!(OOOOO)O!O!", kwlist, &owner, &table,
            &PyList_Type, &names, &max_refs, &PyDict_Type, &mapped, &PyType_Type, &htype,
            &fields[0], &fields[1], &fields[2], &fields[3], &fields[4],
            &PyDict_Type, &fp, &PyList_Type, &dropped))
        return -1;
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        if (Py_TYPE(fields[i])->tp_descr_get == NULL ||
            Py_TYPE(fields[i])->tp_descr_set == NULL) {
            PyErr_SetString(PyExc_TypeError, "handle_fields must be slot descriptors");
            return -1;
        }
    }
    self->d_owner = Py_NewRef(fields[0]);
    self->d_mapped = Py_NewRef(fields[1]);
    self->d_pid = Py_NewRef(fields[2]);
    self->d_returned = Py_NewRef(fields[3]);
    self->d_view = Py_NewRef(fields[4]);
    self->max_refs = max_refs;
    self->owner = Py_NewRef(owner);
    self->mapped = Py_NewRef(mapped);
    self->handle_type = Py_NewRef(htype);
    self->failpoints = Py_NewRef(fp);
    self->dropped = Py_NewRef(dropped);
    self->pid_obj = Py_NewRef(Py_None);
    if (PyList_GET_SIZE(names) == 0) {
        PyErr_SetString(PyExc_ValueError, "one semaphore name per stripe is needed");
        return -1;
    }
    if (PyObject_GetBuffer(table, &self->table, PyBUF_WRITABLE) < 0)
        return -1;
    self->have_buffer = 1;
    /* Refused by construction: a table made by code of another layout is never
     * written with this one's offsets. */
    uint64_t fingerprint = self->table.len < SHMCTX_HEADER_SIZE ? 0 :
        rd64((char *)self->table.buf + SHMCTX_HEADER_FINGERPRINT_OFF);
    if (fingerprint != SHMCTX_LAYOUT_FINGERPRINT) {
        char msg[160];
        snprintf(msg, sizeof(msg), "the table's layout fingerprint %016llx is not the one "
                 "this module was compiled with, %016llx", (unsigned long long)fingerprint,
                 (unsigned long long)SHMCTX_LAYOUT_FINGERPRINT);
        PyErr_SetString(PyExc_ValueError, msg);
        release_resources(self);
        return -1;
    }
    self->capacity = rd32((char *)self->table.buf + SHMCTX_HEADER_CAPACITY_OFF);
    if (open_sems(self, names) < 0) {
        release_resources(self);
        return -1;
    }
    return 0;
}

static PyObject *
HotPath_enable(HotPath *self, PyObject *args)
{
    unsigned int pid;
    unsigned long long start;
    Py_ssize_t row_off;
    if (!PyArg_ParseTuple(args, "IKn", &pid, &start, &row_off))
        return NULL;
    if (!self->have_buffer) {
        PyErr_SetString(PyExc_ValueError, "HotPath is closed");
        return NULL;
    }
    /* The whole row inside the table: locate() then keeps every count it computes there
     * by checking the slot against the capacity alone. */
    if (row_off < SHMCTX_HEADER_SIZE || row_off % SHMCTX_REF_SIZE ||
        row_off > self->table.len - SHMCTX_REF_ROW_STRIDE(self->capacity)) {
        PyErr_SetString(PyExc_ValueError, "row of reference counts outside the table");
        return NULL;
    }
    PyObject *pid_obj = PyLong_FromUnsignedLong(pid);
    if (pid_obj == NULL)
        return NULL;
    Py_XSETREF(self->pid_obj, pid_obj);
    self->pid = pid;
    self->start = start;
    self->row_off = row_off;
    self->enabled = 1;
    Py_RETURN_NONE;
}

static PyObject *
HotPath_disable(HotPath *self, PyObject *Py_UNUSED(ignored))
{
    self->enabled = 0;
    Py_RETURN_NONE;
}

static PyObject *
HotPath_close(HotPath *self, PyObject *Py_UNUSED(ignored))
{
    release_resources(self);
    Py_RETURN_NONE;
}

static int
HotPath_traverse(HotPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->pid_obj);
    Py_VISIT(self->mapped);
    Py_VISIT(self->owner);
    Py_VISIT(self->handle_type);
    Py_VISIT(self->d_owner);
    Py_VISIT(self->d_mapped);
    Py_VISIT(self->d_pid);
    Py_VISIT(self->d_returned);
    Py_VISIT(self->d_view);
    Py_VISIT(self->failpoints);
    Py_VISIT(self->dropped);
    return 0;
}

static int
HotPath_clear(HotPath *self)
{
    self->enabled = 0;
    Py_CLEAR(self->pid_obj);
    Py_CLEAR(self->mapped);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->handle_type);
    Py_CLEAR(self->d_owner);
    Py_CLEAR(self->d_mapped);
    Py_CLEAR(self->d_pid);
    Py_CLEAR(self->d_returned);
    Py_CLEAR(self->d_view);
    Py_CLEAR(self->failpoints);
    Py_CLEAR(self->dropped);
    return 0;
}

static void
HotPath_dealloc(HotPath *self)
{
    PyObject_GC_UnTrack(self);
    release_resources(self);
    HotPath_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* HotPath.try_get(name): get, steps G1-G8 (see _hotpath.py). A handle, or None: defer. */
static PyObject *
HotPath_try_get(HotPath *self, PyObject *name)
{
    if (self->mapped == NULL)  /* cleared by the garbage collector: defer */
        Py_RETURN_NONE;
    PyObject *h = try_get(self, name);
    if (h == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    return h;
}

/* HotPath.try_return(ctx): return, steps R1-R6. True: done; False: defer. */
static PyObject *
HotPath_try_return(HotPath *self, PyObject *ctx)
{
    if (self->mapped == NULL || !try_return(self, ctx))
        Py_RETURN_FALSE;
    PyObject *r = finish_return(self, ctx);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_TRUE;
}

static PyMethodDef HotPath_methods[] = {
    {"try_get", (PyCFunction)HotPath_try_get, METH_O,
     "try_get(name)\n--\n\nGet steps G1-G8 (_hotpath.py): a handle, or None to defer."},
    {"try_return", (PyCFunction)HotPath_try_return, METH_O,
     "try_return(ctx)\n--\n\nReturn steps R1-R6 (_hotpath.py): True if done, False to defer."},
    {"enable", (PyCFunction)HotPath_enable, METH_VARARGS,
     "enable(pid, start, row_off): this process's entry is registered; its reference\n"
     "counts are the row at row_off."},
    {"disable", (PyCFunction)HotPath_disable, METH_NOARGS,
     "disable(): defer every call to Python (after fork, before registering)."},
    {"close", (PyCFunction)HotPath_close, METH_NOARGS,
     "close(): defer every call to Python for good; let go of the table and semaphores."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HotPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmctx._speedups.HotPath",
    .tp_basicsize = sizeof(HotPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The get/return hot path of one ContextManager, in C.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)HotPath_init,
    .tp_dealloc = (destructor)HotPath_dealloc,
    .tp_traverse = (traverseproc)HotPath_traverse,
    .tp_clear = (inquiry)HotPath_clear,
    .tp_methods = HotPath_methods,
};


/* MemoryContext.__del__ in C (the same logic; that one runs without this module). A
 * Python __del__ costs about as much as a whole get/return pair here, and every handle
 * is finalized, so install_finalizer puts this function in the type's tp_finalize slot
 * instead. An unreturned handle queues (mapping, pid) on its owner's ``dropped``
 * list (Mappings.dropped), which Slots.return_dropped works off where no lock is held. */
static PyObject *fin_returned, *fin_owner, *fin_mapped, *fin_pid;

static Py_ssize_t fin_returned_offset = -1;

static void
handle_finalize(PyObject *h)
{
    /* The common case, a handle that was returned, costs one load: the slot is read in
     * place (install_finalizer took its offset from the slot descriptor). */
    if (fin_returned_offset >= 0 &&
        *(PyObject **)((char *)h + fin_returned_offset) == Py_True)
        return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *returned = descr_get(fin_returned, h);
    if (returned == Py_False) {
        PyObject *owner = descr_get(fin_owner, h);
        PyObject *mapped = descr_get(fin_mapped, h);
        PyObject *pid = descr_get(fin_pid, h);
        PyObject *closed = owner ? PyObject_GetAttr(owner, str_closed) : NULL;
        PyObject *dropped = owner ? PyObject_GetAttr(owner, str_dropped) : NULL;
        PyObject *item = mapped && pid ? PyTuple_Pack(2, mapped, pid) : NULL;
        /* As MemoryContext.__del__: nothing is queued on a closed owner (its close gave
         * every reference back; a queued mapping would only stay mapped). */
        if (closed == Py_True)
            ;
        else if (closed == NULL || dropped == NULL || item == NULL || !PyList_Check(dropped) ||
                 PyList_Append(dropped, item) < 0)
            PyErr_WriteUnraisable(h);
        Py_XDECREF(closed);
        Py_XDECREF(item);
        Py_XDECREF(dropped);
        Py_XDECREF(pid);
        Py_XDECREF(mapped);
        Py_XDECREF(owner);
    }
    Py_XDECREF(returned);
    PyErr_Clear();  /* a handle never fully made has no _returned: nothing to give back */
    PyErr_Restore(type, value, tb);
}

static PyObject *
install_finalizer(PyObject *module, PyObject *args)
{
    PyTypeObject *tp;
    PyObject *f[4];
    if (!PyArg_ParseTuple(args, "O!(OOOO)", &PyType_Type, &tp, &f[0], &f[1], &f[2], &f[3]))
        return NULL;
    for (int i = 0; i < 4; i++) {
        if (Py_TYPE(f[i])->tp_descr_get == NULL) {
            PyErr_SetString(PyExc_TypeError, "handle fields must be slot descriptors");
            return NULL;
        }
    }
    if (!(tp->tp_flags & Py_TPFLAGS_HEAPTYPE) || tp->tp_finalize == NULL) {
        PyErr_SetString(PyExc_TypeError, "the handle type must be a class with __del__");
        return NULL;
    }
    if (Py_TYPE(f[0]) == &PyMemberDescr_Type) {
        PyMemberDef *member = ((PyMemberDescrObject *)f[0])->d_member;
        if (member->type == T_OBJECT_EX)
            fin_returned_offset = member->offset;
    }
    Py_XSETREF(fin_returned, Py_NewRef(f[0]));
    Py_XSETREF(fin_owner, Py_NewRef(f[1]));
    Py_XSETREF(fin_mapped, Py_NewRef(f[2]));
    Py_XSETREF(fin_pid, Py_NewRef(f[3]));
    tp->tp_finalize = handle_finalize;
    Py_RETURN_NONE;
}

/* front(method): ContextManager's get_or_create_context, get_context and
 * return_context. A method descriptor (called with the manager as its first argument,
 * no bound method made) that runs the hot path in C when the manager chose it (its
 * ``_hot`` is a HotPath: _hotpath.choose) and the call is the common case, and calls
 * ``method``, the one full definition in Python, for everything else. */
typedef struct {
    PyObject_HEAD
    PyObject *func;
    int kind;
    vectorcallfunc vectorcall;
    /* Where a manager of class ``type`` keeps ``_hot``: the byte offset of that slot
     * (ContextManager declares ``__slots__ = ("_hot", ...)``), or -1 if the class has
     * no such slot (a subclass that made ``_hot`` something else: the Python path
     * serves it). Learned on the first call with an instance of a class, so that each
     * call reads one pointer instead of looking a name up in a dict. */
    PyTypeObject *type;
    Py_ssize_t hot_offset;
} Front;

enum { FRONT_GET_OR_CREATE, FRONT_GET, FRONT_RETURN };

static PyObject *str__hot;

/* Learn where instances of ``tp`` keep ``_hot``. Runs Python code (the class's
 * attribute lookup), so both fields are written only after it, together. */
static void
front_learn(Front *self, PyTypeObject *tp)
{
    Py_ssize_t offset = -1;
    PyObject *d = PyObject_GetAttr((PyObject *)tp, str__hot);
    if (d == NULL)
        PyErr_Clear();
    /* A slot of this class or of a base: its descriptor's offset is valid for every
     * instance of tp (a member descriptor borrowed from an unrelated class is not). */
    else if (Py_TYPE(d) == &PyMemberDescr_Type &&
             ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX &&
             PyType_IsSubtype(tp, PyDescr_TYPE(d)))
        offset = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_XDECREF(d);
    PyTypeObject *old = self->type;
    self->type = (PyTypeObject *)Py_NewRef(tp);
    self->hot_offset = offset;
    Py_XDECREF(old);  /* last: letting go of a class may run code that calls us */
}

static HotPath *
hot_of(Front *self, PyObject *manager)
{
    PyTypeObject *tp = Py_TYPE(manager);
    if (tp != self->type)
        front_learn(self, tp);
    if (self->hot_offset < 0)
        return NULL;
    PyObject *hot = *(PyObject **)((char *)manager + self->hot_offset);
    if (hot == NULL || Py_TYPE(hot) != &HotPathType || ((HotPath *)hot)->mapped == NULL)
        return NULL;
    return (HotPath *)Py_NewRef(hot);
}

static PyObject *
Front_vectorcall(Front *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    HotPath *hot = nargs >= 2 ? hot_of(self, args[0]) : NULL;
    if (hot != NULL) {
        PyObject *res = NULL;
        if (self->kind == FRONT_GET_OR_CREATE) {
            if (hot_arguments(args + 1, nargs - 1, kwnames)) {
                /* The result tuple is made first: once the reference is taken nothing
                 * may fail. */
                res = PyTuple_New(2);
                if (res == NULL) {
                    Py_DECREF(hot);
                    return NULL;
                }
                PyObject *h = try_get(hot, args[1]);
                if (h != NULL) {
                    PyTuple_SET_ITEM(res, 0, h);
                    PyTuple_SET_ITEM(res, 1, Py_NewRef(Py_True));
                } else {
                    Py_CLEAR(res);
                }
            }
        } else if (self->kind == FRONT_GET) {
            if (nargs == 2 && kwnames == NULL)
                res = try_get(hot, args[1]);
        } else if (nargs == 2 && kwnames == NULL && try_return(hot, args[1])) {
            res = finish_return(hot, args[1]);
            Py_DECREF(hot);
            return res;
        }
        Py_DECREF(hot);
        if (res != NULL)
            return res;
        PyErr_Clear();
    }
    return PyObject_Vectorcall(self->func, args, nargsf, kwnames);
}

static PyObject *
Front_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static PyObject *
Front_getattr_of_func(Front *self, void *name)
{
    return PyObject_GetAttrString(self->func, (const char *)name);
}

static PyGetSetDef Front_getset[] = {
    {"__doc__", (getter)Front_getattr_of_func, NULL, NULL, "__doc__"},
    {"__name__", (getter)Front_getattr_of_func, NULL, NULL, "__name__"},
    {"__qualname__", (getter)Front_getattr_of_func, NULL, NULL, "__qualname__"},
    {"__module__", (getter)Front_getattr_of_func, NULL, NULL, "__module__"},
    {NULL},
};

static PyMemberDef Front_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(Front, func), READONLY,
     "the Python method: the full definition"},
    {NULL},
};

static int
Front_traverse(Front *self, visitproc visit, void *arg)
{
    Py_VISIT(self->func);
    Py_VISIT(self->type);
    return 0;
}

static int
Front_clear(Front *self)
{
    Py_CLEAR(self->func);
    Py_CLEAR(self->type);
    return 0;
}

static void
Front_dealloc(Front *self)
{
    PyObject_GC_UnTrack(self);
    Front_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Front_repr(Front *self)
{
    return PyUnicode_FromFormat("<shmctx hot path in front of %R>", self->func);
}

static PyTypeObject FrontType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmctx._speedups.front",
    .tp_basicsize = sizeof(Front),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_METHOD_DESCRIPTOR |
                Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A ContextManager method with the C hot path in front of it.",
    .tp_vectorcall_offset = offsetof(Front, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = Front_descr_get,
    .tp_getset = Front_getset,
    .tp_members = Front_members,
    .tp_traverse = (traverseproc)Front_traverse,
    .tp_clear = (inquiry)Front_clear,
    .tp_dealloc = (destructor)Front_dealloc,
    .tp_repr = (reprfunc)Front_repr,
};

static PyObject *
make_front(PyObject *module, PyObject *func)
{
    PyObject *name = PyObject_GetAttrString(func, "__name__");
    if (name == NULL)
        return NULL;
    int kind = -1;
    if (PyUnicode_CompareWithASCIIString(name, "get_or_create_context") == 0)
        kind = FRONT_GET_OR_CREATE;
    else if (PyUnicode_CompareWithASCIIString(name, "get_context") == 0)
        kind = FRONT_GET;
    else if (PyUnicode_CompareWithASCIIString(name, "return_context") == 0)
        kind = FRONT_RETURN;
    Py_DECREF(name);
    if (kind < 0) {
        PyErr_Format(PyExc_ValueError, "no hot path for %R", func);
        return NULL;
    }
    Front *f = PyObject_GC_New(Front, &FrontType);
    if (f == NULL)
        return NULL;
    f->func = Py_NewRef(func);
    f->kind = kind;
    f->vectorcall = (vectorcallfunc)Front_vectorcall;
    f->type = NULL;
    f->hot_offset = -1;
    PyObject_GC_Track(f);
    return (PyObject *)f;
}

static PyMethodDef module_methods[] = {
    {"front", make_front, METH_O,
     "front(method): method (get_or_create_context, get_context or return_context of\n"
     "ContextManager) with the C hot path in front of it."},
    {"install_finalizer", install_finalizer, METH_VARARGS,
     "install_finalizer(handle_type, (returned, owner, mapped, pid)): put the C\n"
     "finalizer of unreturned handles in place of handle_type.__del__."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "shmctx._speedups",
    "The hot path of shmctx in C (optional: shmctx works without it).", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&HotPathType) < 0 || PyType_Ready(&FrontType) < 0)
        return NULL;
    str__hot = PyUnicode_InternFromString("_hot");
    if (str__hot == NULL)
        return NULL;
    str_hot = PyUnicode_InternFromString("hot");
    str_armed = PyUnicode_InternFromString("armed");
    str_release_view = PyUnicode_InternFromString("_release_view");
    str_dropped = PyUnicode_InternFromString("dropped");
    str_closed = PyUnicode_InternFromString("closed");
    if (str_hot == NULL || str_armed == NULL || str_release_view == NULL ||
        str_dropped == NULL || str_closed == NULL)
        return NULL;
    PyObject *mod = PyModule_Create(&speedups_module);
    if (mod == NULL)
        return NULL;
    if (PyModule_AddObjectRef(mod, "HotPath", (PyObject *)&HotPathType) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    /* The layout this module reads and writes: the Python side uses the module only
     * when this equals _layout.FINGERPRINT. */
    PyObject *fp = PyLong_FromUnsignedLongLong(SHMCTX_LAYOUT_FINGERPRINT);
    if (fp == NULL || PyModule_AddObjectRef(mod, "LAYOUT_FINGERPRINT", fp) < 0) {
        Py_XDECREF(fp);
        Py_DECREF(mod);
        return NULL;
    }
    Py_DECREF(fp);
    return mod;
}
