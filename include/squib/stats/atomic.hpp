// squib-pager: monotonic counters.
#pragma once

#include <squib/concepts.hpp>

#include <atomic>
#include <cstdint>

namespace squib {

/// A point-in-time copy of atomic_stats, plain data to log or compare.
struct stats_snapshot {
    std::uint64_t faults = 0;          ///< faults served (pages or clusters)
    std::uint64_t prewarmed = 0;       ///< pages installed ahead of any fault
    std::uint64_t port_reinstalls = 0; ///< exception ports re-installed after drift (Mach)
    std::uint64_t forwarded = 0;       ///< exceptions passed on to a prior handler (Mach)
    std::uint64_t zero_pages = 0;      ///< faults and prewarms installed as zeros
    std::uint64_t bytes_served = 0;    ///< bytes installed by faults and prewarm
    std::uint64_t errors = 0;          ///< faults or prewarms that failed

    friend bool operator==(const stats_snapshot&, const stats_snapshot&) = default;
};

/// Monotonic counters, safe to bump from every fault thread at once.
/// Relaxed atomics: each counter is exact, but a snapshot taken while faults
/// run may mix counts from slightly different instants.
class atomic_stats {
public:
    static constexpr bool wants_latency = false;
    using snapshot_type = stats_snapshot;

    void on_fault(const fault_event& e) noexcept
    {
        bump(faults_);
        record_bytes(e);
    }
    void on_prewarm(const fault_event& e) noexcept
    {
        bump(prewarmed_);
        record_bytes(e);
    }
    void on_error() noexcept { bump(errors_); }
    void on_forward() noexcept { bump(forwarded_); }
    void on_reinstall() noexcept { bump(reinstalls_); }

    [[nodiscard]] stats_snapshot snapshot() const noexcept
    {
        return {.faults = load(faults_),
                .prewarmed = load(prewarmed_),
                .port_reinstalls = load(reinstalls_),
                .forwarded = load(forwarded_),
                .zero_pages = load(zero_pages_),
                .bytes_served = load(bytes_),
                .errors = load(errors_)};
    }

private:
    static void bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) noexcept
    {
        c.fetch_add(n, std::memory_order_relaxed);
    }
    static std::uint64_t load(const std::atomic<std::uint64_t>& c) noexcept
    {
        return c.load(std::memory_order_relaxed);
    }
    void record_bytes(const fault_event& e) noexcept
    {
        bump(bytes_, e.bytes);
        if (e.zero_page) bump(zero_pages_);
    }

    std::atomic<std::uint64_t> faults_{0};
    std::atomic<std::uint64_t> prewarmed_{0};
    std::atomic<std::uint64_t> reinstalls_{0};
    std::atomic<std::uint64_t> forwarded_{0};
    std::atomic<std::uint64_t> zero_pages_{0};
    std::atomic<std::uint64_t> bytes_{0};
    std::atomic<std::uint64_t> errors_{0};
};

static_assert(PagerStats<atomic_stats>);

} // namespace squib
