// The counting stats policies.
#include <squib/stats/atomic.hpp>
#include <squib/stats/histogram.hpp>
#include <squib/stats/null.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <thread>
#include <type_traits>
#include <vector>

TEST_SUITE("stats")
{
    TEST_CASE("null_stats is empty")
    {
        static_assert(std::is_empty_v<squib::null_stats>, "null_stats must have no state");
        static_assert(!squib::null_stats::wants_latency);
        squib::null_stats s;
        s.on_fault({4096, 0, false});
        CHECK(std::is_empty_v<decltype(s.snapshot())>);
    }

    TEST_CASE_TEMPLATE("counters count what they are told", Stats, squib::atomic_stats, squib::histogram_stats)
    {
        Stats s;
        s.on_fault({4096, 10, false});
        s.on_fault({4096, 20, true});
        s.on_prewarm({2u << 20, 0, false});
        s.on_error();
        s.on_forward();
        s.on_forward();
        s.on_reinstall();
        squib::stats_snapshot c;
        if constexpr (std::is_same_v<Stats, squib::atomic_stats>) c = s.snapshot();
        else c = s.snapshot().counters;
        CHECK(c.faults == 2);
        CHECK(c.prewarmed == 1);
        CHECK(c.zero_pages == 1);
        CHECK(c.bytes_served == 2 * 4096 + (2u << 20));
        CHECK(c.errors == 1);
        CHECK(c.forwarded == 2);
        CHECK(c.port_reinstalls == 1);
    }

    TEST_CASE("histogram_stats measures faults only")
    {
        static_assert(squib::histogram_stats::wants_latency);
        squib::histogram_stats s;
        s.on_fault({4096, 1000, false});
        s.on_prewarm({4096, 0, false});
        const auto snap = s.snapshot();
        CHECK(snap.latency.count == 1);
        CHECK(snap.latency.max_ns == 1000);
    }

    TEST_CASE("atomic_stats from several threads")
    {
        squib::atomic_stats s;
        std::vector<std::thread> threads;
        for (int t = 0; t < 4; ++t)
            threads.emplace_back([&s] {
                for (int i = 0; i < 5000; ++i) s.on_fault({4096, 0, i % 2 == 0});
            });
        for (auto& t : threads) t.join();
        const auto snap = s.snapshot();
        CHECK(snap.faults == 20000);
        CHECK(snap.zero_pages == 10000);
        CHECK(snap.bytes_served == 20000ull * 4096);
    }
}
