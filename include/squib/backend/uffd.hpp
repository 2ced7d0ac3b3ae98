// squib-pager: the Linux userfaultfd backend.
#pragma once

#if !defined(__linux__)
#error "squib/backend/uffd.hpp needs Linux userfaultfd"
#endif

#include <squib/concepts.hpp>
#include <squib/core/page.hpp>
#include <squib/core/region.hpp>
#include <squib/core/result.hpp>
#include <squib/detail/fd.hpp>
#include <squib/detail/published.hpp>
#include <squib/detail/thread.hpp>
#include <squib/error.hpp>

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace squib {

/// Errors specific to the userfaultfd backend.
enum class uffd_errc : int {
    missing_event_remove = 1, ///< the kernel lacks UFFD_FEATURE_EVENT_REMOVE
    missing_event_unmap,      ///< the kernel lacks UFFD_FEATURE_EVENT_UNMAP
    api_refused,              ///< UFFDIO_API failed or answered another API version
    no_copy_ioctl,            ///< a registered range does not allow UFFDIO_COPY
    retry_exhausted,          ///< UFFDIO_COPY kept answering EAGAIN (memory layout kept changing)
    not_a_userfaultfd,        ///< an adopted descriptor is not a userfaultfd
};

namespace detail {
class uffd_category_impl final : public std::error_category {
public:
    [[nodiscard]] const char* name() const noexcept override { return "squib.uffd"; }
    [[nodiscard]] std::string message(int v) const override
    {
        switch (static_cast<uffd_errc>(v)) {
        case uffd_errc::missing_event_remove: return "kernel userfaultfd lacks UFFD_FEATURE_EVENT_REMOVE";
        case uffd_errc::missing_event_unmap: return "kernel userfaultfd lacks UFFD_FEATURE_EVENT_UNMAP";
        case uffd_errc::api_refused: return "UFFDIO_API handshake refused";
        case uffd_errc::no_copy_ioctl: return "registered range does not allow UFFDIO_COPY";
        case uffd_errc::retry_exhausted: return "UFFDIO_COPY kept returning EAGAIN";
        case uffd_errc::not_a_userfaultfd: return "descriptor is not a userfaultfd";
        }
        return "unknown userfaultfd error";
    }
};
} // namespace detail

[[nodiscard]] inline const std::error_category& uffd_category() noexcept
{
    static const detail::uffd_category_impl category;
    return category;
}
[[nodiscard]] inline std::error_code make_error_code(uffd_errc e) noexcept { return {static_cast<int>(e), uffd_category()}; }

} // namespace squib

template <>
struct std::is_error_code_enum<squib::uffd_errc> : std::true_type {};

namespace squib {

/// Called when a fault cannot be served (the source failed, the install
/// failed): the faulting thread stays blocked, so someone must hear of it.
/// Runs on a handler thread; must not call back into the backend's stop().
using unserved_fault_fn = void (*)(void* context, std::uint64_t addr, std::error_code ec) noexcept;

namespace detail {
/// The default: say which address failed and why, then end the process,
/// because a guest blocked on a page that never comes is worse than a crash.
inline void abort_on_unserved(void*, std::uint64_t addr, std::error_code ec) noexcept
{
    std::fprintf(stderr, "squib-pager: cannot serve the page fault at %#llx: %s (%s:%d); ending the process\n",
                 static_cast<unsigned long long>(addr), ec.message().c_str(), ec.category().name(), ec.value());
    std::fflush(stderr);
    std::abort();
}
} // namespace detail

/// How the userfaultfd backend runs.
struct uffd_options {
    /// Handler threads reading faults. Each has its own scratch buffer.
    unsigned threads = 1;
    /// Fault-around: install the aligned block of this many 4 KiB pages around
    /// each fault (clipped to its region) in one UFFDIO_COPY. A power of two;
    /// 1 installs only the faulting page.
    std::uint64_t fault_around_pages = 1;
    /// Most uffd_msg read per read() call (the handler asks for fewer while
    /// faults come one at a time).
    std::size_t batch = 32;
    /// CPUs to pin handler thread i to (`handler_cpus[i % size]`); empty: no
    /// pinning. A wake-up across CPUs is costly on some machines: pinning the
    /// handler next to (or away from) the vCPU threads is worth measuring.
    std::vector<int> handler_cpus{};
    /// Handler thread name prefix (the kernel keeps 15 characters).
    std::string thread_name = "squib-uffd";
    /// Who hears of a fault that cannot be served; default: print and abort.
    unserved_fault_fn on_unserved = &detail::abort_on_unserved;
    void* on_unserved_context = nullptr;
};

/// Counters of the backend's own events (the pager's Stats count faults).
struct uffd_counters {
    std::uint64_t remove_events = 0; ///< UFFD_EVENT_REMOVE (MADV_DONTNEED, balloon)
    std::uint64_t unmap_events = 0;  ///< UFFD_EVENT_UNMAP (munmap of a registered range)
    std::uint64_t exist_races = 0;   ///< installs that found the page already there
    std::uint64_t again_retries = 0; ///< installs retried after EAGAIN (a layout change was pending)
    std::uint64_t unserved = 0;      ///< faults handed to on_unserved
    std::uint64_t redundant = 0;     ///< faults whose page the bitmap had as present (a race, or a zap)
    std::uint64_t moot = 0;          ///< faults whose range went away (unregistered, unmapped, process gone): woken
};

/// Serves page faults with Linux userfaultfd: real faults, real UFFDIO_COPY.
///
/// Two ways to start:
/// - create(): opens a userfaultfd in this process, negotiates the features
///   (EVENT_REMOVE and EVENT_UNMAP are required), and registers each region
///   the pager registers in MISSING mode;
/// - adopt(fd): takes a userfaultfd another process (a VMM) created,
///   negotiated and registered, and installs pages into that process's
///   memory. The pager's regions then only describe the ranges.
///
/// Handler threads poll the userfaultfd and an eventfd (for shutdown), read
/// messages in batches and serve each fault through the pager: straight from
/// the source's mapping when it has one (no intermediate copy), zero pages for
/// holes and for ranges the guest gave back (UFFD_EVENT_REMOVE), else through a
/// per-thread scratch buffer. Pages already installed are tracked in a bitmap
/// per region so fault-around clusters skip them; a page another thread
/// installed first (EEXIST) is success.
class uffd_backend {
public:
    using options = uffd_options;

    /// An empty backend; start() fails with errc::not_running. Exists so
    /// result<uffd_backend> can hold an error.
    uffd_backend() = default;
    uffd_backend(uffd_backend&&) noexcept = default;
    uffd_backend& operator=(uffd_backend&& other) noexcept
    {
        if (this != &other) {
            stop();
            state_ = std::move(other.state_);
        }
        return *this;
    }
    uffd_backend(const uffd_backend&) = delete;
    uffd_backend& operator=(const uffd_backend&) = delete;
    ~uffd_backend() { stop(); }

    /// Opens a userfaultfd (the syscall, or /dev/userfaultfd when the syscall
    /// is refused) and negotiates the API.
    /// Errors: the open's errno (EPERM without privilege), uffd_errc::api_refused,
    /// uffd_errc::missing_event_remove / missing_event_unmap,
    /// std::errc::invalid_argument for bad options.
    [[nodiscard]] static result<uffd_backend> create(options opts = {})
    {
        if (auto ec = check(opts)) return ec;
        // Ask a throwaway descriptor what the kernel offers, so a missing
        // feature is reported by name instead of as UFFDIO_API's EINVAL.
        auto probe = open_userfaultfd();
        if (!probe) return probe.error();
        uffdio_api api{};
        api.api = UFFD_API;
        if (::ioctl(probe->get(), UFFDIO_API, &api) != 0) return uffd_errc::api_refused;
        if ((api.features & UFFD_FEATURE_EVENT_REMOVE) == 0) return uffd_errc::missing_event_remove;
        if ((api.features & UFFD_FEATURE_EVENT_UNMAP) == 0) return uffd_errc::missing_event_unmap;

        auto fd = open_userfaultfd();
        if (!fd) return fd.error();
        uffdio_api want{};
        want.api = UFFD_API;
        // Hugetlbfs and shmem support come along when offered: regions on such memory need them.
        want.features = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP |
                        (api.features & (UFFD_FEATURE_MISSING_HUGETLBFS | UFFD_FEATURE_MISSING_SHMEM));
        if (::ioctl(fd->get(), UFFDIO_API, &want) != 0 || want.api != UFFD_API) return uffd_errc::api_refused;
        return make(std::move(*fd), want.features, true, std::move(opts));
    }

    /// Takes ownership of a userfaultfd that another process created,
    /// negotiated (UFFDIO_API) and registered. Regions registered with the
    /// pager describe that process's ranges; nothing is registered again.
    /// Errors: uffd_errc::not_a_userfaultfd, std::errc::invalid_argument.
    [[nodiscard]] static result<uffd_backend> adopt(int fd, options opts = {})
    {
        unique_fd owned{fd};
        if (auto ec = check(opts)) return ec;
        if (!owned || !looks_like_userfaultfd(owned.get())) return uffd_errc::not_a_userfaultfd;
        // Our reads must never block: shutdown relies on poll() and the eventfd.
        const int flags = ::fcntl(owned.get(), F_GETFL);
        if (flags < 0 || ::fcntl(owned.get(), F_SETFL, flags | O_NONBLOCK) != 0) return last_os_error();
        return make(std::move(owned), 0, false, std::move(opts));
    }

    /// The userfaultfd (still owned by the backend).
    [[nodiscard]] int fd() const noexcept { return state_ ? state_->uffd.get() : -1; }
    /// Features negotiated by create(); 0 for an adopted descriptor.
    [[nodiscard]] std::uint64_t features() const noexcept { return state_ ? state_->features : 0; }
    /// Whether this backend registers ranges itself (create) or adopted them.
    [[nodiscard]] bool owns_registration() const noexcept { return state_ && state_->registers; }

    [[nodiscard]] uffd_counters counters() const noexcept
    {
        if (!state_) return {};
        const auto& c = state_->counts;
        return {c.remove.load(std::memory_order_relaxed), c.unmap.load(std::memory_order_relaxed),
                c.exist.load(std::memory_order_relaxed), c.again.load(std::memory_order_relaxed),
                c.unserved.load(std::memory_order_relaxed), c.redundant.load(std::memory_order_relaxed),
                c.moot.load(std::memory_order_relaxed)};
    }

    // ---- ExceptionBackend --------------------------------------------------------

    /// Starts the handler threads. Errors: errc::not_running (empty backend),
    /// errc::already_running, the errno of eventfd(), a thread spawn error.
    template <class Handler>
    [[nodiscard]] std::error_code start(Handler& handler)
    {
        if (!state_) return errc::not_running;
        try {
            return start_threads(handler);
        } catch (const std::bad_alloc&) {
            stop();
            return std::make_error_code(std::errc::not_enough_memory);
        }
    }

private:
    template <class Handler>
    std::error_code start_threads(Handler& handler)
    {
        state& s = *state_;
        if (!s.threads.empty()) return errc::already_running;
        s.wake.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (!s.wake) return last_os_error();
        s.on_shutdown.emplace(handler.stop_token(), wake_fn{s.wake.get()});

        const std::uint64_t around = s.opts.fault_around_pages * page_4k;
        const std::size_t scratch_bytes = std::max<std::uint64_t>(around, page_2m);
        s.threads.reserve(s.opts.threads);
        for (unsigned i = 0; i < s.opts.threads; ++i) {
            auto ctx = std::make_unique<thread_ctx>(s, scratch_bytes);
            const int cpu = s.opts.handler_cpus.empty()
                                ? -1
                                : s.opts.handler_cpus[i % s.opts.handler_cpus.size()];
            auto t = named_thread::spawn(s.opts.thread_name + "-" + std::to_string(i), 0,
                                         [c = ctx.get(), &handler, around, cpu]() noexcept {
                                             pin(cpu);
                                             c->run(handler, around);
                                         });
            if (!t) {
                stop();
                return t.error();
            }
            s.contexts.push_back(std::move(ctx));
            s.threads.push_back(std::move(*t));
        }
        return {};
    }

public:
    /// Wakes every handler thread through the eventfd and joins them.
    void stop() noexcept
    {
        if (!state_) return;
        state& s = *state_;
        if (s.wake) wake_fn{s.wake.get()}(); // level-triggered: every poller wakes
        for (auto& t : s.threads) t.join();
        s.threads.clear();
        s.contexts.clear();
        s.on_shutdown.reset();
        s.wake.reset();
    }

    /// Tracks `r` and, unless the descriptor was adopted, registers it in
    /// MISSING mode. Errors: the errno of UFFDIO_REGISTER,
    /// uffd_errc::no_copy_ioctl, errc::not_running for an empty backend.
    [[nodiscard]] std::error_code register_range(const region& r)
    {
        if (!state_) return errc::not_running;
        state& s = *state_;
        std::lock_guard lock(s.setup);
        if (s.registers) {
            uffdio_register reg{};
            reg.range.start = r.base;
            reg.range.len = r.size;
            reg.mode = UFFDIO_REGISTER_MODE_MISSING;
            if (::ioctl(s.uffd.get(), UFFDIO_REGISTER, &reg) != 0) return last_os_error();
            if ((reg.ioctls & (std::uint64_t{1} << _UFFDIO_COPY)) == 0) {
                unregister_kernel(r);
                return uffd_errc::no_copy_ioctl;
            }
        }
        auto next = std::make_unique<range_table>(s.ranges.writer_view());
        next->insert(std::make_shared<range_state>(r));
        s.ranges.replace(std::move(next));
        return {};
    }

    /// Stops tracking `r` and, unless adopted, unregisters it.
    /// Errors: the errno of UFFDIO_UNREGISTER (EINVAL after an unmap is ignored).
    [[nodiscard]] std::error_code unregister_range(const region& r)
    {
        if (!state_) return errc::not_running;
        state& s = *state_;
        std::lock_guard lock(s.setup);
        if (s.registers) {
            auto ec = unregister_kernel(r);
            // An unmapped range is already gone from the kernel's view.
            if (ec && !(ec == std::errc::invalid_argument || ec == std::errc::no_such_device_or_address)) return ec;
        }
        auto next = std::make_unique<range_table>(s.ranges.writer_view());
        next->erase(r.base);
        s.ranges.replace(std::move(next));
        return {};
    }

    // ---- PageInstaller (prewarm and handler threads) -------------------------------

    /// Installs `bytes` at `addr` with UFFDIO_COPY, skipping pages already
    /// present, and zero pages where the range was given back. Thread-safe.
    [[nodiscard]] std::error_code install(std::uint64_t addr, std::span<const std::byte> bytes) noexcept
    {
        if (!state_) return errc::not_running;
        install_report report;
        return state_->install(addr, bytes.size(), bytes.data(), report, nullptr);
    }

    /// Makes [addr, addr + len) read as zeros (UFFDIO_ZEROPAGE). Thread-safe.
    [[nodiscard]] std::error_code install_zero(std::uint64_t addr, std::uint64_t len) noexcept
    {
        if (!state_) return errc::not_running;
        install_report report;
        return state_->install(addr, len, nullptr, report, nullptr);
    }

    /// Whether the backend believes the page holding `addr` is installed
    /// (tests and diagnostics).
    [[nodiscard]] bool is_installed(std::uint64_t addr) const noexcept
    {
        if (!state_) return false;
        auto r = state_->find(addr);
        return r && r->installed(r->index(addr));
    }

private:
    using unique_fd = detail::unique_fd;
    using named_thread = detail::named_thread;

    /// Per-region page bookkeeping: installed and given-back bits.
    struct range_state {
        explicit range_state(const region& reg)
            : r(reg), pages(reg.size / reg.page_size), words((pages + 63) / 64),
              present(new std::atomic<std::uint64_t>[words]), removed(new std::atomic<std::uint64_t>[words])
        {
            for (std::size_t i = 0; i < words; ++i) {
                present[i].store(0, std::memory_order_relaxed);
                removed[i].store(0, std::memory_order_relaxed);
            }
        }
        [[nodiscard]] std::size_t index(std::uint64_t addr) const noexcept { return (addr - r.base) / r.page_size; }
        [[nodiscard]] bool installed(std::size_t i) const noexcept { return test(present, i); }
        [[nodiscard]] bool given_back(std::size_t i) const noexcept { return test(removed, i); }
        void mark_installed(std::size_t i) noexcept
        {
            set(present, i);
            clear(removed, i);
        }
        void mark_removed(std::size_t i) noexcept
        {
            set(removed, i);
            clear(present, i);
        }
        void forget(std::size_t i) noexcept { clear(present, i); }

        region r;
        std::size_t pages;
        std::size_t words;
        std::unique_ptr<std::atomic<std::uint64_t>[]> present;
        std::unique_ptr<std::atomic<std::uint64_t>[]> removed;
        std::atomic<bool> retired{false}; // unmapped: no fault can come, installs are refused

    private:
        static bool test(const std::unique_ptr<std::atomic<std::uint64_t>[]>& bits, std::size_t i) noexcept
        {
            return (bits[i / 64].load(std::memory_order_acquire) >> (i % 64)) & 1;
        }
        static void set(std::unique_ptr<std::atomic<std::uint64_t>[]>& bits, std::size_t i) noexcept
        {
            bits[i / 64].fetch_or(std::uint64_t{1} << (i % 64), std::memory_order_acq_rel);
        }
        static void clear(std::unique_ptr<std::atomic<std::uint64_t>[]>& bits, std::size_t i) noexcept
        {
            bits[i / 64].fetch_and(~(std::uint64_t{1} << (i % 64)), std::memory_order_acq_rel);
        }
    };

    /// The tracked ranges, sorted by base; replaced whole by setup.
    struct range_table {
        std::vector<std::shared_ptr<range_state>> items;

        void insert(std::shared_ptr<range_state> s)
        {
            auto at = std::lower_bound(items.begin(), items.end(), s->r.base,
                                       [](const auto& x, std::uint64_t b) { return x->r.base < b; });
            items.insert(at, std::move(s));
        }
        void erase(std::uint64_t base)
        {
            std::erase_if(items, [base](const auto& x) { return x->r.base == base; });
        }
        [[nodiscard]] const std::shared_ptr<range_state>* find(std::uint64_t addr) const noexcept
        {
            auto it = std::upper_bound(items.begin(), items.end(), addr,
                                       [](std::uint64_t a, const auto& x) { return a < x->r.base; });
            if (it == items.begin()) return nullptr;
            --it;
            return (*it)->r.contains(addr) ? &*it : nullptr;
        }
    };

    /// What one install call did, for the fault path's wake decision.
    struct install_report {
        bool covered_fault = false; // a COPY/ZEROPAGE that woke the faulting page succeeded
        bool saw_exist = false;     // some page was already there
    };

    struct thread_ctx;

    struct wake_fn { // makes the eventfd readable: on stop(), and when the pager's shutdown is requested
        int fd;
        void operator()() const noexcept
        {
            const std::uint64_t one = 1;
            [[maybe_unused]] auto n = ::write(fd, &one, sizeof one);
        }
    };

    struct state {
        state(unique_fd fd, std::uint64_t feats, bool reg, options o)
            : uffd(std::move(fd)), features(feats), registers(reg), opts(std::move(o)),
              ranges(std::make_unique<range_table>()),
              zeros(static_cast<std::byte*>(std::calloc(page_2m, 1))) // calloc: fresh pages are zero, none touched now
        {
        }

        unique_fd uffd;
        std::uint64_t features;
        bool registers;
        options opts;
        detail::published<range_table> ranges;
        std::mutex setup; // serialises range changes (the pager's setup lock also does)
        unique_fd wake;   // eventfd: written once on shutdown, never read, so every poll sees it
        std::optional<std::stop_callback<wake_fn>> on_shutdown;
        std::vector<std::unique_ptr<thread_ctx>> contexts;
        std::vector<named_thread> threads;
        struct free_deleter {
            void operator()(std::byte* p) const noexcept { std::free(p); }
        };
        std::unique_ptr<std::byte[], free_deleter> zeros; // a zero huge page, for UFFDIO_COPY where ZEROPAGE is refused
        struct {
            std::atomic<std::uint64_t> remove{0}, unmap{0}, exist{0}, again{0}, unserved{0}, redundant{0}, moot{0};
        } counts;

        [[nodiscard]] std::shared_ptr<range_state> find(std::uint64_t addr) const noexcept
        {
            return ranges.read([addr](const range_table& t) noexcept -> std::shared_ptr<range_state> {
                const auto* p = t.find(addr);
                return p ? *p : nullptr;
            });
        }

        /// Installs [addr, addr + len): from `src` (nullptr: zeros). Pages
        /// already present are skipped, given-back pages get zeros. When
        /// `drain` is set (a handler thread), EAGAIN makes it read pending
        /// events and retry; otherwise EAGAIN is retried after a yield.
        std::error_code install(std::uint64_t addr, std::uint64_t len, const std::byte* src, install_report& report,
                                thread_ctx* drain, std::uint64_t fault_addr = ~std::uint64_t{0}) noexcept
        {
            for (unsigned attempt = 0;; ++attempt) {
                const std::error_code ec = install_once(addr, len, src, report, fault_addr);
                if (ec != std::errc::resource_unavailable_try_again) return ec;
                // A REMOVE or UNMAP event is pending and the kernel refuses
                // installs until it is read. Read it (a handler thread can)
                // or let the thread that has it apply it, then walk the range
                // again with fresh bits: pages given back now get zeros.
                counts.again.fetch_add(1, std::memory_order_relaxed);
                if (attempt >= (drain != nullptr ? 1000u : 100000u)) return uffd_errc::retry_exhausted;
                if (drain == nullptr || !drain_events(*drain)) ::sched_yield();
            }
        }

        std::error_code install_once(std::uint64_t addr, std::uint64_t len, const std::byte* src,
                                     install_report& report, std::uint64_t fault_addr) noexcept
        {
            auto range = find(addr);
            if (!range) return copy_run(addr, len, src, report, fault_addr, nullptr); // untracked: just copy
            const range_state& rs = *range;
            if (rs.retired.load(std::memory_order_acquire)) return std::make_error_code(std::errc::no_such_device_or_address);
            const std::uint64_t end = std::min(addr + len, rs.r.end());
            const std::uint64_t ps = rs.r.page_size;
            // Walk runs of pages in the same state: present (skip), given back (zeros), missing (copy).
            std::uint64_t a = addr;
            while (a < end) {
                const std::size_t i = rs.index(a);
                const int kind = rs.installed(i) ? 0 : rs.given_back(i) ? 1 : 2;
                std::uint64_t b = a + ps;
                while (b < end) {
                    const std::size_t j = rs.index(b);
                    const int k = rs.installed(j) ? 0 : rs.given_back(j) ? 1 : 2;
                    if (k != kind) break;
                    b += ps;
                }
                if (kind != 0) {
                    const std::byte* from = (kind == 2 && src != nullptr) ? src + (a - addr) : nullptr;
                    if (auto ec = copy_run(a, b - a, from, report, fault_addr, range.get())) return ec;
                }
                a = b;
            }
            return {};
        }

        /// One run of missing pages, with UFFDIO_COPY (or ZEROPAGE when
        /// `src` is null), handling partial copies and EEXIST. EAGAIN is
        /// returned for install() to retry.
        std::error_code copy_run(std::uint64_t addr, std::uint64_t len, const std::byte* src, install_report& report,
                                 std::uint64_t fault_addr, range_state* rs) noexcept
        {
            const std::uint64_t ps = rs != nullptr ? rs->r.page_size : page_4k;
            while (len > 0) {
                std::int64_t done = 0;
                int err = 0;
                if (src != nullptr) {
                    uffdio_copy c{};
                    c.dst = addr;
                    c.src = reinterpret_cast<std::uintptr_t>(src); // the kernel reads the bytes from our address space
                    c.len = len;
                    if (::ioctl(uffd.get(), UFFDIO_COPY, &c) == 0) done = static_cast<std::int64_t>(len);
                    else { err = errno; done = c.copy > 0 ? c.copy : 0; }
                } else {
                    uffdio_zeropage z{};
                    z.range.start = addr;
                    z.range.len = len;
                    if (::ioctl(uffd.get(), UFFDIO_ZEROPAGE, &z) == 0) done = static_cast<std::int64_t>(len);
                    else {
                        err = errno;
                        done = z.zeropage > 0 ? z.zeropage : 0;
                        if (err == EINVAL && done == 0 && zeros && ps <= page_2m) {
                            // Hugetlbfs has no zero page: copy zeros one page at a time instead.
                            uffdio_copy c{};
                            c.dst = addr;
                            c.src = reinterpret_cast<std::uintptr_t>(zeros.get()); // zero-filled buffer of ours
                            c.len = ps;
                            if (::ioctl(uffd.get(), UFFDIO_COPY, &c) == 0) { done = static_cast<std::int64_t>(ps); err = 0; }
                            else { err = errno; done = c.copy > 0 ? c.copy : 0; }
                        }
                    }
                }
                if (done > 0) {
                    const auto n = static_cast<std::uint64_t>(done);
                    if (fault_addr - addr < n) report.covered_fault = true;
                    if (rs != nullptr)
                        for (std::uint64_t p = addr; p < addr + n; p += ps) rs->mark_installed(rs->index(p));
                    addr += n;
                    len -= n;
                    if (src != nullptr) src += n;
                    continue;
                }
                switch (err) {
                case 0: break;
                case EEXIST: // someone else installed this page first: fine, move past it
                    report.saw_exist = true;
                    counts.exist.fetch_add(1, std::memory_order_relaxed);
                    if (rs != nullptr) rs->mark_installed(rs->index(addr));
                    addr += ps;
                    len -= std::min(len, ps);
                    if (src != nullptr) src += ps;
                    continue;
                default: return {err, std::system_category()}; // EAGAIN included: install() retries it
                }
            }
            return {};
        }

        bool drain_events(thread_ctx& t) noexcept;
        void on_event(const uffd_msg& m) noexcept;

        void wake_page(std::uint64_t addr, std::uint64_t len) noexcept
        {
            uffdio_range r{};
            r.start = addr;
            r.len = len;
            ::ioctl(uffd.get(), UFFDIO_WAKE, &r); // failure means nobody waits there any more
        }
    };

    /// A handler thread's buffers, allocated at start so serving never allocates.
    struct thread_ctx {
        thread_ctx(state& st, std::size_t scratch_bytes)
            : s(st), msgs(st.opts.batch), drained(st.opts.batch), deferred(st.opts.batch * 4),
              scratch_mem(std::make_unique_for_overwrite<std::byte[]>(scratch_bytes)), scratch(scratch_mem.get(), scratch_bytes)
        {
        }

        struct installer { // what the pager installs through on this thread
            thread_ctx& t;
            std::error_code install(std::uint64_t addr, std::span<const std::byte> bytes) noexcept
            {
                return t.s.install(addr, bytes.size(), bytes.data(), t.report, &t, t.fault_addr);
            }
            std::error_code install_zero(std::uint64_t addr, std::uint64_t len) noexcept
            {
                return t.s.install(addr, len, nullptr, t.report, &t, t.fault_addr);
            }
        };

        template <class Handler>
        void run(Handler& handler, std::uint64_t around) noexcept
        {
            pollfd fds[2] = {{s.uffd.get(), POLLIN, 0}, {s.wake.get(), POLLIN, 0}};
            installer inst{*this};
            std::size_t want = 1; // messages to ask for per read(), adapted to what arrives
            for (;;) {
                // Faults met while draining events for an EAGAIN come first.
                while (deferred_count > 0) serve(handler, inst, deferred[--deferred_count], around);
                const int n = ::poll(fds, 2, -1);
                if (n < 0) {
                    if (errno == EINTR) continue;
                    return; // cannot wait: nothing sane left to do on this thread
                }
                if ((fds[1].revents & POLLIN) != 0) return; // shutdown
                if ((fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) != 0 && (fds[0].revents & POLLIN) == 0) return;
                // Ask for as many messages as last time came, doubled when the read
                // was full: a lone fault (the common case) costs the kernel no
                // second, failing dequeue, and a burst still comes in batches.
                const ssize_t got = ::read(s.uffd.get(), msgs.data(), want * sizeof(uffd_msg));
                if (got < 0) {
                    if (errno == EAGAIN || errno == EINTR) continue; // another thread took them
                    return;
                }
                const auto count = static_cast<std::size_t>(got) / sizeof(uffd_msg);
                want = count == want ? std::min(want * 2, msgs.size()) : std::max<std::size_t>(count, 1);
                for (std::size_t i = 0; i < count; ++i) {
                    if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
                        serve(handler, inst, msgs[i].arg.pagefault.address, around);
                    else
                        s.on_event(msgs[i]);
                }
            }
        }

        template <class Handler>
        void serve(Handler& handler, installer& inst, std::uint64_t addr, std::uint64_t around) noexcept
        {
            fault_addr = addr;
            report = {};
            const std::error_code ec = handler.handle_fault(addr, scratch, inst, around);
            if (ec) {
                if (moot(ec)) {
                    // The range went away under the fault (unregistered, unmapped, the
                    // process exited) or the layout kept changing: nothing to serve now.
                    // Wake the thread; if it still wants the page it faults again.
                    s.counts.moot.fetch_add(1, std::memory_order_relaxed);
                    s.wake_page(align_down(addr, page_4k), page_4k);
                    return;
                }
                s.counts.unserved.fetch_add(1, std::memory_order_relaxed);
                s.opts.on_unserved(s.opts.on_unserved_context, addr, ec);
                return;
            }
            if (report.covered_fault) return;
            // Nothing we did just now covered the faulting page: the bitmap said it
            // was present. It may have been zapped since (a REMOVE not yet read, or
            // one never negotiated). UFFDIO_ZEROPAGE settles it: EEXIST if the page
            // is really there (then only wake), else zeros, the right content after
            // a zap.
            s.counts.redundant.fetch_add(1, std::memory_order_relaxed);
            install_report check;
            const std::uint64_t page = align_down(addr, page_4k);
            if (!s.copy_run(page, page_4k, nullptr, check, addr, nullptr) && check.covered_fault) return;
            s.wake_page(page, page_4k);
        }

        static bool moot(std::error_code ec) noexcept
        {
            return ec == std::errc::no_such_file_or_directory     // ENOENT: range no longer registered
                   || ec == std::errc::no_such_process             // ESRCH: the faulting process is gone
                   || ec == std::errc::no_such_device_or_address   // ENXIO: range retired by an unmap
                   || ec == make_error_code(uffd_errc::retry_exhausted);
        }

        state& s;
        std::vector<uffd_msg> msgs;          // the batch run() is working through
        std::vector<uffd_msg> drained;       // read while draining for EAGAIN; never overwrites `msgs`
        std::vector<std::uint64_t> deferred; // fault addresses read while draining
        std::size_t deferred_count = 0;
        std::unique_ptr<std::byte[]> scratch_mem; // not value-initialised: no page of it is touched before a read needs it
        std::span<std::byte> scratch;
        std::uint64_t fault_addr = 0;
        install_report report;
    };

    static std::error_code check(const options& o) noexcept
    {
        if (o.threads == 0 || o.batch == 0 || !is_power_of_two(o.fault_around_pages) ||
            o.fault_around_pages > (1u << 18) || o.on_unserved == nullptr)
            return std::make_error_code(std::errc::invalid_argument);
        return {};
    }

    static result<uffd_backend> make(unique_fd fd, std::uint64_t features, bool registers, options opts)
    {
        uffd_backend b;
        b.state_ = std::make_unique<state>(std::move(fd), features, registers, std::move(opts));
        if (!b.state_->zeros) return std::make_error_code(std::errc::not_enough_memory);
        return b;
    }

    static result<unique_fd> open_userfaultfd() noexcept
    {
        // Raw syscall: glibc 2.36 has no wrapper. No UFFD_USER_MODE_ONLY: KVM
        // touches guest memory from the kernel and those faults must reach us.
        unique_fd fd{static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK))};
        if (fd) return fd;
        const std::error_code syscall_error = last_os_error();
        // Where the syscall is refused (unprivileged_userfaultfd=0), the device may be allowed.
        unique_fd dev{::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC)};
        if (!dev) return syscall_error;
        unique_fd made{::ioctl(dev.get(), USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK)};
        if (!made) return last_os_error();
        return made;
    }

    static bool looks_like_userfaultfd(int fd) noexcept
    {
        // The kernel names a userfaultfd's anonymous inode "[userfaultfd]".
        char link[64];
        char target[64] = {};
        std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        const ssize_t n = ::readlink(link, target, sizeof target - 1);
        return n > 0 && std::strcmp(target, "anon_inode:[userfaultfd]") == 0;
    }

    static void pin(int cpu) noexcept
    {
        if (cpu < 0) return;
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        ::pthread_setaffinity_np(::pthread_self(), sizeof set, &set); // best effort: a refused pin still serves
    }

    std::error_code unregister_kernel(const region& r) noexcept
    {
        uffdio_range range{};
        range.start = r.base;
        range.len = r.size;
        if (::ioctl(state_->uffd.get(), UFFDIO_UNREGISTER, &range) != 0) return last_os_error();
        return {};
    }

    std::unique_ptr<state> state_;
};

inline bool uffd_backend::state::drain_events(thread_ctx& t) noexcept
{
    // Read whatever is pending without blocking: events are applied now,
    // faults are kept for after the current one. The kernel queues faults
    // ahead of events, so when the deferred buffer is full a fault is woken
    // unserved instead (its thread faults again) to get through to the event.
    const ssize_t got = ::read(uffd.get(), t.drained.data(), t.drained.size() * sizeof(uffd_msg));
    if (got <= 0) return false;
    const auto count = static_cast<std::size_t>(got) / sizeof(uffd_msg);
    for (std::size_t i = 0; i < count; ++i) {
        const uffd_msg& m = t.drained[i];
        if (m.event != UFFD_EVENT_PAGEFAULT)
            on_event(m);
        else if (t.deferred_count < t.deferred.size())
            t.deferred[t.deferred_count++] = m.arg.pagefault.address;
        else
            wake_page(align_down(m.arg.pagefault.address, page_4k), page_4k);
    }
    return true;
}

inline void uffd_backend::state::on_event(const uffd_msg& m) noexcept
{
    if (m.event == UFFD_EVENT_REMOVE || m.event == UFFD_EVENT_UNMAP) {
        const bool unmap = m.event == UFFD_EVENT_UNMAP;
        (unmap ? counts.unmap : counts.remove).fetch_add(1, std::memory_order_relaxed);
        const std::uint64_t start = m.arg.remove.start;
        const std::uint64_t end = m.arg.remove.end;
        ranges.read([&](const range_table& t) noexcept {
            for (const auto& rs : t.items) {
                const std::uint64_t lo = std::max(start, rs->r.base);
                const std::uint64_t hi = std::min(end, rs->r.end());
                if (lo >= hi) continue;
                if (unmap && lo == rs->r.base && hi == rs->r.end()) rs->retired.store(true, std::memory_order_release);
                // Pages given back read as zeros from now on, never as stale snapshot bytes.
                for (std::uint64_t p = align_up(lo, rs->r.page_size); p + rs->r.page_size <= hi; p += rs->r.page_size) {
                    if (unmap) rs->forget(rs->index(p));
                    else rs->mark_removed(rs->index(p));
                }
            }
            return 0;
        });
    }
    // FORK and REMAP are never negotiated by create(); an adopted descriptor
    // might have them. A FORK event carries a new userfaultfd: do not leak it.
    if (m.event == UFFD_EVENT_FORK) ::close(static_cast<int>(m.arg.fork.ufd));
}

static_assert(ExceptionBackend<uffd_backend>);

} // namespace squib
