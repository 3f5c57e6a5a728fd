// The kernels' worker threads: they spin briefly between jobs, then sleep.
//
// Why not XLA's intra-op pool (the FFI ThreadPool): a decode step is ~150 kernel calls of
// 50-300 microseconds each, and a pool thread woken from sleep for each one arrived late
// enough that the caller did most items alone (weights streamed at one core's ~10-12 GB/s;
// profile in BUILD_NOTES.md). Workers here spin for kSpinMicros after a job, so back-to-back
// calls find them awake; after that they sleep on a condition variable and cost nothing
// (TESSERA_CPU_SPIN_US sets the spin). They spin with sched_yield, not a pause loop, so the
// XLA threads that run the fusions between our calls get the core when they need it.
//
// One job at a time: a caller that finds a job running (XLA may run two custom calls at
// once) does its own items alone rather than wait. Workers = usable cores - 1, or
// TESSERA_CPU_THREADS - 1.

#include <sched.h>

#if defined(__x86_64__) || defined(__i386__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>

#include "common.h"

namespace tessera_cpu {
namespace {

inline void CpuRelax() {  // a spin-wait hint to the core
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

constexpr int64_t kDefaultSpinMicros = 200;

int64_t SpinMicros() {  // TESSERA_CPU_SPIN_US overrides
  if (const char* env = std::getenv("TESSERA_CPU_SPIN_US")) return std::max(0L, std::atol(env));
  return kDefaultSpinMicros;
}

int UsableCores() {
  if (const char* env = std::getenv("TESSERA_CPU_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  return static_cast<int>(std::thread::hardware_concurrency());
}

// One call's items. Each job is its own object: a worker that picks up a job late finds its
// items all claimed and leaves without touching anything the caller has since reused.
struct Job {
  void (*call)(const void*, int64_t);
  const void* ctx;
  int64_t total;
  std::atomic<int64_t> next{0}, done{0};

  void Drain() {
    for (int64_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) {
      call(ctx, i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

class SpinPool {
 public:
  SpinPool() : threads_(std::max(1, UsableCores())) {
    for (int t = 1; t < threads_; ++t) std::thread([this] { Work(); }).detach();
  }

  int threads() const { return threads_; }

  void Run(int64_t n, void (*call)(const void*, int64_t), const void* ctx) {
    std::unique_lock<std::mutex> running(run_mu_, std::try_to_lock);
    if (!running.owns_lock() || n == 1) {
      for (int64_t i = 0; i < n; ++i) call(ctx, i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->call = call;
    job->ctx = ctx;
    job->total = n;
    {
      std::lock_guard<std::mutex> lock(job_mu_);
      job_ = job;
      generation_.fetch_add(1);
    }
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      wake_.notify_all();
    }
    job->Drain();
    while (job->done.load(std::memory_order_acquire) != n) CpuRelax();
  }

 private:
  void Work() {
    uint64_t seen = generation_.load();
    for (;;) {
      const auto since = std::chrono::steady_clock::now();
      while (generation_.load() == seen) {
        if (std::chrono::steady_clock::now() - since < spin_) {
          sched_yield();
          continue;
        }
        std::unique_lock<std::mutex> lock(sleep_mu_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(job_mu_);
        job = job_;
        seen = generation_.load();
      }
      job->Drain();
    }
  }

  const int threads_;
  const std::chrono::microseconds spin_{SpinMicros()};
  std::mutex run_mu_;  // one job at a time
  std::mutex job_mu_;  // guards job_ and its generation together
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mu_;
  std::condition_variable wake_;
};

SpinPool& Pool() {
  static SpinPool* pool = new SpinPool();  // never destroyed: its threads live as long as the process
  return *pool;
}

}  // namespace

void RunParallel(int64_t n, void (*call)(const void*, int64_t), const void* ctx) { Pool().Run(n, call, ctx); }

int ParallelThreads() { return Pool().threads(); }

}  // namespace tessera_cpu
