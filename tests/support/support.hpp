// Test helpers shared by the unit tests: temp directories, snapshot files
// with known contents.
#pragma once

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <span>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include <stdlib.h> // mkdtemp

/// Error codes print as `category:value (message)` in failed checks.
template <>
struct doctest::StringMaker<std::error_code> {
    static doctest::String convert(const std::error_code& ec)
    {
        const std::string text = std::string(ec.category().name()) + ":" + std::to_string(ec.value()) + " (" +
                                 ec.message() + ")";
        return doctest::String(text.c_str());
    }
};

namespace squib::test {

/// Marks the running test as skipped, visibly: doctest has no run-time
/// skip, so the line below is what scripts/test counts.
inline void skip(const std::string& test, const std::string& why)
{
    std::printf("SQUIB-SKIP: %s: %s\n", test.c_str(), why.c_str());
    std::fflush(stdout);
    MESSAGE("skipped: " << why);
}

/// In a forked child: undo doctest's crash handlers, so a signal ends the
/// child as it would any process instead of running the parent's reporter.
inline void default_crash_signals() noexcept
{
    for (int sig : {SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTERM}) std::signal(sig, SIG_DFL);
}

/// A fresh directory under $TMPDIR (or /tmp), removed with everything in it.
class temp_dir {
public:
    temp_dir()
    {
        const char* base = std::getenv("TMPDIR");
        std::string templ = std::string(base != nullptr ? base : "/tmp") + "/squib-test-XXXXXX";
        if (::mkdtemp(templ.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
        path_ = templ;
    }
    temp_dir(const temp_dir&) = delete;
    temp_dir& operator=(const temp_dir&) = delete;
    ~temp_dir()
    {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }

    [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
    [[nodiscard]] std::string file(const std::string& name) const { return (path_ / name).string(); }

private:
    std::filesystem::path path_;
};

/// The byte a test snapshot holds at `offset`: distinct per page and per
/// position inside a page, so a page served from the wrong place is caught.
[[nodiscard]] inline std::byte pattern_byte(std::uint64_t offset) noexcept
{
    std::uint64_t x = offset * 0x9E3779B97F4A7C15ull;
    x ^= x >> 29;
    return static_cast<std::byte>((x ^ (offset >> 12)) & 0xff);
}

/// `size` bytes of the pattern starting at source offset `first`.
[[nodiscard]] inline std::vector<std::byte> pattern(std::uint64_t size, std::uint64_t first = 0)
{
    std::vector<std::byte> v(size);
    for (std::uint64_t i = 0; i < size; ++i) v[i] = pattern_byte(first + i);
    return v;
}

/// Writes `bytes` to `path`, replacing it.
inline void write_file(const std::string& path, std::span<const std::byte> bytes)
{
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), // ofstream wants char
              static_cast<std::streamsize>(bytes.size()));
    if (!out) throw std::runtime_error("write_file failed: " + path);
}

} // namespace squib::test
