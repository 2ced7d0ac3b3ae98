// squib-pager: a simulated Mach kernel, so the Mach backend's server loop
// runs — and is tested — on any host. Not included by squib/pager.hpp; users
// may test their own Mach code against it.
//
// What it models, after xnu:
//  * IPC spaces (one per simulated process) holding named rights: receive,
//    send (counted user references, one name per port), send-once (a name
//    each), port sets, and dead names once a port's receive right is gone.
//  * mach_msg: rights are copied in from the sender's space by disposition
//    (copy/move/make send, make/move send-once) and copied out into the
//    receiver's space, header and port descriptors rewritten; a message to a
//    dead port fails with MACH_SEND_INVALID_DEST; receives wait with a timeout.
//    Destroyed send-once rights send a MACH_NOTIFY_SEND_ONCE message.
//  * exception port tables (thread, task, host) with masks, behaviors and
//    flavors, and task_get/set/swap_exception_ports over them.
//  * faulting threads: touch() an address; a missing or protected page raises
//    EXC_BAD_ACCESS, which is delivered in the triage order thread, task, host,
//    encoded with each handler's behavior and flavor by the codec; the thread
//    blocks until a reply, applies returned state, and retries the access on
//    KERN_SUCCESS, else tries the next level; with no level left it is
//    "signalled" (on macOS, the BSD layer would send SIGBUS/SIGSEGV).
//  * exception_server: a process with an exception port that answers what it
//    receives with a scripted callback (or holds replies, or dies); debugger:
//    one that attaches like LLDB's debugserver (saves every task exception
//    port, installs its own for all types) and detaches (restores what it saved).
//
// Not modelled: queue limits (sends never block), vouchers, OOL memory,
// no-senders notifications, thread_id tokens beyond a fresh port per raise.
#pragma once

#include <squib/backend/mach/api.hpp>
#include <squib/backend/mach/codec.hpp>
#include <squib/backend/mach/policy.hpp>
#include <squib/core/result.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace squib::mach::sim {

using space_id = std::uint32_t;
using port_id = std::uint64_t;
using thread_id = std::uint64_t;

inline constexpr port_id no_port = 0;
inline constexpr port_id dead_port = ~port_id{0};

inline constexpr std::int32_t thread_state_none = 5; ///< as THREAD_STATE_NONE on arm64
inline constexpr std::int32_t flavor_basic = 1;      ///< a 4-word register file
inline constexpr std::int32_t flavor_full = 6;       ///< 68 words, as ARM_THREAD_STATE64

/// Words of thread state in `flavor`, 0 for a flavor the simulated CPU lacks.
[[nodiscard]] constexpr std::uint32_t state_words(std::int32_t flavor) noexcept
{
    return flavor == flavor_basic ? 4 : flavor == flavor_full ? 68 : 0;
}

inline constexpr std::uint32_t exc_mask_all = 0x1ffeu;   ///< exception types 1..12, what a debugger takes
inline constexpr std::uint32_t exc_mask_valid = 0x3ffeu; ///< types 1..13
inline constexpr std::uint64_t sim_page_size = 4096;

enum class access : std::uint8_t { read, write };

/// What became of one simulated memory access.
struct access_outcome {
    enum class status : std::uint8_t {
        completed, ///< the access went through (perhaps after exceptions were handled)
        signalled, ///< no handler answered KERN_SUCCESS: the BSD layer would signal the thread
        gave_up,   ///< handlers kept answering success without fixing the page
    };
    status result = status::completed;
    std::byte value{};               ///< the byte read (or written)
    unsigned exceptions = 0;         ///< exceptions raised on the way
    kern_return last = kern_success; ///< the last handler's answer
};

/// Which exception port table an operation addresses.
struct exception_target {
    enum class level : std::uint8_t { thread, task, host };
    level which = level::task;
    thread_id thread = 0;
    [[nodiscard]] static constexpr exception_target task() noexcept { return {level::task, 0}; }
    [[nodiscard]] static constexpr exception_target host() noexcept { return {level::host, 0}; }
    [[nodiscard]] static constexpr exception_target of_thread(thread_id t) noexcept { return {level::thread, t}; }
};

/// The simulated kernel. Every public call is thread-safe (one lock, one
/// condition variable); calls that wait release the lock while waiting.
class kernel {
public:
    kernel()
    {
        std::lock_guard lock(m_);
        task_space_ = new_space();
        task_port_ = new_port(kernel_receiver, kobject::task, 0);
    }
    kernel(const kernel&) = delete;
    kernel& operator=(const kernel&) = delete;

    // ---- processes and threads ---------------------------------------------------

    /// The IPC space of the simulated task (the VMM the pager runs in).
    [[nodiscard]] space_id task_space() const noexcept { return task_space_; }

    /// A new process (its own IPC space), e.g. a debugger or crash reporter.
    [[nodiscard]] space_id create_space()
    {
        std::lock_guard lock(m_);
        return new_space();
    }

    /// The process exits: its receive rights die (queued messages are
    /// destroyed), its send-once rights send notifications, the rest vanish.
    void destroy_space(space_id s)
    {
        std::lock_guard lock(m_);
        auto it = spaces_.find(s);
        if (it == spaces_.end()) return;
        space_obj sp = std::move(it->second);
        spaces_.erase(it);
        for (auto& [name, r] : sp.names) {
            if (r.receive || r.is_set) destroy_port(r.port);
            for (std::uint32_t i = 0; i < r.send_once; ++i) notify_send_once(r.port);
        }
        cv_.notify_all();
    }

    /// A thread of the simulated task; its registers start as zeros.
    [[nodiscard]] thread_id create_thread()
    {
        std::lock_guard lock(m_);
        const thread_id t = next_thread_++;
        thread_obj th;
        th.port = new_port(kernel_receiver, kobject::thread, t);
        th.states[flavor_basic].assign(state_words(flavor_basic), 0);
        th.states[flavor_full].assign(state_words(flavor_full), 0);
        threads_.emplace(t, std::move(th));
        return t;
    }

    [[nodiscard]] std::vector<std::uint32_t> thread_state(thread_id t, std::int32_t flavor) const
    {
        std::lock_guard lock(m_);
        const auto& states = threads_.at(t).states;
        auto it = states.find(flavor);
        return it == states.end() ? std::vector<std::uint32_t>{} : it->second;
    }

    void set_registers(thread_id t, std::int32_t flavor, std::vector<std::uint32_t> words)
    {
        std::lock_guard lock(m_);
        threads_.at(t).states[flavor] = std::move(words);
    }

    // ---- memory of the simulated task ------------------------------------------------

    /// Maps zero-filled pages over [addr, addr + len) with protection `prot`.
    void map(std::uint64_t addr, std::uint64_t len, int prot)
    {
        std::lock_guard lock(m_);
        for (std::uint64_t a = addr & ~(sim_page_size - 1); a < addr + len; a += sim_page_size) {
            page& p = memory_[a];
            p.prot = prot;
            p.bytes.assign(sim_page_size, std::byte{0});
        }
    }

    /// The bytes at [addr, addr + len), ignoring protection (for checks).
    [[nodiscard]] std::vector<std::byte> peek(std::uint64_t addr, std::uint64_t len) const
    {
        std::lock_guard lock(m_);
        std::vector<std::byte> out;
        for (std::uint64_t a = addr; a < addr + len; ++a) {
            auto it = memory_.find(a & ~(sim_page_size - 1));
            out.push_back(it == memory_.end() ? std::byte{0} : it->second.bytes[a & (sim_page_size - 1)]);
        }
        return out;
    }

    [[nodiscard]] int protection(std::uint64_t addr) const
    {
        std::lock_guard lock(m_);
        auto it = memory_.find(addr & ~(sim_page_size - 1));
        return it == memory_.end() ? -1 : it->second.prot;
    }

    /// How many write() / fill_zero() calls touched the page of `addr`.
    [[nodiscard]] std::uint64_t writes(std::uint64_t addr) const
    {
        std::lock_guard lock(m_);
        auto it = memory_.find(addr & ~(sim_page_size - 1));
        return it == memory_.end() ? 0 : it->second.writes;
    }

    /// mach_vm_protect. Errors: KERN_INVALID_ADDRESS if a page is unmapped.
    kern_return protect(std::uint64_t addr, std::uint64_t len, int prot)
    {
        std::lock_guard lock(m_);
        if (!all_mapped(addr, len, 0)) return kern_invalid_address;
        for (std::uint64_t a = addr & ~(sim_page_size - 1); a < addr + len; a += sim_page_size) memory_[a].prot = prot;
        return kern_success;
    }

    /// A store by the task itself: fails unless every page is mapped writable.
    kern_return write(std::uint64_t addr, std::span<const std::byte> bytes)
    {
        std::lock_guard lock(m_);
        return store(addr, bytes.size(), [&](std::uint64_t i) { return bytes[i]; });
    }

    kern_return fill_zero(std::uint64_t addr, std::uint64_t len)
    {
        std::lock_guard lock(m_);
        return store(addr, len, [](std::uint64_t) { return std::byte{0}; });
    }

    // ---- ports -----------------------------------------------------------------------------

    /// mach_port_allocate(RECEIVE).
    [[nodiscard]] result<port_name> allocate_receive(space_id s)
    {
        std::lock_guard lock(m_);
        space_obj* sp = find_space(s);
        if (sp == nullptr) return kern_error(kern_invalid_argument);
        const port_id p = new_port(s, kobject::none, 0);
        const port_name n = new_name(*sp);
        sp->names[n] = right{.port = p, .receive = true};
        sp->by_port[p] = n;
        return n;
    }

    /// mach_port_insert_right(MAKE_SEND) on a receive right.
    kern_return insert_send(space_id s, port_name n)
    {
        std::lock_guard lock(m_);
        right* r = find_right(s, n);
        if (r == nullptr) return kern_invalid_name;
        if (!r->receive) return kern_invalid_right;
        ++r->send;
        return kern_success;
    }

    [[nodiscard]] result<port_name> allocate_port_set(space_id s)
    {
        std::lock_guard lock(m_);
        space_obj* sp = find_space(s);
        if (sp == nullptr) return kern_error(kern_invalid_argument);
        const port_id p = new_port(s, kobject::none, 0);
        ports_.at(p).is_set = true;
        const port_name n = new_name(*sp);
        sp->names[n] = right{.port = p, .is_set = true};
        sp->by_port[p] = n;
        return n;
    }

    /// mach_port_move_member.
    kern_return move_member(space_id s, port_name member, port_name set)
    {
        std::lock_guard lock(m_);
        right* m = find_right(s, member);
        right* st = find_right(s, set);
        if (m == nullptr || st == nullptr) return kern_invalid_name;
        if (!m->receive || !st->is_set) return kern_invalid_right;
        leave_set(m->port);
        ports_.at(m->port).set = st->port;
        ports_.at(st->port).members.push_back(m->port);
        cv_.notify_all();
        return kern_success;
    }

    /// mach_port_mod_refs(RECEIVE, -1): the port dies; send rights to it become dead names.
    kern_return destroy_receive(space_id s, port_name n)
    {
        std::lock_guard lock(m_);
        space_obj* sp = find_space(s);
        if (sp == nullptr) return kern_invalid_argument;
        auto it = sp->names.find(n);
        if (it == sp->names.end()) return kern_invalid_name;
        if (it->second.is_set) {
            destroy_port(it->second.port);
            erase_name(*sp, it);
        } else {
            if (!it->second.receive) return kern_invalid_right;
            it->second.receive = false;
            destroy_port(it->second.port);
            tidy(*sp, it);
        }
        cv_.notify_all();
        return kern_success;
    }

    /// mach_port_deallocate: one send / send-once / dead-name reference, or a port set.
    kern_return deallocate(space_id s, port_name n)
    {
        std::lock_guard lock(m_);
        space_obj* sp = find_space(s);
        if (sp == nullptr) return kern_invalid_argument;
        auto it = sp->names.find(n);
        if (it == sp->names.end()) return kern_invalid_name;
        right& r = it->second;
        if (r.is_set) {
            destroy_port(r.port);
            erase_name(*sp, it);
        } else if (r.send_once > 0) {
            --r.send_once;
            notify_send_once(r.port);
            tidy(*sp, it);
        } else if (r.send > 0) {
            --r.send;
            tidy(*sp, it);
        } else {
            return kern_invalid_right;
        }
        cv_.notify_all();
        return kern_success;
    }

    /// mach_port_type's bits.
    [[nodiscard]] result<std::uint32_t> port_type(space_id s, port_name n) const
    {
        std::lock_guard lock(m_);
        const right* r = find_right(s, n);
        if (r == nullptr) return kern_error(kern_invalid_name);
        std::uint32_t t = 0;
        if (r->is_set) t |= port_type_port_set;
        if (r->receive) t |= port_type_receive;
        if (r->send > 0 || r->send_once > 0) t |= alive(r->port) ? 0 : port_type_dead_name;
        if (r->send > 0 && alive(r->port)) t |= port_type_send;
        if (r->send_once > 0 && alive(r->port)) t |= port_type_send_once;
        return t;
    }

    /// The port a name denotes in a space (no_port if none), for comparisons across spaces.
    [[nodiscard]] port_id port_of(space_id s, port_name n) const
    {
        std::lock_guard lock(m_);
        const right* r = find_right(s, n);
        return r == nullptr ? no_port : r->port;
    }

    [[nodiscard]] bool is_alive(port_id p) const
    {
        std::lock_guard lock(m_);
        return alive(p);
    }

    /// User references held in a space (receive, send, send-once, sets): a leak check.
    [[nodiscard]] std::size_t rights(space_id s) const
    {
        std::lock_guard lock(m_);
        auto it = spaces_.find(s);
        if (it == spaces_.end()) return 0;
        std::size_t n = 0;
        for (const auto& [name, r] : it->second.names) n += r.send + r.send_once + (r.receive ? 1 : 0) + (r.is_set ? 1 : 0);
        return n;
    }

    /// Sends that failed because their destination was a dead name.
    [[nodiscard]] std::uint64_t sends_to_dead_names() const
    {
        std::lock_guard lock(m_);
        return dead_sends_;
    }

    // ---- messages ------------------------------------------------------------------------

    /// mach_msg(MACH_SEND_MSG) from space `s`. Never blocks (no queue limits).
    /// Errors: MACH_SEND_INVALID_HEADER (size), MACH_SEND_INVALID_DEST (no such
    /// right or a dead port), MACH_SEND_INVALID_REPLY, MACH_SEND_INVALID_TYPE,
    /// MACH_SEND_INVALID_RIGHT. On error no right is consumed.
    kern_return send(space_id s, std::span<const std::byte> bytes)
    {
        std::lock_guard lock(m_);
        space_obj* sp = find_space(s);
        if (sp == nullptr) return mach_send_invalid_dest;
        message_header h;
        if (decode_header(bytes, h) || h.size != bytes.size() || h.size % 4 != 0) return mach_send_invalid_header;
        space_obj scratch = *sp; // copy-in works on a copy, committed only if every right is good
        queued q;
        carried dest;
        if (copy_in(scratch, h.remote, msgh_bits_remote(h.bits), dest) != kern_success || dest.port == no_port ||
            dest.port == dead_port) {
            const right* r = find_right(s, h.remote);
            if (h.remote == port_dead || (r != nullptr && !alive(r->port))) ++dead_sends_;
            return mach_send_invalid_dest;
        }
        if (h.local != port_null && copy_in(scratch, h.local, msgh_bits_local(h.bits), q.reply) != kern_success)
            return mach_send_invalid_reply;
        if ((h.bits & msgh_bits_complex) != 0) {
            if (bytes.size() < header_size + body_size) return mach_send_invalid_header;
            const std::uint32_t count = get32(bytes, header_size);
            if (count > (bytes.size() - header_size - body_size) / port_descriptor_size) return mach_send_invalid_header;
            for (std::uint32_t i = 0; i < count; ++i) {
                const std::size_t off = header_size + body_size + i * port_descriptor_size;
                if (std::to_integer<std::uint32_t>(bytes[off + 11]) != msg_port_descriptor) return mach_send_invalid_type;
                carried c;
                if (copy_in(scratch, get32(bytes, off), std::to_integer<std::uint32_t>(bytes[off + 10]), c) != kern_success)
                    return mach_send_invalid_right;
                q.descriptors.emplace_back(off, c);
            }
        }
        *sp = std::move(scratch);
        q.bytes.assign(bytes.begin(), bytes.end());
        q.dest_type = dest.type;
        ports_.at(dest.port).queue.push_back(std::move(q));
        cv_.notify_all();
        return kern_success;
    }

    /// mach_msg(MACH_RCV_MSG) on a receive right or port set of space `s`;
    /// waits at most `timeout` (forever if nullopt). Returns msgh_size.
    /// Errors (kern_category): MACH_RCV_TIMED_OUT, MACH_RCV_INVALID_NAME,
    /// MACH_RCV_PORT_DIED, MACH_RCV_TOO_LARGE (the message is destroyed).
    [[nodiscard]] result<std::size_t> receive(space_id s, port_name n, std::span<std::byte> buffer,
                                              std::optional<std::chrono::nanoseconds> timeout)
    {
        std::unique_lock lock(m_);
        std::optional<std::chrono::steady_clock::time_point> deadline;
        if (timeout) deadline = std::chrono::steady_clock::now() + *timeout;
        for (;;) {
            space_obj* sp = find_space(s);
            if (sp == nullptr) return kern_error(mach_rcv_invalid_name);
            auto it = sp->names.find(n);
            if (it == sp->names.end() || (!it->second.receive && !it->second.is_set))
                return kern_error(mach_rcv_invalid_name);
            const port_id p = it->second.port;
            if (!alive(p)) return kern_error(mach_rcv_port_died);
            port_id src = no_port;
            if (ports_.at(p).is_set) {
                for (port_id m : ports_.at(p).members)
                    if (alive(m) && !ports_.at(m).queue.empty()) {
                        src = m;
                        break;
                    }
            } else if (!ports_.at(p).queue.empty()) {
                src = p;
            }
            if (src != no_port) return copy_out_message(*sp, src, buffer);
            if (deadline) {
                if (std::chrono::steady_clock::now() >= *deadline) return kern_error(mach_rcv_timed_out);
                cv_.wait_until(lock, *deadline);
            } else {
                cv_.wait(lock);
            }
        }
    }

    /// mach_msg_destroy on a message received into space `s`.
    void destroy_message(space_id s, std::span<const std::byte> bytes)
    {
        message_header h;
        if (bytes.size() < header_size) return;
        detail::wire_reader r(bytes);
        h.bits = r.u32();
        h.size = r.u32();
        h.remote = r.u32();
        const std::uint32_t remote_type = msgh_bits_remote(h.bits);
        if (port_valid(h.remote) && (remote_type == msg_type_port_send || remote_type == msg_type_port_send_once))
            static_cast<void>(deallocate(s, h.remote));
        if ((h.bits & msgh_bits_complex) == 0 || bytes.size() < header_size + body_size) return;
        const std::size_t size = std::min<std::size_t>(h.size, bytes.size());
        const std::uint32_t count = get32(bytes, header_size);
        for (std::uint32_t i = 0; i < count; ++i) {
            const std::size_t off = header_size + body_size + i * port_descriptor_size;
            if (off + port_descriptor_size > size) break;
            const std::uint32_t disposition = std::to_integer<std::uint32_t>(bytes[off + 10]);
            const port_name name = get32(bytes, off);
            if (port_valid(name) && (disposition == msg_type_port_send || disposition == msg_type_port_send_once))
                static_cast<void>(deallocate(s, name));
        }
    }

    // ---- exception ports -----------------------------------------------------------------

    /// task/thread/host_set_exception_ports from space `s` (`n` is a send right there, or null).
    /// Errors: KERN_INVALID_ARGUMENT (mask, behavior, flavor), KERN_INVALID_RIGHT.
    kern_return set_exception_ports(space_id s, exception_target target, std::uint32_t mask, port_name n,
                                    std::uint32_t behavior, std::int32_t flavor)
    {
        std::lock_guard lock(m_);
        return set_locked(s, target, mask, n, behavior, flavor);
    }

    /// task/thread/host_get_exception_ports: one row per distinct (port,
    /// behavior, flavor), its port copied out as a send right into space `s`.
    kern_return get_exception_ports(space_id s, exception_target target, std::uint32_t mask, handler_table& out)
    {
        std::lock_guard lock(m_);
        return get_locked(s, target, mask, out);
    }

    /// task_swap_exception_ports: get then set, atomically.
    kern_return swap_exception_ports(space_id s, exception_target target, std::uint32_t mask, port_name n,
                                     std::uint32_t behavior, std::int32_t flavor, handler_table& old)
    {
        std::lock_guard lock(m_);
        if (auto kr = check_set(s, mask, n, behavior, flavor); kr != kern_success) return kr;
        if (auto kr = get_locked(s, target, mask, old); kr != kern_success) return kr;
        return set_locked(s, target, mask, n, behavior, flavor);
    }

    /// The port handling `exception` at `target` right now (no_port if none).
    [[nodiscard]] port_id handler_port(exception_target target, std::int32_t exception) const
    {
        std::lock_guard lock(m_);
        return table_of(target)[static_cast<std::size_t>(exception)].port;
    }

    /// Blocks until `port` handles `exception` at `target`.
    void await_handler_port(exception_target target, std::int32_t exception, port_id port) const
    {
        std::unique_lock lock(m_);
        cv_.wait(lock, [&] { return table_of(target)[static_cast<std::size_t>(exception)].port == port; });
    }

    // ---- thread state through thread ports ---------------------------------------------------

    [[nodiscard]] result<std::uint32_t> get_thread_state(space_id s, port_name thread, std::int32_t flavor,
                                                         std::span<std::uint32_t> out)
    {
        std::lock_guard lock(m_);
        thread_obj* th = thread_by_name(s, thread);
        if (th == nullptr) return kern_error(kern_invalid_argument);
        const std::uint32_t words = state_words(flavor);
        if (words == 0 || out.size() < words) return kern_error(kern_invalid_argument);
        auto& st = th->states[flavor];
        st.resize(words, 0);
        std::copy(st.begin(), st.end(), out.begin());
        return words;
    }

    kern_return set_thread_state(space_id s, port_name thread, std::int32_t flavor, std::span<const std::uint32_t> in)
    {
        std::lock_guard lock(m_);
        thread_obj* th = thread_by_name(s, thread);
        if (th == nullptr) return kern_invalid_argument;
        if (state_words(flavor) == 0 || in.size() != state_words(flavor)) return kern_invalid_argument;
        th->states[flavor].assign(in.begin(), in.end());
        return kern_success;
    }

    // ---- faults ------------------------------------------------------------------------------

    /// Thread `t` reads (or writes `value` to) `addr`, as a CPU would: a
    /// missing page raises EXC_BAD_ACCESS / KERN_INVALID_ADDRESS, a protected
    /// one KERN_PROTECTION_FAILURE, subcode = address; the exception goes
    /// through triage and the access is retried after KERN_SUCCESS. Blocks
    /// while a handler holds the exception.
    access_outcome touch(thread_id t, std::uint64_t addr, access how, std::byte value = {})
    {
        access_outcome out;
        for (unsigned attempt = 0; attempt < 64; ++attempt) {
            kern_return code = kern_success;
            {
                std::lock_guard lock(m_);
                auto it = memory_.find(addr & ~(sim_page_size - 1));
                const int needed = how == access::read ? vm_prot_read : vm_prot_write;
                if (it != memory_.end() && (it->second.prot & needed) != 0) {
                    std::byte& b = it->second.bytes[addr & (sim_page_size - 1)];
                    if (how == access::write) b = value;
                    out.value = b;
                    out.result = access_outcome::status::completed;
                    return out;
                }
                code = it == memory_.end() ? kern_invalid_address : kern_protection_failure;
            }
            ++out.exceptions;
            out.last = raise(t, exc_bad_access, {code, static_cast<std::int64_t>(addr)});
            if (out.last != kern_success) {
                out.result = access_outcome::status::signalled;
                return out;
            }
        }
        out.result = access_outcome::status::gave_up;
        return out;
    }

    /// Raises `exception` with `codes` on thread `t` and runs triage: the
    /// thread's handler, the task's, the host's. Returns the deciding answer.
    kern_return raise(thread_id t, std::int32_t exception, std::array<std::int64_t, 2> codes)
    {
        kern_return kr = kern_failure;
        for (auto level : {exception_target::level::thread, exception_target::level::task, exception_target::level::host}) {
            table_entry e;
            {
                std::lock_guard lock(m_);
                e = table_of({level, t})[static_cast<std::size_t>(exception)];
            }
            if (e.port == no_port) continue;
            kr = deliver(t, e, exception, codes);
            if (kr == kern_success) return kr;
        }
        return kr;
    }

private:
    static constexpr space_id kernel_receiver = 0xffff'ffffu;
    enum class kobject : std::uint8_t { none, thread, task, token };

    struct right {
        port_id port = no_port;
        bool receive = false;
        bool is_set = false;
        std::uint32_t send = 0;
        std::uint32_t send_once = 0;
        [[nodiscard]] bool empty() const noexcept { return !receive && !is_set && send == 0 && send_once == 0; }
    };
    struct space_obj {
        std::map<port_name, right> names;
        std::map<port_id, port_name> by_port; // the name of our send/receive right to a port, if any
        std::uint32_t next_index = 0x11;
    };
    struct carried {
        port_id port = no_port;
        std::uint32_t type = 0; // 17 send, 18 send-once (as it will be received)
    };
    struct queued {
        std::vector<std::byte> bytes;
        carried reply;
        std::uint32_t dest_type = 0;
        std::vector<std::pair<std::size_t, carried>> descriptors; // offset of the descriptor, right it carries
    };
    struct port_obj {
        space_id receiver = 0;
        bool alive = true;
        bool is_set = false;
        port_id set = no_port;
        std::vector<port_id> members;
        std::deque<queued> queue;
        kobject kind = kobject::none;
        thread_id thread = 0;
    };
    struct table_entry {
        port_id port = no_port;
        std::uint32_t behavior = exception_default;
        std::int32_t flavor = thread_state_none;
    };
    using exc_table = std::array<table_entry, exc_types_count>;
    struct thread_obj {
        port_id port = no_port;
        exc_table table{};
        std::map<std::int32_t, std::vector<std::uint32_t>> states;
    };
    struct page {
        int prot = 0;
        std::vector<std::byte> bytes;
        std::uint64_t writes = 0;
    };

    static std::uint32_t get32(std::span<const std::byte> b, std::size_t off) noexcept
    {
        detail::wire_reader r(b, off);
        return r.u32();
    }
    static void put32(std::span<std::byte> b, std::size_t off, std::uint32_t v) noexcept
    {
        for (std::size_t i = 0; i < 4; ++i) b[off + i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
    }

    // -- all below: m_ held --

    space_id new_space()
    {
        const space_id s = next_space_++;
        spaces_.emplace(s, space_obj{});
        return s;
    }
    port_id new_port(space_id receiver, kobject kind, thread_id t)
    {
        const port_id p = next_port_++;
        port_obj o;
        o.receiver = receiver;
        o.kind = kind;
        o.thread = t;
        ports_.emplace(p, std::move(o));
        return p;
    }
    static port_name new_name(space_obj& sp) { return (sp.next_index++ << 8) | 3; }

    space_obj* find_space(space_id s)
    {
        auto it = spaces_.find(s);
        return it == spaces_.end() ? nullptr : &it->second;
    }
    right* find_right(space_id s, port_name n)
    {
        space_obj* sp = find_space(s);
        if (sp == nullptr) return nullptr;
        auto it = sp->names.find(n);
        return it == sp->names.end() ? nullptr : &it->second;
    }
    const right* find_right(space_id s, port_name n) const { return const_cast<kernel*>(this)->find_right(s, n); } // same lookup, read only
    [[nodiscard]] bool alive(port_id p) const
    {
        if (p == no_port || p == dead_port) return false;
        auto it = ports_.find(p);
        return it != ports_.end() && it->second.alive;
    }

    void erase_name(space_obj& sp, std::map<port_name, right>::iterator it)
    {
        auto bp = sp.by_port.find(it->second.port);
        if (bp != sp.by_port.end() && bp->second == it->first) sp.by_port.erase(bp);
        sp.names.erase(it);
    }
    void tidy(space_obj& sp, std::map<port_name, right>::iterator it)
    {
        if (it->second.empty()) erase_name(sp, it);
    }

    void leave_set(port_id p)
    {
        port_obj& o = ports_.at(p);
        if (o.set == no_port) return;
        auto& members = ports_.at(o.set).members;
        members.erase(std::remove(members.begin(), members.end(), p), members.end());
        o.set = no_port;
    }

    /// The port dies: its queue is destroyed (rights in it released).
    void destroy_port(port_id p)
    {
        if (!alive(p)) return;
        port_obj& o = ports_.at(p);
        o.alive = false;
        if (o.set != no_port) leave_set(p);
        for (port_id m : o.members) ports_.at(m).set = no_port;
        o.members.clear();
        std::deque<queued> q = std::move(o.queue);
        o.queue.clear();
        for (auto& msg : q) release_queued(msg);
    }

    /// An undelivered message is destroyed: send-once rights in it notify their ports.
    void release_queued(const queued& q)
    {
        if (q.reply.type == msg_type_port_send_once) notify_send_once(q.reply.port);
        for (const auto& [off, c] : q.descriptors)
            if (c.type == msg_type_port_send_once) notify_send_once(c.port);
    }

    /// MACH_NOTIFY_SEND_ONCE to `p`: a send-once right to it died unused.
    void notify_send_once(port_id p)
    {
        if (!alive(p) || ports_.at(p).is_set) return;
        queued n;
        n.bytes.resize(header_size);
        static_cast<void>(encode_header_only({0, 0, port_null, port_null, port_null, mach_notify_send_once}, n.bytes));
        n.dest_type = msg_type_port_send_once;
        ports_.at(p).queue.push_back(std::move(n));
        cv_.notify_all();
    }

    kern_return copy_in(space_obj& sp, port_name n, std::uint32_t disposition, carried& out)
    {
        out = {};
        if (n == port_null) return kern_success;
        if (n == port_dead) {
            out = {dead_port, msg_type_port_send};
            return kern_success;
        }
        auto it = sp.names.find(n);
        if (it == sp.names.end()) return kern_invalid_name;
        right& r = it->second;
        switch (disposition) {
        case msg_type_port_send: // MOVE_SEND
            if (r.send == 0) return kern_invalid_right;
            --r.send;
            out = {r.port, msg_type_port_send};
            break;
        case msg_type_copy_send:
            if (r.send == 0) return kern_invalid_right;
            out = {r.port, msg_type_port_send};
            break;
        case msg_type_make_send:
            if (!r.receive) return kern_invalid_right;
            out = {r.port, msg_type_port_send};
            break;
        case msg_type_make_send_once:
            if (!r.receive) return kern_invalid_right;
            out = {r.port, msg_type_port_send_once};
            break;
        case msg_type_port_send_once: // MOVE_SEND_ONCE
            if (r.send_once == 0) return kern_invalid_right;
            --r.send_once;
            out = {r.port, msg_type_port_send_once};
            break;
        default: return kern_invalid_right;
        }
        if (!alive(out.port)) out.port = dead_port;
        tidy(sp, it);
        return kern_success;
    }

    port_name copy_out(space_obj& sp, const carried& c)
    {
        if (c.port == no_port) return port_null;
        if (!alive(c.port)) return port_dead;
        if (c.type == msg_type_port_send_once) {
            const port_name n = new_name(sp);
            sp.names[n] = right{.port = c.port, .send_once = 1};
            return n;
        }
        if (auto it = sp.by_port.find(c.port); it != sp.by_port.end()) {
            ++sp.names.at(it->second).send;
            return it->second;
        }
        const port_name n = new_name(sp);
        sp.names[n] = right{.port = c.port, .send = 1};
        sp.by_port[c.port] = n;
        return n;
    }

    result<std::size_t> copy_out_message(space_obj& sp, port_id src, std::span<std::byte> buffer)
    {
        queued q = std::move(ports_.at(src).queue.front());
        ports_.at(src).queue.pop_front();
        if (q.bytes.size() > buffer.size()) {
            release_queued(q);
            return kern_error(mach_rcv_too_large);
        }
        std::copy(q.bytes.begin(), q.bytes.end(), buffer.begin());
        const port_name reply = copy_out(sp, q.reply);
        const port_name local = sp.by_port.at(src);
        const std::uint32_t reply_type = q.reply.port == no_port ? 0 : q.reply.type;
        const std::uint32_t bits = get32(buffer, 0);
        put32(buffer, 0, (bits & ~std::uint32_t{0x1f1f}) | msgh_bits(reply_type, q.dest_type));
        put32(buffer, 8, reply);
        put32(buffer, 12, local);
        for (const auto& [off, c] : q.descriptors) {
            put32(buffer, off, copy_out(sp, c));
            buffer[off + 10] = static_cast<std::byte>(c.port == no_port ? 0 : c.type);
        }
        return q.bytes.size();
    }

    template <class ByteAt>
    kern_return store(std::uint64_t addr, std::uint64_t len, ByteAt&& byte_at)
    {
        if (!all_mapped(addr, len, vm_prot_write)) return kern_protection_failure;
        for (std::uint64_t i = 0; i < len; ++i) {
            page& p = memory_.at((addr + i) & ~(sim_page_size - 1));
            p.bytes[(addr + i) & (sim_page_size - 1)] = byte_at(i);
        }
        for (std::uint64_t a = addr & ~(sim_page_size - 1); a < addr + len; a += sim_page_size) ++memory_.at(a).writes;
        return kern_success;
    }

    [[nodiscard]] bool all_mapped(std::uint64_t addr, std::uint64_t len, int needed) const
    {
        for (std::uint64_t a = addr & ~(sim_page_size - 1); a < addr + len; a += sim_page_size) {
            auto it = memory_.find(a);
            if (it == memory_.end() || (it->second.prot & needed) != needed) return false;
        }
        return true;
    }

    exc_table& table_of(exception_target t)
    {
        switch (t.which) {
        case exception_target::level::thread: return threads_.at(t.thread).table;
        case exception_target::level::task: return task_table_;
        case exception_target::level::host: break;
        }
        return host_table_;
    }
    const exc_table& table_of(exception_target t) const { return const_cast<kernel*>(this)->table_of(t); } // read only

    kern_return check_set(space_id s, std::uint32_t mask, port_name n, std::uint32_t behavior, std::int32_t flavor)
    {
        if ((mask & ~exc_mask_valid) != 0) return kern_invalid_argument;
        const auto kind = kind_for_behavior(behavior);
        if (!kind) return kern_invalid_argument;
        if (carries_state(kind->kind) ? state_words(flavor) == 0
                                      : (state_words(flavor) == 0 && flavor != thread_state_none))
            return kern_invalid_argument;
        if (port_valid(n)) {
            const right* r = find_right(s, n);
            if (r == nullptr || r->send == 0) return kern_invalid_right; // MIG copies a send right in
        }
        return kern_success;
    }

    kern_return set_locked(space_id s, exception_target target, std::uint32_t mask, port_name n,
                           std::uint32_t behavior, std::int32_t flavor)
    {
        if (auto kr = check_set(s, mask, n, behavior, flavor); kr != kern_success) return kr;
        port_id p = no_port;
        if (n == port_dead)
            p = dead_port;
        else if (port_valid(n))
            p = alive(find_right(s, n)->port) ? find_right(s, n)->port : dead_port;
        exc_table& table = table_of(target);
        for (std::int32_t i = 1; i < exc_types_count; ++i)
            if ((mask & (1u << i)) != 0) table[static_cast<std::size_t>(i)] = {p, behavior, flavor};
        cv_.notify_all();
        return kern_success;
    }

    kern_return get_locked(space_id s, exception_target target, std::uint32_t mask, handler_table& out)
    {
        if ((mask & ~exc_mask_valid) != 0) return kern_invalid_argument;
        space_obj* sp = find_space(s);
        if (sp == nullptr) return kern_invalid_argument;
        const exc_table& table = table_of(target);
        std::array<port_id, handler_table::capacity> ids{};
        out.count = 0;
        for (std::int32_t i = 1; i < exc_types_count; ++i) {
            if ((mask & (1u << i)) == 0) continue;
            const table_entry& e = table[static_cast<std::size_t>(i)];
            std::uint32_t j = 0;
            for (; j < out.count; ++j) {
                if (ids[j] == e.port && out.entries[j].behavior == e.behavior && out.entries[j].flavor == e.flavor) {
                    out.entries[j].mask |= 1u << i;
                    break;
                }
            }
            if (j == out.count && out.count < handler_table::capacity) {
                ids[j] = e.port;
                out.entries[j] = {1u << i, copy_out(*sp, {e.port, msg_type_port_send}), e.behavior, e.flavor};
                ++out.count;
            }
        }
        return kern_success;
    }

    thread_obj* thread_by_name(space_id s, port_name n)
    {
        const right* r = find_right(s, n);
        if (r == nullptr || r->send == 0 || !alive(r->port)) return nullptr;
        const port_obj& o = ports_.at(r->port);
        if (o.kind != kobject::thread) return nullptr;
        return &threads_.at(o.thread);
    }

    /// One exception_deliver: encode for the handler's behavior, send with a
    /// fresh kernel reply port, wait for the reply (or the reply right's death).
    kern_return deliver(thread_id t, const table_entry& e, std::int32_t exception, std::array<std::int64_t, 2> codes)
    {
        const auto kind = kind_for_behavior(e.behavior);
        if (!kind) return kern_failure;
        auto req = std::make_unique<exception_request>();
        std::unique_lock lock(m_);
        if (!alive(e.port)) return mach_send_invalid_dest;
        thread_obj& th = threads_.at(t);
        req->header = {msgh_bits(msg_type_copy_send, msg_type_make_send_once), 0, port_null, port_null, port_null,
                       *request_id(kind->kind, kind->code64)};
        req->kind = kind->kind;
        req->code64 = kind->code64;
        req->exception = exception;
        req->code_count = 2;
        for (std::size_t i = 0; i < 2; ++i) // without MACH_EXCEPTION_CODES the kernel casts the codes down
            req->codes[i] = kind->code64 ? codes[i]
                                         : std::int64_t{static_cast<std::int32_t>(
                                               static_cast<std::uint32_t>(static_cast<std::uint64_t>(codes[i])))};
        if (carries_state(kind->kind)) {
            const std::uint32_t words = state_words(e.flavor);
            if (words == 0) return kern_invalid_argument;
            auto& st = th.states[e.flavor];
            st.resize(words, 0);
            req->flavor = e.flavor;
            req->state_count = words;
            std::copy(st.begin(), st.end(), req->state.begin());
        }
        queued q;
        port_id token = no_port;
        if (carries_ports(kind->kind)) {
            q.descriptors.emplace_back(header_size + body_size, carried{th.port, msg_type_port_send});
            q.descriptors.emplace_back(header_size + body_size + port_descriptor_size,
                                       carried{task_port_, msg_type_port_send});
        }
        if (carries_token(kind->kind)) {
            req->thread_id = t;
            token = new_port(kernel_receiver, kobject::token, t);
            q.descriptors.emplace_back(header_size + body_size, carried{token, msg_type_port_send});
        }
        q.bytes.resize(max_request_size);
        const auto size = encode_request(*req, q.bytes);
        if (!size) return kern_failure;
        q.bytes.resize(*size);
        const port_id reply = new_port(kernel_receiver, kobject::none, t);
        q.reply = {reply, msg_type_port_send_once};
        q.dest_type = msg_type_port_send;
        ports_.at(e.port).queue.push_back(std::move(q));
        cv_.notify_all();

        cv_.wait(lock, [&] { return !ports_.at(reply).queue.empty(); });
        queued answer = std::move(ports_.at(reply).queue.front());
        ports_.at(reply).queue.pop_front();
        destroy_port(reply);
        if (token != no_port) destroy_port(token);
        release_queued(answer);

        message_header h;
        if (decode_header(answer.bytes, h)) return mig_reply_mismatch;
        if (h.id == mach_notify_send_once) return mig_server_died; // the handler dropped the reply right
        auto rep = std::make_unique<exception_reply>();
        if (decode_reply(answer.bytes, *rep) || h.id != reply_id(req->header.id)) return mig_reply_mismatch;
        if (rep->ret_code == kern_success && carries_state(kind->kind) && rep->has_state) {
            const std::uint32_t words = state_words(rep->flavor);
            if (words == 0 || rep->state_count != words) return kern_invalid_argument; // thread_set_state refuses it
            th.states[rep->flavor].assign(rep->state.begin(), rep->state.begin() + words);
        }
        return rep->ret_code;
    }

    mutable std::mutex m_;
    mutable std::condition_variable cv_;
    std::map<space_id, space_obj> spaces_;
    std::map<port_id, port_obj> ports_;
    std::map<thread_id, thread_obj> threads_;
    std::map<std::uint64_t, page> memory_;
    exc_table task_table_{};
    exc_table host_table_{};
    space_id task_space_ = 0;
    port_id task_port_ = no_port;
    space_id next_space_ = 1;
    port_id next_port_ = 1;
    thread_id next_thread_ = 0x100;
    std::uint64_t dead_sends_ = 0;
};

// ---------------------------------------------------------------------------

/// The MachApi model over the simulated kernel: the simulated task's calls.
class task_api {
public:
    static constexpr std::int32_t thread_state_none = sim::thread_state_none;

    explicit task_api(kernel& k) noexcept : k_(&k), space_(k.task_space()) {}

    [[nodiscard]] result<port_name> allocate_port() noexcept
    {
        return guard_result<port_name>([&]() -> result<port_name> {
            auto n = k_->allocate_receive(space_);
            if (!n) return n;
            if (auto kr = k_->insert_send(space_, *n); kr != kern_success) {
                k_->destroy_receive(space_, *n);
                return kern_error(kr);
            }
            return n;
        });
    }
    [[nodiscard]] result<port_name> allocate_port_set() noexcept
    {
        return guard_result<port_name>([&] { return k_->allocate_port_set(space_); });
    }
    [[nodiscard]] std::error_code add_to_set(port_name port, port_name set) noexcept
    {
        return guard([&] { return k_->move_member(space_, port, set); });
    }
    void release_port(port_name n) noexcept
    {
        static_cast<void>(guard([&] {
            auto t = k_->port_type(space_, n);
            if (t && (*t & port_type_send) != 0) k_->deallocate(space_, n);
            return k_->destroy_receive(space_, n);
        }));
    }
    void deallocate(port_name n) noexcept
    {
        if (port_valid(n)) static_cast<void>(guard([&] { return k_->deallocate(space_, n); }));
    }
    [[nodiscard]] result<std::uint32_t> port_type(port_name n) noexcept
    {
        return guard_result<std::uint32_t>([&] { return k_->port_type(space_, n); });
    }
    [[nodiscard]] std::error_code get_exception_ports(std::uint32_t mask, handler_table& t) noexcept
    {
        return guard([&] { return k_->get_exception_ports(space_, exception_target::task(), mask, t); });
    }
    [[nodiscard]] std::error_code swap_exception_ports(std::uint32_t mask, port_name n, std::uint32_t behavior,
                                                       std::int32_t flavor, handler_table& old) noexcept
    {
        return guard([&] {
            return k_->swap_exception_ports(space_, exception_target::task(), mask, n, behavior, flavor, old);
        });
    }
    [[nodiscard]] std::error_code set_exception_ports(std::uint32_t mask, port_name n, std::uint32_t behavior,
                                                      std::int32_t flavor) noexcept
    {
        return guard([&] { return k_->set_exception_ports(space_, exception_target::task(), mask, n, behavior, flavor); });
    }
    [[nodiscard]] result<std::size_t> receive(port_name n, std::span<std::byte> buffer,
                                              std::chrono::nanoseconds timeout) noexcept
    {
        return guard_result<std::size_t>([&] { return k_->receive(space_, n, buffer, timeout); });
    }
    [[nodiscard]] std::error_code send(std::span<std::byte> message, std::chrono::nanoseconds) noexcept
    {
        return guard([&] { return k_->send(space_, message); });
    }
    void destroy_message(std::span<std::byte> message) noexcept
    {
        static_cast<void>(guard([&] {
            k_->destroy_message(space_, message);
            return kern_success;
        }));
    }
    [[nodiscard]] std::error_code protect(std::uint64_t addr, std::uint64_t len, int prot) noexcept
    {
        return guard([&] { return k_->protect(addr, len, prot); });
    }
    [[nodiscard]] std::error_code write(std::uint64_t addr, std::span<const std::byte> bytes) noexcept
    {
        return guard([&] { return k_->write(addr, bytes); });
    }
    [[nodiscard]] std::error_code fill_zero(std::uint64_t addr, std::uint64_t len) noexcept
    {
        return guard([&] { return k_->fill_zero(addr, len); });
    }
    [[nodiscard]] result<std::uint32_t> get_thread_state(port_name thread, std::int32_t flavor,
                                                         std::span<std::uint32_t> words) noexcept
    {
        return guard_result<std::uint32_t>([&] { return k_->get_thread_state(space_, thread, flavor, words); });
    }
    [[nodiscard]] std::error_code set_thread_state(port_name thread, std::int32_t flavor,
                                                   std::span<const std::uint32_t> words) noexcept
    {
        return guard([&] { return k_->set_thread_state(space_, thread, flavor, words); });
    }

    [[nodiscard]] kernel& sim() const noexcept { return *k_; }
    [[nodiscard]] space_id space() const noexcept { return space_; }

private:
    // The simulated kernel allocates (std::map, std::vector): an allocation
    // failure there becomes KERN_RESOURCE_SHORTAGE, never an exception.
    template <class F>
    static std::error_code guard(F&& f) noexcept
    {
        try {
            return kern_error(f());
        } catch (...) {
            return kern_error(kern_resource_shortage);
        }
    }
    template <class T, class F>
    static result<T> guard_result(F&& f) noexcept
    {
        try {
            return f();
        } catch (...) {
            return kern_error(kern_resource_shortage);
        }
    }

    kernel* k_;
    space_id space_;
};

static_assert(MachApi<task_api>, "the simulated task must model MachApi");

// ---------------------------------------------------------------------------

/// A simulated process with an exception port: a crash reporter, a test's
/// prior handler, or (through debugger) LLDB's debugserver. Its thread
/// receives exception requests, logs them, and answers each with
/// `respond(request, reply)`: the reply comes pre-filled as a success that
/// echoes the old state; the callback may edit the new state and returns the
/// RetCode. It can hold replies instead (the faulting thread stays blocked)
/// and die (its port becomes a dead name).
class exception_server {
public:
    using respond_fn = std::function<kern_return(const exception_request&, exception_reply&)>;

    struct options {
        std::uint32_t behavior = exception_default | mach_exception_codes;
        std::int32_t flavor = thread_state_none;
    };

    exception_server(kernel& k, options opts, respond_fn respond)
        : k_(k), opts_(opts), respond_(std::move(respond)), space_(k.create_space())
    {
        auto n = k_.allocate_receive(space_);
        port_ = *n;
        k_.insert_send(space_, port_);
        id_ = k_.port_of(space_, port_);
        thread_ = std::thread([this] { run(); });
    }
    exception_server(const exception_server&) = delete;
    exception_server& operator=(const exception_server&) = delete;
    ~exception_server() { exit(); }

    /// Installs its port at `target` for the exception types in `mask`.
    kern_return install(exception_target target, std::uint32_t mask)
    {
        return k_.set_exception_ports(space_, target, mask, port_, opts_.behavior, opts_.flavor);
    }

    /// The process exits: its port dies, held replies are never sent.
    void exit()
    {
        k_.destroy_space(space_);
        if (thread_.joinable()) thread_.join();
    }

    /// Answer nothing until release_replies(): requests are logged and kept.
    void hold_replies()
    {
        std::lock_guard lock(m_);
        holding_ = true;
    }
    void release_replies()
    {
        std::vector<std::vector<std::byte>> held;
        {
            std::lock_guard lock(m_);
            holding_ = false;
            held.swap(held_);
        }
        for (auto& raw : held) answer(raw);
    }

    [[nodiscard]] std::size_t received() const
    {
        std::lock_guard lock(m_);
        return log_.size();
    }
    void await_received(std::size_t n) const
    {
        std::unique_lock lock(m_);
        cv_.wait(lock, [&] { return log_.size() >= n; });
    }
    /// The `i`-th request received (as decoded in this process).
    [[nodiscard]] exception_request request(std::size_t i) const
    {
        std::lock_guard lock(m_);
        return *log_.at(i);
    }

    [[nodiscard]] port_name port() const noexcept { return port_; }
    [[nodiscard]] port_id id() const noexcept { return id_; }
    [[nodiscard]] space_id space() const noexcept { return space_; }
    [[nodiscard]] const options& settings() const noexcept { return opts_; }

private:
    void run()
    {
        std::vector<std::byte> buffer(receive_buffer_size);
        auto req = std::make_unique<exception_request>();
        for (;;) {
            auto n = k_.receive(space_, port_, buffer, std::nullopt);
            if (!n) return; // the port died: the process exited
            std::span<std::byte> msg(buffer.data(), *n);
            if (decode_request(msg, *req)) {
                k_.destroy_message(space_, msg);
                continue;
            }
            bool hold = false;
            {
                std::lock_guard lock(m_);
                log_.push_back(std::make_unique<exception_request>(*req));
                hold = holding_;
                if (hold) held_.emplace_back(msg.begin(), msg.end());
            }
            cv_.notify_all();
            if (!hold) answer(msg);
        }
    }

    void answer(std::span<std::byte> raw)
    {
        auto req = std::make_unique<exception_request>();
        if (decode_request(raw, *req)) return;
        auto rep = std::make_unique<exception_reply>();
        make_reply(*req, kern_success, *rep);
        const kern_return kr = respond_ ? respond_(*req, *rep) : kern_failure;
        if (kr != kern_success) make_reply(*req, kr, *rep);
        std::vector<std::byte> out(receive_buffer_size);
        const auto size = encode_reply(*rep, out);
        if (size && k_.send(space_, std::span<const std::byte>(out).first(*size)) == kern_success) clear_reply_port(raw);
        k_.destroy_message(space_, raw);
    }

    kernel& k_;
    options opts_;
    respond_fn respond_;
    space_id space_;
    port_name port_ = port_null;
    port_id id_ = no_port;
    mutable std::mutex m_;
    mutable std::condition_variable cv_;
    std::vector<std::unique_ptr<exception_request>> log_;
    std::vector<std::vector<std::byte>> held_;
    bool holding_ = false;
    std::thread thread_;
};

/// LLDB's debugserver as the kernel sees it: attach() saves every task
/// exception port (get_exception_ports(EXC_MASK_ALL)) and installs its own
/// for all types with EXCEPTION_DEFAULT | MACH_EXCEPTION_CODES; detach()
/// restores each saved row and exits, so its port becomes a dead name.
class debugger {
public:
    debugger(kernel& k, exception_server::respond_fn respond)
        : k_(k), server_(k, {exception_default | mach_exception_codes, thread_state_none}, std::move(respond))
    {
    }

    kern_return attach()
    {
        if (auto kr = k_.get_exception_ports(server_.space(), exception_target::task(), exc_mask_all, saved_);
            kr != kern_success)
            return kr;
        return server_.install(exception_target::task(), exc_mask_all);
    }

    /// Restores what attach() saved; with `exit_process` the debugger then exits.
    kern_return detach(bool exit_process = true)
    {
        kern_return result = kern_success;
        for (const handler_entry& row : saved_.rows()) {
            const kern_return kr = k_.set_exception_ports(server_.space(), exception_target::task(), row.mask,
                                                          row.port, row.behavior, row.flavor);
            if (kr != kern_success) result = kr;
            if (port_valid(row.port)) k_.deallocate(server_.space(), row.port);
        }
        saved_.count = 0;
        if (exit_process) server_.exit();
        return result;
    }

    [[nodiscard]] exception_server& server() noexcept { return server_; }
    [[nodiscard]] const handler_table& saved() const noexcept { return saved_; }

private:
    kernel& k_;
    exception_server server_;
    handler_table saved_;
};

} // namespace squib::mach::sim
