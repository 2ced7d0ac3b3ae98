// squib-pager: the Mach exception-port backend (macOS), one server loop for
// any MachApi: squib::mach::darwin_api on a Mac, squib::mach::sim::task_api
// in tests on any host.
#pragma once

#include <squib/backend/mach/api.hpp>
#include <squib/backend/mach/codec.hpp>
#include <squib/backend/mach/policy.hpp>
#include <squib/concepts.hpp>
#include <squib/core/page.hpp>
#include <squib/core/region.hpp>
#include <squib/core/result.hpp>
#include <squib/detail/published.hpp>
#include <squib/detail/thread.hpp>
#include <squib/error.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <span>
#include <stop_token>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace squib {

namespace mach {
/// What the Mach backend did, counted since construction.
struct backend_counters {
    std::uint64_t served = 0;           ///< faults in a region answered KERN_SUCCESS after installing the page
    std::uint64_t fault_errors = 0;     ///< faults in a region the pager failed to serve (then forwarded)
    std::uint64_t forwarded = 0;        ///< exceptions sent on to the prior handler
    std::uint64_t forward_failures = 0; ///< exceptions that could not be forwarded (answered KERN_FAILURE)
    std::uint64_t unhandled = 0;        ///< exceptions with no prior handler (answered KERN_FAILURE)
    std::uint64_t dead_priors = 0;      ///< prior handlers dropped because their port died
    std::uint64_t prior_lost = 0;       ///< forwards whose reply right the prior handler dropped
    std::uint64_t reinstalls = 0;       ///< drift checks that put our port back
    std::uint64_t drift_checks = 0;     ///< drift checks run
    std::uint64_t drift_errors = 0;     ///< drift checks whose Mach calls failed
    std::uint64_t malformed = 0;        ///< requests or replies refused by the codec
    std::uint64_t reply_failures = 0;   ///< replies that could not be sent (the faulting thread is gone)
    std::uint64_t receive_errors = 0;   ///< receives that failed other than by timing out
    friend bool operator==(const backend_counters&, const backend_counters&) = default;
};

/// msgh_id of the header-only message stop() sends to wake the server loop.
inline constexpr std::int32_t wake_message_id = 0x5351'4257; // "SQBW"
} // namespace mach

/// Serves page faults that macOS raises as Mach exceptions.
///
/// start() allocates an exception port, swaps it in as the task's
/// EXC_BAD_ACCESS handler (task_swap_exception_ports) and keeps what it
/// displaced as the prior handler; a named thread then receives exception
/// messages with a timeout of one poll interval. An EXC_BAD_ACCESS in a
/// registered range is served: the pager reads the page and installs it
/// through this backend (protect the page read/write, copy the bytes), and
/// the reply KERN_SUCCESS resumes the thread. Anything else is forwarded to
/// the prior handler, re-encoded in its behavior and flavor (64-bit codes cut
/// to 32 bits if it lacks MACH_EXCEPTION_CODES), and its reply is relayed to
/// the faulting thread. Every poll interval the loop checks the task's
/// exception ports: if a debugger replaced our port (LLDB does on attach, and
/// restores what it saved on detach) it swaps itself back in and takes the
/// port it found as the new prior handler. stop() restores the prior handler
/// and releases every port and right.
///
/// The fault path allocates nothing: buffers, forward slots and the page
/// scratch are made by start(). Errors are values, thread spawn included.
///
/// **Example** (on a Mac)
///
///     using mac_pager = squib::pager<squib::mapped_file_source, squib::flat_index,
///                                    squib::mach_backend<squib::mach::darwin_api>, squib::atomic_stats>;
///     mac_pager p{std::move(*src)};
///     if (auto ec = p.register_region({.base = guest_ram, .size = ram_size, .page_size = 16384})) fail(ec);
///     if (auto ec = p.start()) fail(ec);
///
/// Limits: ranges must be reserved by the caller with no access (PROT_NONE)
/// so that every first touch faults; a page is installed by making it
/// read/write and then copying, so another thread that touches the page in
/// that window (without faulting) can see it partly copied.
template <mach::MachApi Api>
class mach_backend {
public:
    struct options {
        std::string thread_name = "squib-mach";   ///< shown by debuggers and top -H (15 characters kept)
        std::size_t stack_size = 0;               ///< 0: the system default
        std::uint32_t behavior = mach::exception_default | mach::mach_exception_codes; ///< what we install with
        std::optional<std::int32_t> flavor;       ///< default: Api::thread_state_none
        std::uint64_t max_page_size = page_2m;    ///< largest region page size; sizes the page scratch
        std::size_t forward_slots = 8;            ///< exceptions that may wait on the prior handler at once
        std::chrono::nanoseconds send_timeout = std::chrono::milliseconds{100}; ///< a full queue fails the send
    };

    explicit mach_backend(Api api, options opts = {}) : api_(std::move(api)), opts_(std::move(opts)) {}
    mach_backend()
        requires std::default_initializable<Api>
        : mach_backend(Api{})
    {
    }
    mach_backend(const mach_backend&) = delete;
    mach_backend& operator=(const mach_backend&) = delete;
    ~mach_backend() { stop(); }

    // ---- ExceptionBackend ----------------------------------------------------------

    /// Installs our exception port and starts the server thread.
    /// Errors: errc::already_running; std::errc::not_enough_memory; the Mach
    /// error of allocating a port or swapping the exception ports; the thread
    /// spawn error (then the prior handler is back in place and no port is left).
    template <class Handler>
    [[nodiscard]] std::error_code start(Handler& handler)
    {
        if (thread_.joinable()) return errc::already_running;
        if (auto ec = prepare()) return ec;
        try {
            stop_ = std::stop_source{}; // a fresh one: a stop_source cannot be un-stopped
        } catch (const std::bad_alloc&) {
            return std::make_error_code(std::errc::not_enough_memory);
        }
        if (auto ec = open_ports()) return ec;
        if (auto ec = install()) {
            close_ports();
            return ec;
        }
        {
            std::lock_guard lock(wake_mutex_);
            wake_port_ = port_.load(std::memory_order_relaxed);
        }
        // Wake at once when the pager's shutdown is requested, not at the next receive timeout.
        on_shutdown_.emplace(handler.stop_token(), request{&stop_});
        on_stop_.emplace(stop_.get_token(), waker{this});
        auto t = detail::named_thread::spawn(opts_.thread_name, opts_.stack_size,
                                             [this, &handler]() noexcept { run(handler); });
        if (!t) {
            on_stop_.reset();
            on_shutdown_.reset();
            teardown(handler);
            return t.error();
        }
        thread_ = std::move(*t);
        return {};
    }

    /// Stops the server thread: it restores the prior handler, answers what
    /// is still queued or waiting on the prior handler, and releases every
    /// port; then it is joined. Returns promptly: a wake-up message ends the
    /// receive, however long the poll interval.
    void stop() noexcept
    {
        stop_.request_stop();
        thread_.join();
        on_stop_.reset();
        on_shutdown_.reset();
    }

    /// Starts tracking which pages of `r` are installed.
    /// Errors: errc::bad_page_size above options::max_page_size; std::errc::not_enough_memory.
    [[nodiscard]] std::error_code register_range(const region& r)
    {
        if (r.page_size > opts_.max_page_size) return errc::bad_page_size;
        try {
            auto tracked = std::make_shared<tracked_range>(r);
            std::lock_guard lock(ranges_mutex_);
            auto next = std::make_unique<range_list>(ranges_.writer_view());
            next->push_back(std::move(tracked));
            ranges_.replace(std::move(next));
        } catch (const std::bad_alloc&) {
            return std::make_error_code(std::errc::not_enough_memory);
        }
        return {};
    }

    /// Errors: errc::region_not_found; std::errc::not_enough_memory.
    [[nodiscard]] std::error_code unregister_range(const region& r)
    {
        try {
            std::lock_guard lock(ranges_mutex_);
            auto next = std::make_unique<range_list>(ranges_.writer_view());
            auto it = std::find_if(next->begin(), next->end(), [&](const auto& t) { return t->where == r; });
            if (it == next->end()) return errc::region_not_found;
            next->erase(it);
            ranges_.replace(std::move(next));
        } catch (const std::bad_alloc&) {
            return std::make_error_code(std::errc::not_enough_memory);
        }
        return {};
    }

    // ---- PageInstaller ---------------------------------------------------------------

    /// Makes the page at `addr` read/write and copies `bytes` (one page of its
    /// region) into it. A page already installed is success and is not
    /// copied again: the thread that faulted first may have written to it.
    /// Errors: errc::out_of_region, errc::unaligned_address, errc::bad_length,
    /// the Mach error of protect or write.
    [[nodiscard]] std::error_code install(std::uint64_t addr, std::span<const std::byte> bytes) noexcept
    {
        return install_page(addr, bytes.size(), [&]() noexcept { return api_.write(addr, bytes); });
    }

    /// As install(), with zeros.
    [[nodiscard]] std::error_code install_zero(std::uint64_t addr, std::uint64_t len) noexcept
    {
        return install_page(addr, len, [&]() noexcept { return api_.fill_zero(addr, len); });
    }

    // ---- inspection ------------------------------------------------------------------------

    /// Our exception port while running, else MACH_PORT_NULL.
    [[nodiscard]] mach::port_name port() const noexcept { return port_.load(std::memory_order_acquire); }

    [[nodiscard]] mach::backend_counters counters() const noexcept
    {
        mach::backend_counters c;
        c.served = load(served_);
        c.fault_errors = load(fault_errors_);
        c.forwarded = load(forwarded_);
        c.forward_failures = load(forward_failures_);
        c.unhandled = load(unhandled_);
        c.dead_priors = load(dead_priors_);
        c.prior_lost = load(prior_lost_);
        c.reinstalls = load(reinstalls_);
        c.drift_checks = load(drift_checks_);
        c.drift_errors = load(drift_errors_);
        c.malformed = load(malformed_);
        c.reply_failures = load(reply_failures_);
        c.receive_errors = load(receive_errors_);
        return c;
    }

    /// Blocks until at least `n` drift checks have completed. Call it only
    /// while the backend runs. Two more than counters().drift_checks
    /// guarantees a check that started after the call.
    void await_drift_checks(std::uint64_t n) const noexcept
    {
        for (std::uint64_t seen = drift_checks_.load(std::memory_order_acquire); seen < n;
             seen = drift_checks_.load(std::memory_order_acquire))
            drift_checks_.wait(seen, std::memory_order_acquire);
    }

    [[nodiscard]] Api& api() noexcept { return api_; }

private:
    using port_name = mach::port_name;

    /// Which pages of one registered region are installed. Two bits per page:
    /// `claimed` by the installer copying it, `present` once copied.
    struct tracked_range {
        explicit tracked_range(const region& r)
            : where(r), words((r.size / r.page_size + 63) / 64),
              claimed(std::make_unique<std::atomic<std::uint64_t>[]>(words)),
              present(std::make_unique<std::atomic<std::uint64_t>[]>(words))
        {
        }
        region where;
        std::size_t words;
        std::unique_ptr<std::atomic<std::uint64_t>[]> claimed;
        std::unique_ptr<std::atomic<std::uint64_t>[]> present;
    };
    using range_list = std::vector<std::shared_ptr<tracked_range>>;

    /// One exception waiting on the prior handler: the original request as
    /// received (its reply right and thread/task rights), until the prior answers.
    struct forward_slot {
        port_name reply_port = mach::port_null; // receives the prior handler's reply
        bool busy = false;
        std::size_t length = 0;
        mach::forward_summary forwarded;
        alignas(8) std::array<std::byte, mach::max_request_size> original{};
    };

    /// Everything the server loop touches, made once by start().
    struct server_state {
        alignas(16) std::array<std::byte, mach::receive_buffer_size> rx{};
        alignas(16) std::array<std::byte, mach::receive_buffer_size> tx{};
        mach::exception_request req;
        mach::exception_request fwd;
        mach::exception_reply reply_in;
        mach::exception_reply reply_out;
        std::unique_ptr<std::byte[]> scratch;
        std::unique_ptr<forward_slot[]> slots;
        std::size_t slot_count = 0;
        mach::prior_chain chain;
    };

    struct request {
        std::stop_source* source;
        void operator()() const noexcept { source->request_stop(); }
    };
    struct waker {
        mach_backend* self;
        void operator()() const noexcept { self->send_wake(); }
    };

    static std::uint64_t load(const std::atomic<std::uint64_t>& c) noexcept { return c.load(std::memory_order_relaxed); }
    static void bump(std::atomic<std::uint64_t>& c) noexcept { c.fetch_add(1, std::memory_order_relaxed); }

    [[nodiscard]] mach::install_behavior configured() const noexcept
    {
        return {opts_.behavior, opts_.flavor.value_or(Api::thread_state_none)};
    }

    // ---- setup -------------------------------------------------------------------------------

    std::error_code prepare() noexcept
    {
        if (state_) return {};
        std::unique_ptr<server_state> s(new (std::nothrow) server_state);
        if (!s) return std::make_error_code(std::errc::not_enough_memory);
        s->scratch.reset(new (std::nothrow) std::byte[opts_.max_page_size]);
        s->slot_count = std::max<std::size_t>(opts_.forward_slots, 1);
        s->slots.reset(new (std::nothrow) forward_slot[s->slot_count]);
        if (!s->scratch || !s->slots) return std::make_error_code(std::errc::not_enough_memory);
        state_ = std::move(s);
        return {};
    }

    std::error_code open_ports() noexcept
    {
        auto p = api_.allocate_port();
        if (!p) return p.error();
        port_.store(*p, std::memory_order_release);
        auto set = api_.allocate_port_set();
        if (!set) {
            close_ports();
            return set.error();
        }
        set_ = *set;
        if (auto ec = api_.add_to_set(*p, set_)) {
            close_ports();
            return ec;
        }
        for (std::size_t i = 0; i < state_->slot_count; ++i) {
            auto r = api_.allocate_port();
            if (r) state_->slots[i].reply_port = *r;
            std::error_code ec = r ? api_.add_to_set(*r, set_) : r.error();
            if (ec) {
                close_ports();
                return ec;
            }
        }
        return {};
    }

    void close_ports() noexcept
    {
        {
            std::lock_guard lock(wake_mutex_); // no wake-up may be sent to a name being released
            wake_port_ = mach::port_null;
        }
        for (std::size_t i = 0; i < state_->slot_count; ++i) {
            forward_slot& s = state_->slots[i];
            if (mach::port_valid(s.reply_port)) api_.release_port(s.reply_port);
            s.reply_port = mach::port_null;
            s.busy = false;
        }
        if (mach::port_valid(set_)) api_.release_port(set_);
        set_ = mach::port_null;
        const port_name p = port_.exchange(mach::port_null, std::memory_order_acq_rel);
        if (mach::port_valid(p)) api_.release_port(p);
        state_->chain.clear(releaser());
    }

    /// Swaps our port in for EXC_BAD_ACCESS and keeps what it displaced.
    std::error_code install() noexcept
    {
        mach::handler_table current;
        if (auto ec = api_.get_exception_ports(mach::exc_mask_bad_access, current)) return ec;
        const auto own = mach::own_behavior(configured(), current.find(mach::exc_bad_access));
        release_rows(current);
        mach::handler_table old;
        if (auto ec = api_.swap_exception_ports(mach::exc_mask_bad_access, port(), own.behavior, own.flavor, old))
            return ec;
        adopt_rows(old);
        return {};
    }

    [[nodiscard]] auto releaser() noexcept
    {
        return [this](port_name n) noexcept { api_.deallocate(n); };
    }

    void release_rows(const mach::handler_table& t) noexcept
    {
        for (const mach::handler_entry& row : t.rows())
            if (mach::port_valid(row.port)) api_.deallocate(row.port);
    }

    void adopt_rows(const mach::handler_table& t) noexcept
    {
        for (const mach::handler_entry& row : t.rows()) {
            if ((row.mask & mach::exc_mask_bad_access) != 0)
                state_->chain.adopt(row, port(), releaser());
            else if (mach::port_valid(row.port))
                api_.deallocate(row.port);
        }
    }

    // ---- the server loop ------------------------------------------------------------------------

    static std::chrono::nanoseconds clamp_interval(std::chrono::nanoseconds i) noexcept
    {
        return std::clamp<std::chrono::nanoseconds>(i, std::chrono::microseconds{1}, std::chrono::hours{24});
    }

    template <class Handler>
    void run(Handler& handler) noexcept
    {
        using clock = std::chrono::steady_clock;
        const std::stop_token token = stop_.get_token();
        clock::time_point next_check = clock::now() + clamp_interval(handler.poll_interval());
        while (!token.stop_requested()) {
            clock::time_point now = clock::now();
            if (now >= next_check) {
                drift_check(handler);
                now = clock::now();
                next_check = now + clamp_interval(handler.poll_interval());
            }
            const auto timeout = std::chrono::duration_cast<std::chrono::nanoseconds>(next_check - now);
            auto got = api_.receive(set_, state_->rx, timeout);
            if (got) {
                dispatch(handler, *got, false);
            } else if (!mach::is_kern(got.error(), mach::mach_rcv_timed_out) &&
                       !mach::is_kern(got.error(), mach::mach_rcv_interrupted)) {
                bump(receive_errors_);
                idle_until(token, next_check); // do not spin on a persistent failure
            }
        }
        teardown(handler);
    }

    void idle_until(const std::stop_token& token, std::chrono::steady_clock::time_point when) noexcept
    {
        std::mutex m;
        std::condition_variable_any cv;
        std::unique_lock lock(m);
        cv.wait_until(lock, token, when, [] { return false; }); // returns early on a stop request
    }

    template <class Handler>
    void dispatch(Handler& handler, std::size_t length, bool draining) noexcept
    {
        const std::span<std::byte> msg = std::span<std::byte>(state_->rx).first(std::min(length, state_->rx.size()));
        mach::message_header h;
        if (mach::decode_header(msg, h)) {
            bump(malformed_); // the kernel never delivers this; nothing in it can be trusted, not even to destroy
            return;
        }
        if (h.local == port()) return on_request(handler, msg, h, draining);
        for (std::size_t i = 0; i < state_->slot_count; ++i)
            if (h.local == state_->slots[i].reply_port) return on_forward_reply(state_->slots[i], msg, h);
        api_.destroy_message(msg);
    }

    template <class Handler>
    void on_request(Handler& handler, std::span<std::byte> msg, const mach::message_header& h, bool draining) noexcept
    {
        server_state& s = *state_;
        if (h.id == mach::wake_message_id) { // stop() wants the loop to look at its token
            api_.destroy_message(msg);
            return;
        }
        if (auto ec = mach::decode_request(msg, s.req)) {
            bump(malformed_);
            reply_error(msg, h, mach::mig_return_for(ec));
            return;
        }
        const auto c = mach::classify(s.req, [this](std::uint64_t a) noexcept { return in_region(a); });
        if (c.action == mach::verdict::handle) {
            const std::error_code ec =
                handler.handle_fault(c.address, std::span<std::byte>(s.scratch.get(), opts_.max_page_size), *this);
            if (!ec) {
                bump(served_);
                reply(msg, mach::kern_success);
                return;
            }
            // Not served (unregistered meanwhile, or the source failed): the
            // exception stays unhandled, so the prior handler gets to see it.
            if (ec != errc::out_of_region) bump(fault_errors_);
        }
        if (draining) { // our port is leaving: the retried access reaches the restored handler directly
            reply(msg, mach::kern_success);
            return;
        }
        forward(handler, msg);
    }

    /// The live prior handler, dropping any whose port died; nullptr if there
    /// is none (or the recorded prior is "no handler").
    const mach::handler_entry* live_prior() noexcept
    {
        server_state& s = *state_;
        while (const mach::handler_entry* top = s.chain.top()) {
            if (top->port == mach::port_null) return nullptr;
            if (top->port != mach::port_dead) {
                auto type = api_.port_type(top->port);
                if (type && !mach::is_dead_name(*type)) return top;
            }
            s.chain.drop_top(releaser());
            bump(dead_priors_);
        }
        return nullptr;
    }

    template <class Handler>
    void forward(Handler& handler, std::span<std::byte> msg) noexcept
    {
        server_state& s = *state_;
        for (std::size_t attempt = 0; attempt <= mach::prior_chain::capacity; ++attempt) {
            const mach::handler_entry* prior = live_prior();
            if (prior == nullptr) break;
            forward_slot* slot = free_slot();
            if (slot == nullptr) return fail_forward(msg);
            auto fetch = [this](port_name thread, std::int32_t flavor, std::span<std::uint32_t> words) noexcept {
                return api_.get_thread_state(thread, flavor, words);
            };
            if (mach::build_forward(s.req, *prior, slot->reply_port, fetch, s.fwd)) return fail_forward(msg);
            auto size = mach::encode_request(s.fwd, s.tx);
            if (!size) return fail_forward(msg);
            const std::error_code ec = api_.send(std::span<std::byte>(s.tx).first(*size), opts_.send_timeout);
            if (mach::is_kern(ec, mach::mach_send_invalid_dest)) { // it died since live_prior() looked
                s.chain.drop_top(releaser());
                bump(dead_priors_);
                continue;
            }
            if (ec) return fail_forward(msg);
            slot->busy = true;
            slot->forwarded = {s.fwd.kind, s.fwd.header.id, s.fwd.flavor};
            slot->length = msg.size();
            std::copy(msg.begin(), msg.end(), slot->original.begin());
            bump(forwarded_);
            handler.note_forward();
            return;
        }
        bump(unhandled_); // nobody else wants it: the kernel moves on to the host level
        reply(msg, mach::kern_failure);
    }

    void fail_forward(std::span<std::byte> msg) noexcept
    {
        bump(forward_failures_);
        reply(msg, mach::kern_failure);
    }

    forward_slot* free_slot() noexcept
    {
        for (std::size_t i = 0; i < state_->slot_count; ++i)
            if (!state_->slots[i].busy) return &state_->slots[i];
        return nullptr;
    }

    void on_forward_reply(forward_slot& slot, std::span<std::byte> msg, const mach::message_header& h) noexcept
    {
        server_state& s = *state_;
        if (!slot.busy) { // a late answer to a forward already settled
            api_.destroy_message(msg);
            return;
        }
        const std::span<std::byte> original = std::span<std::byte>(slot.original).first(slot.length);
        slot.busy = false;
        if (mach::decode_request(original, s.req)) { // it decoded when it arrived; cannot fail
            api_.destroy_message(original);
            api_.destroy_message(msg);
            return;
        }
        if (h.id == mach::mach_notify_send_once) {
            bump(prior_lost_); // the prior handler died holding it, or dropped it: unhandled
            reply(original, mach::kern_failure);
        } else if (mach::decode_reply(msg, s.reply_in) ||
                   s.reply_in.header.id != mach::reply_id(slot.forwarded.id)) {
            bump(malformed_);
            reply(original, mach::kern_failure);
        } else {
            const auto plan = mach::translate_reply(s.req, slot.forwarded, s.reply_in, s.reply_out);
            if (plan.set_state &&
                api_.set_thread_state(s.req.thread.name, slot.forwarded.flavor, s.reply_in.state_span())) {
                mach::make_reply(s.req, mach::kern_failure, s.reply_out);
            } else if (plan.refresh_state) {
                auto n = api_.get_thread_state(s.req.thread.name, s.req.flavor, std::span<std::uint32_t>(s.reply_out.state));
                if (n)
                    s.reply_out.state_count = *n;
                else
                    mach::make_reply(s.req, mach::kern_failure, s.reply_out);
            }
            send_reply(original, s.reply_out);
        }
        api_.destroy_message(msg);
    }

    /// Answers the request in `msg` (decoded in state_->req) with `rc`.
    void reply(std::span<std::byte> msg, mach::kern_return rc) noexcept
    {
        mach::make_reply(state_->req, rc, state_->reply_out);
        send_reply(msg, state_->reply_out);
    }

    /// Sends `rep` to the reply port of `msg`, then releases the rights `msg` still carries.
    void send_reply(std::span<std::byte> msg, const mach::exception_reply& rep) noexcept
    {
        auto size = mach::encode_reply(rep, state_->tx);
        if (size && !api_.send(std::span<std::byte>(state_->tx).first(*size), opts_.send_timeout))
            mach::clear_reply_port(msg); // the send moved the reply right
        else
            bump(reply_failures_);
        api_.destroy_message(msg);
    }

    void reply_error(std::span<std::byte> msg, const mach::message_header& h, mach::kern_return rc) noexcept
    {
        if (mach::can_reply(h)) {
            auto size = mach::encode_error_reply(h, rc, state_->tx);
            if (size && !api_.send(std::span<std::byte>(state_->tx).first(*size), opts_.send_timeout))
                mach::clear_reply_port(msg);
        }
        api_.destroy_message(msg);
    }

    template <class Handler>
    void drift_check(Handler& handler) noexcept
    {
        check_table(handler);
        drift_checks_.fetch_add(1, std::memory_order_release);
        drift_checks_.notify_all();
    }

    template <class Handler>
    void check_table(Handler& handler) noexcept
    {
        mach::handler_table current;
        if (api_.get_exception_ports(mach::exc_mask_bad_access, current)) {
            bump(drift_errors_);
            return;
        }
        if (mach::check_drift(port(), current) == mach::drift::none) {
            release_rows(current);
            return;
        }
        // Replaced (a debugger attached, or detached and restored what it
        // saved): put our port back; what we displace is the new prior.
        const auto own = mach::own_behavior(configured(), current.find(mach::exc_bad_access));
        mach::handler_table old;
        const std::error_code ec =
            api_.swap_exception_ports(mach::exc_mask_bad_access, port(), own.behavior, own.flavor, old);
        release_rows(current);
        if (ec) {
            bump(drift_errors_);
            return;
        }
        adopt_rows(old);
        bump(reinstalls_);
        handler.note_reinstall();
    }

    /// Puts the prior handler back (if the table still holds ours), answers
    /// what is queued and what waits on the prior, releases every port.
    template <class Handler>
    void teardown(Handler& handler) noexcept
    {
        restore();
        for (int i = 0; i < 4096; ++i) { // bounded: a flood cannot keep us here
            auto got = api_.receive(set_, state_->rx, std::chrono::nanoseconds::zero());
            if (!got) break;
            dispatch(handler, *got, true);
        }
        for (std::size_t i = 0; i < state_->slot_count; ++i) {
            forward_slot& slot = state_->slots[i];
            if (!slot.busy) continue;
            slot.busy = false;
            const std::span<std::byte> original = std::span<std::byte>(slot.original).first(slot.length);
            // Retry: the access faults again and reaches the restored handler directly.
            if (!mach::decode_request(original, state_->req))
                reply(original, mach::kern_success);
            else
                api_.destroy_message(original);
        }
        close_ports();
    }

    void restore() noexcept
    {
        mach::handler_table current;
        if (api_.get_exception_ports(mach::exc_mask_bad_access, current)) return;
        const bool ours = mach::check_drift(port(), current) == mach::drift::none;
        release_rows(current);
        if (!ours) return; // someone else owns the table now; leave it to them
        static_cast<void>(live_prior()); // never restore a dead port
        const mach::handler_entry* top = state_->chain.top();
        const bool valid = top != nullptr && mach::kind_for_behavior(top->behavior).has_value();
        const port_name p = top != nullptr ? top->port : mach::port_null;
        static_cast<void>(api_.set_exception_ports(mach::exc_mask_bad_access, p,
                                                   valid ? top->behavior : mach::exception_default,
                                                   valid ? top->flavor : Api::thread_state_none));
    }

    void send_wake() noexcept
    {
        std::lock_guard lock(wake_mutex_);
        if (!mach::port_valid(wake_port_)) return;
        alignas(8) std::array<std::byte, mach::header_size> bytes{};
        const mach::message_header h{mach::msgh_bits(mach::msg_type_copy_send, 0), 0, wake_port_, mach::port_null,
                                     mach::port_null, mach::wake_message_id};
        // Timeout 0: a full queue means the loop is busy and will see the stop request anyway.
        if (auto size = mach::encode_header_only(h, bytes))
            static_cast<void>(api_.send(std::span<std::byte>(bytes).first(*size), std::chrono::nanoseconds::zero()));
    }

    // ---- installing pages ------------------------------------------------------------------------

    [[nodiscard]] bool in_region(std::uint64_t addr) const noexcept
    {
        return ranges_.read([addr](const range_list& list) noexcept {
            return std::any_of(list.begin(), list.end(), [addr](const auto& t) { return t->where.contains(addr); });
        });
    }

    template <class Fill>
    std::error_code install_page(std::uint64_t addr, std::uint64_t len, Fill&& fill) noexcept
    {
        return ranges_.read([&](const range_list& list) noexcept -> std::error_code {
            auto it = std::find_if(list.begin(), list.end(), [addr](const auto& t) { return t->where.contains(addr); });
            if (it == list.end()) return errc::out_of_region;
            tracked_range& t = **it;
            if (!is_aligned(addr - t.where.base, t.where.page_size)) return errc::unaligned_address;
            if (len != t.where.page_size) return errc::bad_length;
            const std::uint64_t index = (addr - t.where.base) / t.where.page_size;
            std::atomic<std::uint64_t>& claimed = t.claimed[index / 64];
            std::atomic<std::uint64_t>& present = t.present[index / 64];
            const std::uint64_t bit = std::uint64_t{1} << (index % 64);
            for (;;) {
                if ((present.load(std::memory_order_acquire) & bit) != 0) return {};
                if ((claimed.fetch_or(bit, std::memory_order_acq_rel) & bit) == 0) break; // ours to copy
                // Another installer (prewarm, or a racing fault) is copying it: wait for it to finish or give up.
                while ((claimed.load(std::memory_order_acquire) & bit) != 0 &&
                       (present.load(std::memory_order_acquire) & bit) == 0)
                    std::this_thread::yield();
            }
            std::error_code ec = api_.protect(addr, len, mach::vm_prot_read | mach::vm_prot_write);
            if (!ec) ec = fill();
            if (ec) {
                claimed.fetch_and(~bit, std::memory_order_release);
                return ec;
            }
            present.fetch_or(bit, std::memory_order_release);
            return {};
        });
    }

    Api api_;
    options opts_;
    std::unique_ptr<server_state> state_;       // made by the first start(); the server thread's alone while it runs
    std::atomic<port_name> port_{mach::port_null};
    port_name set_ = mach::port_null;            // the port set the loop receives on: our port and the reply ports
    std::mutex wake_mutex_;                      // a wake-up is never sent to a name being released
    port_name wake_port_ = mach::port_null;      // guarded by wake_mutex_
    std::mutex ranges_mutex_;                    // serialises range changes; never taken by faults
    detail::published<range_list> ranges_{std::make_unique<range_list>()};
    std::stop_source stop_;
    std::optional<std::stop_callback<request>> on_shutdown_;
    std::optional<std::stop_callback<waker>> on_stop_;
    detail::named_thread thread_;
    std::atomic<std::uint64_t> served_{0}, fault_errors_{0}, forwarded_{0}, forward_failures_{0}, unhandled_{0},
        dead_priors_{0}, prior_lost_{0}, reinstalls_{0}, drift_checks_{0}, drift_errors_{0}, malformed_{0},
        reply_failures_{0}, receive_errors_{0};
};

static_assert(ExceptionBackend<mach_backend<mach::detail::mach_api_archetype>>,
              "mach_backend must model ExceptionBackend for any MachApi");

} // namespace squib
