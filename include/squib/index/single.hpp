// squib-pager: an index that holds at most one region.
#pragma once

#include <squib/core/region.hpp>
#include <squib/error.hpp>

#include <cstddef>
#include <cstdint>
#include <system_error>

namespace squib {

/// The common case of one guest RAM range: a lookup is one range check.
class single_region_index {
public:
    /// Stores `r`. Errors: errc::index_full if a region is already held.
    [[nodiscard]] std::error_code insert(const region& r) noexcept
    {
        if (held_) return errc::index_full;
        region_ = r;
        held_ = true;
        return {};
    }

    /// Removes the region starting at `base`. Errors: errc::region_not_found.
    [[nodiscard]] std::error_code erase(std::uint64_t base) noexcept
    {
        if (!held_ || region_.base != base) return errc::region_not_found;
        held_ = false;
        return {};
    }

    [[nodiscard]] const region* find(std::uint64_t addr) const noexcept
    {
        return held_ && region_.contains(addr) ? &region_ : nullptr;
    }

    [[nodiscard]] std::size_t size() const noexcept { return held_ ? 1 : 0; }

    template <class F>
    void for_each(F&& f) const
    {
        if (held_) f(region_);
    }

private:
    region region_{};
    bool held_ = false;
};

} // namespace squib
