// parallel_for implementations the tests install to check thread-count independence.
#include <thread>

#include "test_util.h"

namespace bt {

void install_thread_parallel_for(int chunks) {
  setenv("BINFORMER_CPU_SERIAL_BELOW", "0", 1);  // small test problems are split too
  binformer::cpu::set_parallel_for([chunks](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    // Uneven contiguous pieces (the first one larger), each at least `grain` long, on threads.
    std::vector<std::thread> threads;
    int64_t begin = 0;
    for (int c = 0; c < chunks && begin < n; ++c) {
      const int64_t remaining = n - begin;
      int64_t len = c == chunks - 1 ? remaining : std::max<int64_t>(grain, remaining / (chunks - c) + (c == 0 ? remaining / 7 : 0));
      len = std::min(len, remaining);
      const int64_t end = begin + len;
      threads.emplace_back([&fn, begin, end] { fn(begin, end); });
      begin = end;
    }
    if (begin < n) fn(begin, n);
    for (auto& t : threads) t.join();
  });
}

void install_serial_parallel_for() {
  binformer::cpu::set_parallel_for(nullptr);
  unsetenv("BINFORMER_CPU_SERIAL_BELOW");
}

}  // namespace bt
