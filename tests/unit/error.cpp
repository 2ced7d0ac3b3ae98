// The error category and the fmt formatters.
#include <squib/error.hpp>
#include <squib/format.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <set>
#include <string>

TEST_SUITE("error")
{
    TEST_CASE("every errc has its own message in the squib category")
    {
        std::set<std::string> messages;
        for (int v = static_cast<int>(squib::errc::unaligned_address); v <= static_cast<int>(squib::errc::install_failed);
             ++v) {
            const std::error_code ec = static_cast<squib::errc>(v);
            CHECK(ec.category() == squib::error_category());
            CHECK(ec.value() == v);
            CHECK(static_cast<bool>(ec));
            const std::string msg = ec.message();
            CHECK(msg != "unknown squib error");
            messages.insert(msg);
        }
        CHECK(messages.size() == static_cast<std::size_t>(squib::errc::install_failed));
        CHECK(squib::error_category().message(9999) == "unknown squib error");
        CHECK(std::string(squib::error_category().name()) == "squib");
    }

    TEST_CASE("errc compares with error codes and not with other categories")
    {
        const std::error_code ec = squib::errc::short_read;
        CHECK(ec == squib::errc::short_read);
        CHECK(ec != squib::errc::out_of_region);
        CHECK(std::error_code(7, std::system_category()) != squib::errc::short_read);
    }

    TEST_CASE("formatters write one readable line")
    {
        CHECK(fmt::format("{}", squib::errc::out_of_region) == "address is outside every registered region");
        CHECK(fmt::format("{}", std::error_code(squib::errc::short_read)).find("short read") != std::string::npos);
        const squib::region r{.base = 0x1000, .size = 0x2000, .source_offset = 0x3000, .page_size = 4096};
        CHECK(fmt::format("{}", r) == "[0x1000, 0x3000) page 4096 @ source 0x3000");
        squib::stats_snapshot s;
        s.faults = 3;
        s.zero_pages = 1;
        CHECK(fmt::format("{}", s) ==
              "faults=3 prewarmed=0 zero_pages=1 bytes=0 errors=0 forwarded=0 reinstalls=0");
        squib::prewarm_report ok{.installed = 4, .failed = 0, .first_error = {}};
        CHECK(fmt::format("{}", ok) == "prewarmed 4 pages");
        squib::prewarm_report bad{.installed = 1, .failed = 2, .first_error = squib::errc::out_of_region};
        CHECK(fmt::format("{}", bad).find("2 failed") != std::string::npos);
        const squib::latency_summary l{.count = 2, .p50_ns = 10, .p99_ns = 20, .max_ns = 21};
        CHECK(fmt::format("{}", l) == "n=2 p50<=10ns p99<=20ns max=21ns");
    }

    TEST_CASE("last_os_error carries errno in the system category")
    {
        errno = ENOENT;
        const auto ec = squib::last_os_error();
        CHECK(ec == std::errc::no_such_file_or_directory);
        CHECK(ec.category() == std::system_category());
    }
}
