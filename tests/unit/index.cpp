// Region indexes: one body over both shipped models, then what is specific.
#include <squib/index/flat.hpp>
#include <squib/index/single.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <random>
#include <vector>

using squib::errc;
using squib::region;

TEST_SUITE("index")
{
    TEST_CASE_TEMPLATE("one region: find, bounds, erase", Index, squib::flat_index, squib::single_region_index)
    {
        Index idx;
        CHECK(idx.size() == 0);
        CHECK(idx.find(0x1000) == nullptr);
        const region r{.base = 0x10000, .size = 0x4000};
        REQUIRE_FALSE(idx.insert(r));
        CHECK(idx.size() == 1);
        REQUIRE(idx.find(0x10000) != nullptr);
        CHECK(*idx.find(0x10000) == r);
        CHECK(idx.find(0x13fff) != nullptr);
        CHECK(idx.find(0x14000) == nullptr);
        CHECK(idx.find(0xffff) == nullptr);
        CHECK(idx.find(0) == nullptr);
        CHECK(idx.find(~std::uint64_t{0}) == nullptr);
        CHECK(idx.erase(0x10001) == errc::region_not_found);
        REQUIRE_FALSE(idx.erase(0x10000));
        CHECK(idx.size() == 0);
        CHECK(idx.find(0x10000) == nullptr);
        CHECK(idx.erase(0x10000) == errc::region_not_found);
    }

    TEST_CASE_TEMPLATE("copies are independent", Index, squib::flat_index, squib::single_region_index)
    {
        Index a;
        REQUIRE_FALSE(a.insert({.base = 0x10000, .size = 0x1000}));
        Index b = a;
        REQUIRE_FALSE(b.erase(0x10000));
        CHECK(a.find(0x10000) != nullptr);
        CHECK(b.find(0x10000) == nullptr);
    }

    TEST_CASE("single_region_index holds one region only")
    {
        squib::single_region_index idx;
        REQUIRE_FALSE(idx.insert({.base = 0x10000, .size = 0x1000}));
        CHECK(idx.insert({.base = 0x20000, .size = 0x1000}) == errc::index_full);
        int seen = 0;
        idx.for_each([&](const region& r) {
            CHECK(r.base == 0x10000);
            ++seen;
        });
        CHECK(seen == 1);
    }

    TEST_CASE("flat_index refuses overlaps on every side")
    {
        squib::flat_index idx;
        REQUIRE_FALSE(idx.insert({.base = 0x10000, .size = 0x4000}));
        REQUIRE_FALSE(idx.insert({.base = 0x20000, .size = 0x4000}));
        CHECK(idx.insert({.base = 0x13000, .size = 0x2000}) == errc::overlapping_region);  // tail of the first
        CHECK(idx.insert({.base = 0xf000, .size = 0x2000}) == errc::overlapping_region);   // head of the first
        CHECK(idx.insert({.base = 0x11000, .size = 0x1000}) == errc::overlapping_region);  // inside
        CHECK(idx.insert({.base = 0x8000, .size = 0x20000}) == errc::overlapping_region);  // around both
        CHECK(idx.insert({.base = 0x10000, .size = 0x4000}) == errc::overlapping_region);  // identical
        CHECK(idx.insert({.base = 0x1f000, .size = 0x1000 + 1}) == errc::overlapping_region);
        CHECK(idx.size() == 2);
        REQUIRE_FALSE(idx.insert({.base = 0x14000, .size = 0xc000})); // exactly fills the gap
        CHECK(idx.size() == 3);
        CHECK(idx.find(0x1ffff)->base == 0x14000);
        CHECK(idx.find(0x20000)->base == 0x20000);
    }

    TEST_CASE("flat_index agrees with a linear scan over many regions")
    {
        std::mt19937_64 rng(42);
        squib::flat_index idx;
        std::vector<region> all;
        std::uint64_t base = 0x1000'0000;
        for (int i = 0; i < 512; ++i) {
            const std::uint64_t pages = 1 + rng() % 8;
            const region r{.base = base, .size = pages * 0x1000, .source_offset = static_cast<std::uint64_t>(i) * 0x10000};
            REQUIRE_FALSE(idx.insert(r));
            all.push_back(r);
            base += r.size + (rng() % 3) * 0x1000; // sometimes adjacent, sometimes a gap
        }
        // Inserted in order; also shuffle-insert into a second index.
        std::vector<region> shuffled = all;
        std::shuffle(shuffled.begin(), shuffled.end(), rng);
        squib::flat_index idx2;
        for (const region& r : shuffled) REQUIRE_FALSE(idx2.insert(r));

        std::vector<region> listed;
        idx2.for_each([&](const region& r) { listed.push_back(r); });
        CHECK(listed == all);

        for (int probe = 0; probe < 20000; ++probe) {
            const std::uint64_t addr = 0x1000'0000 - 0x2000 + rng() % (base - 0x1000'0000 + 0x4000);
            const region* expect = nullptr;
            for (const region& r : all)
                if (r.contains(addr)) expect = &r;
            const region* got = idx.find(addr);
            const region* got2 = idx2.find(addr);
            REQUIRE((expect == nullptr) == (got == nullptr));
            REQUIRE((expect == nullptr) == (got2 == nullptr));
            if (expect != nullptr) {
                CHECK(*got == *expect);
                CHECK(*got2 == *expect);
            }
        }
    }

    TEST_CASE("region validation")
    {
        CHECK_FALSE(region{.base = 0x1000, .size = 0x1000}.validate());
        CHECK(region{.base = 0x1000, .size = 0}.validate() == errc::invalid_region);
        CHECK(region{.base = 0x1001, .size = 0x1000}.validate() == errc::invalid_region);
        CHECK(region{.base = 0x1000, .size = 0x1001}.validate() == errc::invalid_region);
        CHECK(region{.base = 0x1000, .size = 0x1000, .page_size = 0}.validate() == errc::bad_page_size);
        CHECK(region{.base = 0x1000, .size = 0x1000, .page_size = 0x1800}.validate() == errc::bad_page_size);
        CHECK(region{.base = 0x1000, .size = 0x1000, .source_offset = ~std::uint64_t{0} - 0xfff}.validate() ==
              errc::invalid_region);
        CHECK(region{.base = 0x20'0000, .size = 0x20'0000, .page_size = squib::page_2m}.validate() ==
              std::error_code{});
        CHECK(region{.base = 0x1000, .size = 0x20'0000, .page_size = squib::page_2m}.validate() ==
              errc::invalid_region);
        const region r{.base = 0x1000, .size = 0x2000, .source_offset = 0x9000};
        CHECK(r.source_address(0x1fff) == 0x9fff);
        CHECK(r.overlaps({.base = 0x2000, .size = 0x1000}));
        CHECK_FALSE(r.overlaps({.base = 0x3000, .size = 0x1000}));
    }
}
