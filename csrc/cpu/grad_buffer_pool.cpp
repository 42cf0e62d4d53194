// The two-slot pool of CPU gradient buffers (declared in grad_buffer_pool.h).
#include <ATen/ATen.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <mutex>
#include <utility>
#include <vector>

#include "grad_buffer_pool.h"

namespace hdkd_fast::cpu {
namespace {

// A two-slot pool for the CPU gradient buffers ([K, B, C], written in full by the kernel, so never
// zeroed). A training loop frees the previous step's gradient before (or while) the next one is
// made; handing its memory back out skips the ~2000 page faults of a fresh 8 MB buffer that the C
// allocator returns when it has trimmed the heap in between. The buffers go back to the pool only
// when the tensor and every view of its storage are gone (the storage's deleter), so a live tensor
// is never reused. At most kSlots buffers are kept, and only sizes in [kMinBytes, kMaxBytes]. (Like
// any from_blob tensor, such a gradient cannot be resize_()d beyond its size.)
class GradBufferPool {
 public:
  static GradBufferPool& instance() {
    static auto* pool = new GradBufferPool();  // never destroyed: tensors may outlive static destructors
    return *pool;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
    if (bytes < kMinBytes || bytes > kMaxBytes) return at::empty(sizes, options);
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second == bytes) {
          ptr = it->first;
          free_.erase(it);
          break;
        }
      }
    }
    if (ptr == nullptr) ptr = c10::alloc_cpu(bytes);
    try {
      return at::from_blob(ptr, sizes, [bytes](void* q) { GradBufferPool::instance().give_back(q, bytes); },
                           options);
    } catch (...) {
      c10::free_cpu(ptr);
      throw;
    }
  }

 private:
  static constexpr size_t kSlots = 2;
  static constexpr size_t kMinBytes = size_t(1) << 20;
  static constexpr size_t kMaxBytes = size_t(1) << 30;

  void give_back(void* ptr, size_t bytes) {
    std::pair<void*, size_t> evicted{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.emplace_back(ptr, bytes);
      if (free_.size() > kSlots) {  // drop the oldest
        evicted = free_.front();
        free_.erase(free_.begin());
      }
    }
    if (evicted.first != nullptr) c10::free_cpu(evicted.first);
  }

  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> free_;
};
}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return GradBufferPool::instance().empty(sizes, options);
}

}  // namespace hdkd_fast::cpu
