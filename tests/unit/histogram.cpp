// The log-bucketed latency histogram.
#include <squib/stats/histogram.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <thread>
#include <vector>

using squib::latency_histogram;

TEST_SUITE("histogram")
{
    TEST_CASE("buckets tile the whole range in order")
    {
        for (std::size_t i = 0; i + 1 < latency_histogram::bucket_count; ++i) {
            const std::uint64_t upper = latency_histogram::bucket_upper(i);
            REQUIRE(latency_histogram::bucket_of(upper) == i);
            REQUIRE(latency_histogram::bucket_of(upper + 1) == i + 1);
        }
        CHECK(latency_histogram::bucket_of(0) == 0);
        CHECK(latency_histogram::bucket_of(7) == 7);
        CHECK(latency_histogram::bucket_of(8) == 8);
        CHECK(latency_histogram::bucket_upper(latency_histogram::bucket_count - 1) == ~std::uint64_t{0});
    }

    TEST_CASE("a bucket is at most a quarter wider than its lower bound")
    {
        for (std::uint64_t v : {9ull, 100ull, 1000ull, 123456ull, 1ull << 40, (1ull << 63) + 5}) {
            const auto upper = latency_histogram::bucket_upper(latency_histogram::bucket_of(v));
            CHECK(upper >= v);
            CHECK(upper - v <= v / 4);
        }
    }

    TEST_CASE("percentiles of a known distribution")
    {
        latency_histogram h;
        CHECK(h.summary() == squib::latency_summary{});
        for (std::uint64_t v = 1; v <= 1000; ++v) h.record(v * 1000); // 1 us .. 1 ms
        const auto s = h.summary();
        CHECK(s.count == 1000);
        CHECK(s.max_ns == 1'000'000);
        CHECK(s.p50_ns >= 500'000);
        CHECK(s.p50_ns <= 500'000 + 500'000 / 4);
        CHECK(s.p99_ns >= 990'000);
        CHECK(s.p99_ns <= 1'000'000);
    }

    TEST_CASE("one slow outlier moves max and not the median")
    {
        latency_histogram h;
        for (int i = 0; i < 99; ++i) h.record(100);
        h.record(5'000'000);
        const auto s = h.summary();
        CHECK(s.p50_ns == latency_histogram::bucket_upper(latency_histogram::bucket_of(100)));
        CHECK(s.p50_ns >= 100);
        CHECK(s.p99_ns == s.p50_ns);
        CHECK(s.max_ns == 5'000'000);
    }

    TEST_CASE("recording from several threads loses nothing")
    {
        latency_histogram h;
        std::vector<std::thread> threads;
        for (int t = 0; t < 4; ++t)
            threads.emplace_back([&h, t] {
                for (std::uint64_t i = 0; i < 10000; ++i) h.record(i + static_cast<std::uint64_t>(t) * 7);
            });
        for (auto& t : threads) t.join();
        const auto s = h.summary();
        CHECK(s.count == 40000);
        CHECK(s.max_ns == 9999 + 21);
    }
}
