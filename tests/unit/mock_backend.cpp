// The test backend itself: what it records and the failures it scripts.
#include <squib/backend/mock.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <vector>

TEST_SUITE("mock_backend")
{
    TEST_CASE("installs land in simulated memory, in order")
    {
        squib::mock_backend b;
        const std::vector<std::byte> bytes(4096, std::byte{0x5a});
        REQUIRE_FALSE(b.install(0x1000, bytes));
        REQUIRE_FALSE(b.install_zero(0x2000, 4096));
        const auto log = b.installs();
        REQUIRE(log.size() == 2);
        CHECK(log[0].addr == 0x1000);
        CHECK_FALSE(log[0].zero);
        CHECK(log[1].zero);
        CHECK(b.page_at(0x1000) == bytes);
        CHECK(b.page_at(0x2000) == std::vector<std::byte>(4096, std::byte{0}));
        CHECK_FALSE(b.page_at(0x3000).has_value());
    }

    TEST_CASE("scripted install failures run out")
    {
        squib::mock_backend b;
        const std::vector<std::byte> bytes(16);
        b.fail_installs(std::make_error_code(std::errc::io_error), 2);
        CHECK(b.install(0x1000, bytes) == std::errc::io_error);
        CHECK(b.install_zero(0x1000, 16) == std::errc::io_error);
        CHECK_FALSE(b.install(0x1000, bytes));
        CHECK(b.installs().size() == 1);
    }

    TEST_CASE("faults need a started handler")
    {
        squib::mock_backend b;
        CHECK(b.inject_fault(0x1000) == squib::errc::not_running);
        squib::detail::fault_handler_archetype h;
        REQUIRE_FALSE(b.start(h));
        CHECK(b.running());
        CHECK(b.start(h) == squib::errc::already_running);
        CHECK_FALSE(b.inject_fault(0x1000)); // the archetype accepts everything
        b.stop();
        CHECK_FALSE(b.running());
        CHECK(b.inject_fault(0x1000) == squib::errc::not_running);
    }

    TEST_CASE("ranges are tracked and unknown ones refused")
    {
        squib::mock_backend b;
        const squib::region r{.base = 0x10000, .size = 0x1000};
        REQUIRE_FALSE(b.register_range(r));
        CHECK(b.ranges().size() == 1);
        CHECK(b.unregister_range({.base = 0x20000, .size = 0x1000}) == squib::errc::region_not_found);
        REQUIRE_FALSE(b.unregister_range(r));
        CHECK(b.ranges().empty());
    }
}
