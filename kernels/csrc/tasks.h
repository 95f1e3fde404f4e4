/* How Python calls a kernel (kernels/native.py `run`): one call per batch, not one per task.
 *
 * Each kernel covers a part of its maps (images [b0, b1), and for some rows [y0, y1)), so a batch is
 * split into tasks that can run at once. Python passes the tasks as rows of longs: the task's index,
 * then the kernel's own last arguments. OVERLOCK_TASKS defines a kernel's entry point,
 * <kernel>_tasks(its arguments..., tasks, ntasks, threads), which runs them on `threads` threads.
 *
 * Built with OpenMP, the threads are an OpenMP team of the runtime PyTorch itself runs on (the library
 * is linked against the libgomp torch loaded, native.py `_openmp_runtime`): the same threads that
 * ran the aten op before, which spin for a while after it, pick the tasks up. Threads of our own
 * would have to win a core from those spinning ones: in XT's 2-thread inference the kernels then ran
 * no faster than at one thread. Built without OpenMP, the entry point runs its tasks in turn and
 * Python hands each task to its own thread pool instead (one call per task). */
#ifndef OVERLOCK_TASKS_H
#define OVERLOCK_TASKS_H

/* Whether this library runs its tasks on an OpenMP team (native.py checks it after loading). */
int overlock_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#ifdef _OPENMP
#define OVERLOCK_PARALLEL_TASKS _Pragma("omp parallel for num_threads(threads) schedule(static, 1) reduction(| : failed)")
#else
#define OVERLOCK_PARALLEL_TASKS
#endif

/* int NAME##_tasks PARAMS: CALL for every task, `task` pointing at its row of WIDTH longs (task[0]
 * its index). PARAMS must end with `const long* tasks, long ntasks, long threads`. Returns 0, or
 * non-zero if any call failed (could not allocate its buffers). */
#define OVERLOCK_TASKS(NAME, WIDTH, PARAMS, CALL)   \
    int NAME##_tasks PARAMS {                       \
        int failed = 0;                             \
        OVERLOCK_PARALLEL_TASKS                     \
        for (long t = 0; t < ntasks; t++) {         \
            const long* task = tasks + t * (WIDTH); \
            failed |= (CALL) != 0;                  \
        }                                           \
        return failed;                              \
    }

#endif
