// squib-pager: the pager template that ties the four policies together.
#pragma once

#include <squib/concepts.hpp>
#include <squib/core/page.hpp>
#include <squib/core/region.hpp>
#include <squib/core/result.hpp>
#include <squib/detail/published.hpp>
#include <squib/error.hpp>
#include <squib/stats/null.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <stop_token>
#include <system_error>
#include <utility>
#include <vector>

namespace squib {

/// A fault after the region lookup: which page, and where its bytes live.
struct resolved_fault {
    std::uint64_t page = 0;           ///< page-aligned address of the faulting page (of the cluster, with fault-around)
    std::uint64_t page_size = 0;      ///< the region's page size
    std::uint64_t source_address = 0; ///< where `page` lives in the source
    std::uint64_t length = 0;         ///< bytes to install from `page`: one page, or a fault-around cluster
    region where{};                   ///< the region, copied: it may be unregistered meanwhile
};

/// A served page handed back as a view (MappedPageSource only).
struct page_view {
    resolved_fault fault;
    std::span<const std::byte> bytes;
};

/// What prewarm() did.
struct prewarm_report {
    std::uint64_t installed = 0;  ///< distinct pages installed
    std::uint64_t failed = 0;     ///< addresses that could not be resolved or installed
    std::error_code first_error;  ///< the first failure, if any
};

/// Settings that do not change the pager's type.
struct pager_options {
    /// How often polling backends wake (drift checks, receive timeouts). Also
    /// the bound on how long a backend takes to notice shutdown when it has no
    /// faster way to be woken.
    std::chrono::nanoseconds poll_interval = std::chrono::milliseconds{100};
};

namespace detail {
/// A pager's state without its stats: the pager is exactly this plus a Stats
/// member, which lets a static_assert prove that an empty Stats costs nothing.
template <class Source, class Index, class Backend>
struct pager_core {
    template <class... BackendArgs>
    pager_core(Source&& src, const pager_options& opts, BackendArgs&&... args)
        : source(std::move(src)),
          index(std::make_unique<Index>()),
          backend(std::forward<BackendArgs>(args)...),
          poll_interval_ns(opts.poll_interval.count())
    {
    }

    Source source;
    published<Index> index;         // lock-free for faults, replaced whole by setup
    std::mutex setup_mutex;         // serialises region changes, start and stop; never taken by faults
    Backend backend;
    std::stop_source stop;          // shutdown request, visible to every backend thread
    std::atomic<std::int64_t> poll_interval_ns;
    bool started = false;           // guarded by setup_mutex
};
} // namespace detail

/// Serves page faults for lazily backed guest memory.
///
/// A backend reports a faulting address; the pager finds its region in the
/// Index, reads the page from the Source (or views it in place, or sees it is
/// a hole), has the backend install it and tells Stats. Every policy is a
/// template parameter, so the whole fault path is resolved at compile time:
/// no virtual call, no std::function, no lock shared with setup.
///
/// Regions may be registered and unregistered while faults are served. The
/// pager is neither copyable nor movable: backend threads hold a reference.
///
/// **Example**
///
///     using my_pager = squib::pager<squib::file_source, squib::flat_index,
///                                   squib::mock_backend, squib::atomic_stats>;
///     auto src = squib::file_source::open("vm.mem");
///     my_pager p{std::move(*src)};
///     if (auto ec = p.register_region({.base = 0x8000'0000, .size = 1 << 30})) fail(ec);
///     if (auto ec = p.start()) fail(ec);
template <PageSource Source, RegionIndex Index, ExceptionBackend Backend, PagerStats Stats = null_stats>
class pager {
public:
    using source_type = Source;
    using index_type = Index;
    using backend_type = Backend;
    using stats_type = Stats;

    /// Takes ownership of `source`; the backend is default constructed.
    explicit pager(Source source, pager_options opts = {}) : core_(std::move(source), opts) {}

    /// Takes ownership of `source` and builds the backend from `backend_args`.
    template <class... BackendArgs>
    pager(Source source, pager_options opts, std::in_place_t, BackendArgs&&... backend_args)
        : core_(std::move(source), opts, std::forward<BackendArgs>(backend_args)...)
    {
    }

    pager(const pager&) = delete;
    pager& operator=(const pager&) = delete;

    ~pager()
    {
        static_assert(!std::is_empty_v<Stats> || sizeof(pager) == sizeof(core_type),
                      "an empty stats policy must add nothing to the pager's size");
        stop();
    }

    // ---- setup -------------------------------------------------------------

    /// Makes [r.base, r.end()) lazily backed and tells the backend.
    /// Errors: region::validate()'s errors, errc::overlapping_region,
    /// errc::index_full, errc::shutting_down, and the backend's registration
    /// error (the region is then not kept).
    [[nodiscard]] std::error_code register_region(const region& r)
    {
        if (auto ec = r.validate()) return ec;
        std::lock_guard lock(core_.setup_mutex);
        if (core_.stop.stop_requested()) return errc::shutting_down;
        const Index& current = core_.index.writer_view();
        auto next = std::make_unique<Index>(current);
        if (auto ec = next->insert(r)) return ec;
        auto previous = std::make_unique<Index>(current); // for rollback, made before any fault can see r
        // Publish first: once the backend registers the range faults can
        // arrive, and they must find the region.
        core_.index.replace(std::move(next));
        if (auto ec = core_.backend.register_range(r)) {
            core_.index.replace(std::move(previous));
            return ec;
        }
        return {};
    }

    /// Stops serving the region that starts at `base`.
    /// Errors: errc::region_not_found, or the backend's error (the region is
    /// then kept).
    [[nodiscard]] std::error_code unregister_region(std::uint64_t base)
    {
        std::lock_guard lock(core_.setup_mutex);
        const Index& current = core_.index.writer_view();
        const region* r = current.find(base);
        if (r == nullptr || r->base != base) return errc::region_not_found;
        auto next = std::make_unique<Index>(current);
        if (auto ec = next->erase(base)) return ec;
        // Unregister from the backend first so no new fault arrives for it.
        if (auto ec = core_.backend.unregister_range(*r)) return ec;
        core_.index.replace(std::move(next));
        return {};
    }

    /// The registered regions in ascending base order (allocates; setup use).
    [[nodiscard]] std::vector<region> regions() const
    {
        std::vector<region> out;
        core_.index.read([&out](const Index& idx) noexcept {
            out.reserve(idx.size()); // bad_alloc here ends the process: setup callers only
            idx.for_each([&out](const region& r) noexcept { out.push_back(r); });
            return 0;
        });
        return out;
    }

    [[nodiscard]] std::size_t region_count() const noexcept
    {
        return core_.index.read([](const Index& idx) noexcept { return idx.size(); });
    }

    /// Whether `addr` lies in a registered region.
    [[nodiscard]] bool contains(std::uint64_t addr) const noexcept
    {
        return core_.index.read([addr](const Index& idx) noexcept { return idx.find(addr) != nullptr; });
    }

    /// Starts the backend with this pager as its fault handler.
    /// Errors: errc::shutting_down after stop(), errc::already_running, the backend's start error.
    [[nodiscard]] std::error_code start()
    {
        std::lock_guard lock(core_.setup_mutex);
        if (core_.stop.stop_requested()) return errc::shutting_down;
        if (core_.started) return errc::already_running;
        if (auto ec = core_.backend.start(*this)) return ec;
        core_.started = true;
        return {};
    }

    /// Requests shutdown and waits for the backend to let go of the pager.
    /// Not restartable. Safe to call more than once.
    void stop() noexcept
    {
        request_shutdown();
        std::lock_guard lock(core_.setup_mutex);
        if (core_.started) {
            core_.backend.stop();
            core_.started = false;
        }
    }

    /// Asks every backend thread to finish; returns at once.
    void request_shutdown() noexcept { core_.stop.request_stop(); }

    [[nodiscard]] bool shutdown_requested() const noexcept { return core_.stop.stop_requested(); }

    /// A cheap handle that reports the shutdown request (copy it into threads).
    [[nodiscard]] std::stop_token stop_token() const noexcept { return core_.stop.get_token(); }

    [[nodiscard]] std::chrono::nanoseconds poll_interval() const noexcept
    {
        return std::chrono::nanoseconds{core_.poll_interval_ns.load(std::memory_order_relaxed)};
    }

    /// Takes effect at the backend's next wake-up.
    void set_poll_interval(std::chrono::nanoseconds interval) noexcept
    {
        core_.poll_interval_ns.store(interval.count(), std::memory_order_relaxed);
    }

    // ---- prewarm -------------------------------------------------------------

    /// Installs the pages holding `addrs` through the backend before any
    /// fault asks for them (the boot-critical list of core/prewarm.hpp, a
    /// recorded working set). Each distinct page is installed once; failures
    /// are counted and the first is kept, the rest still go ahead.
    prewarm_report prewarm(std::span<const std::uint64_t> addrs)
    {
        prewarm_report report;
        std::vector<resolved_fault> pages;
        pages.reserve(addrs.size());
        std::uint64_t largest_page = 0;
        for (std::uint64_t a : addrs) {
            auto f = resolve(a);
            if (!f) {
                note_prewarm_failure(report, f.error());
                continue;
            }
            largest_page = std::max(largest_page, f->page_size);
            pages.push_back(*f);
        }
        std::sort(pages.begin(), pages.end(), [](const auto& x, const auto& y) { return x.page < y.page; });
        pages.erase(std::unique(pages.begin(), pages.end(), [](const auto& x, const auto& y) { return x.page == y.page; }),
                    pages.end());
        std::vector<std::byte> scratch(MappedPageSource<Source> ? 0 : largest_page);
        for (const resolved_fault& f : pages) {
            if (auto ec = serve_resolved(f, scratch, core_.backend, event_kind::prewarm, 0))
                note_prewarm_failure(report, ec);
            else
                ++report.installed;
        }
        return report;
    }

    // ---- the fault path ------------------------------------------------------

    /// Finds the region and page of `addr`.
    /// Errors: errc::out_of_region.
    [[nodiscard]] result<resolved_fault> resolve(std::uint64_t addr) const noexcept
    {
        return core_.index.read([addr](const Index& idx) noexcept -> result<resolved_fault> {
            const region* r = idx.find(addr);
            if (r == nullptr) return errc::out_of_region;
            const std::uint64_t page = align_down(addr, r->page_size);
            return resolved_fault{page, r->page_size, r->source_address(page), r->page_size, *r};
        });
    }

    /// Serves one fault into a caller buffer: resolves `addr` and reads its
    /// whole page into the front of `dst`. Counts a fault in Stats.
    /// Errors: errc::out_of_region, errc::bad_length if `dst` is smaller than
    /// the page, and the source's error.
    [[nodiscard]] result<resolved_fault> serve(std::uint64_t addr, std::span<std::byte> dst) noexcept
    {
        const std::uint64_t t0 = start_clock();
        auto f = resolve(addr);
        if (!f) return failed(f.error());
        if (dst.size() < f->page_size) return failed(errc::bad_length);
        if (auto ec = core_.source.read(f->source_address, dst.first(f->page_size))) return failed(ec);
        stats_.on_fault({f->page_size, elapsed_since(t0), false});
        return f;
    }

    /// Serves one fault as a view into the source (no copy). Counts a fault.
    /// Errors: errc::out_of_region and the source's error.
    [[nodiscard]] result<page_view> serve_view(std::uint64_t addr) noexcept
        requires MappedPageSource<Source>
    {
        const std::uint64_t t0 = start_clock();
        auto f = resolve(addr);
        if (!f) return failed(f.error());
        auto v = core_.source.view(f->source_address, f->page_size);
        if (!v) return failed(v.error());
        stats_.on_fault({f->page_size, elapsed_since(t0), false});
        return page_view{*f, *v};
    }

    /// The call backends make for every fault: resolve `addr`, fetch its page
    /// the cheapest way the source allows (a zero page for a hole, a view of a
    /// mapping, else a read into `scratch`), and install it with `installer`.
    /// `scratch` must hold the bytes to install unless the source is mapped.
    ///
    /// Fault-around: with `around` a power of two larger than the region's
    /// page size, the whole `around`-aligned block holding `addr`, clipped to
    /// the region, is fetched and handed to the installer in one call (which
    /// skips pages already present); if that fails, the faulting page alone
    /// is served. Any other `around` means one page.
    ///
    /// Errors: as serve(), plus the installer's error. Every failure is also
    /// counted with Stats::on_error.
    template <PageInstaller Installer>
    [[nodiscard]] std::error_code handle_fault(std::uint64_t addr, std::span<std::byte> scratch, Installer& installer,
                                               std::uint64_t around = 0) noexcept
    {
        const std::uint64_t t0 = start_clock();
        auto f = resolve(addr);
        if (!f) return failed(f.error());
        if (around > f->page_size && is_power_of_two(around)) {
            resolved_fault cluster = *f;
            widen(cluster, addr, around);
            // A neighbour the source cannot produce (a region past the end of the
            // file) must not cost the page that faulted: fall back to it alone.
            if (!serve_resolved(cluster, scratch, installer, event_kind::fault, t0, false)) return {};
        }
        return serve_resolved(*f, scratch, installer, event_kind::fault, t0);
    }

    /// Backends that forward exceptions they do not own report it here.
    void note_forward() noexcept { stats_.on_forward(); }
    /// Backends that re-install their exception port after drift report it here.
    void note_reinstall() noexcept { stats_.on_reinstall(); }

    // ---- access ------------------------------------------------------------------

    [[nodiscard]] const Stats& stats() const noexcept { return stats_; }
    [[nodiscard]] Backend& backend() noexcept { return core_.backend; }
    [[nodiscard]] const Backend& backend() const noexcept { return core_.backend; }
    [[nodiscard]] Source& source() noexcept { return core_.source; }
    [[nodiscard]] const Source& source() const noexcept { return core_.source; }

private:
    using core_type = detail::pager_core<Source, Index, Backend>;
    enum class event_kind { fault, prewarm };

    template <class Installer>
    std::error_code serve_resolved(const resolved_fault& f, std::span<std::byte> scratch, Installer& installer,
                                   event_kind kind, std::uint64_t t0, bool count_error = true) noexcept
    {
        bool zero = false;
        std::error_code ec;
        if constexpr (SparsePageSource<Source>) zero = core_.source.is_zero(f.source_address, f.length);
        if (zero) {
            ec = installer.install_zero(f.page, f.length);
        } else if constexpr (MappedPageSource<Source>) {
            auto v = core_.source.view(f.source_address, f.length);
            ec = v ? installer.install(f.page, *v) : v.error();
        } else {
            if (scratch.size() < f.length) {
                ec = errc::bad_length;
            } else {
                auto dst = scratch.first(f.length);
                ec = core_.source.read(f.source_address, dst);
                if (!ec) ec = installer.install(f.page, dst);
            }
        }
        if (ec) {
            if (count_error) stats_.on_error();
            return ec;
        }
        const fault_event e{f.length, kind == event_kind::fault ? elapsed_since(t0) : 0, zero};
        if (kind == event_kind::fault)
            stats_.on_fault(e);
        else
            stats_.on_prewarm(e);
        return {};
    }

    /// Grows a one-page fault to the `around`-aligned block holding `addr`, clipped to its region.
    static void widen(resolved_fault& f, std::uint64_t addr, std::uint64_t around) noexcept
    {
        const region& r = f.where;
        const std::uint64_t block = align_down(addr, around);
        const std::uint64_t lo = std::max(block, r.base);
        const std::uint64_t room = r.end() - block; // > 0: addr is inside r and block <= addr
        const std::uint64_t hi = room > around ? block + around : r.end();
        f.page = lo;
        f.source_address = r.source_address(lo);
        f.length = hi - lo;
    }

    std::error_code failed(std::error_code ec) noexcept
    {
        stats_.on_error();
        return ec;
    }

    void note_prewarm_failure(prewarm_report& report, std::error_code ec) noexcept
    {
        ++report.failed;
        if (!report.first_error) report.first_error = ec;
    }

    static std::uint64_t now_ns() noexcept
    {
        return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                              std::chrono::steady_clock::now().time_since_epoch())
                                              .count());
    }
    static std::uint64_t start_clock() noexcept
    {
        if constexpr (Stats::wants_latency) return now_ns();
        return 0;
    }
    static std::uint64_t elapsed_since(std::uint64_t t0) noexcept
    {
        if constexpr (Stats::wants_latency) return now_ns() - t0;
        static_cast<void>(t0);
        return 0;
    }

    core_type core_;
    [[no_unique_address]] Stats stats_; // after core_, so an empty Stats adds nothing
};

} // namespace squib
