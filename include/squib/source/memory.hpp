// squib-pager: a page source over bytes already in memory.
#pragma once

#include <squib/core/result.hpp>
#include <squib/error.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <system_error>

namespace squib {

/// Serves pages from a caller-owned byte range: source address `a` is
/// `bytes[a]`. The bytes must outlive the source. Useful in tests, in
/// benchmarks, and for snapshots a VMM already holds in memory.
///
/// **Example**
///
///     std::vector<std::byte> snapshot = load();
///     squib::memory_source src{snapshot};
class memory_source {
public:
    memory_source() = default;
    explicit memory_source(std::span<const std::byte> bytes) noexcept : bytes_(bytes) {}

    /// Copies `dst.size()` bytes at `addr`. Errors: errc::short_read past the end.
    [[nodiscard]] std::error_code read(std::uint64_t addr, std::span<std::byte> dst) const noexcept
    {
        auto v = view(addr, dst.size());
        if (!v) return v.error();
        std::memcpy(dst.data(), v->data(), dst.size());
        return {};
    }

    /// The `len` bytes at `addr`, without copying. Errors: errc::short_read past the end.
    [[nodiscard]] result<std::span<const std::byte>> view(std::uint64_t addr, std::size_t len) const noexcept
    {
        if (addr > bytes_.size() || len > bytes_.size() - addr) return errc::short_read;
        return bytes_.subspan(static_cast<std::size_t>(addr), len);
    }

    [[nodiscard]] std::size_t size() const noexcept { return bytes_.size(); }

private:
    std::span<const std::byte> bytes_;
};

} // namespace squib
