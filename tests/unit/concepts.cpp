// Each policy concept, checked both ways: the shipped models pass, near misses fail.
#include <squib/backend/drift_poll.hpp>
#include <squib/backend/mock.hpp>
#include <squib/concepts.hpp>
#include <squib/index/flat.hpp>
#include <squib/index/single.hpp>
#include <squib/source/file.hpp>
#include <squib/source/mapped_file.hpp>
#include <squib/source/memory.hpp>
#include <squib/source/socket.hpp>
#include <squib/stats/atomic.hpp>
#include <squib/stats/histogram.hpp>
#include <squib/stats/null.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <map>

namespace near_miss {

struct read_may_throw { // read is not noexcept: could throw through a fault handler
    std::error_code read(std::uint64_t, std::span<std::byte>) { return {}; }
};
struct read_returns_bool {
    bool read(std::uint64_t, std::span<std::byte>) noexcept { return true; }
};
struct view_without_read {
    squib::result<std::span<const std::byte>> view(std::uint64_t, std::size_t) const noexcept { return errc(); }
    static squib::errc errc() noexcept { return squib::errc::short_read; }
};
struct source_with_bad_view {
    std::error_code read(std::uint64_t, std::span<std::byte>) noexcept { return {}; }
    std::span<const std::byte> view(std::uint64_t, std::size_t) const noexcept { return {}; } // no error channel
};

struct find_may_throw_index {
    std::error_code insert(const squib::region&) { return {}; }
    std::error_code erase(std::uint64_t) { return {}; }
    const squib::region* find(std::uint64_t) const { return nullptr; } // not noexcept
    std::size_t size() const noexcept { return 0; }
    template <class F>
    void for_each(F&&) const
    {
    }
};
struct uncopyable_index {
    uncopyable_index() = default;
    uncopyable_index(const uncopyable_index&) = delete;
    std::error_code insert(const squib::region&) { return {}; }
    std::error_code erase(std::uint64_t) { return {}; }
    const squib::region* find(std::uint64_t) const noexcept { return nullptr; }
    std::size_t size() const noexcept { return 0; }
    template <class F>
    void for_each(F&&) const
    {
    }
};

struct stats_without_latency_flag {
    void on_fault(const squib::fault_event&) noexcept {}
    void on_prewarm(const squib::fault_event&) noexcept {}
    void on_error() noexcept {}
    void on_forward() noexcept {}
    void on_reinstall() noexcept {}
    int snapshot() const noexcept { return 0; }
};
struct stats_that_may_throw {
    static constexpr bool wants_latency = false;
    void on_fault(const squib::fault_event&) {} // not noexcept
    void on_prewarm(const squib::fault_event&) noexcept {}
    void on_error() noexcept {}
    void on_forward() noexcept {}
    void on_reinstall() noexcept {}
    int snapshot() const noexcept { return 0; }
};

struct backend_without_install {
    template <class H>
    std::error_code start(H&)
    {
        return {};
    }
    void stop() noexcept {}
    std::error_code register_range(const squib::region&) { return {}; }
    std::error_code unregister_range(const squib::region&) { return {}; }
};
struct backend_with_throwing_stop {
    template <class H>
    std::error_code start(H&)
    {
        return {};
    }
    void stop() {} // may throw: shutdown paths must not
    std::error_code register_range(const squib::region&) { return {}; }
    std::error_code unregister_range(const squib::region&) { return {}; }
    std::error_code install(std::uint64_t, std::span<const std::byte>) noexcept { return {}; }
    std::error_code install_zero(std::uint64_t, std::uint64_t) noexcept { return {}; }
};

} // namespace near_miss

// Shipped models.
static_assert(squib::PageSource<squib::memory_source>);
static_assert(squib::MappedPageSource<squib::memory_source>);
static_assert(!squib::SparsePageSource<squib::memory_source>);
static_assert(squib::PageSource<squib::file_source>);
static_assert(!squib::MappedPageSource<squib::file_source>);
static_assert(squib::MappedPageSource<squib::mapped_file_source>);
static_assert(squib::SparsePageSource<squib::mapped_file_source>);
static_assert(squib::PageSource<squib::socket_source>);
static_assert(squib::RegionIndex<squib::flat_index>);
static_assert(squib::RegionIndex<squib::single_region_index>);
static_assert(squib::PagerStats<squib::null_stats>);
static_assert(squib::PagerStats<squib::atomic_stats>);
static_assert(squib::PagerStats<squib::histogram_stats>);
static_assert(squib::ExceptionBackend<squib::mock_backend>);
static_assert(squib::ExceptionBackend<squib::drift_poll_backend<>>);
static_assert(squib::PageInstaller<squib::mock_backend>);

// Near misses.
static_assert(!squib::PageSource<near_miss::read_may_throw>);
static_assert(!squib::PageSource<near_miss::read_returns_bool>);
static_assert(!squib::PageSource<near_miss::view_without_read>);
static_assert(!squib::MappedPageSource<near_miss::view_without_read>);
static_assert(squib::PageSource<near_miss::source_with_bad_view>);
static_assert(!squib::MappedPageSource<near_miss::source_with_bad_view>);
static_assert(!squib::PageSource<int>);
static_assert(!squib::RegionIndex<near_miss::find_may_throw_index>);
static_assert(!squib::RegionIndex<near_miss::uncopyable_index>);
static_assert(!squib::RegionIndex<std::map<std::uint64_t, squib::region>>);
static_assert(!squib::PagerStats<near_miss::stats_without_latency_flag>);
static_assert(!squib::PagerStats<near_miss::stats_that_may_throw>);
static_assert(!squib::ExceptionBackend<near_miss::backend_without_install>);
static_assert(!squib::ExceptionBackend<near_miss::backend_with_throwing_stop>);
static_assert(!squib::ExceptionBackend<squib::memory_source>);

TEST_SUITE("concepts")
{
    TEST_CASE("the concept checks above compiled")
    {
        // The real assertions are the static_asserts; this case makes the
        // translation unit part of the run and checks one concept at run time.
        CHECK(squib::PageSource<squib::memory_source>);
        CHECK_FALSE(squib::PageSource<near_miss::read_may_throw>);
    }
}
