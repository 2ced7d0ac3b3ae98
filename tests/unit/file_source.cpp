// Unit tests for squib::file_source (include/squib/source/file.hpp).
#include <squib/concepts.hpp>
#include <squib/source/file.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

using squib::errc;
using squib::file_source;

// The concept checks, both ways: a pread source has no bytes in memory to view
// and knows nothing about holes.
static_assert(squib::PageSource<file_source>);
static_assert(!squib::MappedPageSource<file_source>, "file_source copies; it must not claim zero-copy views");
static_assert(!squib::SparsePageSource<file_source>, "file_source does not track holes");
// It owns a descriptor: moving is fine, copying would double-close.
static_assert(!std::is_copy_constructible_v<file_source> && !std::is_copy_assignable_v<file_source>);
static_assert(std::is_nothrow_move_constructible_v<file_source> && std::is_nothrow_move_assignable_v<file_source>);

constexpr std::uint64_t page = 4096;

bool equal_bytes(std::span<const std::byte> a, std::span<const std::byte> b)
{
    return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

/// A snapshot file of `size` pattern bytes in a fresh temp dir.
struct snapshot {
    explicit snapshot(std::uint64_t size) : path(dir.file("mem")), bytes(squib::test::pattern(size))
    {
        squib::test::write_file(path, bytes);
    }

    squib::test::temp_dir dir;
    std::string path;
    std::vector<std::byte> bytes;
};

} // namespace

TEST_SUITE("file_source")
{
    TEST_CASE("open reports the errno of a missing file")
    {
        squib::test::temp_dir dir;
        auto src = file_source::open(dir.file("does-not-exist"));
        REQUIRE_FALSE(src);
        CHECK(src.error().category() == std::system_category());
        CHECK(src.error().value() == ENOENT);
        CHECK(src.error() == std::errc::no_such_file_or_directory);
    }

    TEST_CASE("open rejects a directory with EISDIR")
    {
        squib::test::temp_dir dir;
        auto src = file_source::open(dir.path());
        REQUIRE_FALSE(src);
        CHECK(src.error() == std::errc::is_a_directory);
    }

    TEST_CASE("open rejects a page size that is not a power of two")
    {
        snapshot snap(4 * page);
        for (std::uint64_t bad : {std::uint64_t{0}, std::uint64_t{3}, std::uint64_t{3000}, std::uint64_t{4097},
                                  std::uint64_t{12288}}) {
            CAPTURE(bad);
            auto src = file_source::open(snap.path, {.ram_start = 0, .page_size = bad});
            REQUIRE_FALSE(src);
            CHECK(src.error() == errc::bad_page_size);
        }
    }

    TEST_CASE("open records size, page size and ram_start")
    {
        snapshot snap(5 * page + 100);
        auto src = file_source::open(snap.path, {.ram_start = 0x10000, .page_size = 8192});
        REQUIRE(src);
        CHECK(src->size() == 5 * page + 100);
        CHECK(src->page_size() == 8192);
        CHECK(src->ram_start() == 0x10000);

        auto defaults = file_source::open(snap.path);
        REQUIRE(defaults);
        CHECK(defaults->page_size() == squib::page_4k);
        CHECK(defaults->ram_start() == 0);
    }

    TEST_CASE("every page reads back byte for byte")
    {
        for (std::uint64_t ps : {page, 4 * page}) {
            for (std::uint64_t ram_start : {std::uint64_t{0}, std::uint64_t{0x8000'0000}}) {
                CAPTURE(ps);
                CAPTURE(ram_start);
                snapshot snap(8 * ps);
                auto src = file_source::open(snap.path, {.ram_start = ram_start, .page_size = ps});
                REQUIRE(src);
                std::vector<std::byte> buf(ps);
                for (std::uint64_t i = 0; i < 8; ++i) {
                    CAPTURE(i);
                    REQUIRE_FALSE(src->read(ram_start + i * ps, buf));
                    CHECK(equal_bytes(buf, std::span(snap.bytes).subspan(i * ps, ps)));
                }
            }
        }
    }

    TEST_CASE("a multi-page read returns consecutive pages")
    {
        snapshot snap(16 * page);
        const std::uint64_t ram_start = 0x1'0000'0000;
        auto src = file_source::open(snap.path, {.ram_start = ram_start});
        REQUIRE(src);
        std::vector<std::byte> buf(5 * page);
        REQUIRE_FALSE(src->read(ram_start + 3 * page, buf));
        CHECK(equal_bytes(buf, std::span(snap.bytes).subspan(3 * page, 5 * page)));

        std::vector<std::byte> all(16 * page);
        REQUIRE_FALSE(src->read(ram_start, all));
        CHECK(all == snap.bytes);
    }

    TEST_CASE("an unaligned address rounds down to its page")
    {
        snapshot snap(4 * page);
        const std::uint64_t ram_start = 0x4000;
        auto src = file_source::open(snap.path, {.ram_start = ram_start});
        REQUIRE(src);
        std::vector<std::byte> buf(page);
        for (std::uint64_t within : {std::uint64_t{1}, std::uint64_t{123}, page - 1}) {
            CAPTURE(within);
            std::fill(buf.begin(), buf.end(), std::byte{0});
            REQUIRE_FALSE(src->read(ram_start + 2 * page + within, buf));
            CHECK(equal_bytes(buf, std::span(snap.bytes).subspan(2 * page, page)));
        }
    }

    TEST_CASE("an address below ram_start is rejected")
    {
        snapshot snap(4 * page);
        auto src = file_source::open(snap.path, {.ram_start = 0x10'0000});
        REQUIRE(src);
        std::vector<std::byte> buf(page);
        CHECK(src->read(0x10'0000 - 1, buf) == errc::below_ram_start);
        CHECK(src->read(0x10'0000 - page, buf) == errc::below_ram_start);
        CHECK(src->read(0, buf) == errc::below_ram_start);
        CHECK_FALSE(src->read(0x10'0000, buf)); // the first byte of RAM is fine
    }

    TEST_CASE("a length that is not a positive multiple of the page size is rejected")
    {
        snapshot snap(8 * page);
        auto src = file_source::open(snap.path);
        REQUIRE(src);
        std::vector<std::byte> buf(3 * page);
        CHECK(src->read(0, std::span(buf).first(0)) == errc::bad_length);
        CHECK(src->read(0, std::span(buf).first(1)) == errc::bad_length);
        CHECK(src->read(0, std::span(buf).first(page - 1)) == errc::bad_length);
        CHECK(src->read(0, std::span(buf).first(page + 1)) == errc::bad_length);
        CHECK(src->read(0, std::span(buf).first(2 * page + 512)) == errc::bad_length);

        auto big = file_source::open(snap.path, {.page_size = 2 * page});
        REQUIRE(big);
        CHECK(big->read(0, std::span(buf).first(page)) == errc::bad_length); // one 4 KiB of an 8 KiB page
        CHECK_FALSE(big->read(0, std::span(buf).first(2 * page)));
    }

    TEST_CASE("reading past the end of the file is a short read")
    {
        snapshot snap(4 * page);
        auto src = file_source::open(snap.path, {.ram_start = 0x1000});
        REQUIRE(src);
        std::vector<std::byte> buf(2 * page);
        CHECK(src->read(0x1000 + 4 * page, std::span(buf).first(page)) == errc::short_read); // exactly at EOF
        CHECK(src->read(0x1000 + 100 * page, std::span(buf).first(page)) == errc::short_read);
        CHECK(src->read(0x1000 + 3 * page, buf) == errc::short_read); // starts inside, ends past EOF
        CHECK_FALSE(src->read(0x1000 + 2 * page, buf));               // the last two whole pages are fine
        // Offsets beyond what off_t can express cannot be in the file either.
        CHECK(src->read(std::numeric_limits<std::uint64_t>::max(), std::span(buf).first(page)) == errc::short_read);
        CHECK(src->read(0x8000'0000'0000'0000ull, std::span(buf).first(page)) == errc::short_read);
    }

    TEST_CASE("a partial last page is a short read, the whole pages before it are not")
    {
        snapshot snap(2 * page + page / 2);
        auto src = file_source::open(snap.path);
        REQUIRE(src);
        CHECK(src->size() == 2 * page + page / 2);
        std::vector<std::byte> buf(page);
        CHECK(src->read(2 * page, buf) == errc::short_read);
        CHECK(src->read(2 * page + 100, buf) == errc::short_read);
        REQUIRE_FALSE(src->read(page, buf));
        CHECK(equal_bytes(buf, std::span(snap.bytes).subspan(page, page)));

        std::vector<std::byte> three(3 * page);
        CHECK(src->read(0, three) == errc::short_read);
    }

    TEST_CASE("an empty file opens and every read is short")
    {
        snapshot snap(0);
        auto src = file_source::open(snap.path);
        REQUIRE(src);
        CHECK(src->size() == 0);
        std::vector<std::byte> buf(page);
        CHECK(src->read(0, buf) == errc::short_read);
    }

    TEST_CASE("a moved source keeps serving; the moved-from one never reports success")
    {
        snapshot snap(4 * page);
        auto opened = file_source::open(snap.path);
        REQUIRE(opened);
        file_source src = std::move(*opened);
        std::vector<std::byte> buf(page);
        REQUIRE_FALSE(src.read(page, buf));
        CHECK(equal_bytes(buf, std::span(snap.bytes).subspan(page, page)));
        CHECK(opened->read(page, buf) == std::errc::bad_file_descriptor); // NOLINT: use after move is the test

        file_source empty;
        CHECK(empty.read(0, buf) == std::errc::bad_file_descriptor);
        empty = std::move(src);
        REQUIRE_FALSE(empty.read(3 * page, buf));
        CHECK(equal_bytes(buf, std::span(snap.bytes).subspan(3 * page, page)));
    }

    TEST_CASE("four threads reading at once all see the right bytes")
    {
        constexpr std::uint64_t pages = 256;
        snapshot snap(pages * page);
        const std::uint64_t ram_start = 0x2000'0000;
        auto src = file_source::open(snap.path, {.ram_start = ram_start});
        REQUIRE(src);

        constexpr int threads = 4;
        std::array<std::uint64_t, threads> bad{};    // pages read wrong, per thread
        std::array<std::uint64_t, threads> failed{}; // reads that returned an error, per thread
        std::vector<std::thread> workers;
        for (int t = 0; t < threads; ++t) {
            workers.emplace_back([&, t] {
                const auto step = 2 * static_cast<std::uint64_t>(t) + 1; // odd, so coprime with 256: every page
                const auto first = 17 * static_cast<std::uint64_t>(t);
                std::vector<std::byte> buf(page);
                // Each thread walks the file in a different order so reads overlap.
                for (std::uint64_t n = 0; n < 4 * pages; ++n) {
                    const std::uint64_t i = (n * step + first) % pages;
                    if (src->read(ram_start + i * page, buf)) {
                        ++failed[t];
                        continue;
                    }
                    if (!equal_bytes(buf, std::span(snap.bytes).subspan(i * page, page))) ++bad[t];
                }
            });
        }
        for (auto& w : workers) w.join();
        for (int t = 0; t < threads; ++t) {
            CAPTURE(t);
            CHECK(failed[t] == 0);
            CHECK(bad[t] == 0);
        }
    }
}
