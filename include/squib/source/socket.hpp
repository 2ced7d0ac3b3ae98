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
    /// The smallest unit a read is made of: every read's address and length
    /// must be multiples of it. A power of two.
    std::uint64_t page_size = 4096;
    /// The largest single request sent; longer reads (a fault-around
    /// cluster) are split. A power of two, at most the server's max_page_size.
    std::uint64_t max_request = 2u << 20;
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
    /// Errors: errc::bad_page_size (page_size or max_request not a power of
    /// two, or max_request below page_size), std::errc::invalid_argument (no connections, negative
    /// timeout), std::errc::filename_too_long (path does not fit sun_path),
    /// errc::timed_out, the errno of socket()/connect() (ENOENT, ECONNREFUSED).
    [[nodiscard]] static result<socket_source> connect(std::string path, options opts = {}) noexcept
    {
        if (opts.connections == 0 || opts.timeout.count() < 0)
            return std::make_error_code(std::errc::invalid_argument);
        if (!is_power_of_two(opts.page_size) || !is_power_of_two(opts.max_request) ||
            opts.max_request < opts.page_size)
            return errc::bad_page_size;
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        if (path.empty() || path.size() >= sizeof(addr.sun_path))
            return std::make_error_code(std::errc::filename_too_long);
        std::memcpy(addr.sun_path, path.data(), path.size());

        const auto ms = opts.timeout.count();
        timeval timeout{};
        timeout.tv_sec = static_cast<time_t>(ms / 1000);
        timeout.tv_usec = static_cast<suseconds_t>((ms % 1000) * 1000);

        auto p = std::unique_ptr<pool>(new (std::nothrow) pool{addr, timeout, opts.connections, opts.page_size, opts.max_request});
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
    /// into `dst`. The protocol carries one power-of-two, self-aligned page
    /// per request, so the read is split into the largest such requests (at
    /// most options::max_request each). Thread-safe; does not allocate. On
    /// error `dst` holds anything.
    ///
    /// Errors: errc::bad_length (empty or not a multiple of options::page_size),
    /// errc::unaligned_address (`addr` not a multiple of options::page_size),
    /// errc::protocol_echo_mismatch,
    /// errc::protocol_truncated, errc::peer_closed (the server hung up, e.g.
    /// because it refused the request), errc::timed_out, the errno of a failed
    /// reconnect or socket call, std::errc::not_connected on a moved-from source.
    [[nodiscard]] std::error_code read(std::uint64_t addr, std::span<std::byte> dst) noexcept
    {
        if (!pool_) return std::make_error_code(std::errc::not_connected);
        if (dst.empty() || !is_aligned(dst.size(), pool_->page_size)) return errc::bad_length;
        if (!is_aligned(addr, pool_->page_size)) return errc::unaligned_address;
        while (!dst.empty()) {
            // The largest power of two that divides addr, fits what is left, and is allowed.
            std::uint64_t chunk = pool_->max_request;
            while (chunk > dst.size() || !is_aligned(addr, chunk)) chunk >>= 1;
            if (auto ec = read_request(addr, dst.first(chunk))) return ec;
            addr += chunk;
            dst = dst.subspan(chunk);
        }
        return {};
    }

    /// How many connections the pool holds (0 for an unconnected source).
    [[nodiscard]] std::size_t connections() const noexcept { return pool_ ? pool_->count : 0; }

private:
    /// One request on a free connection; `dst.size()` is a power of two dividing `addr`.
    [[nodiscard]] std::error_code read_request(std::uint64_t addr, std::span<std::byte> dst) noexcept
    {

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

    struct connection {
        std::mutex mutex; // one request/reply at a time on a stream
        detail::unique_fd fd;
    };

    // Lives on the heap so socket_source can move while mutexes stay put.
    struct pool {
        pool(const sockaddr_un& a, const timeval& t, std::size_t n, std::uint64_t page, std::uint64_t max) noexcept
            : addr(a), timeout(t), count(n), page_size(page), max_request(max),
              connections(new (std::nothrow) connection[n])
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
        std::uint64_t page_size;   // reads are multiples of this
        std::uint64_t max_request; // longest single request
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
