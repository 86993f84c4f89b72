// A small persistent thread pool for the CPU kernels.
//
// Why not OpenMP: torch ships its own OpenMP runtime; linking a second one
// into the same process oversubscribes cores and can deadlock on fork. The
// Python layer passes the thread count it wants (by default
// torch.get_num_threads()), and every long call releases the GIL.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace minidiff {

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

inline void parallel_for(int64_t n, int threads, int64_t grain,
                         const std::function<void(int64_t, int64_t)>& fn) {
  ThreadPool::instance().parallel_for(n, threads, grain, fn);
}

}  // namespace minidiff
