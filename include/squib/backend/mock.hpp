// squib-pager: a backend for tests, driven by hand.
#pragma once

#include <squib/concepts.hpp>
#include <squib/core/region.hpp>
#include <squib/error.hpp>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <system_error>
#include <vector>

namespace squib {

/// A backend with no hardware behind it. A test injects faults with
/// inject_fault(); installed pages land in a simulated memory that the test
/// reads back; failures can be scripted for start, registration and installs.
///
/// inject_fault reaches the pager through one function pointer set by
/// start(): the only indirect call, and only in this test backend.
class mock_backend {
public:
    /// One install, in order of arrival.
    struct install_record {
        std::uint64_t addr = 0;
        std::uint64_t len = 0;
        bool zero = false;
    };

    mock_backend() = default;
    mock_backend(const mock_backend&) = delete;
    mock_backend& operator=(const mock_backend&) = delete;

    // ---- ExceptionBackend ----------------------------------------------------

    template <class Handler>
    [[nodiscard]] std::error_code start(Handler& handler)
    {
        std::lock_guard lock(mutex_);
        if (fail_start_) return *fail_start_;
        if (handler_ != nullptr) return errc::already_running;
        handler_ = &handler;
        serve_ = [](void* h, std::uint64_t addr, std::span<std::byte> scratch, mock_backend& self) noexcept {
            return static_cast<Handler*>(h)->handle_fault(addr, scratch, self); // h is the Handler start() saw
        };
        ++starts_;
        return {};
    }

    void stop() noexcept
    {
        std::unique_lock serving(serving_); // waits for injected faults still in the handler
        std::lock_guard lock(mutex_);
        handler_ = nullptr;
        serve_ = nullptr;
        ++stops_;
    }

    [[nodiscard]] std::error_code register_range(const region& r)
    {
        std::lock_guard lock(mutex_);
        if (fail_register_) return *fail_register_;
        ranges_.push_back(r);
        return {};
    }

    [[nodiscard]] std::error_code unregister_range(const region& r)
    {
        std::lock_guard lock(mutex_);
        if (fail_unregister_) return *fail_unregister_;
        for (auto it = ranges_.begin(); it != ranges_.end(); ++it) {
            if (*it == r) {
                ranges_.erase(it);
                return {};
            }
        }
        return errc::region_not_found;
    }

    // ---- PageInstaller -------------------------------------------------------

    [[nodiscard]] std::error_code install(std::uint64_t addr, std::span<const std::byte> bytes) noexcept
    {
        return record(addr, bytes.size(), bytes.data());
    }

    [[nodiscard]] std::error_code install_zero(std::uint64_t addr, std::uint64_t len) noexcept
    {
        return record(addr, len, nullptr);
    }

    // ---- driving it ------------------------------------------------------------

    /// Delivers a fault at `addr` to the started handler, as a hardware
    /// backend would, with a scratch buffer of `scratch_size` bytes.
    /// Errors: errc::not_running before start() or after stop(), else the
    /// handler's result.
    [[nodiscard]] std::error_code inject_fault(std::uint64_t addr, std::size_t scratch_size = 2u << 20)
    {
        std::shared_lock serving(serving_); // stop() waits for this fault to leave the handler
        void* h = nullptr;
        serve_fn serve = nullptr;
        {
            std::lock_guard lock(mutex_);
            h = handler_;
            serve = serve_;
        }
        if (serve == nullptr) return errc::not_running;
        std::vector<std::byte> scratch(scratch_size);
        return serve(h, addr, scratch, *this);
    }

    /// Makes the next start() fail with `ec` (or succeed again with {}).
    void fail_start(std::error_code ec) { set(fail_start_, ec); }
    void fail_register(std::error_code ec) { set(fail_register_, ec); }
    void fail_unregister(std::error_code ec) { set(fail_unregister_, ec); }
    /// Makes the next `count` installs fail with `ec`.
    void fail_installs(std::error_code ec, unsigned count = 1)
    {
        std::lock_guard lock(mutex_);
        fail_install_ = ec;
        fail_install_count_ = count;
    }

    // ---- what happened -----------------------------------------------------------

    /// The bytes at `addr` in simulated memory: nullopt if never installed.
    [[nodiscard]] std::optional<std::vector<std::byte>> page_at(std::uint64_t addr) const
    {
        std::lock_guard lock(mutex_);
        auto it = memory_.find(addr);
        if (it == memory_.end()) return std::nullopt;
        return it->second;
    }

    [[nodiscard]] std::vector<install_record> installs() const
    {
        std::lock_guard lock(mutex_);
        return log_;
    }

    [[nodiscard]] std::vector<region> ranges() const
    {
        std::lock_guard lock(mutex_);
        return ranges_;
    }

    [[nodiscard]] bool running() const
    {
        std::lock_guard lock(mutex_);
        return handler_ != nullptr;
    }

    [[nodiscard]] unsigned starts() const
    {
        std::lock_guard lock(mutex_);
        return starts_;
    }
    [[nodiscard]] unsigned stops() const
    {
        std::lock_guard lock(mutex_);
        return stops_;
    }

private:
    using serve_fn = std::error_code (*)(void*, std::uint64_t, std::span<std::byte>, mock_backend&) noexcept;

    void set(std::optional<std::error_code>& slot, std::error_code ec)
    {
        std::lock_guard lock(mutex_);
        slot = ec ? std::optional{ec} : std::nullopt;
    }

    std::error_code record(std::uint64_t addr, std::uint64_t len, const std::byte* bytes) noexcept
    {
        std::lock_guard lock(mutex_);
        if (fail_install_count_ > 0) {
            --fail_install_count_;
            return fail_install_;
        }
        try { // a test backend may allocate; it must still not throw through noexcept
            log_.push_back({addr, len, bytes == nullptr});
            auto& page = memory_[addr];
            if (bytes != nullptr)
                page.assign(bytes, bytes + len);
            else
                page.assign(len, std::byte{0});
        } catch (...) {
            return errc::install_failed;
        }
        return {};
    }

    mutable std::mutex mutex_;
    std::shared_mutex serving_; // held shared by each injected fault, exclusively by stop()
    void* handler_ = nullptr;
    serve_fn serve_ = nullptr;
    std::map<std::uint64_t, std::vector<std::byte>> memory_;
    std::vector<install_record> log_;
    std::vector<region> ranges_;
    std::optional<std::error_code> fail_start_, fail_register_, fail_unregister_;
    std::error_code fail_install_;
    unsigned fail_install_count_ = 0;
    unsigned starts_ = 0;
    unsigned stops_ = 0;
};

static_assert(ExceptionBackend<mock_backend>);

} // namespace squib
