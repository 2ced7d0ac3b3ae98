// Unit tests for the page-server wire codec and socket helpers (include/squib/source/wire.hpp).
#include <squib/detail/fd.hpp>
#include <squib/source/wire.hpp>

#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

namespace {

using squib::errc;
namespace wire = squib::wire;

constexpr std::uint64_t gib = 1ull << 30;

template <std::size_t N>
std::array<std::byte, N> bytes_of(const std::array<unsigned, N>& values)
{
    std::array<std::byte, N> out{};
    for (std::size_t i = 0; i < N; ++i) out[i] = static_cast<std::byte>(values[i]);
    return out;
}

/// A connected pair of Unix stream sockets, closed on scope exit.
struct socket_pair {
    socket_pair()
    {
        int fds[2];
        REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
        a.reset(fds[0]);
        b.reset(fds[1]);
    }
    squib::detail::unique_fd a;
    squib::detail::unique_fd b;
};

void set_recv_timeout(int fd, long usec)
{
    timeval tv{0, usec};
    REQUIRE(::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0);
}

// The codec is constexpr: layout facts are checked at compile time too.
static_assert(wire::decode_request(wire::encode_request({0x1122334455667788, 4096})) ==
              wire::request{0x1122334455667788, 4096});
static_assert(wire::request_size == 16 && wire::reply_header_size == 16, "the protocol is fixed at 16-byte headers");

} // namespace

TEST_SUITE("wire")
{
    TEST_CASE("a request is addr then page size, each u64 little-endian")
    {
        const auto bytes = wire::encode_request({0x0102030405060708, 0x1000});
        const auto expected = bytes_of<16>({0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, //
                                            0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00});
        CHECK(bytes == expected);
        CHECK(wire::decode_request(expected) == wire::request{0x0102030405060708, 0x1000});
    }

    TEST_CASE("a reply header has the same layout as the request it echoes")
    {
        const auto bytes = wire::encode_reply_header({0xfedcba9876543210, 2ull << 20});
        const auto expected = bytes_of<16>({0x10, 0x32, 0x54, 0x76, 0x98, 0xba, 0xdc, 0xfe, //
                                            0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00});
        CHECK(bytes == expected);
        CHECK(wire::decode_reply_header(expected) == wire::reply_header{0xfedcba9876543210, 2ull << 20});
        CHECK(wire::encode_request({0xfedcba9876543210, 2ull << 20}) == bytes);
    }

    TEST_CASE("round trips keep every value, extremes included")
    {
        const std::uint64_t values[] = {0, 1, 4096, 0x8000000000000000ull, ~0ull, 0x00ff00ff00ff00ffull};
        for (auto addr : values) {
            for (auto size : values) {
                CAPTURE(addr);
                CAPTURE(size);
                CHECK(wire::decode_request(wire::encode_request({addr, size})) == wire::request{addr, size});
                CHECK(wire::decode_reply_header(wire::encode_reply_header({addr, size})) ==
                      wire::reply_header{addr, size});
            }
        }
    }

    TEST_CASE("check_echo accepts only the exact echo")
    {
        const wire::request req{0x4000, 4096};
        CHECK_FALSE(wire::check_echo(req, {0x4000, 4096}));
        CHECK(wire::check_echo(req, {0x5000, 4096}) == errc::protocol_echo_mismatch);
        CHECK(wire::check_echo(req, {0x4000, 8192}) == errc::protocol_echo_mismatch);
        CHECK(wire::check_echo(req, {0, 0}) == errc::protocol_echo_mismatch);
    }

    TEST_CASE("validate_request accepts aligned power-of-two pages up to the maximum")
    {
        const std::uint64_t max = 2ull << 20;
        CHECK_FALSE(wire::validate_request({0, 4096}, max));
        CHECK_FALSE(wire::validate_request({0x7000, 4096}, max));
        CHECK_FALSE(wire::validate_request({0x200000, max}, max));
        CHECK_FALSE(wire::validate_request({0x3, 1}, max)); // a 1-byte page is odd but consistent
        CHECK(wire::request_problem({0x7000, 4096}, max) == nullptr);
    }

    TEST_CASE("validate_request rejects each kind of bad request with a reason")
    {
        const std::uint64_t max = 2ull << 20;
        struct bad {
            wire::request req;
            const char* reason;
        };
        const bad cases[] = {
            {{0, 0}, "page size is zero"},
            {{0, 3}, "page size is not a power of two"},
            {{0, 4097}, "page size is not a power of two"},
            {{0, ~0ull}, "page size is not a power of two"},
            {{0, gib}, "page size exceeds the server's maximum"},
            {{0, max * 2}, "page size exceeds the server's maximum"},
            {{0x1001, 4096}, "address is not aligned to the page size"},
            {{0x1000, 8192}, "address is not aligned to the page size"},
            {{~0ull, 4096}, "address is not aligned to the page size"},
        };
        for (const auto& c : cases) {
            CAPTURE(c.req.addr);
            CAPTURE(c.req.page_size);
            CHECK(wire::validate_request(c.req, max) == errc::bad_request);
            REQUIRE(wire::request_problem(c.req, max) != nullptr);
            CHECK(std::string_view{wire::request_problem(c.req, max)} == c.reason);
        }
    }

    TEST_CASE("send_all and recv_all move a buffer larger than the socket buffers")
    {
        socket_pair s;
        const std::size_t n = 8u << 20; // many partial transfers on both sides
        std::vector<std::byte> out(n);
        for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<std::byte>(i * 7 + (i >> 12));
        const auto head = wire::encode_reply_header({0x1000, n});

        std::error_code send_ec;
        std::thread sender([&] { send_ec = wire::send_all(s.a.get(), head, out); });
        wire::reply_header_bytes got_head{};
        std::vector<std::byte> in(n);
        CHECK_FALSE(wire::recv_all(s.b.get(), got_head));
        CHECK_FALSE(wire::recv_all(s.b.get(), in));
        sender.join();
        CHECK_FALSE(send_ec);
        CHECK(got_head == head);
        CHECK(in == out);
    }

    TEST_CASE("send_all skips empty parts")
    {
        socket_pair s;
        const auto body = wire::encode_request({1, 2});
        CHECK_FALSE(wire::send_all(s.a.get(), {}, body));
        CHECK_FALSE(wire::send_all(s.a.get(), body));
        CHECK_FALSE(wire::send_all(s.a.get(), {}, {}));
        std::array<std::byte, 32> in{};
        CHECK_FALSE(wire::recv_all(s.b.get(), in));
        CHECK(wire::decode_request(std::span(in).first<16>()) == wire::request{1, 2});
        CHECK(wire::decode_request(std::span(in).last<16>()) == wire::request{1, 2});
    }

    TEST_CASE("recv_all: EOF before the first byte is peer_closed")
    {
        socket_pair s;
        s.a.reset();
        wire::request_bytes in{};
        CHECK(wire::recv_all(s.b.get(), in) == errc::peer_closed);
    }

    TEST_CASE("recv_all: EOF after some bytes is protocol_truncated")
    {
        socket_pair s;
        const auto out = wire::encode_request({1, 2});
        CHECK_FALSE(wire::send_all(s.a.get(), std::span(out).first(5)));
        s.a.reset();
        wire::request_bytes in{};
        CHECK(wire::recv_all(s.b.get(), in) == errc::protocol_truncated);
    }

    TEST_CASE("recv_all: an expired SO_RCVTIMEO is timed_out")
    {
        socket_pair s; // the peer stays open and silent
        set_recv_timeout(s.b.get(), 1000);
        wire::request_bytes in{};
        CHECK(wire::recv_all(s.b.get(), in) == errc::timed_out);
        // ... also when part of the message came first.
        const auto out = wire::encode_request({1, 2});
        CHECK_FALSE(wire::send_all(s.a.get(), std::span(out).first(3)));
        CHECK(wire::recv_all(s.b.get(), in) == errc::timed_out);
    }

    TEST_CASE("send_all to a closed peer is peer_closed, not SIGPIPE")
    {
        socket_pair s;
        s.b.reset();
        const auto out = wire::encode_request({1, 2});
        CHECK(wire::send_all(s.a.get(), out) == errc::peer_closed); // SIGPIPE would have killed the test
    }

    TEST_CASE("send_all: a full send buffer and an expired SO_SNDTIMEO is timed_out")
    {
        socket_pair s; // nobody reads b
        timeval tv{0, 1000};
        REQUIRE(::setsockopt(s.a.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) == 0);
        std::vector<std::byte> big(16u << 20);
        CHECK(wire::send_all(s.a.get(), big) == errc::timed_out);
    }

    TEST_CASE("with a wake fd, waiting ends with shutting_down once it is signalled")
    {
        socket_pair s;
        squib::detail::unique_fd wake{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
        REQUIRE(wake);
        // The waiting side uses non-blocking sockets in this mode.
        REQUIRE(::fcntl(s.b.get(), F_SETFL, O_NONBLOCK) == 0);
        REQUIRE(::fcntl(s.a.get(), F_SETFL, O_NONBLOCK) == 0);

        std::error_code recv_ec;
        std::thread waiter([&] {
            wire::request_bytes in{};
            recv_ec = wire::recv_all(s.b.get(), in, wake.get());
        });
        // Part of a request, then the wake: the receiver must not wait for the rest.
        const auto out = wire::encode_request({1, 2});
        CHECK_FALSE(wire::send_all(s.a.get(), std::span(out).first(4)));
        const std::uint64_t one = 1;
        REQUIRE(::write(wake.get(), &one, sizeof one) == sizeof one);
        waiter.join();
        CHECK(recv_ec == errc::shutting_down);

        // A sender blocked on a full buffer is woken the same way (the eventfd stays readable).
        std::vector<std::byte> big(16u << 20);
        CHECK(wire::send_all(s.a.get(), big, {}, wake.get()) == errc::shutting_down);
    }

    TEST_CASE("with a wake fd, data arriving later is waited for")
    {
        socket_pair s;
        squib::detail::unique_fd wake{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
        REQUIRE(wake);
        REQUIRE(::fcntl(s.b.get(), F_SETFL, O_NONBLOCK) == 0);
        const auto out = wire::encode_request({0xabc000, 4096});
        std::thread sender([&] {
            CHECK_FALSE(wire::send_all(s.a.get(), std::span(out).first(7)));
            CHECK_FALSE(wire::send_all(s.a.get(), std::span(out).subspan(7)));
        });
        wire::request_bytes in{};
        CHECK_FALSE(wire::recv_all(s.b.get(), in, wake.get()));
        sender.join();
        CHECK(wire::decode_request(in) == wire::request{0xabc000, 4096});
    }
}
