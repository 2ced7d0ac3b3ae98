// squib-pager: a read-mostly value whose readers never take a lock.
#pragma once

#include <atomic>
#include <memory>
#include <thread>
#include <utility>

namespace squib::detail {

/// Holds a heap object that fault threads read without locks while a setup
/// thread occasionally replaces it.
///
/// Readers announce themselves on one of two counters (chosen by the parity
/// of an epoch), load the current pointer, use it, and leave. A writer swaps
/// the pointer in, then flips the epoch twice, each time waiting for the
/// counter that new readers no longer use to drain. Any reader that could
/// still hold the old pointer announced itself before the swap, so after both
/// drains nobody does and the old object is deleted. Readers never block or
/// allocate; writers wait only for read sections in flight, which are short
/// (a lookup and a copy). Writers must be serialised by the caller.
template <class T>
class published {
public:
    explicit published(std::unique_ptr<T> initial) noexcept : current_(initial.release()) {}
    published(const published&) = delete;
    published& operator=(const published&) = delete;
    ~published() { delete current_.load(std::memory_order_relaxed); }

    /// Calls `f(const T&)` on the current object and returns its result.
    /// `f` must not keep the reference past the call.
    template <class F>
    decltype(auto) read(F&& f) const noexcept
    {
        auto& slot = readers_[epoch_.load(std::memory_order_seq_cst) & 1].count;
        slot.fetch_add(1, std::memory_order_seq_cst);
        struct leave {
            std::atomic<unsigned long>& c;
            ~leave() { c.fetch_sub(1, std::memory_order_release); } // pairs with the writer's acquire
        } guard{slot};
        return std::forward<F>(f)(*current_.load(std::memory_order_seq_cst));
    }

    /// The current object, for the (serialised) writer only.
    [[nodiscard]] const T& writer_view() const noexcept { return *current_.load(std::memory_order_relaxed); }

    /// Publishes `next` and deletes the previous object once no reader holds it.
    void replace(std::unique_ptr<T> next) noexcept
    {
        T* old = current_.exchange(next.release(), std::memory_order_seq_cst);
        for (int flip = 0; flip < 2; ++flip) {
            const auto draining = epoch_.fetch_add(1, std::memory_order_seq_cst) & 1;
            while (readers_[draining].count.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
        }
        delete old;
    }

private:
    struct alignas(64) counter { // one cache line each, so the two sides do not share a line
        mutable std::atomic<unsigned long> count{0};
    };

    std::atomic<T*> current_;
    std::atomic<unsigned> epoch_{0};
    counter readers_[2];
};

} // namespace squib::detail
