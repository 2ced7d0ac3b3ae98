// Faults served from several threads while regions change underneath them.
#include <squib/backend/mock.hpp>
#include <squib/core/pager.hpp>
#include <squib/index/flat.hpp>
#include <squib/source/memory.hpp>
#include <squib/stats/atomic.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <latch>
#include <thread>
#include <vector>

namespace {
constexpr std::uint64_t page = squib::page_4k;
constexpr std::uint64_t fixed_base = 0x1000'0000;
constexpr std::uint64_t fixed_pages = 64;
constexpr std::uint64_t moving_base = 0x2000'0000; // registered and unregistered over and over
constexpr std::uint64_t moving_pages = 16;
using pager_type = squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend, squib::atomic_stats>;
} // namespace

TEST_SUITE("pager_concurrency")
{
    TEST_CASE("fault threads and a registering thread run at once without wrong bytes")
    {
        const auto snapshot = squib::test::pattern((fixed_pages + 32 * moving_pages) * page);
        pager_type p{squib::memory_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = fixed_base, .size = fixed_pages * page}));

        constexpr int fault_threads = 4;
        constexpr int rounds = 300;
        std::latch go(fault_threads + 1);
        std::atomic<bool> registering_done{false};
        std::atomic<std::uint64_t> wrong{0}, fixed_served{0}, moving_served{0}, moving_missed{0};

        std::vector<std::thread> threads;
        for (int t = 0; t < fault_threads; ++t) {
            threads.emplace_back([&, t] {
                std::vector<std::byte> buf(page);
                go.arrive_and_wait();
                std::uint64_t i = static_cast<std::uint64_t>(t);
                // Keep going until the registering thread is done, and at least a few rounds.
                for (int n = 0; n < rounds || !registering_done.load(std::memory_order_acquire); ++n, ++i) {
                    const std::uint64_t fp = i % fixed_pages;
                    auto f = p.serve(fixed_base + fp * page + (i % 97), buf);
                    if (!f || std::memcmp(buf.data(), snapshot.data() + fp * page, page) != 0)
                        wrong.fetch_add(1);
                    else
                        fixed_served.fetch_add(1);

                    const std::uint64_t mp = i % moving_pages;
                    auto g = p.serve(moving_base + mp * page, buf);
                    if (!g) {
                        if (g.error() == squib::errc::out_of_region)
                            moving_missed.fetch_add(1);
                        else
                            wrong.fetch_add(1);
                        continue;
                    }
                    // Whichever incarnation of the moving region answered, the bytes must be its own.
                    const std::uint64_t src = g->where.source_offset + mp * page;
                    if (g->source_address != src || std::memcmp(buf.data(), snapshot.data() + src, page) != 0)
                        wrong.fetch_add(1);
                    else
                        moving_served.fetch_add(1);
                }
            });
        }

        std::thread registrar([&] {
            go.arrive_and_wait();
            for (int n = 0; n < 200; ++n) {
                const std::uint64_t offset = (fixed_pages + (n % 32) * moving_pages) * page;
                if (p.register_region({.base = moving_base, .size = moving_pages * page, .source_offset = offset}))
                    wrong.fetch_add(1);
                if (p.unregister_region(moving_base)) wrong.fetch_add(1);
            }
            registering_done.store(true, std::memory_order_release);
        });

        registrar.join();
        for (auto& t : threads) t.join();
        CHECK(wrong.load() == 0);
        CHECK(fixed_served.load() >= fault_threads * rounds);
        CHECK(moving_served.load() + moving_missed.load() >= fault_threads * rounds);
        CHECK(p.region_count() == 1);
        CHECK(p.stats().snapshot().faults == fixed_served.load() + moving_served.load());
    }

    TEST_CASE("stop while faults are being injected from other threads")
    {
        const auto snapshot = squib::test::pattern(fixed_pages * page);
        pager_type p{squib::memory_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = fixed_base, .size = fixed_pages * page}));
        REQUIRE_FALSE(p.start());

        constexpr int fault_threads = 3;
        std::latch started(fault_threads + 1);
        std::atomic<std::uint64_t> served{0}, refused{0}, other{0};
        std::vector<std::thread> threads;
        for (int t = 0; t < fault_threads; ++t) {
            threads.emplace_back([&, t] {
                started.arrive_and_wait();
                for (std::uint64_t i = 0;; ++i) {
                    auto ec = p.backend().inject_fault(fixed_base + ((i + t) % fixed_pages) * page, page);
                    if (!ec) {
                        served.fetch_add(1);
                    } else if (ec == squib::errc::not_running) {
                        refused.fetch_add(1);
                        return; // stopped: the backend refuses from now on
                    } else {
                        other.fetch_add(1);
                        return;
                    }
                }
            });
        }
        started.arrive_and_wait();
        p.stop();
        for (auto& t : threads) t.join();
        CHECK(other.load() == 0);
        CHECK(refused.load() == fault_threads);
        CHECK(p.stats().snapshot().faults == served.load());
    }
}
