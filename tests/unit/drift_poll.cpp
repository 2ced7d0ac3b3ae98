// The drift-poll skeleton backend: its thread, its hook, its shutdown.
#include <squib/backend/drift_poll.hpp>
#include <squib/core/pager.hpp>
#include <squib/index/flat.hpp>
#include <squib/source/memory.hpp>
#include <squib/stats/atomic.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>

#include <pthread.h>

namespace {

/// Shared between a test and the hook running on the backend's thread.
struct probe {
    std::atomic<int> checks{0};
    bool report_reinstall = false;
    bool report_error = false;
    char thread_name[16] = {};
};

struct counting_check {
    probe* p;
    squib::drift_result operator()() noexcept
    {
        if (p->checks.load() == 0) ::pthread_getname_np(::pthread_self(), p->thread_name, sizeof p->thread_name);
        p->checks.fetch_add(1);
        p->checks.notify_all();
        squib::drift_result r;
        r.reinstalled = p->report_reinstall;
        if (p->report_error) r.error = std::make_error_code(std::errc::permission_denied);
        return r;
    }
};

using backend = squib::drift_poll_backend<counting_check>;
using pager_type = squib::pager<squib::memory_source, squib::flat_index, backend, squib::atomic_stats>;

void wait_for_checks(const probe& p, int n)
{
    for (int seen = p.checks.load(); seen < n; seen = p.checks.load()) p.checks.wait(seen);
}

} // namespace

TEST_SUITE("drift_poll")
{
    TEST_CASE("the thread runs the hook every interval and counts reinstalls")
    {
        probe pr;
        pr.report_reinstall = true;
        pager_type p{squib::memory_source{}, squib::pager_options{.poll_interval = std::chrono::milliseconds{1}},
                     std::in_place, counting_check{&pr}, backend::options{.thread_name = "squib-drift-test"}};
        REQUIRE_FALSE(p.start());
        wait_for_checks(pr, 5);
        p.stop();
        const int checks = pr.checks.load();
        CHECK(checks >= 5);
        CHECK(p.backend().checks() == static_cast<std::uint64_t>(checks));
        CHECK(p.stats().snapshot().port_reinstalls == static_cast<std::uint64_t>(checks));
        CHECK(std::string(pr.thread_name) == "squib-drift-tes"); // the kernel keeps 15 characters
    }

    TEST_CASE("stop returns without waiting out a long interval")
    {
        probe pr;
        // An hour between checks: if stop waited for the interval this test would never end.
        pager_type p{squib::memory_source{}, squib::pager_options{.poll_interval = std::chrono::hours{1}},
                     std::in_place, counting_check{&pr}};
        REQUIRE_FALSE(p.start());
        wait_for_checks(pr, 1);
        p.stop();
        CHECK(pr.checks.load() == 1);
        CHECK(p.stats().snapshot().port_reinstalls == 0);
    }

    TEST_CASE("failed checks are counted and the loop goes on")
    {
        probe pr;
        pr.report_error = true;
        pager_type p{squib::memory_source{}, squib::pager_options{.poll_interval = std::chrono::microseconds{100}},
                     std::in_place, counting_check{&pr}};
        REQUIRE_FALSE(p.start());
        wait_for_checks(pr, 3);
        p.stop();
        CHECK(p.backend().check_errors() == p.backend().checks());
        CHECK(p.backend().checks() >= 3);
    }

    TEST_CASE("a thread that cannot be spawned is an error value")
    {
        probe pr;
        // No system can give a thread a 1 PiB stack: pthread_create must fail.
        pager_type p{squib::memory_source{}, squib::pager_options{}, std::in_place, counting_check{&pr},
                     backend::options{.thread_name = "squib-drift", .stack_size = std::size_t{1} << 50}};
        const std::error_code ec = p.start();
        CHECK(ec);
        CHECK(ec.category() == std::system_category());
        CHECK(pr.checks.load() == 0);
        p.stop(); // nothing to join; must not hang or crash
    }

    TEST_CASE("start twice, installs unsupported, ranges accepted")
    {
        probe pr;
        backend b{counting_check{&pr}};
        squib::detail::fault_handler_archetype h;
        REQUIRE_FALSE(b.start(h));
        CHECK(b.start(h) == squib::errc::already_running);
        const std::byte page[16] = {};
        CHECK(b.install(0x1000, page) == squib::errc::not_supported);
        CHECK(b.install_zero(0x1000, 4096) == squib::errc::not_supported);
        CHECK_FALSE(b.register_range({.base = 0x1000, .size = 0x1000}));
        CHECK_FALSE(b.unregister_range({.base = 0x1000, .size = 0x1000}));
        b.stop();
        // Restartable after a stop.
        REQUIRE_FALSE(b.start(h));
        b.stop();
    }

    TEST_CASE("prewarm through a backend that cannot install reports every page as failed")
    {
        probe pr;
        std::vector<std::byte> mem(4 * squib::page_4k);
        pager_type p{squib::memory_source{mem}, squib::pager_options{}, std::in_place, counting_check{&pr}};
        REQUIRE_FALSE(p.register_region({.base = 0x10000, .size = 4 * squib::page_4k}));
        const std::vector<std::uint64_t> addrs{0x10000, 0x11000};
        const auto report = p.prewarm(addrs);
        CHECK(report.installed == 0);
        CHECK(report.failed == 2);
        CHECK(report.first_error == squib::errc::not_supported);
    }
}
