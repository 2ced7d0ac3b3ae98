// Unit tests for squib::mapped_file_source (include/squib/source/mapped_file.hpp).
#include <squib/concepts.hpp>
#include <squib/source/file.hpp>
#include <squib/source/mapped_file.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

using squib::errc;
using squib::mapped_file_source;
using squib::detail::data_extent;

// The concept checks: a mapping is a PageSource, can hand out views, and knows its holes.
static_assert(squib::PageSource<mapped_file_source>);
static_assert(squib::MappedPageSource<mapped_file_source>);
static_assert(squib::SparsePageSource<mapped_file_source>);
// It owns a mapping: moving is fine, copying would double-unmap.
static_assert(!std::is_copy_constructible_v<mapped_file_source> && !std::is_copy_assignable_v<mapped_file_source>);
static_assert(std::is_nothrow_move_constructible_v<mapped_file_source> &&
              std::is_nothrow_move_assignable_v<mapped_file_source>);

constexpr std::uint64_t page = 4096;

bool equal_bytes(std::span<const std::byte> a, std::span<const std::byte> b)
{
    return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

bool all_zero(std::span<const std::byte> bytes)
{
    return std::all_of(bytes.begin(), bytes.end(), [](std::byte b) { return b == std::byte{0}; });
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

/// A sparse file of `size` bytes (ftruncate) holding pattern bytes only in
/// the 4 KiB pages listed; the rest is holes.
struct sparse_snapshot {
    sparse_snapshot(std::uint64_t size, std::vector<std::uint64_t> data_pages)
        : path(dir.file("sparse")), pages(std::move(data_pages))
    {
        const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600); // raw syscall: need ftruncate/pwrite
        if (fd < 0) throw std::runtime_error("open failed");
        const squib::detail::unique_fd owned{fd};
        // ftruncate extends with a hole, not with written zeros.
        if (::ftruncate(fd, static_cast<off_t>(size)) != 0) throw std::runtime_error("ftruncate failed");
        for (std::uint64_t p : pages) {
            const auto bytes = squib::test::pattern(page, p * page);
            // pwrite of exactly one page allocates exactly that block.
            if (::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(p * page)) != static_cast<ssize_t>(page))
                throw std::runtime_error("pwrite failed");
        }
    }

    [[nodiscard]] bool is_data_page(std::uint64_t p) const
    {
        return std::find(pages.begin(), pages.end(), p) != pages.end();
    }

    /// Whether the file system under the temp dir reports 4 KiB holes here:
    /// asked directly, so a file system without them is told apart from a bug.
    [[nodiscard]] bool fs_reports_page_holes(std::uint64_t hole_page) const
    {
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC); // raw syscall: independent probe
        if (fd < 0) return false;
        const squib::detail::unique_fd owned{fd};
        const off_t hole = ::lseek(fd, static_cast<off_t>(hole_page * page), SEEK_HOLE); // raw syscall: the probe
        return hole == static_cast<off_t>(hole_page * page);
    }

    squib::test::temp_dir dir;
    std::string path;
    std::vector<std::uint64_t> pages;
};

/// A pretend file system for scan_data_extents: data extents on a file of
/// `size` bytes, with lseek(SEEK_DATA/SEEK_HOLE) semantics.
struct fake_seek {
    std::vector<data_extent> data;
    std::uint64_t size = 0;
    int fail_errno = 0; // when non-zero, every call fails with it
    int calls = 0;

    off_t operator()(off_t off, int whence)
    {
        ++calls;
        if (fail_errno != 0) {
            errno = fail_errno;
            return -1;
        }
        const auto o = static_cast<std::uint64_t>(off);
        if (o >= size) {
            errno = ENXIO;
            return -1;
        }
        for (const auto& e : data) {
            if (whence == SEEK_DATA && e.end > o) return static_cast<off_t>(std::max(o, e.begin));
            if (whence == SEEK_HOLE && e.begin <= o && o < e.end) return static_cast<off_t>(e.end);
        }
        if (whence == SEEK_DATA) {
            errno = ENXIO;
            return -1;
        }
        return off; // SEEK_HOLE inside a hole
    }
};

} // namespace

TEST_SUITE("mapped_file_source")
{
    TEST_CASE("open reports the errno of a missing file")
    {
        squib::test::temp_dir dir;
        auto src = mapped_file_source::open(dir.file("does-not-exist"));
        REQUIRE_FALSE(src);
        CHECK(src.error().category() == std::system_category());
        CHECK(src.error().value() == ENOENT);
        CHECK(src.error() == std::errc::no_such_file_or_directory);
    }

    TEST_CASE("open rejects a directory with EISDIR")
    {
        squib::test::temp_dir dir;
        auto src = mapped_file_source::open(dir.path());
        REQUIRE_FALSE(src);
        CHECK(src.error() == std::errc::is_a_directory);
    }

    TEST_CASE("open rejects a page size that is not a power of two")
    {
        snapshot snap(4 * page);
        for (std::uint64_t bad : {std::uint64_t{0}, std::uint64_t{3}, std::uint64_t{3000}, std::uint64_t{4097},
                                  std::uint64_t{12288}}) {
            CAPTURE(bad);
            auto src = mapped_file_source::open(snap.path, {.ram_start = 0, .page_size = bad});
            REQUIRE_FALSE(src);
            CHECK(src.error() == errc::bad_page_size);
        }
    }

    TEST_CASE("open records size, page size and ram_start")
    {
        snapshot snap(5 * page + 100);
        auto src = mapped_file_source::open(snap.path, {.ram_start = 0x10000, .page_size = 8192});
        REQUIRE(src);
        CHECK(src->size() == 5 * page + 100);
        CHECK(src->page_size() == 8192);
        CHECK(src->ram_start() == 0x10000);

        auto defaults = mapped_file_source::open(snap.path);
        REQUIRE(defaults);
        CHECK(defaults->page_size() == squib::page_4k);
        CHECK(defaults->ram_start() == 0);
    }

    TEST_CASE("every page views and reads back byte for byte")
    {
        for (std::uint64_t ps : {page, 4 * page}) {
            for (std::uint64_t ram_start : {std::uint64_t{0}, std::uint64_t{0x8000'0000}}) {
                CAPTURE(ps);
                CAPTURE(ram_start);
                snapshot snap(8 * ps);
                auto src = mapped_file_source::open(snap.path, {.ram_start = ram_start, .page_size = ps});
                REQUIRE(src);
                std::vector<std::byte> buf(ps);
                for (std::uint64_t i = 0; i < 8; ++i) {
                    CAPTURE(i);
                    const auto expected = std::span(snap.bytes).subspan(i * ps, ps);
                    auto v = src->view(ram_start + i * ps, ps);
                    REQUIRE(v);
                    CHECK(v->size() == ps);
                    CHECK(equal_bytes(*v, expected));
                    REQUIRE_FALSE(src->read(ram_start + i * ps, buf));
                    CHECK(equal_bytes(buf, expected));
                }
            }
        }
    }

    TEST_CASE("a multi-page view and read return consecutive pages")
    {
        snapshot snap(16 * page);
        const std::uint64_t ram_start = 0x1'0000'0000;
        auto src = mapped_file_source::open(snap.path, {.ram_start = ram_start});
        REQUIRE(src);
        auto v = src->view(ram_start + 3 * page, 5 * page);
        REQUIRE(v);
        CHECK(equal_bytes(*v, std::span(snap.bytes).subspan(3 * page, 5 * page)));

        std::vector<std::byte> all(16 * page);
        REQUIRE_FALSE(src->read(ram_start, all));
        CHECK(all == snap.bytes);
    }

    TEST_CASE("views are zero-copy pointers into one mapping")
    {
        snapshot snap(8 * page);
        auto opened = mapped_file_source::open(snap.path, {.ram_start = 0x4000});
        REQUIRE(opened);
        auto first = opened->view(0x4000 + 2 * page, page);
        auto again = opened->view(0x4000 + 2 * page, page);
        auto next = opened->view(0x4000 + 3 * page, page);
        auto base = opened->view(0x4000, page);
        REQUIRE(first);
        REQUIRE(again);
        REQUIRE(next);
        REQUIRE(base);
        CHECK(first->data() == again->data());           // same page, same bytes in memory: nothing copied
        CHECK(next->data() == first->data() + page);     // consecutive pages are consecutive in the mapping
        CHECK(first->data() == base->data() + 2 * page); // offset into one mapping of the whole file

        // Moving the source moves the mapping, not the bytes: old views stay valid.
        mapped_file_source moved = std::move(*opened);
        auto after = moved.view(0x4000 + 2 * page, page);
        REQUIRE(after);
        CHECK(after->data() == first->data());
        CHECK(equal_bytes(*first, std::span(snap.bytes).subspan(2 * page, page)));
        CHECK(opened->view(0x4000, page).error() == errc::short_read); // NOLINT: use after move is the test
    }

    TEST_CASE("an unaligned address rounds down to its page")
    {
        snapshot snap(4 * page);
        const std::uint64_t ram_start = 0x4000;
        auto src = mapped_file_source::open(snap.path, {.ram_start = ram_start});
        REQUIRE(src);
        auto aligned = src->view(ram_start + 2 * page, page);
        REQUIRE(aligned);
        std::vector<std::byte> buf(page);
        for (std::uint64_t within : {std::uint64_t{1}, std::uint64_t{123}, page - 1}) {
            CAPTURE(within);
            auto v = src->view(ram_start + 2 * page + within, page);
            REQUIRE(v);
            CHECK(v->data() == aligned->data());
            std::fill(buf.begin(), buf.end(), std::byte{0});
            REQUIRE_FALSE(src->read(ram_start + 2 * page + within, buf));
            CHECK(equal_bytes(buf, std::span(snap.bytes).subspan(2 * page, page)));
        }
    }

    TEST_CASE("an address below ram_start is rejected")
    {
        snapshot snap(4 * page);
        auto src = mapped_file_source::open(snap.path, {.ram_start = 0x10'0000});
        REQUIRE(src);
        std::vector<std::byte> buf(page);
        CHECK(src->view(0x10'0000 - 1, page).error() == errc::below_ram_start);
        CHECK(src->view(0, page).error() == errc::below_ram_start);
        CHECK(src->read(0x10'0000 - page, buf) == errc::below_ram_start);
        CHECK_FALSE(src->is_zero(0x10'0000 - page, page));
        CHECK(src->view(0x10'0000, page)); // the first byte of RAM is fine
    }

    TEST_CASE("a length that is not a positive multiple of the page size is rejected")
    {
        snapshot snap(8 * page);
        auto src = mapped_file_source::open(snap.path);
        REQUIRE(src);
        for (std::size_t len : {std::size_t{0}, std::size_t{1}, std::size_t{page - 1}, std::size_t{page + 1},
                                std::size_t{2 * page + 512}}) {
            CAPTURE(len);
            CHECK(src->view(0, len).error() == errc::bad_length);
            CHECK_FALSE(src->is_zero(0, len));
        }
        std::vector<std::byte> buf(page + 1);
        CHECK(src->read(0, buf) == errc::bad_length);
        CHECK(src->read(0, std::span(buf).first(0)) == errc::bad_length);

        auto big = mapped_file_source::open(snap.path, {.page_size = 2 * page});
        REQUIRE(big);
        CHECK(big->view(0, page).error() == errc::bad_length); // one 4 KiB of an 8 KiB page
        CHECK(big->view(0, 2 * page));
    }

    TEST_CASE("reading past the end of the file is a short read")
    {
        snapshot snap(4 * page);
        auto src = mapped_file_source::open(snap.path, {.ram_start = 0x1000});
        REQUIRE(src);
        std::vector<std::byte> buf(2 * page);
        CHECK(src->view(0x1000 + 4 * page, page).error() == errc::short_read); // exactly at EOF
        CHECK(src->view(0x1000 + 100 * page, page).error() == errc::short_read);
        CHECK(src->read(0x1000 + 3 * page, buf) == errc::short_read); // starts inside, ends past EOF
        CHECK_FALSE(src->read(0x1000 + 2 * page, buf));               // the last two whole pages are fine
        CHECK(src->view(std::numeric_limits<std::uint64_t>::max(), page).error() == errc::short_read);
        // A length that would wrap the offset must not pass the bounds check.
        CHECK(src->view(0x1000 + page, std::numeric_limits<std::size_t>::max() & ~(page - 1)).error() ==
              errc::short_read);
        CHECK_FALSE(src->is_zero(0x1000 + 4 * page, page));
    }

    TEST_CASE("a partial last page is a short read, the whole pages before it are not")
    {
        snapshot snap(2 * page + page / 2);
        auto src = mapped_file_source::open(snap.path);
        REQUIRE(src);
        CHECK(src->size() == 2 * page + page / 2);
        CHECK(src->view(2 * page, page).error() == errc::short_read);
        CHECK(src->view(2 * page + 100, page).error() == errc::short_read);
        CHECK(src->view(0, 3 * page).error() == errc::short_read);
        CHECK_FALSE(src->is_zero(2 * page, page));
        auto v = src->view(page, page);
        REQUIRE(v);
        CHECK(equal_bytes(*v, std::span(snap.bytes).subspan(page, page)));
    }

    TEST_CASE("an empty file maps nothing and every read is short")
    {
        snapshot snap(0);
        auto src = mapped_file_source::open(snap.path);
        REQUIRE(src);
        CHECK(src->size() == 0);
        CHECK(src->data_extent_count() == 0);
        CHECK(src->view(0, page).error() == errc::short_read);
        std::vector<std::byte> buf(page);
        CHECK(src->read(0, buf) == errc::short_read);
        CHECK_FALSE(src->is_zero(0, page));

        mapped_file_source empty; // the default state is the same
        CHECK(empty.read(0, buf) == errc::short_read);
        CHECK_FALSE(empty.is_zero(0, page));
    }

    TEST_CASE("a sparse file: holes are zero, data pages are not")
    {
        constexpr std::uint64_t pages = 256; // 1 MiB
        // Data runs: page 0, pages 64-65, page 200, and the last page.
        sparse_snapshot snap(pages * page, {0, 64, 65, 200, pages - 1});
        auto src = mapped_file_source::open(snap.path, {.ram_start = 0x8000'0000});
        REQUIRE(src);
        REQUIRE(src->size() == pages * page);
        const std::uint64_t ram = 0x8000'0000;

        // Whatever the file system, is_zero must never hide real bytes, and
        // every page reads back what was written (zeros in holes).
        std::vector<std::byte> buf(page);
        for (std::uint64_t p = 0; p < pages; ++p) {
            CAPTURE(p);
            REQUIRE_FALSE(src->read(ram + p * page, buf));
            if (snap.is_data_page(p)) {
                CHECK_FALSE(src->is_zero(ram + p * page, page));
                CHECK(buf == squib::test::pattern(page, p * page));
            } else {
                CHECK(all_zero(buf));
            }
        }

        if (!snap.fs_reports_page_holes(1)) {
            MESSAGE("file system under $TMPDIR does not report 4 KiB holes; only the safety checks ran");
            CHECK(src->data_extent_count() >= 1);
            return;
        }
        CHECK(src->data_extent_count() == 4);
        for (std::uint64_t p = 0; p < pages; ++p) {
            CAPTURE(p);
            CHECK(src->is_zero(ram + p * page, page) == !snap.is_data_page(p));
        }
        // Ranges: all hole, touching data at either end, covering data in the middle.
        CHECK(src->is_zero(ram + 1 * page, 63 * page));       // pages 1..63
        CHECK_FALSE(src->is_zero(ram + 1 * page, 64 * page)); // pages 1..64
        CHECK_FALSE(src->is_zero(ram + 0 * page, 2 * page));  // pages 0..1
        CHECK(src->is_zero(ram + 66 * page, 134 * page));     // pages 66..199
        CHECK_FALSE(src->is_zero(ram + 66 * page, 135 * page));
        CHECK_FALSE(src->is_zero(ram + 150 * page, 100 * page)); // spans page 200
        CHECK(src->is_zero(ram + 201 * page + 17, page));        // unaligned rounds down, like view
        CHECK_FALSE(src->is_zero(ram + 200 * page + 17, page));
        CHECK_FALSE(src->is_zero(ram + (pages - 1) * page, page));
        CHECK_FALSE(src->is_zero(ram + pages * page, page)); // past EOF
        CHECK_FALSE(src->is_zero(ram - page, page));         // below ram_start

        // Larger pages: a 64 KiB page is zero only if none of its 4 KiB blocks is data.
        auto big = mapped_file_source::open(snap.path, {.ram_start = ram, .page_size = 16 * page});
        REQUIRE(big);
        CHECK_FALSE(big->is_zero(ram, 16 * page));           // holds page 0
        CHECK(big->is_zero(ram + 16 * page, 16 * page));     // pages 16..31
        CHECK_FALSE(big->is_zero(ram + 64 * page, 16 * page)); // holds 64-65
    }

    TEST_CASE("a file that is all hole has no data extents and reads as zeros")
    {
        sparse_snapshot snap(64 * page, {});
        auto src = mapped_file_source::open(snap.path);
        REQUIRE(src);
        std::vector<std::byte> buf(page);
        for (std::uint64_t p = 0; p < 64; ++p) {
            REQUIRE_FALSE(src->read(p * page, buf));
            CHECK(all_zero(buf));
        }
        if (!snap.fs_reports_page_holes(0)) {
            MESSAGE("file system under $TMPDIR does not report holes; only the safety checks ran");
            return;
        }
        CHECK(src->data_extent_count() == 0);
        CHECK(src->is_zero(0, 64 * page));
        CHECK(src->is_zero(63 * page, page));
        CHECK_FALSE(src->is_zero(64 * page, page)); // out of range is never zero
    }

    TEST_CASE("a file with no holes is one data extent and never zero")
    {
        snapshot snap(64 * page);
        auto src = mapped_file_source::open(snap.path);
        REQUIRE(src);
        CHECK(src->data_extent_count() == 1);
        for (std::uint64_t p = 0; p < 64; ++p) {
            CAPTURE(p);
            CHECK_FALSE(src->is_zero(p * page, page));
        }
        CHECK_FALSE(src->is_zero(0, 64 * page));
    }

    TEST_CASE("scan_data_extents follows SEEK_DATA/SEEK_HOLE and is safe when they fail")
    {
        SUBCASE("extents come back in order, clipped to the size at open")
        {
            fake_seek fs{.data = {{0, page}, {10 * page, 12 * page}, {30 * page, 40 * page}}, .size = 32 * page};
            // The last extent runs past `size` (the file grew after fstat): clip it.
            const auto got = squib::detail::scan_data_extents(32 * page, fs);
            CHECK(got == std::vector<data_extent>{{0, page}, {10 * page, 12 * page}, {30 * page, 32 * page}});
        }
        SUBCASE("ENXIO at offset 0 means the whole file is hole")
        {
            fake_seek fs{.data = {}, .size = 16 * page};
            CHECK(squib::detail::scan_data_extents(16 * page, fs).empty());
            CHECK(fs.calls == 1);
        }
        SUBCASE("EINVAL (no SEEK_DATA support) means the whole file is data")
        {
            fake_seek fs{.data = {}, .size = 16 * page, .fail_errno = EINVAL};
            CHECK(squib::detail::scan_data_extents(16 * page, fs) == std::vector<data_extent>{{0, 16 * page}});
        }
        SUBCASE("any other failure is also treated as all data")
        {
            fake_seek fs{.data = {}, .size = 16 * page, .fail_errno = EIO};
            CHECK(squib::detail::scan_data_extents(16 * page, fs) == std::vector<data_extent>{{0, 16 * page}});
        }
        SUBCASE("an empty file has no extents and needs no seek")
        {
            fake_seek fs{.data = {}, .size = 0, .fail_errno = EINVAL};
            CHECK(squib::detail::scan_data_extents(0, fs).empty());
            CHECK(fs.calls == 0);
        }
        SUBCASE("a file that is all data is one extent")
        {
            fake_seek fs{.data = {{0, 16 * page}}, .size = 16 * page};
            CHECK(squib::detail::scan_data_extents(16 * page, fs) == std::vector<data_extent>{{0, 16 * page}});
        }
    }

    TEST_CASE("read and view agree with file_source on every page and every error")
    {
        snapshot snap(6 * page + 300);
        const std::uint64_t ram = 0x2000;
        auto mapped = mapped_file_source::open(snap.path, {.ram_start = ram});
        auto filed = squib::file_source::open(snap.path, {.ram_start = ram});
        REQUIRE(mapped);
        REQUIRE(filed);
        std::vector<std::byte> a(2 * page);
        std::vector<std::byte> b(2 * page);
        for (std::uint64_t addr = 0; addr < ram + 9 * page; addr += page / 2) {
            for (std::size_t len : {std::size_t{page}, std::size_t{2 * page}, std::size_t{page / 2}}) {
                CAPTURE(addr);
                CAPTURE(len);
                const auto ea = mapped->read(addr, std::span(a).first(len));
                const auto eb = filed->read(addr, std::span(b).first(len));
                CHECK(ea == eb);
                if (!ea && !eb) CHECK(equal_bytes(std::span(a).first(len), std::span(b).first(len)));
            }
        }
    }

    TEST_CASE("four threads viewing and reading at once all see the right bytes")
    {
        constexpr std::uint64_t pages = 256;
        // Half the pages hold data, the others are holes, so is_zero is exercised too.
        std::vector<std::uint64_t> data_pages;
        for (std::uint64_t p = 0; p < pages; p += 2) data_pages.push_back(p);
        sparse_snapshot snap(pages * page, data_pages);
        const std::uint64_t ram_start = 0x2000'0000;
        auto src = mapped_file_source::open(snap.path, {.ram_start = ram_start});
        REQUIRE(src);

        constexpr int threads = 4;
        std::array<std::uint64_t, threads> bad{};    // pages seen wrong, per thread
        std::array<std::uint64_t, threads> failed{}; // calls that returned an error, per thread
        std::vector<std::thread> workers;
        for (int t = 0; t < threads; ++t) {
            workers.emplace_back([&, t] {
                const auto step = 2 * static_cast<std::uint64_t>(t) + 1; // odd, so coprime with 256: every page
                const auto first = 17 * static_cast<std::uint64_t>(t);
                std::vector<std::byte> buf(page);
                for (std::uint64_t n = 0; n < 4 * pages; ++n) {
                    const std::uint64_t i = (n * step + first) % pages;
                    const std::uint64_t addr = ram_start + i * page;
                    const auto expected = i % 2 == 0 ? squib::test::pattern(page, i * page)
                                                     : std::vector<std::byte>(page);
                    auto v = src->view(addr, page);
                    if (!v || src->read(addr, buf)) {
                        ++failed[t];
                        continue;
                    }
                    if (!equal_bytes(*v, expected) || buf != expected) ++bad[t];
                    if (src->is_zero(addr, page) && i % 2 == 0) ++bad[t]; // data reported as hole
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
