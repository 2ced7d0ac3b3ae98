// squib-pager: the page-server wire protocol, shared by the client
// (source/socket.hpp) and the server (source/page_server.hpp).
//
// One stream connection carries a sequence of request/reply pairs, strictly
// in order, one outstanding request at a time:
//
//     request:  <u64 LE addr><u64 LE page_size>                     16 bytes
//     reply:    <u64 LE addr><u64 LE page_size> <page_size bytes>   16 + page_size bytes
//
// The reply header echoes the request so a desynchronised stream is caught
// before its bytes are handed to a guest. There is no version field and no
// handshake. Integers are assembled byte by byte, so the layout is the same on
// every host whatever its endianness.
#pragma once

#include <squib/core/page.hpp>
#include <squib/error.hpp>

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <span>
#include <system_error>

namespace squib::wire {

inline constexpr std::size_t request_size = 16;      ///< bytes in an encoded request
inline constexpr std::size_t reply_header_size = 16; ///< bytes in an encoded reply header (payload follows)

using request_bytes = std::array<std::byte, request_size>;
using reply_header_bytes = std::array<std::byte, reply_header_size>;

/// A request for the `page_size` bytes at source address `addr`.
struct request {
    std::uint64_t addr = 0;
    std::uint64_t page_size = 0;
    friend constexpr bool operator==(const request&, const request&) = default;
};

/// The header in front of a reply payload; a correct server echoes the request.
struct reply_header {
    std::uint64_t addr = 0;
    std::uint64_t page_size = 0;
    friend constexpr bool operator==(const reply_header&, const reply_header&) = default;
};

namespace detail {

constexpr void store_le64(std::byte* out, std::uint64_t v) noexcept
{
    for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
}

[[nodiscard]] constexpr std::uint64_t load_le64(const std::byte* in) noexcept
{
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= std::to_integer<std::uint64_t>(in[i]) << (8 * i);
    return v;
}

/// Two u64 fields, little-endian, back to back: the shape of both headers.
[[nodiscard]] constexpr std::array<std::byte, 16> encode_pair(std::uint64_t a, std::uint64_t b) noexcept
{
    std::array<std::byte, 16> out{};
    store_le64(out.data(), a);
    store_le64(out.data() + 8, b);
    return out;
}

[[nodiscard]] inline std::error_code os_error(int err) noexcept { return {err, std::system_category()}; }

/// Waits until `fd` is ready for `events` or `wake_fd` becomes readable.
/// Errors: errc::shutting_down when woken, the errno of a failed poll.
[[nodiscard]] inline std::error_code wait_ready(int fd, short events, int wake_fd) noexcept
{
    for (;;) {
        pollfd fds[2] = {{fd, events, 0}, {wake_fd, POLLIN, 0}};
        // Raw syscall: wait for progress on the socket or for shutdown, with no timeout.
        if (::poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return os_error(errno);
        }
        if (fds[1].revents != 0) return errc::shutting_down;
        // POLLHUP/POLLERR also end the wait: the next send/recv reports them.
        if (fds[0].revents != 0) return {};
    }
}

} // namespace detail

/// Encodes a request as 16 little-endian bytes.
///
/// **Example**
///
///     auto bytes = squib::wire::encode_request({.addr = 0x1000, .page_size = 4096});
///     // bytes = 00 10 00 00 00 00 00 00  00 10 00 00 00 00 00 00
[[nodiscard]] constexpr request_bytes encode_request(const request& r) noexcept
{
    return detail::encode_pair(r.addr, r.page_size);
}

/// Decodes the 16 bytes of a request. Every bit pattern decodes; use
/// validate_request() to decide whether the server should serve it.
[[nodiscard]] constexpr request decode_request(std::span<const std::byte, request_size> bytes) noexcept
{
    return {detail::load_le64(bytes.data()), detail::load_le64(bytes.data() + 8)};
}

/// Encodes a reply header as 16 little-endian bytes.
[[nodiscard]] constexpr reply_header_bytes encode_reply_header(const reply_header& h) noexcept
{
    return detail::encode_pair(h.addr, h.page_size);
}

/// Decodes the 16 bytes of a reply header.
[[nodiscard]] constexpr reply_header decode_reply_header(std::span<const std::byte, reply_header_size> bytes) noexcept
{
    return {detail::load_le64(bytes.data()), detail::load_le64(bytes.data() + 8)};
}

/// Whether `h` answers `r`. Errors: errc::protocol_echo_mismatch if the
/// server echoed another address or size (the stream is out of step).
[[nodiscard]] inline std::error_code check_echo(const request& r, const reply_header& h) noexcept
{
    if (h.addr != r.addr || h.page_size != r.page_size) return errc::protocol_echo_mismatch;
    return {};
}

/// Why a server must refuse `r`, as a short phrase for a log line, or nullptr
/// if it may serve it. `max_page_size` is a power of two.
[[nodiscard]] constexpr const char* request_problem(const request& r, std::uint64_t max_page_size) noexcept
{
    if (r.page_size == 0) return "page size is zero";
    if (!is_power_of_two(r.page_size)) return "page size is not a power of two";
    if (r.page_size > max_page_size) return "page size exceeds the server's maximum";
    if (!is_aligned(r.addr, r.page_size)) return "address is not aligned to the page size";
    return nullptr;
}

/// Checks a request before serving it: the page size must be a power of two
/// no larger than `max_page_size` and `addr` a multiple of it. Whether the
/// page exists is the source's business. Errors: errc::bad_request.
[[nodiscard]] inline std::error_code validate_request(const request& r, std::uint64_t max_page_size) noexcept
{
    if (request_problem(r, max_page_size) != nullptr) return errc::bad_request;
    return {};
}

/// Sends all of `head` then all of `body` on stream socket `fd`, in as few
/// syscalls as the kernel allows, looping over partial sends and EINTR.
/// MSG_NOSIGNAL: a vanished peer is an error value, never a SIGPIPE.
///
/// Two modes. With `wake_fd < 0` `fd` is blocking, and EAGAIN means its
/// SO_SNDTIMEO expired. With `wake_fd >= 0` `fd` is non-blocking, and the call
/// waits (with no timeout) until `fd` is writable or `wake_fd` is readable.
///
/// Errors: errc::timed_out, errc::peer_closed (EPIPE, ECONNRESET),
/// errc::shutting_down (woken through `wake_fd`), other errno values.
[[nodiscard]] inline std::error_code send_all(int fd, std::span<const std::byte> head,
                                              std::span<const std::byte> body = {}, int wake_fd = -1) noexcept
{
    // iovec wants non-const pointers; sendmsg only reads through them.
    iovec iov[2] = {{const_cast<std::byte*>(head.data()), head.size()},
                    {const_cast<std::byte*>(body.data()), body.size()}};
    iovec* cur = iov;
    std::size_t left = 2;
    for (;;) {
        while (left > 0 && cur->iov_len == 0) {
            ++cur;
            --left;
        }
        if (left == 0) return {};
        msghdr msg{};
        msg.msg_iov = cur;
        msg.msg_iovlen = left;
        // Raw syscall: one gather write for header + payload, no SIGPIPE.
        const ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            const int err = errno;
            if (err == EINTR) continue;
            if (err == EAGAIN || err == EWOULDBLOCK) {
                if (wake_fd < 0) return errc::timed_out;
                if (auto ec = detail::wait_ready(fd, POLLOUT, wake_fd)) return ec;
                continue;
            }
            if (err == EPIPE || err == ECONNRESET) return errc::peer_closed;
            return detail::os_error(err);
        }
        auto sent = static_cast<std::size_t>(n);
        while (left > 0 && sent >= cur->iov_len) {
            sent -= cur->iov_len;
            ++cur;
            --left;
        }
        if (left > 0) {
            cur->iov_base = static_cast<std::byte*>(cur->iov_base) + sent;
            cur->iov_len -= sent;
        }
    }
}

/// Receives exactly `buf.size()` bytes from stream socket `fd`, looping over
/// partial reads and EINTR. `wake_fd` selects the mode as for send_all().
///
/// Errors: errc::peer_closed if the peer closed (or reset) before the first
/// byte, errc::protocol_truncated if it closed after some but not all of them,
/// errc::timed_out, errc::shutting_down, other errno values.
[[nodiscard]] inline std::error_code recv_all(int fd, std::span<std::byte> buf, int wake_fd = -1) noexcept
{
    std::size_t got = 0;
    while (got < buf.size()) {
        // Raw syscall: stream reads return whatever has arrived; loop for the rest.
        const ssize_t n = ::recv(fd, buf.data() + got, buf.size() - got, 0);
        if (n > 0) {
            got += static_cast<std::size_t>(n);
            continue;
        }
        if (n == 0) return got == 0 ? errc::peer_closed : errc::protocol_truncated;
        const int err = errno;
        if (err == EINTR) continue;
        if (err == EAGAIN || err == EWOULDBLOCK) {
            if (wake_fd < 0) return errc::timed_out;
            if (auto ec = detail::wait_ready(fd, POLLIN, wake_fd)) return ec;
            continue;
        }
        if (err == ECONNRESET) return got == 0 ? errc::peer_closed : errc::protocol_truncated;
        return detail::os_error(err);
    }
    return {};
}

} // namespace squib::wire
