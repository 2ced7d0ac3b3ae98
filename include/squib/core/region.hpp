// squib-pager: a lazily backed address range.
#pragma once

#include <squib/core/page.hpp>
#include <squib/error.hpp>

#include <cstdint>
#include <system_error>

namespace squib {

/// One lazily backed range of guest memory.
///
/// Addresses in [base, base + size) are served from the page source at
/// `source_offset + (addr - base)`, one `page_size` page at a time.
struct region {
    std::uint64_t base = 0;          ///< first address (host virtual or guest physical, as the backend sees faults)
    std::uint64_t size = 0;          ///< bytes, a positive multiple of page_size
    std::uint64_t source_offset = 0; ///< where `base` lives in the page source
    std::uint64_t page_size = page_4k;

    /// One past the last address. Valid only for a region that passed validate().
    [[nodiscard]] constexpr std::uint64_t end() const noexcept { return base + size; }

    [[nodiscard]] constexpr bool contains(std::uint64_t addr) const noexcept
    {
        return addr - base < size; // unsigned wrap makes addr < base fail too
    }

    /// The source address of the byte at `addr`; `addr` must be inside.
    [[nodiscard]] constexpr std::uint64_t source_address(std::uint64_t addr) const noexcept
    {
        return source_offset + (addr - base);
    }

    /// Whether [base, end) and [other.base, other.end) share a byte.
    [[nodiscard]] constexpr bool overlaps(const region& other) const noexcept
    {
        return base < other.end() && other.base < end();
    }

    /// Checks the invariants every index relies on.
    /// Errors: errc::bad_page_size, errc::invalid_region (empty, unaligned, wrapping).
    [[nodiscard]] std::error_code validate() const noexcept
    {
        if (!is_power_of_two(page_size)) return errc::bad_page_size;
        if (size == 0 || !is_aligned(base, page_size) || !is_aligned(size, page_size) ||
            !is_aligned(source_offset, page_size))
            return errc::invalid_region;
        if (base + size < base || source_offset + size < source_offset) return errc::invalid_region;
        return {};
    }

    friend constexpr bool operator==(const region&, const region&) = default;
};

} // namespace squib
