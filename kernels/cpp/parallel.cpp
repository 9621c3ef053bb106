// The kernels' thread pool (see parallel.h for what a caller gets).
//
// One job at a time. The caller publishes it (fn, ctx, ntasks, how many workers may join) and opens it by making
// `epoch` odd; workers and caller claim tasks from `next`; the caller, out of tasks, closes the job (epoch even
// again) and waits only for the workers inside it (`active`). A worker enters by incrementing `active` *before*
// it re-reads `epoch`, and the caller closes *before* it reads `active` (all four sequentially consistent: the
// store-load pattern of Dekker's algorithm): either the caller sees the worker and waits for it, or the worker
// sees the job closed and leaves without reading anything of it. A late worker therefore never delays the caller
// beyond the tasks it has claimed, and never touches a finished job (whose fn and ctx live on the caller's stack).
//
// Waiting: spin spin_time() with pause (and yield), then sleep on a condition variable (the build is C++17: no
// std::atomic::wait); the waker skips the mutex and the syscall when no one sleeps (a sleeper registers before its
// last check: Dekker again). Workers are detached and the pool is never destroyed: at interpreter exit the threads
// sleep or spin on memory that stays valid, nothing joins or frees anything. fork(): only the forking thread exists
// in the child, so the child drops (leaks) the pool and builds a new one on its next call (pthread_atfork).
#include "parallel.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <sched.h>
#endif

namespace fastllm {
namespace {

// How long a waiting thread spins before it sleeps: FASTLLM_SPIN_US (read once, at the pool's first use; fastllm's
// import validates it), default kDefaultSpinUs (= SPIN_US_DEFAULT in fastllm/_ext.py). It was 50 us. A decode step
// of a Hugging Face model through fastllm.accelerate has 50-150 us of Python between two kernel calls: the workers
// slept, each GEMM woke them (a futex wake-up), and the caller ran most tasks alone. SmolLM2-135M-shaped Llama,
// HF generate B=1, 64 tokens, fp32, Zen 4 2 cores (medians of 5, two runs each): 50 us 27.2 / 27.5 tok/s,
// 300 us 29.0 / 29.8, 1000 us 29.1 / 30.0, 2000 us 30.4 / 29.4; MiniLM B8 S256 unchanged (303 vs 300 ms). The
// spin yields every 16 pauses, so a runnable thread on the spinner's core (torch's OpenMP worker, another
// process) runs instead; an idle core burns up to 1 ms after a job.
constexpr long kDefaultSpinUs = 1000;
std::chrono::microseconds spin_time() {
  static const std::chrono::microseconds t = [] {
    const char* s = std::getenv("FASTLLM_SPIN_US");
    char* end = nullptr;
    const long v = s != nullptr ? std::strtol(s, &end, 10) : -1;
    return std::chrono::microseconds(s != nullptr && end != s && *end == '\0' && v >= 0 && v <= 1000000
                                         ? v : kDefaultSpinUs);
  }();
  return t;
}
constexpr int kMaxWorkers = 511;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Spins until ready() or spin_time() has passed; returns ready(). Every 16 pauses it also yields: on an idle core that is
// a cheap system call, but where the spinner shares its core with a runnable thread (the other cores busy: the
// caller itself, or another process) that thread runs instead of waiting for the spinner's time slice to end.
// Measured (1x576x1536 fp32 GEMM in 16 tasks, another process on the other core): 2-thread calls took 105-128 us
// against 140-159 us on 1 thread with the yield, 132-176 us against 161-164 us without.
template <class P>
bool spin_until(P ready) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto spin = spin_time();
  for (int i = 1;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if (i % 16 == 0) std::this_thread::yield();  // a spinner sharing its core (others busy) lets the runnable run
    if (i % 64 == 0 && std::chrono::steady_clock::now() - t0 > spin) return ready();
  }
}

// Where threads sleep until a condition holds. ready() must read the condition with seq_cst loads, and wake() be
// called after the seq_cst store that makes it true.
class Parking {
 public:
  template <class P>
  void sleep_until(P ready) {
    std::unique_lock<std::mutex> lock(mu_);
    sleepers_.fetch_add(1);  // before the check below: a waker that misses this count sees the condition true
    while (!ready()) cv_.wait(lock);
    sleepers_.fetch_sub(1);
  }
  void wake() {
    if (sleepers_.load() == 0) return;
    { std::lock_guard<std::mutex> lock(mu_); }  // a sleeper between its last check and cv_.wait holds mu_
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<int> sleepers_{0};
};

class Pool {
 public:
  // false: the pool is running another call (its tasks then run on the calling thread)
  bool try_acquire() { return !busy_.exchange(true, std::memory_order_acquire); }
  void release() { busy_.store(false, std::memory_order_release); }

  // Runs a job; the caller holds the pool (try_acquire).
  void run(int64_t ntasks, int nthreads, TaskFn fn, void* ctx) {
    int64_t want = nthreads;
    if (ntasks < want) want = ntasks;
    if (hw_ > 0 && hw_ < want) want = hw_;
    if (want - 1 > kMaxWorkers) want = kMaxWorkers + 1;
    grow(static_cast<int>(want - 1));
    const int helpers = static_cast<int>(want - 1) < nworkers_ ? static_cast<int>(want - 1) : nworkers_;
    if (helpers < 1) {
      for (int64_t t = 0; t < ntasks; ++t) fn(ctx, t, 0);
      return;
    }
    fn_ = fn;
    ctx_ = ctx;
    ntasks_ = ntasks;
    helpers_ = helpers;
    next_.store(0, std::memory_order_relaxed);
    const uint32_t open = epoch_.load(std::memory_order_relaxed) + 1;  // only this thread writes epoch_
    epoch_.store(open);  // publishes the fields above
    idle_.wake();
    for (int64_t t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < ntasks;) fn(ctx, t, 0);
    epoch_.store(open + 1);  // closed: from now on a worker that arrives leaves
    auto drained = [this] { return active_.load() == 0; };
    if (!spin_until(drained)) done_.sleep_until(drained);
  }

 private:
  // Starts workers up to n (fewer if the system refuses threads). Only the caller holding the pool runs this.
  void grow(int n) {
    while (nworkers_ < n) {
      try {
        std::thread(&Pool::work, this, nworkers_, epoch_.load(std::memory_order_relaxed)).detach();
      } catch (const std::system_error&) {
        return;
      }
      ++nworkers_;
    }
  }

  // Worker `id` runs tasks in slot id + 1 of the jobs that want it. `seen`: the last epoch it looked at (an even
  // one at start, when no job is open).
  void work(int id, uint32_t seen) {
    const int slot = id + 1;
#if defined(__linux__) && defined(SCHED_BATCH)
    // SCHED_BATCH (same weight, no wakeup preemption): a woken worker that the scheduler places on the caller's
    // own core (the other cores busy) waits for the caller instead of preempting it and running the tasks there,
    // one core doing the work of two with context switches. Measured on 2 cores with the other one loaded, 16
    // tasks of 5.5 us after 200 us idle: 147 us on 2 threads (the worker ran 80% of the tasks) against 89 us on
    // 1; with SCHED_BATCH, 89 us. An idle core still takes a woken worker at once (no preemption needed there).
    sched_param sp{};
    pthread_setschedparam(pthread_self(), SCHED_BATCH, &sp);  // best effort: a refusal changes nothing else
#endif
    for (;;) {
      auto job_open = [this, seen] {
        const uint32_t e = epoch_.load();
        return (e & 1u) != 0 && e != seen;
      };
      if (!spin_until(job_open)) idle_.sleep_until(job_open);
      active_.fetch_add(1);
      const uint32_t e = epoch_.load();  // after the increment: is the job still open?
      if ((e & 1u) != 0 && e != seen) {
        seen = e;
        if (id < helpers_) {
          const TaskFn fn = fn_;
          void* const ctx = ctx_;
          const int64_t ntasks = ntasks_;
          for (int64_t t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < ntasks;) fn(ctx, t, slot);
        }
      }
      if (active_.fetch_sub(1) == 1) done_.wake();
    }
  }

  // The open job: written by the caller before it opens the job, read by the workers that entered it.
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t ntasks_ = 0;
  int helpers_ = 0;  // workers 0 .. helpers_-1 take part
  int nworkers_ = 0;  // workers started (the caller's: read and written under busy_)
  const int64_t hw_ = std::thread::hardware_concurrency();  // 0: unknown (glibc reads /sys: once, not per call)
  alignas(64) std::atomic<uint32_t> epoch_{0};  // odd while a job is open
  alignas(64) std::atomic<int64_t> next_{0};    // the next task to claim
  alignas(64) std::atomic<int> active_{0};      // workers inside the job
  std::atomic<bool> busy_{false};
  Parking idle_;  // workers waiting for a job
  Parking done_;  // the caller waiting for the workers still inside its job
};

std::atomic<Pool*> g_pool{nullptr};

#if defined(__unix__) || defined(__APPLE__)
// In a forked child the workers do not exist (and a mutex may have been held): drop the pool, leaked.
void forget_pool() { g_pool.store(nullptr, std::memory_order_relaxed); }
const int g_atfork = pthread_atfork(nullptr, nullptr, forget_pool);
#endif

Pool* pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return p;
  Pool* fresh = new (std::nothrow) Pool;
  if (fresh == nullptr) return nullptr;
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return fresh;
  delete fresh;  // another thread installed one first (no worker of ours was started)
  return p;
}

}  // namespace

void parallel_run(int64_t ntasks, int nthreads, TaskFn fn, void* ctx) {
  Pool* p = nthreads > 1 && ntasks > 1 ? pool() : nullptr;
  if (p == nullptr || !p->try_acquire()) {  // one thread, no pool, or the pool is busy (another caller, nesting)
    for (int64_t t = 0; t < ntasks; ++t) fn(ctx, t, 0);
    return;
  }
  p->run(ntasks, nthreads, fn, ctx);
  p->release();
}

}  // namespace fastllm
