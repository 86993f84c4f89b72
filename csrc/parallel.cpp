#include "parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#ifdef MINIDIFF_OPENMP
#include <omp.h>
#endif

namespace minidiff {

namespace {

std::vector<std::pair<int64_t, int64_t>> split(int64_t n, int parts) {
  std::vector<std::pair<int64_t, int64_t>> chunks;
  int64_t base = n / parts, rem = n % parts, start = 0;
  for (int i = 0; i < parts; ++i) {
    int64_t len = base + (i < rem ? 1 : 0);
    chunks.emplace_back(start, start + len);
    start += len;
  }
  return chunks;
}

// A fork()ed child inherits the parent's thread-pool bookkeeping but none of its
// threads: the first parallel region there would wait forever (libgomp and our pool
// alike; torch's own ops hang the same way unless the child sets 1 thread). The
// kernels run single-threaded in a forked child instead.
std::atomic<bool> g_forked_child{false};
const int g_atfork = pthread_atfork(nullptr, nullptr, [] { g_forked_child.store(true); });

int count_parts(int64_t n, int threads, int64_t grain) {
  if (g_forked_child.load(std::memory_order_relaxed)) return 1;
  grain = std::max<int64_t>(grain, 1);
  const int64_t max_chunks = (n + grain - 1) / grain;
  return static_cast<int>(std::min<int64_t>(std::max(threads, 1), max_chunks));
}

}  // namespace

// The fallback backend (builds without GNU OpenMP).
class ThreadPool {
 public:
  static ThreadPool& instance();

  // Runs fn(chunk_begin, chunk_end) over [0, n) split into at most `threads`
  // contiguous chunks of at least `grain` items. Blocks until all are done.
  // The calling thread works on the first chunk itself.
  void parallel_for(int64_t n, int threads, int64_t grain,
                    const std::function<void(int64_t, int64_t)>& fn);

  ~ThreadPool();

 private:
  ThreadPool() = default;
  void ensure_workers(int count);
  void worker_loop(int id);

  std::mutex call_mutex_;  // one parallel_for at a time
  std::mutex mutex_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int64_t)>* task_ = nullptr;
  std::vector<std::pair<int64_t, int64_t>> chunks_;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
};

#ifdef MINIDIFF_OPENMP
const char* parallel_backend() { return "openmp"; }

void parallel_for(int64_t n, int threads, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int parts = count_parts(n, threads, grain);
  if (parts <= 1 || omp_in_parallel()) {
    fn(0, n);
    return;
  }
  const auto chunks = split(n, parts);
  std::exception_ptr error;
#pragma omp parallel num_threads(parts)
  {
    // the runtime may grant fewer threads than asked (OMP_THREAD_LIMIT): cover every chunk
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    for (int c = tid; c < parts; c += team) {
      try {
        fn(chunks[c].first, chunks[c].second);
      } catch (...) {
#pragma omp critical(minidiff_parallel_error)
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}
#else
const char* parallel_backend() { return "threadpool"; }

void parallel_for(int64_t n, int threads, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  ThreadPool::instance().parallel_for(n, threads, grain, fn);
}
#endif

ThreadPool& ThreadPool::instance() {
  // Leaked on purpose: joining threads during interpreter shutdown can hang.
  static ThreadPool* pool = new ThreadPool();
  return *pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::ensure_workers(int count) {
  while (static_cast<int>(workers_.size()) < count) {
    int id = static_cast<int>(workers_.size()) + 1;  // chunk 0 is the caller's
    workers_.emplace_back([this, id] { worker_loop(id); });
  }
}

void ThreadPool::worker_loop(int id) {
  uint64_t seen = 0;
  for (;;) {
    std::pair<int64_t, int64_t> chunk{0, 0};
    const std::function<void(int64_t, int64_t)>* task = nullptr;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      work_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (id >= static_cast<int>(chunks_.size())) continue;
      chunk = chunks_[id];
      task = task_;
    }
    (*task)(chunk.first, chunk.second);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int threads, int64_t grain,
                              const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int parts = count_parts(n, threads, grain);
  if (parts <= 1) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mutex_);
  std::exception_ptr error;
  const std::function<void(int64_t, int64_t)> guarded = [&](int64_t b, int64_t e) {
    try {
      fn(b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error) error = std::current_exception();
    }
  };
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ensure_workers(parts - 1);
    chunks_ = split(n, parts);
    task_ = &guarded;
    pending_ = parts - 1;
    ++generation_;
  }
  work_cv_.notify_all();
  guarded(chunks_[0].first, chunks_[0].second);
  std::unique_lock<std::mutex> lock(mutex_);
  done_cv_.wait(lock, [&] { return pending_ == 0; });
  task_ = nullptr;
  if (error) std::rethrow_exception(error);
}

}  // namespace minidiff
