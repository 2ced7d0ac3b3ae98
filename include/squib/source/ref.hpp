// squib-pager: a non-owning handle to a page source, to share one source
// between several pagers (one snapshot file restoring many VMs).
#pragma once

#include <squib/concepts.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <system_error>

namespace squib {

/// Forwards to a source that lives elsewhere and outlives this handle. It is
/// mapped or sparse exactly when the referenced source is, so a pager over a
/// source_ref takes the same zero-copy and zero-page paths.
///
/// **Example**
///
///     auto snapshot = squib::mapped_file_source::open("vm.mem");
///     vm_pager a{squib::source_ref{*snapshot}};
///     vm_pager b{squib::source_ref{*snapshot}}; // both restore from one mapping
template <PageSource Source>
class source_ref {
public:
    explicit source_ref(Source& source) noexcept : source_(&source) {}

    [[nodiscard]] std::error_code read(std::uint64_t addr, std::span<std::byte> dst) const noexcept
    {
        return source_->read(addr, dst);
    }

    [[nodiscard]] result<std::span<const std::byte>> view(std::uint64_t addr, std::size_t len) const noexcept
        requires MappedPageSource<Source>
    {
        return source_->view(addr, len);
    }

    [[nodiscard]] bool is_zero(std::uint64_t addr, std::size_t len) const noexcept
        requires SparsePageSource<Source>
    {
        return source_->is_zero(addr, len);
    }

    [[nodiscard]] Source& get() const noexcept { return *source_; }

private:
    Source* source_;
};

} // namespace squib
