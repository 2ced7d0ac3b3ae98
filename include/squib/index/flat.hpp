// squib-pager: a sorted flat region index (binary search, O(log n) lookup).
#pragma once

#include <squib/core/region.hpp>
#include <squib/error.hpp>

#include <boost/container/flat_map.hpp>

#include <cstddef>
#include <iterator>
#include <cstdint>
#include <system_error>

namespace squib {

/// Regions kept sorted by base in one contiguous array, so a lookup is a
/// binary search over cache-friendly memory. Inserting and erasing move
/// elements (O(n)); both happen at setup, lookups on every fault.
class flat_index {
public:
    /// Adds `r`. Errors: errc::overlapping_region if it shares a byte with a held region.
    [[nodiscard]] std::error_code insert(const region& r)
    {
        auto next = regions_.lower_bound(r.base);
        if (next != regions_.end() && next->second.overlaps(r)) return errc::overlapping_region;
        if (next != regions_.begin() && std::prev(next)->second.overlaps(r)) return errc::overlapping_region;
        regions_.emplace_hint(next, r.base, r);
        return {};
    }

    /// Removes the region starting at `base`. Errors: errc::region_not_found.
    [[nodiscard]] std::error_code erase(std::uint64_t base)
    {
        return regions_.erase(base) == 1 ? std::error_code{} : make_error_code(errc::region_not_found);
    }

    /// The region holding `addr`, or nullptr.
    [[nodiscard]] const region* find(std::uint64_t addr) const noexcept
    {
        auto it = regions_.upper_bound(addr); // first region starting after addr
        if (it == regions_.begin()) return nullptr;
        const region& r = std::prev(it)->second;
        return r.contains(addr) ? &r : nullptr;
    }

    [[nodiscard]] std::size_t size() const noexcept { return regions_.size(); }

    template <class F>
    void for_each(F&& f) const
    {
        for (const auto& entry : regions_) f(entry.second);
    }

private:
    boost::container::flat_map<std::uint64_t, region> regions_;
};

} // namespace squib
