// squib-pager: the policy concepts.
//
// squib::pager<Source, Index, Backend, Stats> is composed from four policies,
// each a C++20 concept below. The requirements are numbered; the shipped
// models are listed under each so a new policy can copy the closest one.
// This header is kept light: it pulls in only the types the concepts name.
#pragma once

#include <squib/core/region.hpp>
#include <squib/core/result.hpp>

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stop_token>
#include <system_error>

namespace squib {

/// What a stats policy is told about one served page.
struct fault_event {
    std::uint64_t bytes = 0;      ///< bytes handed to the backend: a page, or a whole fault-around cluster
    std::uint64_t latency_ns = 0; ///< resolve-to-installed time; 0 unless Stats::wants_latency
    bool zero_page = false;       ///< installed as zeros without reading the source
};

// ---------------------------------------------------------------------------
/// PageSource: where page bytes come from.
///
/// 1. `s.read(addr, dst)` is `noexcept` and returns `std::error_code`; on
///    success `dst` holds the bytes at source address `addr` (the pager passes
///    `region::source_address`, page aligned, and a `dst` whose size is a
///    positive multiple of the region's page size).
/// 2. On failure `dst` may hold anything and the error says why (short read,
///    address below the source's range, peer closed, ...). A source never
///    reports success for bytes it did not produce.
/// 3. `read` may be called from several fault threads at once.
/// 4. `read` does not allocate after the source is set up.
///
/// Models: squib::file_source (source/file.hpp), squib::mapped_file_source
/// (source/mapped_file.hpp), squib::memory_source (source/memory.hpp),
/// squib::socket_source (source/socket.hpp).
template <class S>
concept PageSource = requires(S& s, std::uint64_t addr, std::span<std::byte> dst) {
    { s.read(addr, dst) } noexcept -> std::same_as<std::error_code>;
};

/// MappedPageSource: a PageSource whose bytes already sit in memory, so a
/// backend can install a page straight from them with no intermediate copy.
///
/// 1. It is a PageSource.
/// 2. `s.view(addr, len)` is `noexcept` and returns
///    `result<std::span<const std::byte>>` of exactly `len` bytes, valid for
///    the source's lifetime, or the error `read` would have given.
///
/// Models: squib::mapped_file_source, squib::memory_source.
template <class S>
concept MappedPageSource =
    PageSource<S> && requires(const S& s, std::uint64_t addr, std::size_t len) {
        { s.view(addr, len) } noexcept -> std::same_as<result<std::span<const std::byte>>>;
    };

/// SparsePageSource: a PageSource that knows which ranges read as zeros
/// without reading them (file holes), so a backend can install a zero page.
///
/// 1. It is a PageSource.
/// 2. `s.is_zero(addr, len)` is `noexcept`, returns `bool`, and is `true` only
///    if every byte of [addr, addr + len) reads as zero. `false` is always safe.
///
/// Models: squib::mapped_file_source.
template <class S>
concept SparsePageSource = PageSource<S> && requires(const S& s, std::uint64_t addr, std::size_t len) {
    { s.is_zero(addr, len) } noexcept -> std::same_as<bool>;
};

namespace detail {
/// Stands in for any callable the pager passes to RegionIndex::for_each.
struct region_visitor_archetype {
    void operator()(const region&) const noexcept {}
};
} // namespace detail

// ---------------------------------------------------------------------------
/// RegionIndex: which address ranges are lazily backed.
///
/// 1. Default constructible and copyable: the pager publishes a new copy on
///    every change so lookups never take a lock shared with setup.
/// 2. `i.insert(r)` returns `std::error_code`: errc::overlapping_region if `r`
///    shares a byte with a region already held, errc::index_full if the index
///    cannot hold more. `r` has passed region::validate().
/// 3. `i.erase(base)` returns `std::error_code`: errc::region_not_found unless
///    a region starts exactly at `base`.
/// 4. `i.find(addr)` is `noexcept` and returns the region holding `addr` or
///    nullptr; it does not allocate and is safe to call concurrently on a
///    const index.
/// 5. `i.size()` is `noexcept` and counts the regions; `i.for_each(f)` calls
///    `f(const region&)` for each, in ascending base order.
///
/// Models: squib::flat_index (index/flat.hpp), squib::single_region_index
/// (index/single.hpp).
template <class I>
concept RegionIndex =
    std::default_initializable<I> && std::copy_constructible<I> &&
    requires(I& i, const I& ci, const region& r, std::uint64_t addr,
             const detail::region_visitor_archetype& visit) {
        { i.insert(r) } -> std::same_as<std::error_code>;
        { i.erase(addr) } -> std::same_as<std::error_code>;
        { ci.find(addr) } noexcept -> std::same_as<const region*>;
        { ci.size() } noexcept -> std::convertible_to<std::size_t>;
        ci.for_each(visit);
    };

// ---------------------------------------------------------------------------
/// PagerStats: a tracker told about every served page.
///
/// 1. `S::wants_latency` is a constant bool; when false the pager never reads
///    a clock for this policy.
/// 2. `on_fault(e)`, `on_prewarm(e)` take a `const fault_event&`; `on_error()`,
///    `on_forward()` and `on_reinstall()` take nothing. All are `noexcept`,
///    safe from several threads at once, and do not allocate.
/// 3. `s.snapshot()` returns plain data describing what was counted.
///
/// Models: squib::null_stats (stats/null.hpp, free: empty and stored with
/// [[no_unique_address]]), squib::atomic_stats (stats/atomic.hpp),
/// squib::histogram_stats (stats/histogram.hpp).
template <class S>
concept PagerStats = requires(S& s, const S& cs, const fault_event& e) {
    { S::wants_latency } -> std::convertible_to<bool>;
    { s.on_fault(e) } noexcept;
    { s.on_prewarm(e) } noexcept;
    { s.on_error() } noexcept;
    { s.on_forward() } noexcept;
    { s.on_reinstall() } noexcept;
    cs.snapshot();
};

// ---------------------------------------------------------------------------
/// PageInstaller: how a backend puts bytes into the faulting address space.
/// The pager calls it from FaultHandler::handle_fault with resolved pages.
///
/// 1. `i.install(addr, bytes)` is `noexcept`, returns `std::error_code`, and
///    places `bytes` at page-aligned `addr`. A page that is already present
///    (another thread won the race) is success.
/// 2. `i.install_zero(addr, len)` is `noexcept`, returns `std::error_code`,
///    and makes [addr, addr + len) read as zeros.
///
/// Models: every ExceptionBackend below is also a PageInstaller.
template <class I>
concept PageInstaller =
    requires(I& i, std::uint64_t addr, std::span<const std::byte> bytes, std::uint64_t len) {
        { i.install(addr, bytes) } noexcept -> std::same_as<std::error_code>;
        { i.install_zero(addr, len) } noexcept -> std::same_as<std::error_code>;
    };

namespace detail {
/// The handler interface a backend may use, as an archetype: squib::pager
/// provides exactly these members. Backends take the handler as a template
/// parameter, so every call below is resolved at compile time.
struct fault_handler_archetype {
    template <PageInstaller Installer>
    std::error_code handle_fault(std::uint64_t, std::span<std::byte>, Installer&, std::uint64_t = 0) noexcept
    {
        return {};
    }
    [[nodiscard]] std::stop_token stop_token() const noexcept { return {}; }
    [[nodiscard]] std::chrono::nanoseconds poll_interval() const noexcept { return {}; }
    void note_forward() noexcept {}
    void note_reinstall() noexcept {}
};
} // namespace detail

/// ExceptionBackend: turns hardware faults into calls to the pager.
///
/// 1. It is a PageInstaller (prewarm installs through it).
/// 2. `b.start(handler)` returns `std::error_code`; it takes the handler (the
///    pager) by reference as a template parameter and keeps calling
///    `handler.handle_fault(addr, scratch, installer)` for each fault until
///    stopped (a fourth argument asks for fault-around: see
///    pager::handle_fault). Failing to start (a thread that cannot be spawned, a device
///    that cannot be opened) is an error value, never an exception.
/// 3. `b.stop()` is `noexcept`, returns once no thread of the backend touches
///    the handler any more, within about one poll interval after the
///    handler's stop token is triggered.
/// 4. `b.register_range(r)` / `b.unregister_range(r)` return
///    `std::error_code`; the pager calls them when regions change.
///
/// Models: squib::mock_backend (backend/mock.hpp), squib::drift_poll_backend
/// (backend/drift_poll.hpp).
template <class B>
concept ExceptionBackend =
    PageInstaller<B> && requires(B& b, detail::fault_handler_archetype& h, const region& r) {
        { b.start(h) } -> std::same_as<std::error_code>;
        { b.stop() } noexcept;
        { b.register_range(r) } -> std::same_as<std::error_code>;
        { b.unregister_range(r) } -> std::same_as<std::error_code>;
    };

} // namespace squib
