// squib-pager: which pages to install before the guest runs.
#pragma once

#include <squib/core/page.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace squib {

/// Where a restored guest will touch memory first. A zero address leaves
/// that part out.
struct boot_layout {
    std::uint64_t kernel_entry = 0;        ///< the address the vCPU resumes at (kernel text)
    std::uint64_t kernel_window = 64 << 10; ///< bytes on each side of kernel_entry
    std::uint64_t vcpu0_stack_pointer = 0; ///< vCPU0's stack pointer at the snapshot
    std::uint64_t stack_window = 16 << 10; ///< bytes below the stack pointer (stacks grow down)
    std::uint64_t fdt_address = 0;         ///< the flattened device tree (or boot params) page
    std::uint64_t fdt_size = 4096;         ///< its size in bytes
};

/// The boot-critical pages of `layout` as sorted, distinct, page-aligned
/// addresses: the kernel text neighbourhood, the pages of vCPU0's stack just
/// below (and holding) its stack pointer, and the FDT. Feed them to
/// pager::prewarm before the first guest instruction. `page_size` must be a
/// power of two.
[[nodiscard]] inline std::vector<std::uint64_t> boot_critical_pages(const boot_layout& layout,
                                                                    std::uint64_t page_size)
{
    std::vector<std::uint64_t> pages;
    auto add_range = [&](std::uint64_t first, std::uint64_t last) { // inclusive byte addresses
        for (std::uint64_t p = align_down(first, page_size); p <= last; p += page_size) {
            pages.push_back(p);
            if (p + page_size < p) break; // the last page of the address space
        }
    };
    if (layout.kernel_entry != 0) {
        const std::uint64_t lo = layout.kernel_entry - std::min(layout.kernel_entry, layout.kernel_window);
        const std::uint64_t room = ~std::uint64_t{0} - layout.kernel_entry;
        const std::uint64_t after = layout.kernel_window != 0 ? layout.kernel_window - 1 : 0; // [entry - w, entry + w)
        add_range(lo, layout.kernel_entry + std::min(room, after));
    }
    if (layout.vcpu0_stack_pointer != 0) {
        const std::uint64_t sp = layout.vcpu0_stack_pointer;
        add_range(sp - std::min(sp, layout.stack_window), sp);
    }
    if (layout.fdt_address != 0 && layout.fdt_size != 0) {
        const std::uint64_t room = ~std::uint64_t{0} - layout.fdt_address;
        add_range(layout.fdt_address, layout.fdt_address + std::min(room, layout.fdt_size - 1));
    }
    std::sort(pages.begin(), pages.end());
    pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
    return pages;
}

} // namespace squib
