// The in-memory page source.
#include <squib/core/page.hpp>
#include <squib/source/memory.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <cstring>

TEST_SUITE("memory_source")
{
    TEST_CASE("read and view return the bytes at the address")
    {
        const auto bytes = squib::test::pattern(4 * squib::page_4k);
        squib::memory_source src{bytes};
        CHECK(src.size() == bytes.size());
        std::vector<std::byte> buf(squib::page_4k);
        REQUIRE_FALSE(src.read(squib::page_4k, buf));
        CHECK(std::memcmp(buf.data(), bytes.data() + squib::page_4k, squib::page_4k) == 0);
        auto v = src.view(2 * squib::page_4k, squib::page_4k);
        REQUIRE(v);
        CHECK(v->data() == bytes.data() + 2 * squib::page_4k);
    }

    TEST_CASE("past the end is a short read")
    {
        const auto bytes = squib::test::pattern(2 * squib::page_4k);
        squib::memory_source src{bytes};
        std::vector<std::byte> buf(squib::page_4k);
        CHECK(src.read(2 * squib::page_4k, buf) == squib::errc::short_read);
        CHECK(src.read(squib::page_4k + 1, buf) == squib::errc::short_read);
        CHECK(src.view(~std::uint64_t{0} - 1, 16).error() == squib::errc::short_read);
        CHECK(squib::memory_source{}.view(0, 1).error() == squib::errc::short_read);
    }
}
