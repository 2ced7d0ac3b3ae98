// squib-pager: a page source that asks a page server over a Unix socket.
#pragma once

#include <squib/core/page.hpp>
#include <squib/core/result.hpp>
#include <squib/detail/fd.hpp>
#include <squib/error.hpp>
#include <squib/source/wire.hpp>

#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <system_error>
#include <utility>

namespace squib {

/// How a socket_source talks to its server.
struct socket_source_options {
    /// Connections opened by connect(); up to this many reads are in flight
    /// at once. Must be at least 1.
    std::size_t connections = 1;
    /// Bounds each wait for the server to make progress (connect, send, or
    /// the next bytes of a reply), so a dead or silent server gives
    /// errc::timed_out instead of hanging a guest. Zero waits forever.
    std::chrono::milliseconds timeout{5000};
};

/// A PageSource whose pages come from a squib::page_server (or anything that
/// speaks source/wire.hpp) on a Unix stream socket.
///
/// Several fault threads may share one client: it holds a fixed pool of
/// connections, each used by one read at a time. A read that sees the server
/// break the protocol (wrong echo, short payload, hang-up, timeout) returns
/// that error and closes its connection, because the stream can no longer be
/// trusted; the next read that picks the connection opens it again.
///
/// **Example**
///
///     auto src = squib::socket_source::connect("/run/vm1/pages.sock", {.connections = 4});
///     if (!src) return src.error();
///     std::array<std::byte, 4096> page;
///     if (auto ec = src->read(0x10000, page)) log(ec);
class socket_source {
public:
    using options = socket_source_options;

    /// An unconnected source; read() fails with std::errc::not_connected.
    /// Exists so result<socket_source> can hold an error.
    socket_source() = default;

    /// Opens `opts.connections` connections to the server listening on
    /// `path`. Every connection is opened here, so a server that is not there
    /// is reported now rather than at the first fault.
    ///
    /// Errors: std::errc::invalid_argument (no connections, negative
    /// timeout), std::errc::filename_too_long (path does not fit sun_path),
    /// errc::timed_out, the errno of socket()/connect() (ENOENT, ECONNREFUSED).
    [[nodiscard]] static result<socket_source> connect(std::string path, options opts = {}) noexcept
    {
        if (opts.connections == 0 || opts.timeout.count() < 0)
            return std::make_error_code(std::errc::invalid_argument);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        if (path.empty() || path.size() >= sizeof(addr.sun_path))
            return std::make_error_code(std::errc::filename_too_long);
        std::memcpy(addr.sun_path, path.data(), path.size());

        const auto ms = opts.timeout.count();
        timeval timeout{};
        timeout.tv_sec = static_cast<time_t>(ms / 1000);
        timeout.tv_usec = static_cast<suseconds_t>((ms % 1000) * 1000);

        auto p = std::unique_ptr<pool>(new (std::nothrow) pool{addr, timeout, opts.connections});
        if (!p || !p->connections) return std::make_error_code(std::errc::not_enough_memory);
        for (std::size_t i = 0; i < p->count; ++i) {
            auto fd = p->open();
            if (!fd) return fd.error();
            p->connections[i].fd = std::move(*fd);
        }
        socket_source s;
        s.pool_ = std::move(p);
        return s;
    }

    /// Reads the `dst.size()` bytes at source address `addr` from the server
    /// into `dst`: one request of page size `dst.size()`, so `dst.size()` must
    /// be a power of two and `addr` a multiple of it. Thread-safe; does not
    /// allocate. On error `dst` holds anything.
    ///
    /// Errors: errc::bad_length (empty or not a power of two),
    /// errc::unaligned_address, errc::protocol_echo_mismatch,
    /// errc::protocol_truncated, errc::peer_closed (the server hung up, e.g.
    /// because it refused the request), errc::timed_out, the errno of a failed
    /// reconnect or socket call, std::errc::not_connected on a moved-from source.
    [[nodiscard]] std::error_code read(std::uint64_t addr, std::span<std::byte> dst) noexcept
    {
        if (!pool_) return std::make_error_code(std::errc::not_connected);
        if (!is_power_of_two(dst.size())) return errc::bad_length;
        if (!is_aligned(addr, dst.size())) return errc::unaligned_address;

        // Start the try_lock scan at a different connection on every call so
        // concurrent readers spread out instead of all contending for the first.
        const std::size_t start = pool_->next.fetch_add(1, std::memory_order_relaxed) % pool_->count;
        std::unique_lock<std::mutex> lock;
        connection* conn = nullptr;
        for (std::size_t i = 0; i < pool_->count && conn == nullptr; ++i) {
            connection& c = pool_->connections[(start + i) % pool_->count];
            lock = std::unique_lock<std::mutex>(c.mutex, std::try_to_lock);
            if (lock.owns_lock()) conn = &c;
        }
        if (conn == nullptr) { // all busy: queue on one of them
            conn = &pool_->connections[start];
            lock = std::unique_lock<std::mutex>(conn->mutex);
        }

        if (!conn->fd) {
            auto fd = pool_->open();
            if (!fd) return fd.error();
            conn->fd = std::move(*fd);
        }
        auto ec = round_trip(conn->fd.get(), {addr, dst.size()}, dst);
        if (ec) conn->fd.reset(); // the stream is out of step; reconnect next time
        return ec;
    }

    /// How many connections the pool holds (0 for an unconnected source).
    [[nodiscard]] std::size_t connections() const noexcept { return pool_ ? pool_->count : 0; }

private:
    struct connection {
        std::mutex mutex; // one request/reply at a time on a stream
        detail::unique_fd fd;
    };

    // Lives on the heap so socket_source can move while mutexes stay put.
    struct pool {
        pool(const sockaddr_un& a, const timeval& t, std::size_t n) noexcept
            : addr(a), timeout(t), count(n), connections(new (std::nothrow) connection[n])
        {
        }

        /// A new connection with the timeouts set. No allocation: reconnects
        /// happen on the fault path.
        [[nodiscard]] result<detail::unique_fd> open() const noexcept
        {
            for (;;) {
                // Raw syscall: a fresh Unix stream socket, not inherited across exec.
                detail::unique_fd fd{::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
                if (!fd) return last_os_error();
                if (timeout.tv_sec != 0 || timeout.tv_usec != 0) {
                    // Set before connect(): on Unix sockets SO_SNDTIMEO also bounds a connect
                    // to a server whose backlog is full.
                    if (::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout) != 0 ||
                        ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout) != 0)
                        return last_os_error();
                }
                // sockaddr_un is passed as the generic sockaddr the API takes.
                if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) return fd;
                if (errno == EINTR) continue; // a fresh socket is simpler than resuming the connect
                if (errno == EAGAIN || errno == EWOULDBLOCK) return errc::timed_out;
                return last_os_error();
            }
        }

        sockaddr_un addr;
        timeval timeout;
        std::size_t count;
        std::unique_ptr<connection[]> connections;
        std::atomic<std::size_t> next{0}; // where the next read starts looking
    };

    /// One request/reply on `fd`. Any error leaves the stream unusable.
    [[nodiscard]] static std::error_code round_trip(int fd, wire::request req, std::span<std::byte> dst) noexcept
    {
        const auto out = wire::encode_request(req);
        if (auto ec = wire::send_all(fd, out)) return ec;
        wire::reply_header_bytes in;
        if (auto ec = wire::recv_all(fd, in)) return ec;
        if (auto ec = wire::check_echo(req, wire::decode_reply_header(in))) return ec;
        auto ec = wire::recv_all(fd, dst);
        if (ec == errc::peer_closed) return errc::protocol_truncated; // the header promised a payload
        return ec;
    }

    std::unique_ptr<pool> pool_;
};

} // namespace squib
