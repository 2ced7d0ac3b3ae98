// squib-pager: the stats policy that counts nothing and costs nothing.
#pragma once

#include <squib/concepts.hpp>

namespace squib {

/// Counts nothing. Empty, and the pager stores it with [[no_unique_address]],
/// so a pager with null_stats is exactly as large as one without stats.
struct null_stats {
    static constexpr bool wants_latency = false;

    struct snapshot_type {};

    void on_fault(const fault_event&) noexcept {}
    void on_prewarm(const fault_event&) noexcept {}
    void on_error() noexcept {}
    void on_forward() noexcept {}
    void on_reinstall() noexcept {}
    [[nodiscard]] snapshot_type snapshot() const noexcept { return {}; }
};

static_assert(PagerStats<null_stats>);

} // namespace squib
