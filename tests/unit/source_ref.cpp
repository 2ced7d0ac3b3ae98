// source_ref: sharing one source between pagers.
#include <squib/backend/mock.hpp>
#include <squib/core/pager.hpp>
#include <squib/index/flat.hpp>
#include <squib/source/file.hpp>
#include <squib/source/mapped_file.hpp>
#include <squib/source/memory.hpp>
#include <squib/source/ref.hpp>

#include "../support/sources.hpp"
#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <cstring>

static_assert(squib::MappedPageSource<squib::source_ref<squib::memory_source>>);
static_assert(squib::SparsePageSource<squib::source_ref<squib::mapped_file_source>>);
static_assert(squib::PageSource<squib::source_ref<squib::file_source>>);
static_assert(!squib::MappedPageSource<squib::source_ref<squib::file_source>>);
static_assert(!squib::SparsePageSource<squib::source_ref<squib::memory_source>>);

TEST_SUITE("source_ref")
{
    TEST_CASE("two pagers restore from one source")
    {
        const auto snapshot = squib::test::pattern(16 * squib::page_4k);
        squib::memory_source shared{snapshot};
        using pager_type = squib::pager<squib::source_ref<squib::memory_source>, squib::flat_index, squib::mock_backend>;
        pager_type a{squib::source_ref{shared}};
        pager_type b{squib::source_ref{shared}};
        REQUIRE_FALSE(a.register_region({.base = 0x10000, .size = 16 * squib::page_4k}));
        REQUIRE_FALSE(b.register_region({.base = 0x90000, .size = 8 * squib::page_4k, .source_offset = 8 * squib::page_4k}));
        // Views point into the one shared snapshot.
        auto va = a.serve_view(0x10000 + 9 * squib::page_4k);
        auto vb = b.serve_view(0x90000 + squib::page_4k);
        REQUIRE(va);
        REQUIRE(vb);
        CHECK(va->bytes.data() == snapshot.data() + 9 * squib::page_4k);
        CHECK(vb->bytes.data() == va->bytes.data());
        CHECK(&a.source().get() == &shared);
    }

    TEST_CASE("holes of a shared sparse file are still zero pages")
    {
        squib::test::temp_dir dir;
        const std::string path = dir.file("sparse.mem");
        {
            std::vector<std::byte> data(squib::page_4k, std::byte{7});
            squib::test::write_file(path, data);
            REQUIRE(::truncate(path.c_str(), 64 * squib::page_4k) == 0); // the rest is a hole
        }
        auto file = squib::mapped_file_source::open(path);
        REQUIRE(file);
        squib::source_ref ref{*file};
        CHECK_FALSE(ref.is_zero(0, squib::page_4k));
        std::vector<std::byte> page(squib::page_4k);
        REQUIRE_FALSE(ref.read(0, page));
        CHECK(page[0] == std::byte{7});
        if (file->data_extent_count() == 1) CHECK(ref.is_zero(32 * squib::page_4k, squib::page_4k));
    }
}
