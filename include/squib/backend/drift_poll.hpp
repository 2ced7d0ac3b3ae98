// squib-pager: the drift-poll skeleton backend.
#pragma once

#include <squib/concepts.hpp>
#include <squib/core/region.hpp>
#include <squib/core/result.hpp>
#include <squib/detail/thread.hpp>
#include <squib/error.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <system_error>
#include <utility>

namespace squib {

/// What one drift check found.
struct drift_result {
    bool reinstalled = false; ///< the check found its hook replaced and put it back
    std::error_code error;    ///< the check itself failed (counted, the loop goes on)
};

/// The drift check that never finds drift.
struct no_drift_check {
    drift_result operator()() noexcept { return {}; }
};

/// A backend that owns no exception port and serves no faults: a named thread
/// wakes every poll interval and runs `DriftCheck`, the hook that verifies
/// (and if need be restores) whatever the host's fault delivery depends on —
/// on macOS, that our exception port is still the task's. It is the no-port
/// mode of the Mach backend and a template for polling backends. Installing
/// pages is not supported: it has no memory to install into.
///
/// `DriftCheck` is a callable `drift_result() noexcept`, run on the backend's
/// thread only. Each reinstall it reports is counted by the pager's stats.
template <class DriftCheck = no_drift_check>
class drift_poll_backend {
public:
    struct options {
        std::string thread_name = "squib-drift"; ///< shown by top -H and debuggers (15 characters kept)
        std::size_t stack_size = 0;              ///< 0: the system default
    };

    drift_poll_backend() = default;
    explicit drift_poll_backend(DriftCheck check, options opts = {}) : check_(std::move(check)), opts_(std::move(opts)) {}
    drift_poll_backend(const drift_poll_backend&) = delete;
    drift_poll_backend& operator=(const drift_poll_backend&) = delete;
    ~drift_poll_backend() { stop(); }

    /// Spawns the polling thread. Errors: errc::already_running, the thread
    /// spawn error (EAGAIN, ...), never an exception.
    template <class Handler>
    [[nodiscard]] std::error_code start(Handler& handler)
    {
        if (thread_.joinable()) return errc::already_running;
        try {
            stop_ = std::stop_source{}; // a fresh one: a stop_source cannot be un-stopped
        } catch (const std::bad_alloc&) {
            return std::make_error_code(std::errc::not_enough_memory);
        }
        // Wake at once when the pager's shutdown is requested, not at the next tick.
        on_shutdown_.emplace(handler.stop_token(), request{&stop_});
        auto t = detail::named_thread::spawn(opts_.thread_name, opts_.stack_size, [this, &handler]() noexcept {
            run(handler);
        });
        if (!t) {
            on_shutdown_.reset();
            return t.error();
        }
        thread_ = std::move(*t);
        return {};
    }

    /// Wakes the thread and joins it. Returns promptly: the thread waits on a
    /// condition that the stop request interrupts, never a full interval.
    void stop() noexcept
    {
        stop_.request_stop();
        thread_.join();
        on_shutdown_.reset();
    }

    [[nodiscard]] std::error_code register_range(const region&) noexcept { return {}; }
    [[nodiscard]] std::error_code unregister_range(const region&) noexcept { return {}; }

    [[nodiscard]] std::error_code install(std::uint64_t, std::span<const std::byte>) noexcept
    {
        return errc::not_supported;
    }
    [[nodiscard]] std::error_code install_zero(std::uint64_t, std::uint64_t) noexcept { return errc::not_supported; }

    /// Drift checks run so far.
    [[nodiscard]] std::uint64_t checks() const noexcept { return checks_.load(std::memory_order_acquire); }
    /// Drift checks that failed.
    [[nodiscard]] std::uint64_t check_errors() const noexcept { return errors_.load(std::memory_order_relaxed); }

private:
    struct request {
        std::stop_source* source;
        void operator()() const noexcept { source->request_stop(); }
    };

    template <class Handler>
    void run(Handler& handler) noexcept
    {
        std::stop_token token = stop_.get_token();
        std::mutex m;
        std::condition_variable_any cv;
        std::unique_lock lock(m);
        while (!token.stop_requested()) {
            drift_result r = check_();
            if (r.reinstalled) handler.note_reinstall();
            if (r.error) errors_.fetch_add(1, std::memory_order_relaxed);
            checks_.fetch_add(1, std::memory_order_release);
            // Returns early, with the predicate false, when a stop is requested.
            cv.wait_for(lock, token, handler.poll_interval(), [] { return false; });
        }
    }

    DriftCheck check_{};
    options opts_{};
    std::stop_source stop_;
    std::optional<std::stop_callback<request>> on_shutdown_;
    detail::named_thread thread_;
    std::atomic<std::uint64_t> checks_{0};
    std::atomic<std::uint64_t> errors_{0};
};

static_assert(ExceptionBackend<drift_poll_backend<>>);

} // namespace squib
