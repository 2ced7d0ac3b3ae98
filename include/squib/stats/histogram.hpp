// squib-pager: latency histograms.
#pragma once

#include <squib/concepts.hpp>
#include <squib/stats/atomic.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>

namespace squib {

/// Percentiles read from a latency_histogram.
struct latency_summary {
    std::uint64_t count = 0;
    std::uint64_t p50_ns = 0; ///< upper bound of the bucket holding the median, capped at max_ns
    std::uint64_t p99_ns = 0;
    std::uint64_t max_ns = 0; ///< exact

    friend bool operator==(const latency_summary&, const latency_summary&) = default;
};

/// A log-bucketed histogram of nanosecond latencies: exact below 8 ns, then
/// four buckets per power of two, so a reported percentile is at most 25%
/// above the true value. Recording is two relaxed atomic adds (plus a CAS
/// loop only when a new maximum is seen); nothing allocates.
class latency_histogram {
public:
    static constexpr std::size_t bucket_count = 8 + 61 * 4;

    void record(std::uint64_t ns) noexcept
    {
        buckets_[bucket_of(ns)].fetch_add(1, std::memory_order_relaxed);
        std::uint64_t seen = max_.load(std::memory_order_relaxed);
        while (ns > seen && !max_.compare_exchange_weak(seen, ns, std::memory_order_relaxed)) {
        }
    }

    /// Bucket index of a latency; exposed for tests.
    [[nodiscard]] static constexpr std::size_t bucket_of(std::uint64_t ns) noexcept
    {
        if (ns < 8) return static_cast<std::size_t>(ns);
        const auto octave = static_cast<std::size_t>(std::bit_width(ns) - 1); // 3..63
        const auto sub = static_cast<std::size_t>((ns >> (octave - 2)) & 3);
        return 8 + (octave - 3) * 4 + sub;
    }

    /// Largest latency that falls in bucket `i`.
    [[nodiscard]] static constexpr std::uint64_t bucket_upper(std::size_t i) noexcept
    {
        if (i < 8) return i;
        const std::size_t octave = (i - 8) / 4 + 3;
        const std::uint64_t sub = (i - 8) % 4;
        const std::uint64_t lower = (4 + sub) << (octave - 2);
        return lower + ((std::uint64_t{1} << (octave - 2)) - 1);
    }

    /// Count, p50, p99 and max. Safe while recording goes on.
    [[nodiscard]] latency_summary summary() const noexcept
    {
        std::array<std::uint64_t, bucket_count> counts{};
        latency_summary s;
        for (std::size_t i = 0; i < bucket_count; ++i) {
            counts[i] = buckets_[i].load(std::memory_order_relaxed);
            s.count += counts[i];
        }
        s.max_ns = max_.load(std::memory_order_relaxed);
        if (s.count == 0) return s;
        // A bucket's upper bound can lie above every sample in it; the exact max caps it.
        s.p50_ns = std::min(percentile(counts, s.count, 50), s.max_ns);
        s.p99_ns = std::min(percentile(counts, s.count, 99), s.max_ns);
        return s;
    }

private:
    static std::uint64_t percentile(const std::array<std::uint64_t, bucket_count>& counts, std::uint64_t total,
                                    std::uint64_t pct) noexcept
    {
        const std::uint64_t rank = (total * pct + 99) / 100; // ceil: the rank-th smallest sample
        std::uint64_t seen = 0;
        for (std::size_t i = 0; i < bucket_count; ++i) {
            seen += counts[i];
            if (seen >= rank) return bucket_upper(i);
        }
        return bucket_upper(bucket_count - 1);
    }

    std::array<std::atomic<std::uint64_t>, bucket_count> buckets_{};
    std::atomic<std::uint64_t> max_{0};
};

/// atomic_stats plus a latency histogram of every fault. The pager reads a
/// clock around each fault only for policies like this one (wants_latency).
class histogram_stats {
public:
    static constexpr bool wants_latency = true;

    struct snapshot_type {
        stats_snapshot counters;
        latency_summary latency;
    };

    void on_fault(const fault_event& e) noexcept
    {
        counters_.on_fault(e);
        latency_.record(e.latency_ns);
    }
    void on_prewarm(const fault_event& e) noexcept { counters_.on_prewarm(e); }
    void on_error() noexcept { counters_.on_error(); }
    void on_forward() noexcept { counters_.on_forward(); }
    void on_reinstall() noexcept { counters_.on_reinstall(); }

    [[nodiscard]] snapshot_type snapshot() const noexcept { return {counters_.snapshot(), latency_.summary()}; }

private:
    atomic_stats counters_;
    latency_histogram latency_;
};

static_assert(PagerStats<histogram_stats>);
static_assert(latency_histogram::bucket_of(~std::uint64_t{0}) == latency_histogram::bucket_count - 1,
              "the last bucket must hold the largest representable latency");

} // namespace squib
