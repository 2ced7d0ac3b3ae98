// Replays the Mach codec fuzzer's corpus (tests/fuzz/corpus/mach_codec)
// through the fuzz target's own checks: nothing crashes, what decodes
// round-trips, what is refused can be answered.
//
// The corpus directory is, in order: $SQUIB_MACH_CORPUS, the compile
// definition SQUIB_MACH_CORPUS_DIR (a string), or the path next to this
// source file (right when run from the source root).
#include "../fuzz/mach_codec_fuzz.cpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <vector>

namespace {

std::filesystem::path corpus_dir()
{
    if (const char* env = std::getenv("SQUIB_MACH_CORPUS"); env != nullptr && *env != '\0') return env;
#if defined(SQUIB_MACH_CORPUS_DIR)
    return SQUIB_MACH_CORPUS_DIR;
#else
    return std::filesystem::path(__FILE__).parent_path().parent_path() / "fuzz" / "corpus" / "mach_codec";
#endif
}

std::vector<std::uint8_t> read_all(const std::filesystem::path& p)
{
    std::ifstream f(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

} // namespace

TEST_SUITE("mach_codec_corpus")
{
    TEST_CASE("every corpus file passes the fuzz target's checks, and the corpus covers every kind and refusal")
    {
        const auto dir = corpus_dir();
        INFO("corpus: ", dir.string(), " (set SQUIB_MACH_CORPUS to point elsewhere)");
        REQUIRE(std::filesystem::is_directory(dir));
        std::vector<std::filesystem::path> files;
        for (const auto& e : std::filesystem::directory_iterator(dir))
            if (e.is_regular_file()) files.push_back(e.path());
        std::sort(files.begin(), files.end());
        REQUIRE(files.size() >= 20);

        std::set<std::int32_t> ids;
        std::set<int> refusals;
        std::size_t replies = 0;
        for (const auto& path : files) {
            CAPTURE(path.filename().string());
            const auto bytes = read_all(path);
            const auto o = squib_mach_fuzz::check_one(bytes.data(), bytes.size());
            CHECK(o.broken == nullptr);
            if (o.broken != nullptr) MESSAGE(o.broken);
            if (o.request_id != 0) ids.insert(o.request_id);
            if (o.request_error) refusals.insert(o.request_error.value());
            if (o.reply_ok) ++replies;
        }
        CHECK(ids == std::set<std::int32_t>{2401, 2402, 2403, 2405, 2406, 2407, 2408, 2410});
        CHECK(replies >= 4);
        using m = squib::mach::mach_errc;
        for (m e : {m::truncated, m::size_mismatch, m::too_many_codes, m::oversized_state, m::bad_descriptor,
                    m::unknown_id}) {
            CAPTURE(static_cast<int>(e));
            CHECK(refusals.count(static_cast<int>(e)) == 1);
        }
    }
}
