// The pager template: regions, the fault path, prewarm, shutdown, stats.
#include <squib/backend/mock.hpp>
#include <squib/core/pager.hpp>
#include <squib/index/flat.hpp>
#include <squib/index/single.hpp>
#include <squib/source/memory.hpp>
#include <squib/stats/atomic.hpp>
#include <squib/stats/histogram.hpp>
#include <squib/stats/null.hpp>

#include "../support/sources.hpp"
#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

using squib::errc;
using squib::region;
using squib::test::pattern;

constexpr std::uint64_t ram_base = 0x4000'0000;
constexpr std::uint64_t ram_size = 64 * squib::page_4k;

/// One combination of policies; the source is built over a caller's snapshot bytes.
template <class Source, class Index, class Stats>
struct combo {
    using pager_type = squib::pager<Source, Index, squib::mock_backend, Stats>;
    static Source make_source(std::span<const std::byte> bytes) { return Source{bytes}; }
};

using memory_flat_null = combo<squib::memory_source, squib::flat_index, squib::null_stats>;
using memory_single_atomic = combo<squib::memory_source, squib::single_region_index, squib::atomic_stats>;
using readonly_flat_histogram = combo<squib::test::read_only_source, squib::flat_index, squib::histogram_stats>;
using readonly_single_null = combo<squib::test::read_only_source, squib::single_region_index, squib::null_stats>;

template <class Stats>
std::uint64_t faults_of(const Stats& s)
{
    if constexpr (std::is_same_v<Stats, squib::atomic_stats>) return s.snapshot().faults;
    else if constexpr (std::is_same_v<Stats, squib::histogram_stats>) return s.snapshot().counters.faults;
    else return 0;
}

} // namespace

TEST_SUITE("pager")
{
    TEST_CASE_TEMPLATE("a fault installs the snapshot bytes of its page", C, memory_flat_null, memory_single_atomic,
                       readonly_flat_histogram, readonly_single_null)
    {
        const auto snapshot = pattern(ram_size);
        typename C::pager_type p{C::make_source(snapshot)};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));
        REQUIRE_FALSE(p.start());

        // An address in the middle of page 5: the whole of page 5 is installed.
        const std::uint64_t addr = ram_base + 5 * squib::page_4k + 123;
        REQUIRE_FALSE(p.backend().inject_fault(addr));
        auto page = p.backend().page_at(ram_base + 5 * squib::page_4k);
        REQUIRE(page.has_value());
        CHECK(std::equal(page->begin(), page->end(), snapshot.begin() + 5 * squib::page_4k));

        // Every page, once each.
        for (std::uint64_t off = 0; off < ram_size; off += squib::page_4k) {
            REQUIRE_FALSE(p.backend().inject_fault(ram_base + off));
            auto got = p.backend().page_at(ram_base + off);
            REQUIRE(got.has_value());
            REQUIRE(got->size() == squib::page_4k);
            CHECK(std::memcmp(got->data(), snapshot.data() + off, squib::page_4k) == 0);
        }
        if constexpr (!std::is_same_v<typename C::pager_type::stats_type, squib::null_stats>)
            CHECK(faults_of(p.stats()) == ram_size / squib::page_4k + 1);
    }

    TEST_CASE_TEMPLATE("addresses outside every region are errors and install nothing", C, memory_flat_null,
                       memory_single_atomic, readonly_flat_histogram)
    {
        const auto snapshot = pattern(ram_size);
        typename C::pager_type p{C::make_source(snapshot)};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));
        REQUIRE_FALSE(p.start());
        CHECK(p.backend().inject_fault(ram_base - 1) == errc::out_of_region);
        CHECK(p.backend().inject_fault(ram_base + ram_size) == errc::out_of_region);
        CHECK(p.backend().inject_fault(0) == errc::out_of_region);
        CHECK(p.backend().inject_fault(~std::uint64_t{0}) == errc::out_of_region);
        CHECK(p.backend().installs().empty());
        CHECK(p.contains(ram_base));
        CHECK(p.contains(ram_base + ram_size - 1));
        CHECK_FALSE(p.contains(ram_base + ram_size));
    }

    TEST_CASE("region offsets into the source are honoured")
    {
        const auto snapshot = pattern(4 * ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend> p{squib::memory_source{snapshot}};
        // Two regions whose bytes live at different places in the snapshot.
        REQUIRE_FALSE(p.register_region({.base = 0x1000'0000, .size = ram_size, .source_offset = 2 * ram_size}));
        REQUIRE_FALSE(p.register_region({.base = 0x2000'0000, .size = ram_size, .source_offset = 0}));
        REQUIRE_FALSE(p.start());
        REQUIRE_FALSE(p.backend().inject_fault(0x1000'0000 + 3 * squib::page_4k));
        REQUIRE_FALSE(p.backend().inject_fault(0x2000'0000 + 3 * squib::page_4k));
        auto a = p.backend().page_at(0x1000'0000 + 3 * squib::page_4k);
        auto b = p.backend().page_at(0x2000'0000 + 3 * squib::page_4k);
        REQUIRE(a.has_value());
        REQUIRE(b.has_value());
        CHECK(std::memcmp(a->data(), snapshot.data() + 2 * ram_size + 3 * squib::page_4k, squib::page_4k) == 0);
        CHECK(std::memcmp(b->data(), snapshot.data() + 3 * squib::page_4k, squib::page_4k) == 0);
    }

    TEST_CASE("2 MiB pages are served whole")
    {
        const auto snapshot = pattern(2 * squib::page_2m);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend, squib::atomic_stats> p{
            squib::memory_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = 0x4000'0000, .size = 2 * squib::page_2m, .page_size = squib::page_2m}));
        REQUIRE_FALSE(p.start());
        REQUIRE_FALSE(p.backend().inject_fault(0x4000'0000 + squib::page_2m + 4097));
        auto page = p.backend().page_at(0x4000'0000 + squib::page_2m);
        REQUIRE(page.has_value());
        REQUIRE(page->size() == squib::page_2m);
        CHECK(std::memcmp(page->data(), snapshot.data() + squib::page_2m, squib::page_2m) == 0);
        CHECK(p.stats().snapshot().bytes_served == squib::page_2m);
    }

    TEST_CASE("invalid and overlapping regions are refused and change nothing")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend> p{squib::memory_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));

        CHECK(p.register_region({.base = ram_base + 1, .size = squib::page_4k}) == errc::invalid_region);
        CHECK(p.register_region({.base = 0x9000'0000, .size = 100}) == errc::invalid_region);
        CHECK(p.register_region({.base = 0x9000'0000, .size = 0}) == errc::invalid_region);
        CHECK(p.register_region({.base = 0x9000'0000, .size = squib::page_4k, .source_offset = 7}) ==
              errc::invalid_region);
        CHECK(p.register_region({.base = 0x9000'0000, .size = squib::page_4k, .page_size = 3000}) ==
              errc::bad_page_size);
        CHECK(p.register_region({.base = ~std::uint64_t{0} - squib::page_4k + 1, .size = 2 * squib::page_4k}) ==
              errc::invalid_region);
        // Overlaps on either side, inside, and around.
        CHECK(p.register_region({.base = ram_base - squib::page_4k, .size = 2 * squib::page_4k}) ==
              errc::overlapping_region);
        CHECK(p.register_region({.base = ram_base + ram_size - squib::page_4k, .size = 2 * squib::page_4k}) ==
              errc::overlapping_region);
        CHECK(p.register_region({.base = ram_base + squib::page_4k, .size = squib::page_4k}) ==
              errc::overlapping_region);
        CHECK(p.register_region({.base = ram_base - squib::page_4k, .size = ram_size + 2 * squib::page_4k}) ==
              errc::overlapping_region);
        // Adjacent is fine.
        CHECK_FALSE(p.register_region({.base = ram_base + ram_size, .size = squib::page_4k}));
        CHECK(p.region_count() == 2);
        CHECK(p.backend().ranges().size() == 2);
    }

    TEST_CASE("unregistering a region stops serving it")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend> p{squib::memory_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));
        REQUIRE_FALSE(p.start());
        CHECK(p.unregister_region(ram_base + squib::page_4k) == errc::region_not_found);
        CHECK(p.unregister_region(0x1234'0000) == errc::region_not_found);
        REQUIRE_FALSE(p.unregister_region(ram_base));
        CHECK(p.region_count() == 0);
        CHECK(p.backend().ranges().empty());
        CHECK(p.backend().inject_fault(ram_base) == errc::out_of_region);
        // It can come back.
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));
        CHECK_FALSE(p.backend().inject_fault(ram_base));
    }

    TEST_CASE("a backend that refuses a range leaves the index unchanged")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend> p{squib::memory_source{snapshot}};
        p.backend().fail_register(std::make_error_code(std::errc::operation_not_permitted));
        CHECK(p.register_region({.base = ram_base, .size = ram_size}) == std::errc::operation_not_permitted);
        CHECK(p.region_count() == 0);
        CHECK_FALSE(p.contains(ram_base));

        p.backend().fail_register({});
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));
        p.backend().fail_unregister(std::make_error_code(std::errc::device_or_resource_busy));
        CHECK(p.unregister_region(ram_base) == std::errc::device_or_resource_busy);
        CHECK(p.contains(ram_base)); // kept: the backend still delivers its faults
    }

    TEST_CASE("regions() lists what is registered in ascending order")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend> p{squib::memory_source{snapshot}};
        const region hi{.base = 0x8000'0000, .size = squib::page_4k};
        const region lo{.base = 0x1000'0000, .size = 2 * squib::page_4k, .source_offset = squib::page_4k};
        REQUIRE_FALSE(p.register_region(hi));
        REQUIRE_FALSE(p.register_region(lo));
        const auto all = p.regions();
        REQUIRE(all.size() == 2);
        CHECK(all[0] == lo);
        CHECK(all[1] == hi);
    }

    TEST_CASE("serve fills a caller buffer and checks its size")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::test::read_only_source, squib::flat_index, squib::mock_backend, squib::atomic_stats> p{
            squib::test::read_only_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));
        std::vector<std::byte> buf(squib::page_4k);
        auto f = p.serve(ram_base + 7 * squib::page_4k + 9, buf);
        REQUIRE(f);
        CHECK(f->page == ram_base + 7 * squib::page_4k);
        CHECK(f->page_size == squib::page_4k);
        CHECK(f->source_address == 7 * squib::page_4k);
        CHECK(std::memcmp(buf.data(), snapshot.data() + 7 * squib::page_4k, squib::page_4k) == 0);

        std::vector<std::byte> small(squib::page_4k - 1);
        CHECK(p.serve(ram_base, small).error() == errc::bad_length);
        CHECK(p.serve(ram_base + ram_size, buf).error() == errc::out_of_region);
        const auto s = p.stats().snapshot();
        CHECK(s.faults == 1);
        CHECK(s.errors == 2);
    }

    TEST_CASE("serve_view hands out the source's bytes without a copy")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend> p{squib::memory_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size, .source_offset = 0}));
        auto v = p.serve_view(ram_base + 3 * squib::page_4k + 1);
        REQUIRE(v);
        CHECK(v->bytes.data() == snapshot.data() + 3 * squib::page_4k);
        CHECK(v->bytes.size() == squib::page_4k);
        CHECK(p.serve_view(ram_base - 1).error() == errc::out_of_region);
    }

    TEST_CASE("a region that reaches past the end of the source reports a short read")
    {
        const auto snapshot = pattern(4 * squib::page_4k);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend, squib::atomic_stats> p{
            squib::memory_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = 8 * squib::page_4k}));
        REQUIRE_FALSE(p.start());
        CHECK_FALSE(p.backend().inject_fault(ram_base + 3 * squib::page_4k));
        CHECK(p.backend().inject_fault(ram_base + 4 * squib::page_4k) == errc::short_read);
        CHECK_FALSE(p.backend().page_at(ram_base + 4 * squib::page_4k).has_value());
        CHECK(p.stats().snapshot().errors == 1);
    }

    TEST_CASE("source and install failures are returned and counted, never installed")
    {
        squib::pager<squib::test::failing_source, squib::flat_index, squib::mock_backend, squib::atomic_stats> p{
            squib::test::failing_source{std::make_error_code(std::errc::io_error)}};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));
        REQUIRE_FALSE(p.start());
        CHECK(p.backend().inject_fault(ram_base) == std::errc::io_error);
        CHECK(p.backend().installs().empty());

        const auto snapshot = pattern(ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend, squib::atomic_stats> q{
            squib::memory_source{snapshot}};
        REQUIRE_FALSE(q.register_region({.base = ram_base, .size = ram_size}));
        REQUIRE_FALSE(q.start());
        q.backend().fail_installs(std::make_error_code(std::errc::no_such_process), 1);
        CHECK(q.backend().inject_fault(ram_base) == std::errc::no_such_process);
        CHECK_FALSE(q.backend().inject_fault(ram_base)); // the next attempt goes through
        const auto s = q.stats().snapshot();
        CHECK(s.errors == 1);
        CHECK(s.faults == 1);
    }

    TEST_CASE("a scratch buffer smaller than the page is an error for a read-only source")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::test::read_only_source, squib::flat_index, squib::mock_backend> p{
            squib::test::read_only_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));
        REQUIRE_FALSE(p.start());
        CHECK(p.backend().inject_fault(ram_base, squib::page_4k / 2) == errc::bad_length);
        CHECK(p.source().reads() == 0);
    }

    TEST_CASE("holes in a sparse source are installed as zero pages without reading")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::test::sparse_memory_source, squib::flat_index, squib::mock_backend, squib::atomic_stats> p{
            squib::test::sparse_memory_source{snapshot, 8 * squib::page_4k, 16 * squib::page_4k}};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));
        REQUIRE_FALSE(p.start());
        REQUIRE_FALSE(p.backend().inject_fault(ram_base + 9 * squib::page_4k));
        REQUIRE_FALSE(p.backend().inject_fault(ram_base + 2 * squib::page_4k));
        const auto log = p.backend().installs();
        REQUIRE(log.size() == 2);
        CHECK(log[0].zero);
        CHECK(log[0].addr == ram_base + 9 * squib::page_4k);
        CHECK_FALSE(log[1].zero);
        auto zero_page = p.backend().page_at(ram_base + 9 * squib::page_4k);
        REQUIRE(zero_page.has_value());
        CHECK(std::all_of(zero_page->begin(), zero_page->end(), [](std::byte b) { return b == std::byte{0}; }));
        const auto s = p.stats().snapshot();
        CHECK(s.zero_pages == 1);
        CHECK(s.faults == 2);
    }

    TEST_CASE("prewarm installs each distinct page once and reports failures")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend, squib::atomic_stats> p{
            squib::memory_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));
        const std::vector<std::uint64_t> addrs{ram_base + 10,
                                               ram_base + 20, // same page as the first
                                               ram_base + 3 * squib::page_4k,
                                               0x10, // outside every region
                                               ram_base + ram_size - 1};
        const auto report = p.prewarm(addrs);
        CHECK(report.installed == 3);
        CHECK(report.failed == 1);
        CHECK(report.first_error == errc::out_of_region);
        for (std::uint64_t page : {ram_base, ram_base + 3 * squib::page_4k, ram_base + ram_size - squib::page_4k}) {
            auto got = p.backend().page_at(page);
            REQUIRE(got.has_value());
            CHECK(std::memcmp(got->data(), snapshot.data() + (page - ram_base), squib::page_4k) == 0);
        }
        const auto s = p.stats().snapshot();
        CHECK(s.prewarmed == 3);
        CHECK(s.faults == 0);
        CHECK(s.bytes_served == 3 * squib::page_4k);
    }

    TEST_CASE("prewarm through a read-only source copies via scratch")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::test::read_only_source, squib::single_region_index, squib::mock_backend> p{
            squib::test::read_only_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));
        const std::vector<std::uint64_t> addrs{ram_base + 5 * squib::page_4k};
        CHECK(p.prewarm(addrs).installed == 1);
        CHECK(p.source().reads() == 1);
        p.backend().fail_installs(std::make_error_code(std::errc::bad_address), 1);
        const auto report = p.prewarm(addrs);
        CHECK(report.installed == 0);
        CHECK(report.first_error == std::errc::bad_address);
    }

    TEST_CASE("start, stop and shutdown")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend> p{squib::memory_source{snapshot}};
        auto token = p.stop_token();
        CHECK_FALSE(token.stop_requested());
        CHECK_FALSE(p.shutdown_requested());

        p.backend().fail_start(std::make_error_code(std::errc::resource_unavailable_try_again));
        CHECK(p.start() == std::errc::resource_unavailable_try_again);
        p.backend().fail_start({});
        REQUIRE_FALSE(p.start());
        CHECK(p.start() == errc::already_running);
        CHECK(p.backend().running());

        p.stop();
        CHECK(token.stop_requested());
        CHECK(p.shutdown_requested());
        CHECK_FALSE(p.backend().running());
        CHECK(p.backend().stops() == 1);
        CHECK(p.start() == errc::shutting_down);
        CHECK(p.register_region({.base = ram_base, .size = ram_size}) == errc::shutting_down);
        p.stop(); // twice is fine
        CHECK(p.backend().stops() == 1);
        CHECK(p.backend().inject_fault(ram_base) == errc::not_running);
    }

    TEST_CASE("request_shutdown is seen through the handle before the backend stops")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend> p{squib::memory_source{snapshot}};
        REQUIRE_FALSE(p.start());
        auto token = p.stop_token();
        p.request_shutdown();
        CHECK(token.stop_requested());
        CHECK(p.backend().running()); // only stop() joins the backend
    }

    TEST_CASE("the poll interval is a setting")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend> p{
            squib::memory_source{snapshot}, squib::pager_options{.poll_interval = std::chrono::milliseconds{25}}};
        CHECK(p.poll_interval() == std::chrono::milliseconds{25});
        p.set_poll_interval(std::chrono::seconds{2});
        CHECK(p.poll_interval() == std::chrono::seconds{2});
    }

    TEST_CASE("histogram stats record one latency per fault")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend, squib::histogram_stats> p{
            squib::memory_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = ram_base, .size = ram_size}));
        REQUIRE_FALSE(p.start());
        for (int i = 0; i < 10; ++i) REQUIRE_FALSE(p.backend().inject_fault(ram_base + i * squib::page_4k));
        const auto s = p.stats().snapshot();
        CHECK(s.counters.faults == 10);
        CHECK(s.latency.count == 10);
        CHECK(s.latency.p50_ns <= s.latency.p99_ns);
        CHECK(s.latency.p99_ns <= s.latency.max_ns);
        CHECK(s.latency.max_ns > 0);
    }

    TEST_CASE("an empty stats policy costs no space")
    {
        using with_null = squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend, squib::null_stats>;
        using core = squib::detail::pager_core<squib::memory_source, squib::flat_index, squib::mock_backend>;
        static_assert(sizeof(with_null) == sizeof(core), "null_stats must be free");
        using with_atomic =
            squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend, squib::atomic_stats>;
        static_assert(sizeof(with_atomic) > sizeof(core), "a real stats policy takes room");
        CHECK(sizeof(with_null) < sizeof(with_atomic));
    }

    TEST_CASE("the stats policy hears about forwards and reinstalls from the backend")
    {
        const auto snapshot = pattern(ram_size);
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend, squib::atomic_stats> p{
            squib::memory_source{snapshot}};
        p.note_forward();
        p.note_forward();
        p.note_reinstall();
        const auto s = p.stats().snapshot();
        CHECK(s.forwarded == 2);
        CHECK(s.port_reinstalls == 1);
    }

    TEST_CASE("fault-around installs the aligned block, clipped to the region")
    {
        const auto snapshot = pattern(64 * squib::page_4k);
        constexpr std::uint64_t around = 16 * squib::page_4k; // 64 KiB blocks
        // The region starts 3 pages into a block and ends 5 pages into the next-but-one.
        constexpr std::uint64_t base = 0x100'0000 + 3 * squib::page_4k;
        constexpr std::uint64_t size = (13 + 16 + 5) * squib::page_4k;
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend, squib::atomic_stats> p{
            squib::memory_source{snapshot}};
        REQUIRE_FALSE(p.register_region({.base = base, .size = size, .source_offset = squib::page_4k}));
        REQUIRE_FALSE(p.start());
        std::vector<std::byte> scratch(around);
        auto& b = p.backend();

        struct forward { // hands faults to the mock with a chosen fault-around size
            squib::mock_backend& m;
            std::error_code install(std::uint64_t a, std::span<const std::byte> bytes) noexcept { return m.install(a, bytes); }
            std::error_code install_zero(std::uint64_t a, std::uint64_t len) noexcept { return m.install_zero(a, len); }
        } installer{b};

        // First (clipped) block: from the region base to the block end.
        REQUIRE_FALSE(p.handle_fault(base + squib::page_4k, scratch, installer, around));
        // Middle block: whole.
        REQUIRE_FALSE(p.handle_fault(0x101'0000 + 7 * squib::page_4k + 5, scratch, installer, around));
        // Last block: clipped at the region end.
        REQUIRE_FALSE(p.handle_fault(base + size - 1, scratch, installer, around));
        // Not a power of two: one page.
        REQUIRE_FALSE(p.handle_fault(0x101'0000 + 9 * squib::page_4k, scratch, installer, 3 * squib::page_4k));

        const auto log = b.installs();
        REQUIRE(log.size() == 4);
        CHECK(log[0].addr == base);
        CHECK(log[0].len == 13 * squib::page_4k);
        CHECK(log[1].addr == 0x101'0000);
        CHECK(log[1].len == around);
        CHECK(log[2].addr == 0x102'0000);
        CHECK(log[2].len == 5 * squib::page_4k);
        CHECK(log[3].addr == 0x101'0000 + 9 * squib::page_4k);
        CHECK(log[3].len == squib::page_4k);
        // The bytes come from the right place in the source.
        const auto middle = b.page_at(0x101'0000);
        REQUIRE(middle.has_value());
        REQUIRE(middle->size() == around);
        const std::uint64_t src = squib::page_4k + (0x101'0000 - base);
        CHECK(std::memcmp(middle->data(), snapshot.data() + src, around) == 0);
        CHECK(p.stats().snapshot().bytes_served == (13 + 16 + 5 + 1) * squib::page_4k);

        // A read-only source needs scratch for the whole block.
        squib::pager<squib::test::read_only_source, squib::flat_index, squib::mock_backend> q{
            squib::test::read_only_source{snapshot}};
        REQUIRE_FALSE(q.register_region({.base = base, .size = size, .source_offset = squib::page_4k}));
        forward qi{q.backend()};
        // With too little scratch for the block, the faulting page alone is served.
        std::vector<std::byte> small(squib::page_4k);
        CHECK_FALSE(q.handle_fault(0x101'0000 + 2 * squib::page_4k, small, qi, around));
        CHECK(q.backend().installs().at(0).addr == 0x101'0000 + 2 * squib::page_4k);
        CHECK(q.backend().installs().at(0).len == squib::page_4k);
        CHECK_FALSE(q.handle_fault(0x101'0000, scratch, qi, around));
        CHECK(q.backend().installs().at(1).len == around);

        // A block that reaches past the end of the source still serves the faulting page.
        squib::pager<squib::memory_source, squib::flat_index, squib::mock_backend, squib::atomic_stats> r{
            squib::memory_source{std::span(snapshot).first(20 * squib::page_4k)}};
        REQUIRE_FALSE(r.register_region({.base = 0x200'0000, .size = 32 * squib::page_4k}));
        forward ri{r.backend()};
        CHECK_FALSE(r.handle_fault(0x200'0000 + 17 * squib::page_4k, scratch, ri, around));
        CHECK(r.backend().installs().at(0).len == squib::page_4k);
        CHECK(r.handle_fault(0x200'0000 + 21 * squib::page_4k, scratch, ri, around) == errc::short_read);
        CHECK(r.stats().snapshot().errors == 1); // the fallback is not an error; the page past the end is
    }
}
