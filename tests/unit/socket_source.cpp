// Unit tests for squib::socket_source (include/squib/source/socket.hpp), against
// a real squib::page_server and against fake servers that break the protocol.
#include <squib/concepts.hpp>
#include <squib/detail/fd.hpp>
#include <squib/source/memory.hpp>
#include <squib/source/page_server.hpp>
#include <squib/source/socket.hpp>
#include <squib/source/wire.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <latch>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using squib::errc;
using squib::socket_source;
namespace wire = squib::wire;
using server_t = squib::page_server<squib::memory_source>;

// The client is a page source like any other: a pager can be built on it.
static_assert(squib::PageSource<socket_source>);
// It is not a mapped source: its bytes are not in this process until read.
static_assert(!squib::MappedPageSource<socket_source>);
// Movable (the pool lives on the heap), never copyable (it owns connections).
static_assert(std::is_nothrow_move_constructible_v<socket_source> && std::is_nothrow_move_assignable_v<socket_source>);
static_assert(!std::is_copy_constructible_v<socket_source>);

// Near misses the concept must reject: a read that may throw, a read with the wrong shape.
struct throwing_reader {
    std::error_code read(std::uint64_t, std::span<std::byte>) { return {}; }
};
struct wrong_result_reader {
    bool read(std::uint64_t, std::span<std::byte>) noexcept { return true; }
};
static_assert(!squib::PageSource<throwing_reader>);
static_assert(!squib::PageSource<wrong_result_reader>);
static_assert(!squib::PageSource<int>);

constexpr std::uint64_t page = 4096;

bool equal_bytes(std::span<const std::byte> a, std::span<const std::byte> b)
{
    return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

/// A quiet server options set: log lines are kept out of the test output.
server_t::options quiet()
{
    server_t::options o;
    o.log = [](std::string_view) {};
    return o;
}

/// A snapshot in memory with a temp dir for the socket.
struct fixture {
    explicit fixture(std::uint64_t size = 4u << 20) : bytes(squib::test::pattern(size)), src(bytes) {}

    squib::test::temp_dir dir;
    std::string path = dir.file("s");
    std::vector<std::byte> bytes;
    squib::memory_source src;

    std::unique_ptr<server_t> serve()
    {
        auto s = server_t::start(src, path, quiet());
        REQUIRE(s);
        return std::move(*s);
    }

    [[nodiscard]] std::span<const std::byte> expected(std::uint64_t addr, std::size_t len) const
    {
        return std::span(bytes).subspan(addr, len);
    }
};

socket_source connect(const std::string& path, socket_source::options opts = {})
{
    auto c = socket_source::connect(path, opts);
    REQUIRE_MESSAGE(c, c.error().message());
    return std::move(*c);
}

/// A server that accepts exactly one connection and runs `behave` on it, to
/// play a server that breaks the protocol. The listener is closed and the
/// socket file removed on destruction.
class fake_server {
public:
    fake_server(const std::string& path, std::function<void(int)> behave) : path_(path)
    {
        listen_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
        REQUIRE(listen_);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::memcpy(addr.sun_path, path.data(), path.size());
        REQUIRE(::bind(listen_.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
        REQUIRE(::listen(listen_.get(), 4) == 0);
        thread_ = std::thread([this, behave = std::move(behave)] {
            squib::detail::unique_fd fd{::accept(listen_.get(), nullptr, nullptr)};
            if (fd) behave(fd.get());
        });
    }
    fake_server(const fake_server&) = delete;
    fake_server& operator=(const fake_server&) = delete;
    ~fake_server()
    {
        thread_.join(); // the client always connects, so accept returns
        listen_.reset();
        ::unlink(path_.c_str());
    }

private:
    std::string path_;
    squib::detail::unique_fd listen_;
    std::thread thread_;
};

/// Reads one request off `fd` as a fake server.
wire::request read_request(int fd)
{
    wire::request_bytes raw{};
    REQUIRE_FALSE(wire::recv_all(fd, raw));
    return wire::decode_request(raw);
}

/// Sends `header` and `payload_len` bytes of payload (errors ignored: the
/// client may already have hung up, which is what some tests expect).
void reply(int fd, wire::reply_header header, std::size_t payload_len)
{
    std::vector<std::byte> payload(payload_len, std::byte{0x5a});
    static_cast<void>(wire::send_all(fd, wire::encode_reply_header(header), payload));
}

/// Blocks until the peer closes `fd` (the client gave up on this connection).
void wait_for_hangup(int fd)
{
    std::array<std::byte, 64> sink{};
    while (::recv(fd, sink.data(), sink.size(), 0) > 0) {
    }
}

} // namespace

TEST_SUITE("socket_source")
{
    TEST_CASE("connect reports a missing or unusable server at once")
    {
        squib::test::temp_dir dir;
        auto none = socket_source::connect(dir.file("absent"));
        CHECK(none.error() == std::errc::no_such_file_or_directory);

        CHECK(socket_source::connect(std::string(200, 'x')).error() == std::errc::filename_too_long);
        CHECK(socket_source::connect("").error() == std::errc::filename_too_long);
        CHECK(socket_source::connect(dir.file("s"), {.connections = 0}).error() == std::errc::invalid_argument);
        CHECK(socket_source::connect(dir.file("s"), {.timeout = std::chrono::milliseconds{-1}}).error() ==
              std::errc::invalid_argument);

        // A socket file nobody listens on (a crashed server's leftover).
        const std::string stale = dir.file("stale");
        {
            squib::detail::unique_fd fd{::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
            sockaddr_un addr{};
            addr.sun_family = AF_UNIX;
            std::memcpy(addr.sun_path, stale.data(), stale.size());
            REQUIRE(::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
        }
        CHECK(socket_source::connect(stale).error() == std::errc::connection_refused);
    }

    TEST_CASE("reads pages byte for byte, at every page size the server allows")
    {
        fixture f;
        auto server = f.serve();
        auto client = connect(f.path, {.page_size = 64}); // allow the 64-byte read below
        CHECK(client.connections() == 1);

        struct want {
            std::uint64_t addr;
            std::size_t len;
        };
        const want reads[] = {{0, 4096},          {4096, 4096},       {0x123000, 4096}, {f.bytes.size() - page, 4096},
                              {0x10000, 0x10000}, {0x200000, 2u << 20}, {0x7000, 4096},   {0x40, 64}};
        std::vector<std::byte> buf(2u << 20);
        for (const auto& r : reads) {
            CAPTURE(r.addr);
            CAPTURE(r.len);
            const std::span<std::byte> dst{buf.data(), r.len};
            std::fill(dst.begin(), dst.end(), std::byte{0xee});
            REQUIRE_FALSE(client.read(r.addr, dst));
            CHECK(equal_bytes(dst, f.expected(r.addr, r.len)));
        }
        server->stop();
        CHECK(server->requests_served() == std::size(reads));
        CHECK(server->clients_rejected() == 0);
    }

    TEST_CASE("requests the protocol cannot carry fail locally and keep the connection")
    {
        fixture f;
        auto server = f.serve();
        auto client = connect(f.path);
        std::array<std::byte, 8192> buf{};

        CHECK(client.read(0, std::span(buf).first(0)) == errc::bad_length);
        CHECK(client.read(0, std::span(buf).first(3000)) == errc::bad_length);
        CHECK(client.read(0, std::span(buf).first(4096 + 2048)) == errc::bad_length);
        CHECK(client.read(0x800, std::span(buf).first(4096)) == errc::unaligned_address);

        REQUIRE_FALSE(client.read(0x3000, std::span(buf).first(4096)));
        CHECK(equal_bytes(std::span(buf).first(4096), f.expected(0x3000, 4096)));
        server->stop();
        CHECK(server->clients_accepted() == 1); // never reconnected: nothing was sent for the local errors
        CHECK(server->requests_served() == 1);
    }

    TEST_CASE("reads the protocol cannot carry in one request are split into aligned ones")
    {
        fixture f;
        auto server = f.serve();
        auto client = connect(f.path);
        std::vector<std::byte> buf(64 * 1024);
        // 8 KiB at 0x1000 is not self-aligned: 4 KiB at 0x1000, then 4 KiB at 0x2000.
        REQUIRE_FALSE(client.read(0x1000, std::span(buf).first(8192)));
        CHECK(equal_bytes(std::span(buf).first(8192), f.expected(0x1000, 8192)));
        // 3 pages at 0x4000: 16 KiB is too long, so 8 KiB at 0x4000, then 4 KiB at 0x6000.
        REQUIRE_FALSE(client.read(0x4000, std::span(buf).first(3 * 4096)));
        CHECK(equal_bytes(std::span(buf).first(3 * 4096), f.expected(0x4000, 3 * 4096)));
        // 13 pages at 0x3000 (a clipped fault-around cluster).
        REQUIRE_FALSE(client.read(0x3000, std::span(buf).first(13 * 4096)));
        CHECK(equal_bytes(std::span(buf).first(13 * 4096), f.expected(0x3000, 13 * 4096)));
        server->stop(); // joins the server's threads: its counters are final only now
        // 2 + 2 + 3 (4 KiB at 0x3000, 16 KiB at 0x4000, 32 KiB at 0x8000) requests.
        CHECK(server->requests_served() == 7);
    }

    TEST_CASE("page_size and max_request are checked at connect")
    {
        fixture f;
        auto server = f.serve();
        CHECK(squib::socket_source::connect(f.path, {.page_size = 3000}).error() == errc::bad_page_size);
        CHECK(squib::socket_source::connect(f.path, {.page_size = 8192, .max_request = 4096}).error() ==
              errc::bad_page_size);
        auto big = squib::socket_source::connect(f.path, {.page_size = 4096, .max_request = 4096});
        REQUIRE(big);
        std::vector<std::byte> buf(4 * 4096);
        REQUIRE_FALSE(big->read(0, buf)); // four single-page requests
        CHECK(equal_bytes(buf, f.expected(0, buf.size())));
        server->stop();
        CHECK(server->requests_served() == 4);
    }

    TEST_CASE("a page the server cannot serve is peer_closed; the next read reconnects")
    {
        fixture f(1u << 20);
        auto server = f.serve();
        auto client = connect(f.path);
        std::array<std::byte, 4096> buf{};

        CHECK(client.read(f.bytes.size(), buf) == errc::peer_closed); // past the end: the server hangs up
        REQUIRE_FALSE(client.read(0x5000, buf));
        CHECK(equal_bytes(buf, f.expected(0x5000, 4096)));
        server->stop();
        CHECK(server->clients_accepted() == 2);
        CHECK(server->clients_rejected() == 1);
    }

    TEST_CASE("many threads share one client; every byte is right")
    {
        for (const std::size_t connections : {std::size_t{1}, std::size_t{4}}) {
            CAPTURE(connections);
            fixture f(1u << 20);
            auto server = f.serve();
            auto client = connect(f.path, {.connections = connections});
            CHECK(client.connections() == connections);

            constexpr int threads = 8;
            constexpr int reads_per_thread = 200;
            const std::uint64_t pages = f.bytes.size() / page;
            std::latch go(threads);
            std::atomic<int> failures{0};
            std::vector<std::thread> workers;
            for (int t = 0; t < threads; ++t) {
                workers.emplace_back([&, t] {
                    std::array<std::byte, page> buf{};
                    go.arrive_and_wait(); // all start together: the pool is contended
                    for (int i = 0; i < reads_per_thread; ++i) {
                        const std::uint64_t addr = ((static_cast<std::uint64_t>(t) * 37 + i * 11) % pages) * page;
                        if (client.read(addr, buf) || !equal_bytes(buf, f.expected(addr, page)))
                            failures.fetch_add(1);
                    }
                });
            }
            for (auto& w : workers) w.join();
            CHECK(failures.load() == 0);
            server->stop();
            CHECK(server->requests_served() == threads * reads_per_thread);
            CHECK(server->clients_accepted() == connections); // the pool never grew or reconnected
            CHECK(server->clients_rejected() == 0);
        }
    }

    TEST_CASE("a moved source keeps its connections; the moved-from one says not_connected")
    {
        fixture f(1u << 20);
        auto server = f.serve();
        auto a = connect(f.path, {.connections = 2});
        socket_source b = std::move(a);
        std::array<std::byte, 4096> buf{};
        CHECK(a.read(0, buf) == std::errc::not_connected); // NOLINT: testing the moved-from state
        CHECK(a.connections() == 0);                       // NOLINT
        REQUIRE_FALSE(b.read(0x9000, buf));
        CHECK(equal_bytes(buf, f.expected(0x9000, 4096)));
        socket_source c;
        CHECK(c.read(0, buf) == std::errc::not_connected);
        c = std::move(b);
        CHECK_FALSE(c.read(0xa000, buf));
    }

    TEST_CASE("a lying server gives the specific error; a real server on the path is used next")
    {
        fixture f(1u << 20);
        struct lie {
            const char* name;
            std::function<void(int)> behave;
            std::error_code expected;
        };
        const lie lies[] = {
            {"echoes the wrong address",
             [](int fd) {
                 const auto r = read_request(fd);
                 reply(fd, {r.addr + page, r.page_size}, r.page_size);
             },
             errc::protocol_echo_mismatch},
            {"echoes the wrong size",
             [](int fd) {
                 const auto r = read_request(fd);
                 reply(fd, {r.addr, r.page_size / 2}, r.page_size / 2);
             },
             errc::protocol_echo_mismatch},
            {"sends half the payload and closes",
             [](int fd) {
                 const auto r = read_request(fd);
                 reply(fd, {r.addr, r.page_size}, r.page_size / 2);
             },
             errc::protocol_truncated},
            {"sends half a header and closes",
             [](int fd) {
                 const auto r = read_request(fd);
                 const auto h = wire::encode_reply_header({r.addr, r.page_size});
                 static_cast<void>(wire::send_all(fd, std::span(h).first(8)));
             },
             errc::protocol_truncated},
            {"closes right after the request", [](int fd) { static_cast<void>(read_request(fd)); },
             errc::peer_closed},
            {"never answers",
             [](int fd) {
                 static_cast<void>(read_request(fd));
                 wait_for_hangup(fd); // until the client times out and drops the connection
             },
             errc::timed_out},
            {"answers only part of the payload, then goes silent",
             [](int fd) {
                 const auto r = read_request(fd);
                 std::vector<std::byte> part(r.page_size / 4, std::byte{1});
                 static_cast<void>(wire::send_all(fd, wire::encode_reply_header({r.addr, r.page_size}), part));
                 wait_for_hangup(fd);
             },
             errc::timed_out},
        };
        for (const auto& l : lies) {
            CAPTURE(l.name);
            std::array<std::byte, page> buf{};
            // A short timeout: "never answers" must fail fast, and no other case waits for it.
            const socket_source::options opts{.connections = 1, .timeout = std::chrono::milliseconds{20}};
            std::optional<socket_source> client;
            {
                fake_server liar(f.path, l.behave);
                client.emplace(connect(f.path, opts));
                CHECK(client->read(0x2000, buf) == l.expected);
            } // the liar is gone, and so is its socket file

            CHECK(client->read(0x2000, buf) == std::errc::no_such_file_or_directory); // reconnect fails: an error
            auto server = f.serve();
            REQUIRE_FALSE(client->read(0x2000, buf)); // reconnects to the real server
            CHECK(equal_bytes(buf, f.expected(0x2000, page)));
            REQUIRE_FALSE(client->read(0x3000, buf)); // and keeps the connection
            CHECK(equal_bytes(buf, f.expected(0x3000, page)));
            server->stop();
            CHECK(server->clients_accepted() == 1);
        }
    }

    TEST_CASE("a restarted server: the first read sees the hang-up, the next reconnects")
    {
        fixture f(1u << 20);
        auto client = [&] {
            auto server = f.serve();
            auto c = connect(f.path);
            std::array<std::byte, page> buf{};
            REQUIRE_FALSE(c.read(0, buf));
            return c;
        }(); // the first server stops here, closing the connection
        auto server = f.serve();
        std::array<std::byte, page> buf{};
        CHECK(client.read(0x1000, buf) == errc::peer_closed);
        REQUIRE_FALSE(client.read(0x1000, buf));
        CHECK(equal_bytes(buf, f.expected(0x1000, page)));
    }

    TEST_CASE("with every connection lost, each reader reconnects its own")
    {
        fixture f(1u << 20);
        auto client = [&] {
            auto server = f.serve();
            return connect(f.path, {.connections = 3});
        }(); // all three connections are now dead
        auto server = f.serve();
        std::array<std::byte, page> buf{};
        int failures = 0;
        int successes = 0;
        for (int i = 0; i < 9; ++i) {
            if (client.read(0x4000, buf)) {
                ++failures;
            } else {
                ++successes;
                CHECK(equal_bytes(buf, f.expected(0x4000, page)));
            }
        }
        CHECK(failures == 3); // one hang-up per dead connection, then they work
        CHECK(successes == 6);
        server->stop();
        CHECK(server->clients_accepted() == 3);
    }
}
