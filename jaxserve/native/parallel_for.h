// parallel_for over XLA's intra-op thread pool, shared by the native kernels.

#ifndef JAXSERVE_NATIVE_PARALLEL_FOR_H_
#define JAXSERVE_NATIVE_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

// A spin-wait hint to the core (x86 `pause`; elsewhere a plain spin).
inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}
// Microseconds from the environment variable `name`, else `fallback`.
inline std::chrono::microseconds env_micros(const char* name, long fallback) {
  const char* env = std::getenv(name);
  return std::chrono::microseconds{env ? std::atol(env) : fallback};
}

// How long the caller spins for its helpers (below): 200 us, or JAXSERVE_SPIN_US where set
// (0: sleep at once; for benchmarks/spin_wait.py), read once.
inline std::chrono::microseconds spin_wait() {
  static const std::chrono::microseconds us = env_micros("JAXSERVE_SPIN_US", 200);
  return us;
}

// How long a helper that has finished its share of a decode-sized product (`linger`) waits,
// spinning, for the next parallel_for's work before it goes back to the pool: 100 us, or
// JAXSERVE_HELPER_SPIN_US where set (0: never), read once. A helper handed its task by the
// pool starts ~11 us after the caller (timestamps in a decode step), and a decode step's 49
// products and 12 attention calls are each a few hundred microseconds apart at most: a helper
// still spinning takes the next call's work at once. The bench model's decode step 0.964x as
// long (rounds 0.946-0.996), its prefill job 1.019x (0.947-1.024, within this VM's noise;
// benchmarks/helper_linger.py, fresh processes alternating). Only decode-sized products
// linger: lingering after every product made the prefill job 1.03-1.07x as long in three of
// four alternating pairs (the spinning helper holds a core that XLA's own parallel ops between
// products want; manual runs, not kept).
inline std::chrono::microseconds helper_spin() {
  static const std::chrono::microseconds us = env_micros("JAXSERVE_HELPER_SPIN_US", 100);
  return us;
}

struct ParallelForState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::function<void(int64_t)> fn;
  std::mutex mu;
  std::condition_variable cv;

  // Claims indices until none are left; the last to finish wakes the caller.
  void work() {
    int64_t mine = 0;
    for (int64_t i; (i = next.fetch_add(1)) < total; ++mine) fn(i);
    if (mine && done.fetch_add(mine) + mine == total) {
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
  }
};

// Where a caller hands its next job to a helper that is still spinning (see helper_spin). One
// per process: relay_v1()'s static is a unique symbol, so the attention and matmul libraries
// share it (a helper lingering after a product takes the next attention call's work too).
// Whoever changes Relay or ParallelForState must rename relay_v1() (two builds of this header in
// one process, as benchmarks comparing a revision's kernel load, would share one object).
struct Relay {
  std::atomic<int> idle{0};          // helpers spinning for a job
  std::atomic<bool> posted{false};   // a job is waiting in `job`
  std::mutex mu;
  std::shared_ptr<ParallelForState> job;
};
inline Relay& relay_v1() {
  static Relay r;
  return r;
}

// A pool task: the job's share, then (`linger`) the next jobs posted to the relay while they
// keep coming within helper_spin() of each other.
inline void help(const std::shared_ptr<ParallelForState>& first, bool linger) {
  first->work();
  const auto spin = helper_spin();
  if (!linger || spin.count() == 0) return;
  Relay& r = relay_v1();
  r.idle.fetch_add(1);
  auto until = std::chrono::steady_clock::now() + spin;
  while (std::chrono::steady_clock::now() < until) {
    if (r.posted.load(std::memory_order_acquire)) {
      std::shared_ptr<ParallelForState> st;
      {
        std::lock_guard<std::mutex> lock(r.mu);
        st = std::move(r.job);  // leaves r.job empty
        r.posted.store(false, std::memory_order_release);
      }
      if (st) {
        r.idle.fetch_sub(1);
        st->work();
        r.idle.fetch_add(1);
        until = std::chrono::steady_clock::now() + spin;
        continue;
      }
    }
    for (int i = 0; i < 64; ++i) pause();
  }
  r.idle.fetch_sub(1);
}

// Runs fn(i) for i in [0, total) on the pool and the calling thread; returns when all are done.
// The caller works too, so the call finishes even if the pool never runs a task (or the relay's
// helper stopped spinning before it took the job: the caller takes it back at the end). With
// `linger`, the helpers then wait for the next call's work (helper_spin).
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t total,
                         std::function<void(int64_t)> fn, bool linger = false) {
  auto st = std::make_shared<ParallelForState>();
  st->total = total;
  st->fn = std::move(fn);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  Relay& r = relay_v1();
  bool relayed = false;
  if (helpers > 0 && r.idle.load(std::memory_order_acquire) > 0) {
    std::lock_guard<std::mutex> lock(r.mu);
    if (!r.job) {
      r.job = st;
      r.posted.store(true, std::memory_order_release);
      relayed = true;
      --helpers;
    }
  }
  // Schedule takes its task by value (forwarding a reference would not compile): a copy each.
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([st, linger] { help(st, linger); });
  st->work();
  // Equal shares finish close together: wait for the helpers spinning, for up to spin_wait(),
  // before sleeping on the condition variable. Waking from it takes tens of microseconds, 49
  // products a decode step: spinning made the bench model's weights-only decode step 0.89x
  // as long (23.2-24.1 -> 20.5-21.3 ms), its 528-row prefill products 0.98-0.99x
  // (benchmarks/spin_wait.py; 2-core VM); spinning only ~20 us (500 `pause`s) gained nothing.
  const auto until = std::chrono::steady_clock::now() + spin_wait();
  while (st->done.load(std::memory_order_acquire) != st->total) {
    for (int i = 0; i < 64; ++i) pause();
    if (std::chrono::steady_clock::now() > until) break;
  }
  {
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return st->done.load() == st->total; });
  }
  if (relayed) {  // not taken (the helper stopped spinning meanwhile): take it back
    std::lock_guard<std::mutex> lock(r.mu);
    if (r.job == st) {
      r.job.reset();
      r.posted.store(false, std::memory_order_release);
    }
  }
}

}  // namespace jaxserve

#endif  // JAXSERVE_NATIVE_PARALLEL_FOR_H_
