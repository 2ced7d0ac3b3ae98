// The boot-critical prewarm list.
#include <squib/core/prewarm.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <algorithm>

TEST_SUITE("prewarm")
{
    TEST_CASE("kernel neighbourhood, stack and FDT pages, sorted and distinct")
    {
        squib::boot_layout l;
        l.kernel_entry = 0x8020'0800;
        l.kernel_window = 0x2000; // [entry - 8 KiB, entry + 8 KiB)
        l.vcpu0_stack_pointer = 0x8100'0010;
        l.stack_window = 0x1000;
        l.fdt_address = 0x8800'0000;
        l.fdt_size = 0x1800; // two pages
        const auto pages = squib::boot_critical_pages(l, 0x1000);
        const std::vector<std::uint64_t> expect{
            0x801f'e000, 0x801f'f000, 0x8020'0000, 0x8020'1000, 0x8020'2000, // kernel
            0x80ff'f000, 0x8100'0000,                                        // stack: SP page and the one below
            0x8800'0000, 0x8800'1000,                                        // FDT
        };
        CHECK(pages == expect);
    }

    TEST_CASE("absent parts are left out and windows clip at zero")
    {
        squib::boot_layout l;
        l.kernel_entry = 0x1000;
        l.kernel_window = 0x10000; // would reach below address 0
        l.fdt_address = 0;
        const auto pages = squib::boot_critical_pages(l, 0x1000);
        CHECK(pages.front() == 0);
        CHECK(pages.back() == 0x1000 + 0x10000 - 0x1000);
        CHECK(std::is_sorted(pages.begin(), pages.end()));
        CHECK(squib::boot_critical_pages(squib::boot_layout{}, 0x1000).empty());
    }

    TEST_CASE("overlapping parts do not repeat pages; 2 MiB pages")
    {
        squib::boot_layout l;
        l.kernel_entry = 0x4000'1000;
        l.kernel_window = 0x1000;
        l.vcpu0_stack_pointer = 0x4000'3000;
        l.stack_window = 0x2000;
        l.fdt_address = 0x4000'2000;
        const auto pages = squib::boot_critical_pages(l, squib::page_2m);
        CHECK(pages == std::vector<std::uint64_t>{0x4000'0000});
    }

    TEST_CASE("the top of the address space does not wrap")
    {
        squib::boot_layout l;
        l.fdt_address = ~std::uint64_t{0} - 0xfff;
        l.fdt_size = 0x10000;
        const auto pages = squib::boot_critical_pages(l, 0x1000);
        CHECK(pages == std::vector<std::uint64_t>{~std::uint64_t{0} - 0xfff});
    }
}
