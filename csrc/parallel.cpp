#include "parallel.h"

namespace minidiff {

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
  grain = std::max<int64_t>(grain, 1);
  int64_t max_chunks = (n + grain - 1) / grain;
  int parts = static_cast<int>(std::min<int64_t>(std::max(threads, 1), max_chunks));
  if (parts <= 1) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> call_lock(call_mutex_);
  std::vector<std::pair<int64_t, int64_t>> chunks;
  int64_t base = n / parts, rem = n % parts, start = 0;
  for (int i = 0; i < parts; ++i) {
    int64_t len = base + (i < rem ? 1 : 0);
    chunks.emplace_back(start, start + len);
    start += len;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ensure_workers(parts - 1);
    chunks_ = chunks;
    task_ = &fn;
    pending_ = parts - 1;
    ++generation_;
  }
  work_cv_.notify_all();
  fn(chunks[0].first, chunks[0].second);
  std::unique_lock<std::mutex> lock(mutex_);
  done_cv_.wait(lock, [&] { return pending_ == 0; });
  task_ = nullptr;
}

}  // namespace minidiff
