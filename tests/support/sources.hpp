// Page sources used only by tests: each forces one path through the pager.
#pragma once

#include <squib/core/result.hpp>
#include <squib/error.hpp>
#include <squib/source/memory.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>
#include <system_error>

namespace squib::test {

/// Only read(): the pager must copy through a scratch buffer.
class read_only_source {
public:
    explicit read_only_source(std::span<const std::byte> bytes) noexcept : inner_(bytes) {}
    read_only_source(read_only_source&& other) noexcept : inner_(other.inner_), reads_(other.reads()) {}
    [[nodiscard]] std::error_code read(std::uint64_t addr, std::span<std::byte> dst) const noexcept
    {
        reads_.fetch_add(1, std::memory_order_relaxed);
        return inner_.read(addr, dst);
    }
    [[nodiscard]] std::uint64_t reads() const noexcept { return reads_.load(std::memory_order_relaxed); }

private:
    memory_source inner_;
    mutable std::atomic<std::uint64_t> reads_{0};
};

/// A mapped source whose pages in [zero_begin, zero_end) are holes.
class sparse_memory_source {
public:
    sparse_memory_source(std::span<const std::byte> bytes, std::uint64_t zero_begin, std::uint64_t zero_end) noexcept
        : inner_(bytes), zero_begin_(zero_begin), zero_end_(zero_end)
    {
    }
    [[nodiscard]] std::error_code read(std::uint64_t addr, std::span<std::byte> dst) const noexcept
    {
        return inner_.read(addr, dst);
    }
    [[nodiscard]] result<std::span<const std::byte>> view(std::uint64_t addr, std::size_t len) const noexcept
    {
        return inner_.view(addr, len);
    }
    [[nodiscard]] bool is_zero(std::uint64_t addr, std::size_t len) const noexcept
    {
        return addr >= zero_begin_ && addr + len <= zero_end_;
    }

private:
    memory_source inner_;
    std::uint64_t zero_begin_;
    std::uint64_t zero_end_;
};

/// Fails every read with a chosen error.
class failing_source {
public:
    explicit failing_source(std::error_code ec = make_error_code(errc::short_read)) noexcept : ec_(ec) {}
    [[nodiscard]] std::error_code read(std::uint64_t, std::span<std::byte>) const noexcept { return ec_; }

private:
    std::error_code ec_;
};

} // namespace squib::test
