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
// How long the caller spins for its helpers (below): 200 us, or JAXSERVE_SPIN_US where set
// (0: sleep at once; for benchmarks/spin_wait.py), read once.
inline std::chrono::microseconds spin_wait() {
  static const std::chrono::microseconds us{[] {
    const char* env = std::getenv("JAXSERVE_SPIN_US");
    return env ? std::atol(env) : 200L;
  }()};
  return us;
}

// Runs fn(i) for i in [0, total) on the pool and the calling thread; returns when all are done.
// The caller works too, so the call finishes even if the pool never runs a task.
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t total,
                         std::function<void(int64_t)> fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t total = 0;
    std::function<void(int64_t)> fn;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  st->total = total;
  st->fn = std::move(fn);
  auto work = [st]() {
    int64_t mine = 0;
    for (int64_t i; (i = st->next.fetch_add(1)) < st->total; ++mine) st->fn(i);
    if (mine && st->done.fetch_add(mine) + mine == st->total) {
      std::lock_guard<std::mutex> lock(st->mu);
      st->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  // Schedule takes its task by value (forwarding a reference would not compile): a copy each.
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
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
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == st->total; });
}

}  // namespace jaxserve

#endif  // JAXSERVE_NATIVE_PARALLEL_FOR_H_
