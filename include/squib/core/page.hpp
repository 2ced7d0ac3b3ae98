// squib-pager: page geometry.
#pragma once

#include <cstdint>

namespace squib {

inline constexpr std::uint64_t page_4k = 4096;
inline constexpr std::uint64_t page_2m = 2ull << 20;

[[nodiscard]] constexpr bool is_power_of_two(std::uint64_t v) noexcept
{
    return v != 0 && (v & (v - 1)) == 0;
}

/// Rounds `v` down to a multiple of `page`; `page` must be a power of two.
[[nodiscard]] constexpr std::uint64_t align_down(std::uint64_t v, std::uint64_t page) noexcept
{
    return v & ~(page - 1);
}

/// Rounds `v` up to a multiple of `page`; `page` must be a power of two and
/// the result must not wrap (callers check `v <= UINT64_MAX - page + 1`).
[[nodiscard]] constexpr std::uint64_t align_up(std::uint64_t v, std::uint64_t page) noexcept
{
    return (v + page - 1) & ~(page - 1);
}

[[nodiscard]] constexpr bool is_aligned(std::uint64_t v, std::uint64_t page) noexcept
{
    return (v & (page - 1)) == 0;
}

} // namespace squib
