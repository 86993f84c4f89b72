// Parallel loops for the CPU kernels.
//
// Preferred backend: OpenMP on the process's one OpenMP runtime. torch's wheel ships
// GNU libgomp with the soname libgomp.so.1 and _C links libgomp.so.1 too; the dynamic
// loader reuses an already-loaded object of the same soname, so with torch imported
// first (minidiff._native does that) the kernels' parallel regions run on torch's own
// OpenMP worker threads. A second pool would compete with those threads, which spin
// for a while after every torch op: measured on 2 cores, a 10 ms sparse kernel took
// 22 ms with its own 2-thread pool right after a torch matmul, vs 9.9 ms on 1 thread.
// Fallback (compilers without GNU OpenMP): a small persistent std::thread pool.
// The Python layer passes the thread count (torch.get_num_threads()), and every long
// call releases the GIL.
#pragma once

#include <cstdint>
#include <functional>

namespace minidiff {

// Runs fn(chunk_begin, chunk_end) over [0, n) split into at most `threads`
// contiguous chunks of at least `grain` items; blocks until all are done. An
// exception thrown by fn is rethrown in the caller after every chunk finished.
void parallel_for(int64_t n, int threads, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// "openmp" or "threadpool": which backend this build uses.
const char* parallel_backend();

}  // namespace minidiff
