/* shmctx._speedups: the hot path in C, as a shortcut in front of the Python one.
 *
 * HotPath.get_or_create_context / get_context / return_context either complete the whole
 * operation exactly as ContextManager._get_fast and ContextManager.return_context do
 * (same writes, same order, same lock protocol as _lock.RobustLock.acquire/release), or
 * do nothing observable and call the Python method, which has the full semantics: a
 * busy stripe lock (spinning, waiting, taking over from a dead owner), a stale mapping,
 * the reference limit, a missing reference record, armed failpoints, any error. So
 * every decision beyond the common case stays in Python, in one place.
 *
 * Why it exists: in pure Python the crash-safe pair (owner record, slot check,
 * per-process count, refcount, last-used stamp, handle) costs about 3x a bare semaphore
 * around one struct write (docs/performance.md); here it costs less than that floor.
 *
 * Offsets come from _layout.py (the one description of the table), passed in by
 * _manager.py, which also checks that the field widths assumed below still match it:
 *   lock record: u32 owner pid, u32 epoch, u64 owner start
 *   slot:        u8 state, u32 refcount, u64 incarnation, f64 last used
 *   ref record:  u32 slot + 1, u32 count
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
#include <string.h>
#include <time.h>

#define REF_SIZE 8
#define LOCK_SIZE 16

typedef struct {
    PyObject_HEAD
    int enabled;
    int have_buffer;
    Py_buffer table;
    Py_ssize_t nstripes;
    sem_t **sems;
    Py_ssize_t *lock_offs;
    /* slot field offsets, relative to the slot */
    Py_ssize_t o_state, o_refcount, o_inc, o_last_used, slot_size;
    long ready, free_state;
    uint32_t max_refs;
    /* this process, set by enable() once its process entry is registered */
    uint32_t pid;
    uint64_t start;
    Py_ssize_t refs_off;
    PyObject *pid_obj;
    PyObject *refidx;   /* dict: slot -> index of this process's reference record */
    PyObject *mapped;   /* the manager's dict: name -> _Mapped */
    PyObject *manager;
    PyObject *handle_type;
    PyObject *d_manager, *d_mapped, *d_pid, *d_returned, *d_view; /* slot descriptors */
    PyObject *failpoints; /* _failpoints module dict: the "armed" flag */
    PyObject *dropped;    /* the manager's list of handles dropped unreturned */
    PyObject *slow_get, *slow_get_context, *slow_return;
} HotPath;

static PyObject *str_hot, *str_armed, *str_release_view, *str_dropped;

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
    char *rec = (char *)self->table.buf + self->lock_offs[stripe];
    uint32_t epoch = rd32(rec + 4);
    wr32(rec + 4, epoch + 1);
    wr64(rec + 8, self->start);
    /* The pid last, in one aligned store the compiler may not move before the two
     * above: waiters and the sweeper read the record without the lock, and a pid beside
     * an epoch or start time nobody wrote with it would be judged wrongly. (Lock
     * records are 64-byte aligned: _layout.py.) */
    __atomic_store_n((uint32_t *)rec, self->pid, __ATOMIC_RELEASE);
    return 1;
}

/* RobustLock.release: clear the owner, then post. */
static void
lock_release(HotPath *self, Py_ssize_t stripe)
{
    wr32((char *)self->table.buf + self->lock_offs[stripe], 0);
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
    uint32_t sp1;
} Where;

/* Where mapping ``m`` lives in the table, from its ``hot`` tuple (slot offset, stripe,
 * incarnation, slot) and this process's reference record for the slot. 0: defer. */
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
        PyObject *slot = PyTuple_GET_ITEM(hot, 3);
        PyObject *ri = PyDict_GetItemWithError(self->refidx, slot);
        if (ri != NULL) {
            Py_ssize_t off = PyLong_AsSsize_t(PyTuple_GET_ITEM(hot, 0));
            Py_ssize_t stripe = PyLong_AsSsize_t(PyTuple_GET_ITEM(hot, 1));
            unsigned long long inc = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(hot, 2));
            Py_ssize_t s = PyLong_AsSsize_t(slot);
            Py_ssize_t r = PyLong_AsSsize_t(ri);
            Py_ssize_t ref_off = self->refs_off + REF_SIZE * r;
            if (!PyErr_Occurred() && off >= 0 && off + self->slot_size <= self->table.len &&
                stripe >= 0 && stripe < self->nstripes && s >= 0 && s < UINT32_MAX &&
                r >= 0 && ref_off + REF_SIZE <= self->table.len) {
                w->slot_off = off;
                w->stripe = stripe;
                w->inc = inc;
                w->sp1 = (uint32_t)s + 1;
                w->ref_off = ref_off;
                ok = 1;
            }
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
    if (descr_set(self->d_manager, h, self->manager) < 0 ||
        descr_set(self->d_mapped, h, m) < 0 ||
        descr_set(self->d_pid, h, self->pid_obj) < 0 ||
        descr_set(self->d_returned, h, Py_True) < 0 ||
        descr_set(self->d_view, h, Py_None) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    return h;
}

/* ContextManager._get_fast. New handle; NULL without an error: defer to Python. */
static PyObject *
try_get(HotPath *self, PyObject *name)
{
    if (!self->enabled || !PyUnicode_CheckExact(name) || failpoints_armed(self) ||
        PyList_GET_SIZE(self->dropped)) {  /* Python gives dropped references back first */
        PyErr_Clear();
        return NULL;
    }
    PyObject *m = PyDict_GetItemWithError(self->mapped, name);
    if (m == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_INCREF(m);
    Where w;
    /* The handle is made first: once the counts are written nothing may fail. Making it
     * may run a collection (see lock_try), so the slot is located after it. */
    PyObject *h = new_handle(self, m);
    if (h == NULL || !locate(self, m, &w) || !lock_try(self, w.stripe))
        goto defer;
    char *so = (char *)self->table.buf + w.slot_off;
    char *ref = (char *)self->table.buf + w.ref_off;
    uint32_t rc = rd32(so + self->o_refcount);
    if (rd64(so + self->o_inc) != w.inc || (unsigned char)so[self->o_state] != self->ready ||
        (self->max_refs && rc >= self->max_refs) || rd32(ref) != w.sp1) {
        lock_release(self, w.stripe);
        goto defer;
    }
    /* Per-process count first, then the refcount: the order _add_ref keeps, so that a
     * death in between is repaired from the per-process records. */
    wr32(ref + 4, rd32(ref + 4) + 1);
    wr32(so + self->o_refcount, rc + 1);
    lock_release(self, w.stripe);
    /* Now it stands for the reference. Setting a slot runs no Python code, so nothing
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

static PyObject *
forward(PyObject *slow, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    return PyObject_Vectorcall(slow, args, nargsf, kwnames);
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

static PyObject *
HotPath_get_or_create_context(HotPath *self, PyObject *const *args, size_t nargsf,
                              PyObject *kwnames)
{
    if (hot_arguments(args, nargsf, kwnames)) {
        /* The result tuple is made first: once the reference is taken nothing may fail. */
        PyObject *res = PyTuple_New(2);
        if (res == NULL)
            return NULL;
        PyObject *h = try_get(self, args[0]);
        if (h != NULL) {
            PyTuple_SET_ITEM(res, 0, h);
            PyTuple_SET_ITEM(res, 1, Py_NewRef(Py_True));
            return res;
        }
        Py_DECREF(res);
    }
    return forward(self->slow_get, args, nargsf, kwnames);
}

static PyObject *
HotPath_get_context(HotPath *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) == 1 && kwnames == NULL) {
        PyObject *h = try_get(self, args[0]);
        if (h != NULL)
            return h;
    }
    return forward(self->slow_get_context, args, nargsf, kwnames);
}

/* ContextManager.return_context's common case. 1 done, 0 defer, -1 error. */
static int
try_return(HotPath *self, PyObject *ctx)
{
    if (!self->enabled || (PyObject *)Py_TYPE(ctx) != self->handle_type ||
        failpoints_armed(self) || PyList_GET_SIZE(self->dropped)) {
        PyErr_Clear();
        return 0;
    }
    PyObject *manager = NULL, *pid = NULL, *returned = NULL, *m = NULL;
    int done = 0;
    Where w;
    if ((manager = descr_get(self->d_manager, ctx)) == NULL ||
        (pid = descr_get(self->d_pid, ctx)) == NULL ||
        (returned = descr_get(self->d_returned, ctx)) == NULL ||
        (m = descr_get(self->d_mapped, ctx)) == NULL)
        goto out;
    if (manager != self->manager || returned != Py_False ||
        PyObject_RichCompareBool(pid, self->pid_obj, Py_EQ) != 1 || !locate(self, m, &w))
        goto out;
    if (!lock_try(self, w.stripe))
        goto out;
    char *so = (char *)self->table.buf + w.slot_off;
    char *ref = (char *)self->table.buf + w.ref_off;
    uint32_t count = rd32(ref + 4);
    if (rd64(so + self->o_inc) != w.inc || (unsigned char)so[self->o_state] == self->free_state ||
        rd32(ref) != w.sp1 || count == 0 || descr_set(self->d_returned, ctx, Py_True) < 0) {
        lock_release(self, w.stripe);
        goto out;
    }
    uint32_t rc = rd32(so + self->o_refcount);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    wr32(ref + 4, count - 1);
    wr32(so + self->o_refcount, rc ? rc - 1 : 0);
    memcpy(so + self->o_last_used, &now, 8);
    lock_release(self, w.stripe);
    done = 1;
out:
    PyErr_Clear();
    Py_XDECREF(manager);
    Py_XDECREF(pid);
    Py_XDECREF(returned);
    Py_XDECREF(m);
    return done;
}

static PyObject *
HotPath_return_context(HotPath *self, PyObject *ctx)
{
    if (!try_return(self, ctx))
        return PyObject_CallOneArg(self->slow_return, ctx);
    PyObject *view = descr_get(self->d_view, ctx);
    if (view == NULL)
        return NULL;
    int has_view = view != Py_None;
    Py_DECREF(view);
    if (has_view)  /* ctx.buf was used: MemoryContext._release_view lets go of it */
        return PyObject_CallMethodNoArgs(ctx, str_release_view);
    Py_RETURN_NONE;
}

static int
open_sems(HotPath *self, PyObject *names, PyObject *offs)
{
    Py_ssize_t n = PyList_GET_SIZE(names);
    self->sems = PyMem_Calloc(n, sizeof(sem_t *));
    self->lock_offs = PyMem_Calloc(n, sizeof(Py_ssize_t));
    if (self->sems == NULL || self->lock_offs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->nstripes = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *name = PyUnicode_AsUTF8(PyList_GET_ITEM(names, i));
        Py_ssize_t off = PyLong_AsSsize_t(PyList_GET_ITEM(offs, i));
        if (name == NULL || PyErr_Occurred())
            return -1;
        if (off < 0 || off + LOCK_SIZE > self->table.len) {
            PyErr_Format(PyExc_ValueError, "lock record offset %zd outside the table", off);
            return -1;
        }
        self->lock_offs[i] = off;
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
    PyMem_Free(self->lock_offs);
    self->lock_offs = NULL;
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
        "manager", "table", "sem_names", "lock_offsets", "slot_fields", "states",
        "max_refs", "mapped", "handle_type", "handle_fields", "failpoints",
        "slow_get", "slow_get_context", "slow_return", "dropped", NULL};
    PyObject *manager, *table, *names, *offs, *mapped, *htype,
        *fp, *sg, *sgc, *sr, *dropped;
    PyObject *fields[5];
    unsigned int max_refs;
    if (self->have_buffer || self->manager != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "HotPath is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(
            args, kwds, "OOO!O!(nnnnn)(ll)IO!O!(OOOOO)O!OOOO!", kwlist, &manager, &table,
            &PyList_Type, &names, &PyList_Type, &offs, &self->o_state, &self->o_refcount,
            &self->o_inc, &self->o_last_used, &self->slot_size, &self->ready,
            &self->free_state, &max_refs, &PyDict_Type, &mapped, &PyType_Type, &htype,
            &fields[0], &fields[1], &fields[2], &fields[3], &fields[4],
            &PyDict_Type, &fp, &sg, &sgc, &sr, &PyList_Type, &dropped))
        return -1;
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
        if (Py_TYPE(fields[i])->tp_descr_get == NULL ||
            Py_TYPE(fields[i])->tp_descr_set == NULL) {
            PyErr_SetString(PyExc_TypeError, "handle_fields must be slot descriptors");
            return -1;
        }
    }
    self->d_manager = Py_NewRef(fields[0]);
    self->d_mapped = Py_NewRef(fields[1]);
    self->d_pid = Py_NewRef(fields[2]);
    self->d_returned = Py_NewRef(fields[3]);
    self->d_view = Py_NewRef(fields[4]);
    self->max_refs = max_refs;
    self->manager = Py_NewRef(manager);
    self->mapped = Py_NewRef(mapped);
    self->handle_type = Py_NewRef(htype);
    self->failpoints = Py_NewRef(fp);
    self->slow_get = Py_NewRef(sg);
    self->slow_get_context = Py_NewRef(sgc);
    self->slow_return = Py_NewRef(sr);
    self->dropped = Py_NewRef(dropped);
    self->refidx = PyDict_New();
    self->pid_obj = Py_NewRef(Py_None);
    if (self->refidx == NULL)
        return -1;
    if (self->slot_size <= 0 || self->o_state < 0 || self->o_state >= self->slot_size ||
        self->o_refcount < 0 || self->o_refcount + 4 > self->slot_size ||
        self->o_inc < 0 || self->o_inc + 8 > self->slot_size ||
        self->o_last_used < 0 || self->o_last_used + 8 > self->slot_size) {
        PyErr_SetString(PyExc_ValueError, "slot field offsets outside the slot");
        return -1;
    }
    if (PyList_GET_SIZE(names) != PyList_GET_SIZE(offs) || PyList_GET_SIZE(names) == 0) {
        PyErr_SetString(PyExc_ValueError, "one lock offset per semaphore name is needed");
        return -1;
    }
    if (PyObject_GetBuffer(table, &self->table, PyBUF_WRITABLE) < 0)
        return -1;
    self->have_buffer = 1;
    if (open_sems(self, names, offs) < 0) {
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
    Py_ssize_t refs_off;
    PyObject *refidx;
    if (!PyArg_ParseTuple(args, "IKnO!", &pid, &start, &refs_off, &PyDict_Type, &refidx))
        return NULL;
    if (!self->have_buffer) {
        PyErr_SetString(PyExc_ValueError, "HotPath is closed");
        return NULL;
    }
    if (refs_off < 0 || refs_off >= self->table.len) {
        PyErr_SetString(PyExc_ValueError, "reference records outside the table");
        return NULL;
    }
    PyObject *pid_obj = PyLong_FromUnsignedLong(pid);
    if (pid_obj == NULL)
        return NULL;
    Py_XSETREF(self->pid_obj, pid_obj);
    Py_XSETREF(self->refidx, Py_NewRef(refidx));
    self->pid = pid;
    self->start = start;
    self->refs_off = refs_off;
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
    Py_VISIT(self->refidx);
    Py_VISIT(self->mapped);
    Py_VISIT(self->manager);
    Py_VISIT(self->handle_type);
    Py_VISIT(self->d_manager);
    Py_VISIT(self->d_mapped);
    Py_VISIT(self->d_pid);
    Py_VISIT(self->d_returned);
    Py_VISIT(self->d_view);
    Py_VISIT(self->failpoints);
    Py_VISIT(self->slow_get);
    Py_VISIT(self->slow_get_context);
    Py_VISIT(self->slow_return);
    Py_VISIT(self->dropped);
    return 0;
}

static int
HotPath_clear(HotPath *self)
{
    self->enabled = 0;
    Py_CLEAR(self->pid_obj);
    Py_CLEAR(self->refidx);
    Py_CLEAR(self->mapped);
    Py_CLEAR(self->manager);
    Py_CLEAR(self->handle_type);
    Py_CLEAR(self->d_manager);
    Py_CLEAR(self->d_mapped);
    Py_CLEAR(self->d_pid);
    Py_CLEAR(self->d_returned);
    Py_CLEAR(self->d_view);
    Py_CLEAR(self->failpoints);
    Py_CLEAR(self->slow_get);
    Py_CLEAR(self->slow_get_context);
    Py_CLEAR(self->slow_return);
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

/* A cleared HotPath (the garbage collector broke a cycle) must not be called into. */
static PyObject *
cleared(void)
{
    PyErr_SetString(PyExc_RuntimeError, "shmctx HotPath used after it was cleared");
    return NULL;
}

static PyObject *
HotPath_vget(HotPath *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (self->slow_get == NULL)
        return cleared();
    return HotPath_get_or_create_context(self, args, nargsf, kwnames);
}

static PyObject *
HotPath_vget_context(HotPath *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (self->slow_get_context == NULL)
        return cleared();
    return HotPath_get_context(self, args, nargsf, kwnames);
}

static PyObject *
HotPath_vreturn(HotPath *self, PyObject *ctx)
{
    if (self->slow_return == NULL)
        return cleared();
    return HotPath_return_context(self, ctx);
}

static PyMethodDef HotPath_methods[] = {
    {"get_or_create_context", (PyCFunction)(void (*)(void))HotPath_vget,
     METH_FASTCALL | METH_KEYWORDS,
     "get_or_create_context(name, config=None, *, init=None, timeout=None)\n--\n\n"
     "ContextManager.get_or_create_context, with its hot path in C."},
    {"get_context", (PyCFunction)(void (*)(void))HotPath_vget_context,
     METH_FASTCALL | METH_KEYWORDS,
     "get_context(name, *, timeout=None)\n--\n\n"
     "ContextManager.get_context, with its hot path in C."},
    {"return_context", (PyCFunction)HotPath_vreturn, METH_O,
     "return_context(ctx)\n--\n\nContextManager.return_context, with its hot path in C."},
    {"enable", (PyCFunction)HotPath_enable, METH_VARARGS,
     "enable(pid, start, refs_off, refidx): this process's entry is registered."},
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
 * instead. An unreturned handle queues (mapping, pid) on its manager's ``_dropped``
 * list, which the manager works off where no lock is held (_return_dropped). */
static PyObject *fin_returned, *fin_manager, *fin_mapped, *fin_pid;

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
        PyObject *manager = descr_get(fin_manager, h);
        PyObject *mapped = descr_get(fin_mapped, h);
        PyObject *pid = descr_get(fin_pid, h);
        PyObject *dropped = manager ? PyObject_GetAttr(manager, str_dropped) : NULL;
        PyObject *item = mapped && pid ? PyTuple_Pack(2, mapped, pid) : NULL;
        if (dropped == NULL || item == NULL || !PyList_Check(dropped) ||
            PyList_Append(dropped, item) < 0)
            PyErr_WriteUnraisable(h);
        Py_XDECREF(item);
        Py_XDECREF(dropped);
        Py_XDECREF(pid);
        Py_XDECREF(mapped);
        Py_XDECREF(manager);
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
    Py_XSETREF(fin_manager, Py_NewRef(f[1]));
    Py_XSETREF(fin_mapped, Py_NewRef(f[2]));
    Py_XSETREF(fin_pid, Py_NewRef(f[3]));
    tp->tp_finalize = handle_finalize;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"install_finalizer", install_finalizer, METH_VARARGS,
     "install_finalizer(handle_type, (returned, manager, mapped, pid)): put the C\n"
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
    if (PyType_Ready(&HotPathType) < 0)
        return NULL;
    str_hot = PyUnicode_InternFromString("hot");
    str_armed = PyUnicode_InternFromString("armed");
    str_release_view = PyUnicode_InternFromString("_release_view");
    str_dropped = PyUnicode_InternFromString("_dropped");
    if (str_hot == NULL || str_armed == NULL || str_release_view == NULL ||
        str_dropped == NULL)
        return NULL;
    PyObject *mod = PyModule_Create(&speedups_module);
    if (mod == NULL)
        return NULL;
    if (PyModule_AddObjectRef(mod, "HotPath", (PyObject *)&HotPathType) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
