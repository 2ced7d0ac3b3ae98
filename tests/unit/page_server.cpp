// Unit tests for squib::page_server (include/squib/source/page_server.hpp):
// serving, hostile clients, shutdown, limits.
#include <squib/concepts.hpp>
#include <squib/detail/fd.hpp>
#include <squib/source/memory.hpp>
#include <squib/source/page_server.hpp>
#include <squib/source/socket.hpp>
#include <squib/source/wire.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

namespace {

using squib::errc;
using squib::memory_source;
using squib::socket_source;
namespace wire = squib::wire;

constexpr std::uint64_t page = 4096;
constexpr std::uint64_t gib = 1ull << 30;

/// A PageSource that is not a MappedPageSource: the server must not need views.
struct plain_source {
    memory_source inner;
    [[nodiscard]] std::error_code read(std::uint64_t addr, std::span<std::byte> dst) const noexcept
    {
        return inner.read(addr, dst);
    }
};
static_assert(squib::PageSource<plain_source> && !squib::MappedPageSource<plain_source>);

/// Whether page_server<S> may be named: the class is constrained on PageSource.
template <class S>
concept servable = requires { typename squib::page_server<S>; };
static_assert(servable<memory_source>);
static_assert(servable<plain_source>);
static_assert(!servable<int>);
static_assert(!servable<std::vector<std::byte>>); // bytes are not a source until wrapped in memory_source

bool equal_bytes(std::span<const std::byte> a, std::span<const std::byte> b)
{
    return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

/// Collects the server's log lines; tests wait on it instead of sleeping.
class log_capture {
public:
    std::function<void(std::string_view)> sink()
    {
        return [this](std::string_view line) {
            {
                std::lock_guard<std::mutex> guard(mutex_);
                lines_.emplace_back(line);
            }
            changed_.notify_all();
        };
    }

    /// Waits until `n` lines were logged. The 30 s bound only turns a bug
    /// into a failure instead of a hang; correct code never comes near it.
    [[nodiscard]] bool wait_for(std::size_t n)
    {
        std::unique_lock<std::mutex> lock(mutex_);
        return changed_.wait_for(lock, std::chrono::seconds(30), [&] { return lines_.size() >= n; });
    }

    [[nodiscard]] std::vector<std::string> lines() const
    {
        std::lock_guard<std::mutex> guard(mutex_);
        return lines_;
    }

    [[nodiscard]] std::string line(std::size_t i) const
    {
        std::lock_guard<std::mutex> guard(mutex_);
        return i < lines_.size() ? lines_[i] : std::string{};
    }

private:
    mutable std::mutex mutex_;
    std::condition_variable changed_;
    std::vector<std::string> lines_;
};

bool contains(const std::string& haystack, std::string_view needle)
{
    return haystack.find(needle) != std::string::npos;
}

sockaddr_un unix_address(const std::string& path)
{
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    return addr;
}

/// A raw connection for playing a hostile client. The receive timeout only
/// turns a server that never hangs up into a failure instead of a hang.
squib::detail::unique_fd raw_connect(const std::string& path)
{
    squib::detail::unique_fd fd{::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
    REQUIRE(fd);
    timeval guard{30, 0};
    REQUIRE(::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &guard, sizeof guard) == 0);
    const auto addr = unix_address(path);
    REQUIRE(::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
    return fd;
}

void raw_send(int fd, std::span<const std::byte> bytes)
{
    REQUIRE_FALSE(wire::send_all(fd, bytes));
}

/// True once the server has closed `fd` (EOF or reset, after any reply bytes).
bool hung_up(int fd)
{
    std::array<std::byte, 4096> sink{};
    for (;;) {
        const ssize_t n = ::recv(fd, sink.data(), sink.size(), 0);
        if (n == 0 || (n < 0 && errno == ECONNRESET)) return true;
        if (n < 0 && errno != EINTR) return false; // the guard timeout: the server kept the connection
    }
}

bool file_exists(const std::string& path)
{
    struct stat st{};
    return ::lstat(path.c_str(), &st) == 0;
}

template <class Source>
Source make_source(std::span<const std::byte> bytes)
{
    if constexpr (std::is_same_v<Source, plain_source>)
        return plain_source{memory_source{bytes}};
    else
        return Source{bytes};
}

socket_source connect(const std::string& path, socket_source::options opts = {})
{
    auto c = socket_source::connect(path, opts);
    REQUIRE_MESSAGE(c, c.error().message());
    return std::move(*c);
}

} // namespace

TEST_SUITE("page_server")
{
    TEST_CASE("start rejects bad options and paths")
    {
        squib::test::temp_dir dir;
        const auto bytes = squib::test::pattern(64 * page);
        memory_source src{bytes};
        using server_t = squib::page_server<memory_source>;
        CHECK(server_t::start(src, dir.file("s"), {.max_page_size = 3000}).error() == errc::bad_page_size);
        CHECK(server_t::start(src, dir.file("s"), {.max_page_size = 0}).error() == errc::bad_page_size);
        CHECK(server_t::start(src, dir.file("s"), {.max_clients = 0}).error() == std::errc::invalid_argument);
        CHECK(server_t::start(src, std::string(200, 'x')).error() == std::errc::filename_too_long);
        CHECK(server_t::start(src, "").error() == std::errc::filename_too_long);
        CHECK(server_t::start(src, dir.file("no/such/dir")).error() == std::errc::no_such_file_or_directory);
        CHECK_FALSE(file_exists(dir.file("s")));
    }

    TEST_CASE("the socket file: stale ones are replaced, live ones kept, ours removed on stop")
    {
        squib::test::temp_dir dir;
        const auto bytes = squib::test::pattern(64 * page);
        memory_source src{bytes};
        using server_t = squib::page_server<memory_source>;
        const std::string path = dir.file("s");
        const server_t::options quiet{.log = [](std::string_view) {}};

        { // a crashed server's leftover: bound, never unlinked
            squib::detail::unique_fd fd{::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
            const auto addr = unix_address(path);
            REQUIRE(::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
        }
        REQUIRE(file_exists(path));
        auto a = server_t::start(src, path, quiet);
        REQUIRE(a);
        CHECK(server_t::start(src, path, quiet).error() == std::errc::address_in_use); // a is alive
        {
            auto c = connect(path);
            std::array<std::byte, page> buf{};
            CHECK_FALSE(c.read(0, buf)); // the probe did not disturb a
        }
        (*a)->stop();
        CHECK_FALSE(file_exists(path));
        (*a)->stop(); // idempotent

        // A regular file is not ours to delete: bind reports the path in use.
        squib::test::write_file(path, bytes);
        CHECK(server_t::start(src, path, quiet).error() == std::errc::address_in_use);
        CHECK(file_exists(path));
        std::filesystem::remove(path);

        // A successor's socket at the same path survives its predecessor's stop().
        auto first = server_t::start(src, path, quiet);
        REQUIRE(first);
        std::filesystem::remove(path); // e.g. an operator cleaned up
        auto second = server_t::start(src, path, quiet);
        REQUIRE(second);
        (*first)->stop();
        CHECK(file_exists(path));
        auto c = connect(path);
        std::array<std::byte, page> buf{};
        CHECK_FALSE(c.read(page, buf));
        (*second)->stop();
        CHECK_FALSE(file_exists(path));
    }

    TEST_CASE_TEMPLATE("serves any PageSource, counting what it does", Source, memory_source, plain_source)
    {
        squib::test::temp_dir dir;
        const auto bytes = squib::test::pattern(4u << 20);
        Source src = make_source<Source>(bytes);
        log_capture log;
        auto server = squib::page_server<Source>::start(src, dir.file("s"), {.log = log.sink()});
        REQUIRE(server);
        CHECK((*server)->socket_path() == dir.file("s"));

        auto client = connect(dir.file("s"));
        std::vector<std::byte> buf(2u << 20);
        int reads = 0;
        for (std::uint64_t size : {page, 2 * page, 64 * page, std::uint64_t{2} << 20}) {
            for (std::uint64_t addr = 0; addr + size <= bytes.size(); addr += size * 3) {
                const std::span<std::byte> dst{buf.data(), size};
                REQUIRE_FALSE(client.read(addr, dst));
                CHECK(equal_bytes(dst, std::span(bytes).subspan(addr, size)));
                ++reads;
            }
        }
        (*server)->stop();
        CHECK((*server)->requests_served() == static_cast<std::uint64_t>(reads));
        CHECK((*server)->clients_accepted() == 1);
        CHECK((*server)->clients_rejected() == 0);
        CHECK((*server)->clients_refused() == 0);
        CHECK((*server)->active_clients() == 0);
        CHECK(log.lines().empty()); // a well-behaved client is not worth a log line
    }

    TEST_CASE("hostile clients are logged and dropped while a good client keeps being served")
    {
        squib::test::temp_dir dir;
        const auto bytes = squib::test::pattern(1u << 20);
        memory_source src{bytes};
        log_capture log;
        auto started = squib::page_server<memory_source>::start(src, dir.file("s"), {.log = log.sink()});
        REQUIRE(started);
        auto& server = **started;
        const std::uint64_t pages = bytes.size() / page;

        // A client reading in the background for the whole test ...
        auto background = connect(dir.file("s"));
        std::atomic<std::uint64_t> good_reads{0};
        std::atomic<bool> done{false};
        std::atomic<int> bad_reads{0};
        std::thread reader([&] {
            std::array<std::byte, page> buf{};
            for (std::uint64_t i = 0; !done.load(); ++i) {
                const std::uint64_t addr = (i * 7 % pages) * page;
                if (background.read(addr, buf) || !equal_bytes(buf, std::span(bytes).subspan(addr, page)))
                    bad_reads.fetch_add(1);
                good_reads.fetch_add(1);
                good_reads.notify_all();
            }
        });
        good_reads.wait(0); // it is being served before the first hostile client arrives

        // ... and one on a connection the main thread checks between attacks.
        auto steady = connect(dir.file("s"));
        const auto steady_read = [&](std::uint64_t addr) {
            std::array<std::byte, page> buf{};
            REQUIRE_FALSE(steady.read(addr, buf));
            CHECK(equal_bytes(buf, std::span(bytes).subspan(addr, page)));
        };
        steady_read(0);

        struct attack {
            const char* name;
            std::vector<std::byte> bytes; // what the client sends
            bool close_early;             // close without waiting for the server
            const char* reason;           // what the log line must say
        };
        const auto req = [](std::uint64_t addr, std::uint64_t size) {
            const auto b = wire::encode_request({addr, size});
            return std::vector<std::byte>(b.begin(), b.end());
        };
        const std::string_view http = "GET / HTTP/1.1\r\n";
        std::vector<std::byte> garbage(http.size());
        std::memcpy(garbage.data(), http.data(), http.size());
        std::vector<std::byte> half = req(0, page);
        half.resize(8);
        const attack attacks[] = {
            {"garbage", garbage, false, "page size is not a power of two"},
            {"unaligned address", req(0x1001, page), false, "address is not aligned to the page size"},
            {"page size 0", req(0, 0), false, "page size is zero"},
            {"page size not a power of two", req(0, 3 * page), false, "page size is not a power of two"},
            {"page size 1 GiB", req(0, gib), false, "page size exceeds the server's maximum"},
            {"address past the source", req(bytes.size(), page), false, "short read"},
            {"address far past the source", req(~0ull - page + 1, page), false, "short read"},
            {"half a request, then close", half, true, "truncated"},
        };

        std::size_t logged = 0;
        for (const auto& a : attacks) {
            CAPTURE(a.name);
            {
                auto fd = raw_connect(dir.file("s"));
                raw_send(fd.get(), a.bytes);
                if (!a.close_early) CHECK(hung_up(fd.get()));
            }
            REQUIRE(log.wait_for(logged + 1));
            const std::string line = log.line(logged);
            CAPTURE(line);
            CHECK(contains(line, a.reason));
            CHECK(contains(line, "closing"));
            ++logged;
            steady_read((logged * 5 % pages) * page); // the steady connection is untouched
        }

        // The background client made progress after the last attack too.
        const auto seen = good_reads.load();
        good_reads.wait(seen);
        done.store(true);
        reader.join();
        CHECK(bad_reads.load() == 0);

        server.stop();
        CHECK(server.clients_rejected() == std::size(attacks));
        CHECK(server.clients_accepted() == std::size(attacks) + 2);
        CHECK(log.lines().size() == std::size(attacks)); // one line per attack, nothing else
    }

    TEST_CASE("a source error is logged with the source's message")
    {
        // A source that fails every odd page: an extreme, short-reading policy.
        struct flaky_source {
            memory_source inner;
            [[nodiscard]] std::error_code read(std::uint64_t addr, std::span<std::byte> dst) const noexcept
            {
                if ((addr / page) % 2 == 1) return errc::below_ram_start;
                return inner.read(addr, dst);
            }
        };
        squib::test::temp_dir dir;
        const auto bytes = squib::test::pattern(64 * page);
        flaky_source src{memory_source{bytes}};
        log_capture log;
        auto server = squib::page_server<flaky_source>::start(src, dir.file("s"), {.log = log.sink()});
        REQUIRE(server);
        auto client = connect(dir.file("s"));
        std::array<std::byte, page> buf{};
        CHECK(client.read(page, buf) == errc::peer_closed);
        REQUIRE(log.wait_for(1));
        CHECK(contains(log.line(0), squib::make_error_code(errc::below_ram_start).message()));
        CHECK(contains(log.line(0), "0x1000"));
        REQUIRE_FALSE(client.read(2 * page, buf));
        CHECK(equal_bytes(buf, std::span(bytes).subspan(2 * page, page)));
    }

    TEST_CASE("stop returns with clients idle, mid-request and mid-reply")
    {
        squib::test::temp_dir dir;
        const auto bytes = squib::test::pattern(4u << 20);
        memory_source src{bytes};
        log_capture log;
        auto started = squib::page_server<memory_source>::start(src, dir.file("s"), {.log = log.sink()});
        REQUIRE(started);
        auto& server = **started;

        // Idle between requests.
        auto idle = connect(dir.file("s"), {.connections = 2});
        std::array<std::byte, page> buf{};
        REQUIRE_FALSE(idle.read(0, buf));
        // Stopped half-way through a request.
        auto partial = raw_connect(dir.file("s"));
        const auto req = wire::encode_request({0, page});
        raw_send(partial.get(), std::span(req).first(8));
        // Asked for a 2 MiB page and never reads it: the server blocks sending.
        auto stuck = raw_connect(dir.file("s"));
        raw_send(stuck.get(), wire::encode_request({0, 2u << 20}));
        std::byte first{};
        REQUIRE(::recv(stuck.get(), &first, 1, 0) == 1); // the reply has begun and cannot fit the socket buffers

        server.stop(); // must not wait for any of them
        CHECK(server.active_clients() == 0);
        CHECK_FALSE(file_exists(dir.file("s")));
        CHECK(hung_up(partial.get()));
        CHECK(hung_up(stuck.get()));
        CHECK(idle.read(page, buf)); // the server is gone: an error, whichever one
        CHECK(server.clients_rejected() == 0); // shutting down is nobody's fault
    }

    TEST_CASE("stop returns promptly with nobody connected, and the destructor stops too")
    {
        squib::test::temp_dir dir;
        const auto bytes = squib::test::pattern(16 * page);
        memory_source src{bytes};
        {
            auto server = squib::page_server<memory_source>::start(src, dir.file("s"));
            REQUIRE(server);
            CHECK(file_exists(dir.file("s")));
        } // destructor only
        CHECK_FALSE(file_exists(dir.file("s")));
    }

    TEST_CASE("clients beyond max_clients are refused with a log line")
    {
        squib::test::temp_dir dir;
        const auto bytes = squib::test::pattern(64 * page);
        memory_source src{bytes};
        log_capture log;
        auto started =
            squib::page_server<memory_source>::start(src, dir.file("s"), {.max_clients = 2, .log = log.sink()});
        REQUIRE(started);
        auto& server = **started;

        std::array<std::byte, page> buf{};
        auto a = connect(dir.file("s"));
        auto b = connect(dir.file("s"));
        REQUIRE_FALSE(a.read(0, buf)); // both are being served now
        REQUIRE_FALSE(b.read(page, buf));
        CHECK(server.active_clients() == 2);

        auto c = connect(dir.file("s")); // the kernel accepts the connection ...
        CHECK(c.read(0, buf) == errc::peer_closed); // ... the server closes it unserved
        REQUIRE(log.wait_for(1));
        CHECK(contains(log.line(0), "max_clients"));
        CHECK(server.clients_refused() == 1);
        CHECK(server.clients_accepted() == 2);

        REQUIRE_FALSE(a.read(2 * page, buf)); // the admitted clients are unaffected
        CHECK(equal_bytes(buf, std::span(bytes).subspan(2 * page, page)));
        server.stop();
        CHECK(server.requests_served() == 3);
    }
}
