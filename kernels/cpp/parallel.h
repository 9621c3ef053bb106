// The C++ kernels' thread pool: parallel_for(ntasks, nthreads, fn) instead of OpenMP parallel regions.
//
// fn(task, slot) runs once for each task = 0 .. ntasks-1, on up to nthreads threads: the calling thread (slot 0)
// and nthreads - 1 pool workers (slots 1, 2, ...). Every thread claims its next task from one atomic counter, and
// the call returns once every task claimed is done: a worker that has not started by the time the caller runs out
// of tasks is not waited for; it finds the job over when it wakes and never touches it. So a call is never much
// slower than the same call on one thread. (An OpenMP static loop waits at its end barrier for every thread of
// the team; on a 2-core VM whose other core is busy, with another process, hypervisor steal or torch's own
// spinning OpenMP worker, that is a scheduler time slice: a 2-thread decode GEMM took 4.8 ms against 2.6 ms on
// one thread. Issue 11.)
//
// Contract for a kernel:
//   - slot < min(nthreads, ntasks): per-thread scratch is indexed by slot (0 = the caller), never by
//     omp_get_thread_num(); which slot runs which task depends on timing, so results must depend only on the task
//     decomposition (a function of the shapes, and of nthreads where a kernel's results already did)
//   - a task does a few microseconds of work at least (a claim is one atomic add on a shared cache line); a
//     loop with fewer tasks than threads splits finer (parallel_chunks: a few chunks per thread) so that claiming
//     balances the load
//   - fn must not throw: an exception in a task terminates the process, as it does in an OpenMP region
//     (kernels allocate before their parallel loops)
//   - a call made while the pool runs another call (a second Python thread with the GIL released, or a task
//     calling parallel_for) runs all its tasks on its own thread, slot 0: no deadlock, no oversubscription
//   - what a task writes is visible to the caller when parallel_for returns
//
// The pool (parallel.cpp) starts its workers on first use, as many as the largest nthreads asked (at most the
// hardware threads), spins up to 1 ms after each job (FASTLLM_SPIN_US: the kernel calls of a decode step, with
// Python between them, find it awake), then sleeps. After fork() the child builds a fresh pool on its next call.
//
// The template below has internal linkage, like everything in common.h: the *_avx2 / *_avx512* TUs include this
// header; the pool itself (std::thread, atomics, mutexes) lives only in the portable TU parallel.cpp.
#pragma once

#include <cstdint>
#include <type_traits>

namespace fastllm {

// The type-erased entry point (parallel.cpp): fn(ctx, task, slot) for every task, as parallel_for.
using TaskFn = void (*)(void* ctx, int64_t task, int slot);
void parallel_run(int64_t ntasks, int nthreads, TaskFn fn, void* ctx);

namespace {  // internal linkage: each TU instantiates its own copy (see common.h)

template <class F>
void parallel_for(int64_t ntasks, int nthreads, F&& fn) {
  if (ntasks <= 0) return;
  if (nthreads <= 1 || ntasks == 1) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t, 0);
    return;
  }
  using Fn = typename std::remove_reference<F>::type;
  // noexcept: a throwing task terminates here (see the contract) instead of unwinding through the pool
  parallel_run(ntasks, nthreads, [](void* c, int64_t t, int s) noexcept { (*static_cast<Fn*>(c))(t, s); },
               const_cast<void*>(static_cast<const void*>(&fn)));
}

// fn(i0, i1, slot) over [0, n) cut into min(n, per_thread * nthreads) contiguous chunks of near-equal size (chunk c
// is [n c / C, n (c + 1) / C)), for loops whose items are independent of one another (per row, per panel).
template <class F>
void parallel_chunks(int64_t n, int nthreads, int per_thread, F&& fn) {
  const int64_t want = static_cast<int64_t>(nthreads < 1 ? 1 : nthreads) * (per_thread < 1 ? 1 : per_thread);
  const int64_t chunks = n < want ? n : want;
  parallel_for(chunks, nthreads, [&](int64_t c, int slot) { fn(n * c / chunks, n * (c + 1) / chunks, slot); });
}

}  // namespace
}  // namespace fastllm
