// squib-pager: the Mach backend's decisions, as pure functions over decoded
// messages and handler tables. Portable: no Mach call is made here, so every
// decision is unit-tested on any host.
//
//  * classify()      handle an EXC_BAD_ACCESS inside a registered region, forward the rest
//  * build_forward() re-encode a request in the prior handler's behavior and flavor
//  * translate_reply() turn the prior handler's reply into the reply the kernel expects
//  * own_behavior()  the behavior we install with, so that forwarding stays possible
//  * prior_chain     the handlers we displaced, newest on top; a debugger's port
//                    found during a drift check is pushed, ours never is,
//                    dead ones are dropped
#pragma once

#include <squib/backend/mach/codec.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <system_error>

namespace squib::mach {

/// MACH_PORT_TYPE_DEAD_NAME: what mach_port_type() reports for a send right whose port died.
inline constexpr std::uint32_t port_type_dead_name = 1u << (16 + 4);
inline constexpr std::uint32_t port_type_send = 1u << 16;
inline constexpr std::uint32_t port_type_receive = 1u << 17;
inline constexpr std::uint32_t port_type_send_once = 1u << 18;
inline constexpr std::uint32_t port_type_port_set = 1u << 19;

/// Whether mach_port_type() bits say the name is dead (its port was destroyed).
[[nodiscard]] constexpr bool is_dead_name(std::uint32_t type) noexcept { return (type & port_type_dead_name) != 0; }

/// The top byte of an arm64 address is ignored by the MMU (TBI) and may carry
/// a tag; regions are registered untagged.
inline constexpr std::uint64_t untagged_address_mask = 0x00ff'ffff'ffff'ffffull;

// ---------------------------------------------------------------------------
// Exception port tables

/// One row of an exception port table, as task_get_exception_ports returns it.
struct handler_entry {
    std::uint32_t mask = 0;       ///< exception types this row covers (EXC_MASK_*)
    port_name port = port_null;   ///< a send right in our space (or null / dead)
    std::uint32_t behavior = 0;   ///< EXCEPTION_* | flags such as MACH_EXCEPTION_CODES
    std::int32_t flavor = 0;      ///< thread state flavor for the state behaviors

    [[nodiscard]] constexpr std::uint32_t base_behavior() const noexcept
    {
        return behavior & ~mach_exception_behavior_flags;
    }
    [[nodiscard]] constexpr bool codes64() const noexcept { return (behavior & mach_exception_codes) != 0; }
    friend constexpr bool operator==(const handler_entry&, const handler_entry&) = default;
};

/// A whole table: up to one row per exception type.
struct handler_table {
    static constexpr std::size_t capacity = 32; ///< more than EXC_TYPES_COUNT on any arch
    std::array<handler_entry, capacity> entries{};
    std::uint32_t count = 0;

    /// The row covering exception type `exception`, or nullptr.
    [[nodiscard]] const handler_entry* find(std::int32_t exception) const noexcept
    {
        const std::uint32_t bit = 1u << static_cast<unsigned>(exception);
        for (std::uint32_t i = 0; i < std::min<std::uint32_t>(count, capacity); ++i)
            if ((entries[i].mask & bit) != 0) return &entries[i];
        return nullptr;
    }
    [[nodiscard]] std::span<const handler_entry> rows() const noexcept
    {
        return std::span<const handler_entry>(entries).first(std::min<std::size_t>(count, capacity));
    }
};

/// The request kind (and code width) a handler installed with `behavior` receives.
/// Errors: mach_errc::bad_behavior (unknown base behavior, or a protected
/// behavior without MACH_EXCEPTION_CODES, which the kernel refuses).
[[nodiscard]] inline result<request_id_info> kind_for_behavior(std::uint32_t behavior) noexcept
{
    const bool code64 = (behavior & mach_exception_codes) != 0;
    switch (behavior & ~mach_exception_behavior_flags) {
    case exception_default: return request_id_info{request_kind::raise, code64};
    case exception_state: return request_id_info{request_kind::raise_state, code64};
    case exception_state_identity: return request_id_info{request_kind::raise_state_identity, code64};
    case exception_identity_protected:
        if (code64) return request_id_info{request_kind::raise_identity_protected, true};
        break;
    case exception_state_identity_protected:
        if (code64) return request_id_info{request_kind::raise_state_identity_protected, true};
        break;
    default: break;
    }
    return mach_errc::bad_behavior;
}

// ---------------------------------------------------------------------------
// Handle or forward

enum class verdict : std::uint8_t { handle, forward };

struct classification {
    verdict action = verdict::forward;
    std::uint64_t address = 0; ///< the untagged faulting address (meaningful for handle)
};

/// The faulting address of an EXC_BAD_ACCESS for a missing or protected page
/// (code KERN_INVALID_ADDRESS or KERN_PROTECTION_FAILURE, subcode = address),
/// tag byte removed; nullopt for any other exception or code.
[[nodiscard]] constexpr std::optional<std::uint64_t> fault_address(const exception_request& r) noexcept
{
    if (r.exception != exc_bad_access || r.code_count < 2) return std::nullopt;
    if (r.codes[0] != kern_invalid_address && r.codes[0] != kern_protection_failure) return std::nullopt;
    // 32-bit codes hold the address's low word only; it is not sign-extended.
    const std::uint64_t raw = r.code64 ? static_cast<std::uint64_t>(r.codes[1])
                                       : std::uint64_t{static_cast<std::uint32_t>(r.codes[1])};
    return raw & untagged_address_mask;
}

/// Handle an EXC_BAD_ACCESS (invalid address or protection failure) whose
/// address `in_region(addr)` claims; forward everything else.
///
/// **Example**
///
///     auto c = squib::mach::classify(req, [&](std::uint64_t a) noexcept { return index.find(a) != nullptr; });
///     if (c.action == squib::mach::verdict::handle) serve(c.address);
template <class InRegion>
[[nodiscard]] classification classify(const exception_request& r, InRegion&& in_region) noexcept
{
    const auto addr = fault_address(r);
    if (addr && in_region(*addr)) return {verdict::handle, *addr};
    return {verdict::forward, addr.value_or(0)};
}

// ---------------------------------------------------------------------------
// Forwarding

/// The behavior and flavor we install our port with. Normally the configured
/// ones (EXCEPTION_DEFAULT | MACH_EXCEPTION_CODES: thread and task ports, so
/// any prior's state can be fetched). When the prior handler takes protected
/// identities we take them too, with 64-bit codes: a protected request has
/// no thread port, so only a protected request can be forwarded to it.
struct install_behavior {
    std::uint32_t behavior = exception_default | mach_exception_codes;
    std::int32_t flavor = 0;
    friend constexpr bool operator==(const install_behavior&, const install_behavior&) = default;
};

[[nodiscard]] constexpr install_behavior own_behavior(install_behavior configured, const handler_entry* prior) noexcept
{
    if (prior != nullptr && port_valid(prior->port)) {
        const std::uint32_t base = prior->base_behavior();
        if (base == exception_identity_protected || base == exception_state_identity_protected)
            return {base | mach_exception_codes, prior->flavor};
    }
    configured.behavior |= mach_exception_codes; // we need whole 64-bit addresses
    return configured;
}

/// Builds in `out` the request the prior handler `prior` expects for the
/// exception in `in`: the id of its behavior, its flavor, codes cut to 32
/// bits unless it has MACH_EXCEPTION_CODES, addressed to `prior.port` (copy
/// send) with `reply_port` as reply port (make send-once). Thread, task and
/// token rights are passed on as copies. When the prior wants thread state
/// that `in` does not carry in its flavor, it is fetched with
/// `fetch_state(thread, flavor, span<std::uint32_t>) -> result<std::uint32_t>`.
/// Errors: mach_errc::bad_behavior, mach_errc::cannot_translate (the prior
/// needs thread and task ports, a protected identity, or state that `in` does
/// not carry and cannot yield), and fetch_state's error.
template <class FetchState>
[[nodiscard]] std::error_code build_forward(const exception_request& in, const handler_entry& prior,
                                            port_name reply_port, FetchState&& fetch_state,
                                            exception_request& out) noexcept
{
    const auto target = kind_for_behavior(prior.behavior);
    if (!target) return target.error();
    const auto id = request_id(target->kind, target->code64);
    if (!id) return mach_errc::bad_behavior;
    if (carries_ports(target->kind) && !carries_ports(in.kind)) return mach_errc::cannot_translate;
    if (carries_token(target->kind) && !carries_token(in.kind)) return mach_errc::cannot_translate;

    out.header = {msgh_bits(msg_type_copy_send, msg_type_make_send_once), 0, prior.port, reply_port, port_null, *id};
    out.kind = target->kind;
    out.code64 = target->code64;
    if (carries_ports(target->kind)) {
        out.thread = {in.thread.name, static_cast<std::uint8_t>(msg_type_copy_send)};
        out.task = {in.task.name, static_cast<std::uint8_t>(msg_type_copy_send)};
    }
    if (carries_token(target->kind)) {
        out.thread_id = in.thread_id;
        out.task_token = {in.task_token.name, static_cast<std::uint8_t>(msg_type_copy_send)};
    }
    out.exception = in.exception;
    out.code_count = std::min(in.code_count, max_codes);
    for (std::uint32_t i = 0; i < max_codes; ++i) {
        const std::int64_t c = i < out.code_count ? in.codes[i] : 0;
        // Without MACH_EXCEPTION_CODES the kernel sends CAST_DOWN codes; so do we.
        out.codes[i] = target->code64 ? c : std::int64_t{static_cast<std::int32_t>(static_cast<std::uint32_t>(
                                                static_cast<std::uint64_t>(c)))};
    }
    if (carries_state(target->kind)) {
        out.flavor = prior.flavor;
        if (carries_state(in.kind) && in.flavor == prior.flavor) {
            out.state_count = std::min(in.state_count, max_state_words);
            std::copy_n(in.state.begin(), out.state_count, out.state.begin());
        } else if (carries_ports(in.kind)) {
            auto n = fetch_state(in.thread.name, prior.flavor, std::span<std::uint32_t>(out.state));
            if (!n) return n.error();
            out.state_count = std::min(*n, max_state_words);
        } else {
            return mach_errc::cannot_translate;
        }
    }
    return {};
}

/// What the server must do besides sending the translated reply.
struct reply_plan {
    bool set_state = false;     ///< apply the prior's new state (forwarded flavor) to the thread first
    bool refresh_state = false; ///< then re-read the original flavor into the reply's new state
};

/// The forwarded request's shape, kept while the prior handler works on it.
struct forward_summary {
    request_kind kind = request_kind::raise;
    std::int32_t id = 0;
    std::int32_t flavor = 0;
};

/// Builds in `out` the reply to `original` from the prior handler's reply to
/// the forwarded request: the prior's return code, and for a state routine
/// the prior's new state when the flavors agree (else the old state, with the
/// plan telling the server to set the prior's state on the thread itself and
/// re-read it, as the kernel would have done for the prior directly).
[[nodiscard]] inline reply_plan translate_reply(const exception_request& original, const forward_summary& forwarded,
                                                const exception_reply& prior_reply, exception_reply& out) noexcept
{
    make_reply(original, prior_reply.ret_code, out);
    reply_plan plan;
    const bool prior_state = prior_reply.ret_code == kern_success && carries_state(forwarded.kind) &&
                             prior_reply.has_state;
    if (!prior_state) return plan;
    if (carries_state(original.kind) && original.flavor == prior_reply.flavor) {
        out.state_count = std::min(prior_reply.state_count, max_state_words);
        std::copy_n(prior_reply.state.begin(), out.state_count, out.state.begin());
        return plan;
    }
    plan.set_state = carries_ports(original.kind);
    plan.refresh_state = plan.set_state && carries_state(original.kind);
    return plan;
}

// ---------------------------------------------------------------------------
// Drift and the prior handlers

/// What a drift check found in the current table.
enum class drift : std::uint8_t {
    none,     ///< our port is still the handler
    replaced, ///< someone (a debugger attaching or detaching) installed another port
};

/// Compares our port with the row for EXC_BAD_ACCESS in `current`.
[[nodiscard]] inline drift check_drift(port_name ours, const handler_table& current) noexcept
{
    const handler_entry* row = current.find(exc_bad_access);
    return row != nullptr && row->port == ours ? drift::none : drift::replaced;
}

/// The handlers our port displaced, newest on top. The top one is the prior
/// handler exceptions are forwarded to; a null top means "no handler" (the
/// kernel moves on to the host level). Each entry owns one send right, which
/// `release(port_name)` gives back when the entry leaves.
///
///  * adopt(): a row found in the table (at start, or during a drift check)
///    becomes the new top. Our own port is never recorded. A port already in
///    the chain means the table went back to that state (a debugger detached
///    and restored what it saved): entries above it are dropped.
///  * drop_top(): the top's port died; the one below becomes the prior.
class prior_chain {
public:
    static constexpr std::size_t capacity = 8;

    template <class Release>
    void adopt(const handler_entry& e, port_name ours, Release&& release) noexcept
    {
        if (e.port == ours && port_valid(ours)) {
            release(e.port); // never our own port: give back the right the table handed us
            return;
        }
        for (std::size_t i = size_; i-- > 0;) {
            if (entries_[i].port == e.port) {
                if (port_valid(e.port)) release(e.port); // the chain already holds a right to it
                while (size_ > i + 1) release_entry(--size_, release);
                entries_[i] = e;
                return;
            }
        }
        if (size_ == capacity) { // forget the oldest
            release_entry(0, release);
            std::move(entries_.begin() + 1, entries_.end(), entries_.begin());
            --size_;
        }
        entries_[size_++] = e;
    }

    /// The prior handler, or nullptr when none was ever recorded.
    [[nodiscard]] const handler_entry* top() const noexcept { return size_ == 0 ? nullptr : &entries_[size_ - 1]; }

    template <class Release>
    void drop_top(Release&& release) noexcept
    {
        if (size_ > 0) release_entry(--size_, release);
    }

    template <class Release>
    void clear(Release&& release) noexcept
    {
        while (size_ > 0) release_entry(--size_, release);
    }

    [[nodiscard]] std::size_t size() const noexcept { return size_; }
    [[nodiscard]] std::span<const handler_entry> entries() const noexcept
    {
        return std::span<const handler_entry>(entries_).first(size_);
    }

private:
    template <class Release>
    void release_entry(std::size_t i, Release& release) noexcept
    {
        if (port_valid(entries_[i].port)) release(entries_[i].port);
        entries_[i] = {};
    }

    std::array<handler_entry, capacity> entries_{};
    std::size_t size_ = 0;
};

} // namespace squib::mach
