// squib-pager: serves any PageSource to socket_source clients over a Unix socket.
#pragma once

#include <squib/concepts.hpp>
#include <squib/core/page.hpp>
#include <squib/core/result.hpp>
#include <squib/detail/fd.hpp>
#include <squib/detail/thread.hpp>
#include <squib/error.hpp>
#include <squib/source/wire.hpp>

#include <fmt/format.h>

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <list>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

namespace squib {

/// How a page_server runs.
struct page_server_options {
    /// The largest page a client may ask for; a power of two. Bounds the
    /// per-client buffer, so a hostile request cannot make the server allocate
    /// a gigabyte.
    std::uint64_t max_page_size = page_2m;
    /// Connections served at once; more are accepted and closed at once with
    /// a log line. At least 1.
    std::size_t max_clients = 64;
    /// Receives one line per notable event (a refused client, a client closed
    /// for a bad request, an OS failure). Calls are serialised by the server,
    /// so the callback need not be thread-safe; it must not call stop().
    /// Empty: lines go to stderr prefixed with "squib page_server: ".
    std::function<void(std::string_view)> log{};
};

/// Serves the pages of `Source` to socket_source clients on a Unix stream
/// socket, speaking the protocol in source/wire.hpp.
///
/// An accept thread hands each connection to a thread of its own. A client
/// whose request is invalid (unaligned, absurd page size), whose page the
/// source cannot produce (out of range, short read), or that sends a partial
/// request or garbage is logged and disconnected; the protocol has no error
/// reply, so the client sees errc::peer_closed. Other clients are unaffected.
///
/// **Example**
///
///     squib::memory_source src{snapshot};
///     auto server = squib::page_server<squib::memory_source>::start(src, "/run/vm1/pages.sock");
///     if (!server) return server.error();
///     // ... clients fault pages in ...
///     (*server)->stop(); // also done by the destructor
template <PageSource Source>
class page_server {
public:
    using options = page_server_options;

    /// Listens on `socket_path` and starts serving `src`, which must outlive
    /// the server. A socket file left at the path by a server that is gone is
    /// replaced; one that a live server answers on is not.
    ///
    /// Errors: errc::bad_page_size (max_page_size not a power of two),
    /// std::errc::invalid_argument (max_clients 0),
    /// std::errc::filename_too_long (path does not fit sun_path),
    /// std::errc::address_in_use (a live server owns the path, or a file that
    /// is not a socket sits there), the errno of socket/bind/listen/eventfd
    /// (ENOENT: the directory is missing) or of a thread that could not be
    /// spawned (EAGAIN), std::errc::not_enough_memory.
    [[nodiscard]] static result<std::unique_ptr<page_server>> start(Source& src, std::string socket_path,
                                                                   options opts = {}) noexcept
    {
        if (!is_power_of_two(opts.max_page_size) || opts.max_page_size > std::numeric_limits<std::size_t>::max())
            return errc::bad_page_size; // the per-client buffer must be able to hold one page
        if (opts.max_clients == 0) return std::make_error_code(std::errc::invalid_argument);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        if (socket_path.empty() || socket_path.size() >= sizeof(addr.sun_path))
            return std::make_error_code(std::errc::filename_too_long);
        std::memcpy(addr.sun_path, socket_path.data(), socket_path.size());

        std::unique_ptr<page_server> server;
        try {
            server.reset(new page_server(src, std::move(socket_path), std::move(opts)));
        } catch (...) { // std::bad_alloc: nothing else in the constructor throws
            return std::make_error_code(std::errc::not_enough_memory);
        }
        if (auto ec = server->listen_on(addr)) return ec;
        auto thread = detail::named_thread::spawn("squib-accept", 0, [s = server.get()]() noexcept { s->accept_loop(); });
        if (!thread) return thread.error(); // ~page_server removes the socket file
        server->accept_thread_ = std::move(*thread);
        return server;
    }

    page_server(const page_server&) = delete;
    page_server& operator=(const page_server&) = delete;
    ~page_server() { stop(); }

    /// Wakes and joins every thread of the server, closes every connection
    /// and removes the socket file. Returns promptly whatever the clients are
    /// doing. Idempotent; also run by the destructor. Must not be called from
    /// the log callback.
    void stop() noexcept
    {
        std::lock_guard<std::mutex> guard(stop_mutex_);
        if (stopped_) return;
        stopped_ = true;
        stopping_.store(true, std::memory_order_relaxed);
        if (wake_) {
            const std::uint64_t one = 1;
            // Raw syscall: makes the eventfd readable for good, waking every poll() in the server.
            while (::write(wake_.get(), &one, sizeof one) < 0 && errno == EINTR) {
            }
        }
        accept_thread_.join();
        // The accept thread is gone, so clients_ is ours alone now.
        for (auto& c : clients_) c.thread.join();
        clients_.clear();
        listen_.reset();
        remove_socket_file();
    }

    /// The path the server listens on.
    [[nodiscard]] const std::string& socket_path() const noexcept { return path_; }
    /// Connections handed to a serving thread.
    [[nodiscard]] std::uint64_t clients_accepted() const noexcept { return accepted_.load(std::memory_order_relaxed); }
    /// Connections closed at once because max_clients were being served.
    [[nodiscard]] std::uint64_t clients_refused() const noexcept { return refused_.load(std::memory_order_relaxed); }
    /// Clients disconnected for a bad, truncated or unservable request.
    [[nodiscard]] std::uint64_t clients_rejected() const noexcept { return rejected_.load(std::memory_order_relaxed); }
    /// Replies sent in full.
    [[nodiscard]] std::uint64_t requests_served() const noexcept { return served_.load(std::memory_order_relaxed); }
    /// Clients being served right now.
    [[nodiscard]] std::size_t active_clients() const noexcept { return active_.load(std::memory_order_relaxed); }

private:
    struct client_slot {
        detail::named_thread thread;
        std::atomic<bool> finished{false}; // set by the thread as its last act; then join() is prompt
    };

    page_server(Source& src, std::string path, options opts)
        : src_(&src), path_(std::move(path)), opts_(std::move(opts))
    {
    }

    /// Creates the eventfd and the listening socket.
    [[nodiscard]] std::error_code listen_on(const sockaddr_un& addr) noexcept
    {
        // Raw syscall: a counter every server thread polls for shutdown.
        wake_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (!wake_) return last_os_error();
        if (auto ec = clear_stale_socket(addr)) return ec;
        // Raw syscall: non-blocking so accept() after poll() cannot hang on a vanished connection.
        listen_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
        if (!listen_) return last_os_error();
        // sockaddr_un is passed as the generic sockaddr the API takes.
        if (::bind(listen_.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) return last_os_error();
        struct stat st{};
        if (::stat(path_.c_str(), &st) == 0) { // remembered so stop() never removes a successor's socket
            bound_dev_ = st.st_dev;
            bound_ino_ = st.st_ino;
            bound_ = true;
        }
        if (::listen(listen_.get(), SOMAXCONN) != 0) {
            const auto ec = last_os_error();
            remove_socket_file();
            return ec;
        }
        return {};
    }

    /// Unlinks a socket file nobody answers on, so a crashed server does not
    /// block its replacement. Anything else at the path is left for bind() to
    /// report.
    [[nodiscard]] std::error_code clear_stale_socket(const sockaddr_un& addr) const noexcept
    {
        struct stat st{};
        if (::lstat(path_.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) return {};
        // Raw syscall: a non-blocking probe, so a live server with a full backlog cannot stall us.
        detail::unique_fd probe{::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)};
        if (!probe) return last_os_error();
        // sockaddr_un is passed as the generic sockaddr the API takes.
        if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0 || errno == EAGAIN)
            return std::make_error_code(std::errc::address_in_use);
        if (errno != ECONNREFUSED) return {};
        if (::unlink(path_.c_str()) != 0 && errno != ENOENT) return last_os_error();
        return {};
    }

    void remove_socket_file() noexcept
    {
        if (!bound_) return;
        bound_ = false;
        struct stat st{};
        if (::stat(path_.c_str(), &st) == 0 && st.st_dev == bound_dev_ && st.st_ino == bound_ino_)
            ::unlink(path_.c_str()); // best effort: a leftover file is cleared by the next start()
    }

    /// Formats and logs one line; logging never takes the server down.
    template <class... Args>
    void note(fmt::format_string<Args...> format, Args&&... args) noexcept
    {
        try {
            const std::string line = fmt::format(format, std::forward<Args>(args)...);
            std::lock_guard<std::mutex> guard(log_mutex_);
            if (opts_.log)
                opts_.log(line);
            else
                fmt::print(stderr, "squib page_server: {}\n", line);
        } catch (...) {
        }
    }

    void accept_loop() noexcept
    {
        for (;;) {
            pollfd fds[2] = {{listen_.get(), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
            // Raw syscall: wait for a connection or for stop(), with no timeout.
            if (::poll(fds, 2, -1) < 0) {
                if (errno == EINTR) continue;
                note("poll on the listening socket failed: {}; no longer accepting", last_os_error().message());
                return;
            }
            if (fds[1].revents != 0) return;
            reap_finished();
            if (fds[0].revents == 0) continue;

            // Raw syscall: non-blocking, because the client threads wait in poll() with the eventfd.
            detail::unique_fd fd{::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK)};
            if (!fd) {
                const int err = errno;
                if (err == EINTR || err == EAGAIN || err == EWOULDBLOCK || err == ECONNABORTED) continue;
                note("accept failed: {}", std::system_category().message(err));
                // Out of descriptors or memory: the listener stays readable, so pause
                // (still answering stop()) instead of spinning on the same failure.
                pollfd wake{wake_.get(), POLLIN, 0};
                if (::poll(&wake, 1, 100) > 0) return;
                continue;
            }
            if (active_.load(std::memory_order_relaxed) >= opts_.max_clients) {
                refused_.fetch_add(1, std::memory_order_relaxed);
                note("refusing a client: max_clients ({}) are connected", opts_.max_clients);
                continue; // fd closes here
            }
            spawn_client(std::move(fd));
        }
    }

    void spawn_client(detail::unique_fd fd) noexcept
    {
        const std::uint64_t id = ++next_id_;
        client_slot* slot = nullptr;
        try {
            slot = &clients_.emplace_back();
        } catch (...) {
            note("client {}: out of memory accepting it; closing", id);
            return;
        }
        active_.fetch_add(1, std::memory_order_relaxed); // before the thread exists: it decrements on exit
        auto thread = detail::named_thread::spawn("squib-client", 0,
                                                  [this, slot, id, fd = std::move(fd)]() mutable noexcept {
                                                      serve_client(std::move(fd), id);
                                                      slot->finished.store(true, std::memory_order_release);
                                                  });
        if (!thread) { // the closure, and with it the connection, is gone
            active_.fetch_sub(1, std::memory_order_relaxed);
            clients_.pop_back();
            note("client {}: cannot start a thread for it: {}; closing", id, thread.error().message());
            return;
        }
        slot->thread = std::move(*thread);
        accepted_.fetch_add(1, std::memory_order_relaxed);
    }

    /// Joins the threads of clients that have left, so a long-running server
    /// does not pile up finished threads.
    void reap_finished() noexcept
    {
        for (auto it = clients_.begin(); it != clients_.end();) {
            if (it->finished.load(std::memory_order_acquire)) {
                it->thread.join();
                it = clients_.erase(it);
            } else {
                ++it;
            }
        }
    }

    /// Closes `id` for a bad request: counted, logged, then disconnected by the caller.
    template <class... Args>
    void reject(std::uint64_t id, fmt::format_string<Args...> format, Args&&... args) noexcept
    {
        rejected_.fetch_add(1, std::memory_order_relaxed);
        try {
            note("client {}: {}; closing", id, fmt::format(format, std::forward<Args>(args)...));
        } catch (...) {
        }
    }

    void serve_client(detail::unique_fd fd, std::uint64_t id) noexcept
    {
        std::unique_ptr<std::byte[]> buffer; // grows to the largest page this client asked for
        std::size_t capacity = 0;
        while (!stopping_.load(std::memory_order_relaxed)) { // checked per request: a busy client cannot hold off stop()
            wire::request_bytes raw;
            auto ec = wire::recv_all(fd.get(), raw, wake_.get());
            if (ec == errc::peer_closed || ec == errc::shutting_down) break; // leaving between requests is normal
            if (ec == errc::protocol_truncated) { // errc's message speaks of replies: say what happened here
                reject(id, "request truncated: the client hung up inside its {}-byte request", wire::request_size);
                break;
            }
            if (ec) {
                reject(id, "reading a request: {}", ec.message());
                break;
            }
            const wire::request req = wire::decode_request(raw);
            if (const char* why = wire::request_problem(req, opts_.max_page_size)) {
                reject(id, "{}: {} (addr {:#x}, page size {})", make_error_code(errc::bad_request).message(), why,
                       req.addr, req.page_size);
                break;
            }
            const auto size = static_cast<std::size_t>(req.page_size); // <= max_page_size
            if (size > capacity) {
                buffer = std::unique_ptr<std::byte[]>(new (std::nothrow) std::byte[size]);
                capacity = buffer ? size : 0;
                if (!buffer) {
                    note("client {}: out of memory for a {} byte page; closing", id, size);
                    break;
                }
            }
            const std::span<std::byte> page{buffer.get(), size};
            if (auto read_ec = src_->read(req.addr, page)) {
                reject(id, "source cannot serve addr {:#x} page size {}: {}", req.addr, req.page_size,
                       read_ec.message());
                break;
            }
            const auto header = wire::encode_reply_header({req.addr, req.page_size});
            ec = wire::send_all(fd.get(), header, page, wake_.get());
            if (ec == errc::shutting_down) break;
            if (ec) {
                note("client {}: sending a reply: {}; closing", id, ec.message());
                break;
            }
            served_.fetch_add(1, std::memory_order_relaxed);
        }
        fd.reset(); // the client sees the hang-up before active_clients() drops
        active_.fetch_sub(1, std::memory_order_relaxed);
    }

    Source* src_;
    std::string path_;
    options opts_;
    detail::unique_fd wake_;   // eventfd; readable once stop() has begun
    detail::unique_fd listen_;
    bool bound_ = false;       // we created the socket file at path_ ...
    dev_t bound_dev_{};        // ... and it is this inode
    ino_t bound_ino_{};
    detail::named_thread accept_thread_;
    std::list<client_slot> clients_; // owned by the accept thread while it runs; stable addresses
    std::uint64_t next_id_ = 0;      // accept thread only; numbers clients in log lines
    std::atomic<bool> stopping_{false};
    std::atomic<std::size_t> active_{0};
    std::atomic<std::uint64_t> accepted_{0};
    std::atomic<std::uint64_t> refused_{0};
    std::atomic<std::uint64_t> rejected_{0};
    std::atomic<std::uint64_t> served_{0};
    std::mutex log_mutex_;
    std::mutex stop_mutex_;
    bool stopped_ = false; // guarded by stop_mutex_
};

} // namespace squib
