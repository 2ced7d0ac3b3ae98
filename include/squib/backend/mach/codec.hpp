// squib-pager: the Mach exception messages on the wire. Portable: it builds
// and runs on any host, so the Mach backend's parsing is tested (and fuzzed)
// on Linux.
//
// The kernel raises an exception by sending a MIG request to the handler's
// port and blocks the faulting thread until a reply arrives (reply id =
// request id + 100). The requests come from two MIG subsystems:
//
//     exc      2401 exception_raise                  32-bit codes
//              2402 exception_raise_state
//              2403 exception_raise_state_identity
//     mach_exc 2405 mach_exception_raise             64-bit codes (MACH_EXCEPTION_CODES)
//              2406 mach_exception_raise_state
//              2407 mach_exception_raise_state_identity
//              2408 mach_exception_raise_identity_protected        (hardened: thread id + task token)
//              2410 mach_exception_raise_state_identity_protected  (2409, backtrace, is not decoded)
//
// MIG packs the fields on 4-byte boundaries and sends only `codeCnt` codes and
// `old_stateCnt` state words, so every field after the codes moves with
// codeCnt. This codec therefore never overlays a struct: it reads and writes
// each little-endian field through a bounds-checked cursor, and a message is
// accepted only if its msgh_size is exactly what its counts imply.
#pragma once

#include <squib/core/result.hpp>
#include <squib/error.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <type_traits>

namespace squib::mach {

// ---------------------------------------------------------------------------
// Mach facts (values from xnu's osfmk/mach headers; the same on arm64 and x86_64)

using port_name = std::uint32_t;  ///< mach_port_name_t
using kern_return = std::int32_t; ///< kern_return_t and mach_msg_return_t

inline constexpr port_name port_null = 0;
inline constexpr port_name port_dead = 0xffff'ffffu;

/// MACH_PORT_VALID: neither null nor dead.
[[nodiscard]] constexpr bool port_valid(port_name n) noexcept { return n != port_null && n != port_dead; }

inline constexpr kern_return kern_success = 0;
inline constexpr kern_return kern_invalid_address = 1;
inline constexpr kern_return kern_protection_failure = 2;
inline constexpr kern_return kern_invalid_argument = 4;
inline constexpr kern_return kern_failure = 5;
inline constexpr kern_return kern_resource_shortage = 6;
inline constexpr kern_return kern_invalid_name = 15;
inline constexpr kern_return kern_invalid_right = 17;
inline constexpr kern_return kern_invalid_value = 18;

inline constexpr kern_return mig_type_error = -300;
inline constexpr kern_return mig_reply_mismatch = -301;
inline constexpr kern_return mig_bad_id = -303;
inline constexpr kern_return mig_bad_arguments = -304;
inline constexpr kern_return mig_server_died = -308;

inline constexpr kern_return mach_send_invalid_dest = 0x1000'0003;
inline constexpr kern_return mach_send_timed_out = 0x1000'0004;
inline constexpr kern_return mach_send_msg_too_small = 0x1000'0008;
inline constexpr kern_return mach_send_invalid_reply = 0x1000'0009;
inline constexpr kern_return mach_send_invalid_right = 0x1000'000a;
inline constexpr kern_return mach_send_invalid_type = 0x1000'000f;
inline constexpr kern_return mach_send_invalid_header = 0x1000'0010;
inline constexpr kern_return mach_rcv_invalid_name = 0x1000'4002;
inline constexpr kern_return mach_rcv_timed_out = 0x1000'4003;
inline constexpr kern_return mach_rcv_too_large = 0x1000'4004;
inline constexpr kern_return mach_rcv_interrupted = 0x1000'4005;
inline constexpr kern_return mach_rcv_port_died = 0x1000'4009;

inline constexpr std::int32_t exc_bad_access = 1;           ///< EXC_BAD_ACCESS: code = kern_return, subcode = address
inline constexpr std::uint32_t exc_mask_bad_access = 1u << 1; ///< EXC_MASK_BAD_ACCESS
inline constexpr std::int32_t exc_types_count = 14;         ///< EXC_TYPES_COUNT (type 0 is illegal)

inline constexpr std::uint32_t exception_default = 1;
inline constexpr std::uint32_t exception_state = 2;
inline constexpr std::uint32_t exception_state_identity = 3;
inline constexpr std::uint32_t exception_identity_protected = 4;
inline constexpr std::uint32_t exception_state_identity_protected = 5;
inline constexpr std::uint32_t mach_exception_codes = 0x8000'0000u;           ///< 64-bit codes
inline constexpr std::uint32_t mach_exception_behavior_flags = 0xe000'0000u; ///< MACH_EXCEPTION_MASK

inline constexpr std::uint32_t max_codes = 2;          ///< EXCEPTION_CODE_MAX
inline constexpr std::uint32_t max_state_words = 1296; ///< THREAD_STATE_MAX, in 32-bit words

inline constexpr std::uint32_t msg_type_port_send = 17;      ///< MACH_MSG_TYPE_MOVE_SEND, as received
inline constexpr std::uint32_t msg_type_port_send_once = 18; ///< MACH_MSG_TYPE_MOVE_SEND_ONCE, as received
inline constexpr std::uint32_t msg_type_copy_send = 19;
inline constexpr std::uint32_t msg_type_make_send = 20;
inline constexpr std::uint32_t msg_type_make_send_once = 21;
inline constexpr std::uint32_t msgh_bits_complex = 0x8000'0000u;
inline constexpr std::uint32_t msg_port_descriptor = 0;

/// MACH_MSGH_BITS(remote, local).
[[nodiscard]] constexpr std::uint32_t msgh_bits(std::uint32_t remote, std::uint32_t local) noexcept
{
    return (remote & 0x1f) | ((local & 0x1f) << 8);
}
[[nodiscard]] constexpr std::uint32_t msgh_bits_remote(std::uint32_t bits) noexcept { return bits & 0x1f; }
[[nodiscard]] constexpr std::uint32_t msgh_bits_local(std::uint32_t bits) noexcept { return (bits >> 8) & 0x1f; }

inline constexpr std::int32_t reply_id_offset = 100;

/// The reply id for request id `id` (id + 100). Wraps instead of overflowing:
/// an error reply is made for any id a sender chose, INT32_MAX included.
[[nodiscard]] constexpr std::int32_t reply_id(std::int32_t id) noexcept
{
    return static_cast<std::int32_t>(static_cast<std::uint32_t>(id) + std::uint32_t{reply_id_offset});
}
/// The request id a reply id answers (id - 100), wrapping like reply_id().
[[nodiscard]] constexpr std::int32_t request_id_of_reply(std::int32_t id) noexcept
{
    return static_cast<std::int32_t>(static_cast<std::uint32_t>(id) - std::uint32_t{reply_id_offset});
}
inline constexpr std::int32_t mach_notify_send_once = 0100 + 07; ///< a send-once right died unused (71)

inline constexpr std::size_t header_size = 24;          ///< mach_msg_header_t
inline constexpr std::size_t body_size = 4;             ///< mach_msg_body_t
inline constexpr std::size_t port_descriptor_size = 12; ///< mach_msg_port_descriptor_t (user space)
inline constexpr std::size_t ndr_size = 8;              ///< NDR_record_t
inline constexpr std::size_t error_reply_size = 36;     ///< mig_reply_error_t: header, NDR, RetCode

/// The NDR record every MIG message carries: little-endian integers, ASCII, IEEE floats.
inline constexpr std::array<std::uint8_t, ndr_size> ndr_record{0, 0, 0, 0, 1, 0, 0, 0};

// ---------------------------------------------------------------------------
// Errors

/// Why the codec or the policy refused a message. (OS failures are
/// kern_category() codes; see kern_error().)
enum class mach_errc : int {
    truncated = 1,    ///< the bytes end inside the header or before msgh_size
    size_mismatch,    ///< msgh_size disagrees with what the counts in the message imply
    too_many_codes,   ///< codeCnt above EXCEPTION_CODE_MAX (2)
    oversized_state,  ///< a state count above THREAD_STATE_MAX (1296 words)
    bad_descriptor,   ///< complex bit, descriptor count or descriptor type is wrong for the id
    unknown_id,       ///< msgh_id is no exception request (or reply) this codec knows
    buffer_too_small, ///< the output buffer cannot hold the encoded message
    bad_behavior,     ///< an exception behavior no kernel accepts
    cannot_translate, ///< the request lacks what the prior handler's behavior needs
    bad_reply,        ///< a reply that MIG would not send (success without the new state)
};

} // namespace squib::mach

template <>
struct std::is_error_code_enum<squib::mach::mach_errc> : std::true_type {};

namespace squib::mach {

namespace detail {

class mach_category_impl final : public std::error_category {
public:
    [[nodiscard]] const char* name() const noexcept override { return "squib-mach"; }
    [[nodiscard]] std::string message(int value) const override
    {
        switch (static_cast<mach_errc>(value)) {
        case mach_errc::truncated: return "Mach message truncated";
        case mach_errc::size_mismatch: return "Mach message size disagrees with its counts";
        case mach_errc::too_many_codes: return "exception message carries more than two codes";
        case mach_errc::oversized_state: return "exception message carries more than THREAD_STATE_MAX state words";
        case mach_errc::bad_descriptor: return "exception message has wrong port descriptors";
        case mach_errc::unknown_id: return "unknown Mach exception message id";
        case mach_errc::buffer_too_small: return "buffer too small for the Mach message";
        case mach_errc::bad_behavior: return "invalid exception behavior";
        case mach_errc::cannot_translate: return "exception cannot be re-encoded in the handler's behavior";
        case mach_errc::bad_reply: return "invalid exception reply";
        }
        return "unknown squib-mach error";
    }
};

class kern_category_impl final : public std::error_category {
public:
    [[nodiscard]] const char* name() const noexcept override { return "mach"; }
    [[nodiscard]] std::string message(int value) const override
    {
        switch (value) {
        case kern_invalid_address: return "KERN_INVALID_ADDRESS";
        case kern_protection_failure: return "KERN_PROTECTION_FAILURE";
        case kern_invalid_argument: return "KERN_INVALID_ARGUMENT";
        case kern_failure: return "KERN_FAILURE";
        case kern_resource_shortage: return "KERN_RESOURCE_SHORTAGE";
        case kern_invalid_name: return "KERN_INVALID_NAME";
        case kern_invalid_right: return "KERN_INVALID_RIGHT";
        case kern_invalid_value: return "KERN_INVALID_VALUE";
        case mig_type_error: return "MIG_TYPE_ERROR";
        case mig_reply_mismatch: return "MIG_REPLY_MISMATCH";
        case mig_bad_id: return "MIG_BAD_ID";
        case mig_bad_arguments: return "MIG_BAD_ARGUMENTS";
        case mig_server_died: return "MIG_SERVER_DIED";
        case mach_send_invalid_dest: return "MACH_SEND_INVALID_DEST";
        case mach_send_timed_out: return "MACH_SEND_TIMED_OUT";
        case mach_send_msg_too_small: return "MACH_SEND_MSG_TOO_SMALL";
        case mach_send_invalid_reply: return "MACH_SEND_INVALID_REPLY";
        case mach_send_invalid_right: return "MACH_SEND_INVALID_RIGHT";
        case mach_send_invalid_type: return "MACH_SEND_INVALID_TYPE";
        case mach_send_invalid_header: return "MACH_SEND_INVALID_HEADER";
        case mach_rcv_invalid_name: return "MACH_RCV_INVALID_NAME";
        case mach_rcv_timed_out: return "MACH_RCV_TIMED_OUT";
        case mach_rcv_too_large: return "MACH_RCV_TOO_LARGE";
        case mach_rcv_interrupted: return "MACH_RCV_INTERRUPTED";
        case mach_rcv_port_died: return "MACH_RCV_PORT_DIED";
        default: break;
        }
        return "kern_return " + std::to_string(value);
    }
};

} // namespace detail

/// The category of mach_errc values.
[[nodiscard]] inline const std::error_category& mach_category() noexcept
{
    static const detail::mach_category_impl category;
    return category;
}

/// The category of kern_return_t / mach_msg_return_t values passed through from
/// Mach calls (or the simulated kernel). The value is the kern_return itself.
[[nodiscard]] inline const std::error_category& kern_category() noexcept
{
    static const detail::kern_category_impl category;
    return category;
}

[[nodiscard]] inline std::error_code make_error_code(mach_errc e) noexcept { return {static_cast<int>(e), mach_category()}; }

/// A kern_return as an error code: success (0) is the empty error code.
[[nodiscard]] inline std::error_code kern_error(kern_return kr) noexcept
{
    return kr == kern_success ? std::error_code{} : std::error_code{kr, kern_category()};
}

/// Whether `ec` is the kern_return `kr`.
[[nodiscard]] inline bool is_kern(std::error_code ec, kern_return kr) noexcept
{
    return ec.category() == kern_category() && ec.value() == kr;
}

/// The MIG return code a server puts in the error reply to a refused request,
/// as a MIG-generated server would: MIG_BAD_ID for an unknown id,
/// MIG_TYPE_ERROR for wrong descriptors, MIG_BAD_ARGUMENTS otherwise.
[[nodiscard]] inline kern_return mig_return_for(std::error_code ec) noexcept
{
    if (ec == mach_errc::unknown_id) return mig_bad_id;
    if (ec == mach_errc::bad_descriptor) return mig_type_error;
    return mig_bad_arguments;
}

// ---------------------------------------------------------------------------
// Message kinds

/// Which exception routine a request is, independent of its code width.
enum class request_kind : std::uint8_t {
    raise,                          ///< exception, codes; thread and task ports
    raise_state,                    ///< exception, codes, flavor, thread state
    raise_state_identity,           ///< both of the above
    raise_identity_protected,       ///< thread id and task identity token instead of ports
    raise_state_identity_protected, ///< protected identity plus thread state
};

[[nodiscard]] constexpr bool carries_ports(request_kind k) noexcept
{
    return k == request_kind::raise || k == request_kind::raise_state_identity;
}
[[nodiscard]] constexpr bool carries_token(request_kind k) noexcept
{
    return k == request_kind::raise_identity_protected || k == request_kind::raise_state_identity_protected;
}
[[nodiscard]] constexpr bool carries_state(request_kind k) noexcept
{
    return k == request_kind::raise_state || k == request_kind::raise_state_identity ||
           k == request_kind::raise_state_identity_protected;
}
/// Port descriptors in the request: thread + task, or the task token alone.
[[nodiscard]] constexpr std::uint32_t descriptor_count(request_kind k) noexcept
{
    return carries_ports(k) ? 2u : carries_token(k) ? 1u : 0u;
}

/// What a request id says.
struct request_id_info {
    request_kind kind = request_kind::raise;
    bool code64 = false; ///< 64-bit codes (the mach_exc subsystem)
};

/// The kind and code width of request id `id`, or nullopt if it is none.
[[nodiscard]] constexpr std::optional<request_id_info> lookup_request_id(std::int32_t id) noexcept
{
    switch (id) {
    case 2401: return request_id_info{request_kind::raise, false};
    case 2402: return request_id_info{request_kind::raise_state, false};
    case 2403: return request_id_info{request_kind::raise_state_identity, false};
    case 2405: return request_id_info{request_kind::raise, true};
    case 2406: return request_id_info{request_kind::raise_state, true};
    case 2407: return request_id_info{request_kind::raise_state_identity, true};
    case 2408: return request_id_info{request_kind::raise_identity_protected, true};
    case 2410: return request_id_info{request_kind::raise_state_identity_protected, true};
    default: return std::nullopt;
    }
}

/// The request id for `kind` with 64-bit codes or not; nullopt for the
/// protected kinds without 64-bit codes (the kernel has no such message).
[[nodiscard]] constexpr std::optional<std::int32_t> request_id(request_kind kind, bool code64) noexcept
{
    switch (kind) {
    case request_kind::raise: return code64 ? 2405 : 2401;
    case request_kind::raise_state: return code64 ? 2406 : 2402;
    case request_kind::raise_state_identity: return code64 ? 2407 : 2403;
    case request_kind::raise_identity_protected: return code64 ? std::optional<std::int32_t>{2408} : std::nullopt;
    case request_kind::raise_state_identity_protected:
        return code64 ? std::optional<std::int32_t>{2410} : std::nullopt;
    }
    return std::nullopt;
}

/// The exact msgh_size of a request with `codes` codes and `state_words` state words.
[[nodiscard]] constexpr std::size_t request_size(request_kind kind, bool code64, std::uint32_t codes,
                                                 std::uint32_t state_words) noexcept
{
    std::size_t n = header_size;
    if (descriptor_count(kind) != 0) n += body_size + descriptor_count(kind) * port_descriptor_size;
    n += ndr_size;
    if (carries_token(kind)) n += 8; // thread_id
    n += 4 + 4;                      // exception, codeCnt
    n += std::size_t{codes} * (code64 ? 8 : 4);
    if (carries_state(kind)) n += 4 + 4 + std::size_t{state_words} * 4; // flavor, old_stateCnt, old_state
    return n;
}

/// The largest request the kernel can send (state_identity with two codes and
/// a full state), and a receive buffer that holds it plus any trailer.
inline constexpr std::size_t max_request_size =
    request_size(request_kind::raise_state_identity, true, max_codes, max_state_words);
inline constexpr std::size_t max_reply_size = header_size + ndr_size + 4 + 4 + 4 + max_state_words * 4;
inline constexpr std::size_t receive_buffer_size = 8192;
static_assert(max_request_size + 256 <= receive_buffer_size && max_reply_size + 256 <= receive_buffer_size,
              "the receive buffer must hold the largest request or reply and a trailer");

// ---------------------------------------------------------------------------
// Decoded messages

/// mach_msg_header_t. On a received message `remote` is the reply port and
/// `local` the port it arrived on.
struct message_header {
    std::uint32_t bits = 0;
    std::uint32_t size = 0; ///< msgh_size; encoders compute it
    port_name remote = port_null;
    port_name local = port_null;
    port_name voucher = port_null;
    std::int32_t id = 0;
    friend constexpr bool operator==(const message_header&, const message_header&) = default;
};

/// mach_msg_port_descriptor_t without its padding.
struct port_descriptor {
    port_name name = port_null;
    std::uint8_t disposition = 0; ///< MACH_MSG_TYPE_*: 17 or 18 as received, 19 (copy send) when forwarding
    friend constexpr bool operator==(const port_descriptor&, const port_descriptor&) = default;
};

/// Any exception request, decoded. Only the fields of its kind are meaningful
/// (and compared). About 5 KiB: servers keep one and decode into it.
struct exception_request {
    message_header header;
    request_kind kind = request_kind::raise;
    bool code64 = true;
    port_descriptor thread;     ///< carries_ports kinds
    port_descriptor task;       ///< carries_ports kinds
    std::uint64_t thread_id = 0; ///< carries_token kinds
    port_descriptor task_token; ///< carries_token kinds
    std::int32_t exception = 0;
    std::uint32_t code_count = 0;
    std::array<std::int64_t, max_codes> codes{}; ///< 32-bit codes are stored sign-extended, as C would widen them
    std::int32_t flavor = 0;                      ///< carries_state kinds
    std::uint32_t state_count = 0;                ///< carries_state kinds, in 32-bit words
    std::array<std::uint32_t, max_state_words> state{};

    [[nodiscard]] std::span<const std::int64_t> code_span() const noexcept
    {
        return std::span<const std::int64_t>(codes).first(std::min(code_count, max_codes));
    }
    [[nodiscard]] std::span<const std::uint32_t> state_span() const noexcept
    {
        return std::span<const std::uint32_t>(state).first(std::min(state_count, max_state_words));
    }

    friend bool operator==(const exception_request& a, const exception_request& b) noexcept
    {
        if (a.header != b.header || a.kind != b.kind || a.code64 != b.code64 || a.exception != b.exception ||
            a.code_count != b.code_count || !std::ranges::equal(a.code_span(), b.code_span()))
            return false;
        if (carries_ports(a.kind) && (a.thread != b.thread || a.task != b.task)) return false;
        if (carries_token(a.kind) && (a.thread_id != b.thread_id || a.task_token != b.task_token)) return false;
        if (carries_state(a.kind) && (a.flavor != b.flavor || a.state_count != b.state_count ||
                                      !std::ranges::equal(a.state_span(), b.state_span())))
            return false;
        return true;
    }
};

/// Any exception reply, decoded: RetCode, and for the state routines the
/// flavor and new state (absent in an error reply, as MIG sends it).
struct exception_reply {
    message_header header;
    kern_return ret_code = kern_success;
    bool has_state = false;
    std::int32_t flavor = 0;
    std::uint32_t state_count = 0;
    std::array<std::uint32_t, max_state_words> state{};

    [[nodiscard]] std::span<const std::uint32_t> state_span() const noexcept
    {
        return std::span<const std::uint32_t>(state).first(std::min(state_count, max_state_words));
    }

    friend bool operator==(const exception_reply& a, const exception_reply& b) noexcept
    {
        if (a.header != b.header || a.ret_code != b.ret_code || a.has_state != b.has_state) return false;
        return !a.has_state || (a.flavor == b.flavor && a.state_count == b.state_count &&
                                std::ranges::equal(a.state_span(), b.state_span()));
    }
};

// ---------------------------------------------------------------------------
// Cursors

namespace detail {

/// Reads little-endian fields from a byte span; any read past the end fails
/// the cursor and yields zero, so callers check ok() once at the end.
class wire_reader {
public:
    wire_reader(std::span<const std::byte> bytes, std::size_t pos = 0) noexcept : bytes_(bytes), pos_(pos) {}

    [[nodiscard]] std::uint32_t u32() noexcept { return static_cast<std::uint32_t>(take(4)); }
    [[nodiscard]] std::int32_t i32() noexcept { return static_cast<std::int32_t>(u32()); }
    [[nodiscard]] std::uint64_t u64() noexcept { return take(8); }
    [[nodiscard]] std::int64_t i64() noexcept { return static_cast<std::int64_t>(u64()); }
    void skip(std::size_t n) noexcept { static_cast<void>(room(n)); pos_ += ok_ ? n : 0; }

    [[nodiscard]] bool ok() const noexcept { return ok_; }
    [[nodiscard]] std::size_t pos() const noexcept { return pos_; }

private:
    [[nodiscard]] bool room(std::size_t n) noexcept
    {
        if (!ok_ || bytes_.size() - pos_ < n) ok_ = false;
        return ok_;
    }
    [[nodiscard]] std::uint64_t take(std::size_t n) noexcept
    {
        if (!room(n)) return 0;
        std::uint64_t v = 0;
        for (std::size_t i = 0; i < n; ++i) v |= std::to_integer<std::uint64_t>(bytes_[pos_ + i]) << (8 * i);
        pos_ += n;
        return v;
    }

    std::span<const std::byte> bytes_;
    std::size_t pos_;
    bool ok_ = true;
};

/// Writes little-endian fields into a byte span; fails (and writes nothing
/// more) once the span is full.
class wire_writer {
public:
    explicit wire_writer(std::span<std::byte> out) noexcept : out_(out) {}

    void u32(std::uint32_t v) noexcept { put(v, 4); }
    void i32(std::int32_t v) noexcept { u32(static_cast<std::uint32_t>(v)); }
    void u64(std::uint64_t v) noexcept { put(v, 8); }
    void i64(std::int64_t v) noexcept { u64(static_cast<std::uint64_t>(v)); }
    void bytes(std::span<const std::uint8_t> b) noexcept
    {
        for (std::uint8_t x : b) put(x, 1);
    }

    [[nodiscard]] bool ok() const noexcept { return ok_; }
    [[nodiscard]] std::size_t pos() const noexcept { return pos_; }

private:
    void put(std::uint64_t v, std::size_t n) noexcept
    {
        if (!ok_ || out_.size() - pos_ < n) {
            ok_ = false;
            return;
        }
        for (std::size_t i = 0; i < n; ++i) out_[pos_ + i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
        pos_ += n;
    }

    std::span<std::byte> out_;
    std::size_t pos_ = 0;
    bool ok_ = true;
};

inline void write_header(wire_writer& w, const message_header& h, std::uint32_t size) noexcept
{
    w.u32(h.bits);
    w.u32(size);
    w.u32(h.remote);
    w.u32(h.local);
    w.u32(h.voucher);
    w.i32(h.id);
}

inline void write_descriptor(wire_writer& w, const port_descriptor& d) noexcept
{
    w.u32(d.name);
    w.u32(0);                                                              // pad1
    w.u32((std::uint32_t{d.disposition} << 16) | (msg_port_descriptor << 24)); // pad2:16, disposition:8, type:8
}

[[nodiscard]] inline bool read_descriptor(wire_reader& r, port_descriptor& d) noexcept
{
    d.name = r.u32();
    r.skip(4); // pad1
    const std::uint32_t word = r.u32();
    d.disposition = static_cast<std::uint8_t>((word >> 16) & 0xff);
    return (word >> 24) == msg_port_descriptor;
}

} // namespace detail

// ---------------------------------------------------------------------------
// Decoding and encoding

/// Reads the header of any Mach message.
/// Errors: mach_errc::truncated if `in` is shorter than a header or than its
/// own msgh_size; mach_errc::size_mismatch if msgh_size is below a header.
[[nodiscard]] inline std::error_code decode_header(std::span<const std::byte> in, message_header& h) noexcept
{
    if (in.size() < header_size) return mach_errc::truncated;
    detail::wire_reader r(in);
    h.bits = r.u32();
    h.size = r.u32();
    h.remote = r.u32();
    h.local = r.u32();
    h.voucher = r.u32();
    h.id = r.i32();
    if (h.size < header_size) return mach_errc::size_mismatch;
    if (h.size > in.size()) return mach_errc::truncated; // the header claims more than arrived
    return {};
}

/// Decodes an exception request. `in` is the received bytes (a trailer after
/// msgh_size is ignored). Every field is bounds-checked and the message must
/// be exactly as long as its counts say.
/// Errors: mach_errc::truncated, size_mismatch, unknown_id, bad_descriptor,
/// too_many_codes, oversized_state.
///
/// **Example**
///
///     squib::mach::exception_request req;
///     if (auto ec = squib::mach::decode_request(received, req))
///         reply_error(squib::mach::mig_return_for(ec));
[[nodiscard]] inline std::error_code decode_request(std::span<const std::byte> in, exception_request& out) noexcept
{
    message_header h;
    if (auto ec = decode_header(in, h)) return ec;
    const auto info = lookup_request_id(h.id);
    if (!info) return mach_errc::unknown_id;
    const std::uint32_t descriptors = descriptor_count(info->kind);
    const bool complex = (h.bits & msgh_bits_complex) != 0;
    if (complex != (descriptors != 0)) return mach_errc::bad_descriptor;

    detail::wire_reader r(in.first(h.size), header_size);
    out.header = h;
    out.kind = info->kind;
    out.code64 = info->code64;
    if (descriptors != 0) {
        if (r.u32() != descriptors) return r.ok() ? mach_errc::bad_descriptor : mach_errc::size_mismatch;
        bool typed = true;
        if (carries_ports(info->kind)) {
            typed = detail::read_descriptor(r, out.thread) && typed;
            typed = detail::read_descriptor(r, out.task) && typed;
        } else {
            typed = detail::read_descriptor(r, out.task_token);
        }
        if (!r.ok()) return mach_errc::size_mismatch;
        if (!typed) return mach_errc::bad_descriptor;
    }
    r.skip(ndr_size); // NDR_record: the kernel always sends the native one
    if (carries_token(info->kind)) out.thread_id = r.u64();
    out.exception = r.i32();
    out.code_count = r.u32();
    if (!r.ok()) return mach_errc::size_mismatch;
    if (out.code_count > max_codes) return mach_errc::too_many_codes;
    for (std::uint32_t i = 0; i < out.code_count; ++i)
        out.codes[i] = info->code64 ? r.i64() : std::int64_t{r.i32()};
    for (std::uint32_t i = out.code_count; i < max_codes; ++i) out.codes[i] = 0;
    if (carries_state(info->kind)) {
        out.flavor = r.i32();
        out.state_count = r.u32();
        if (!r.ok()) return mach_errc::size_mismatch;
        if (out.state_count > max_state_words) return mach_errc::oversized_state;
        for (std::uint32_t i = 0; i < out.state_count; ++i) out.state[i] = r.u32();
    }
    if (!r.ok() || r.pos() != h.size) return mach_errc::size_mismatch;
    return {};
}

/// Encodes `req` into `out` and returns its size; msgh_size is computed (the
/// header's `size` is ignored) and msgh_id must agree with kind and code64.
/// 32-bit codes are truncated to their low 32 bits.
/// Errors: mach_errc::unknown_id, too_many_codes, oversized_state, buffer_too_small.
[[nodiscard]] inline result<std::size_t> encode_request(const exception_request& req, std::span<std::byte> out) noexcept
{
    const auto id = request_id(req.kind, req.code64);
    if (!id || *id != req.header.id) return mach_errc::unknown_id;
    if (req.code_count > max_codes) return mach_errc::too_many_codes;
    const std::uint32_t states = carries_state(req.kind) ? req.state_count : 0;
    if (states > max_state_words) return mach_errc::oversized_state;
    const std::size_t size = request_size(req.kind, req.code64, req.code_count, states);
    if (out.size() < size) return mach_errc::buffer_too_small;

    detail::wire_writer w(out);
    const std::uint32_t descriptors = descriptor_count(req.kind);
    message_header h = req.header;
    h.bits = descriptors != 0 ? (h.bits | msgh_bits_complex) : (h.bits & ~msgh_bits_complex);
    detail::write_header(w, h, static_cast<std::uint32_t>(size));
    if (descriptors != 0) {
        w.u32(descriptors);
        if (carries_ports(req.kind)) {
            detail::write_descriptor(w, req.thread);
            detail::write_descriptor(w, req.task);
        } else {
            detail::write_descriptor(w, req.task_token);
        }
    }
    w.bytes(ndr_record);
    if (carries_token(req.kind)) w.u64(req.thread_id);
    w.i32(req.exception);
    w.u32(req.code_count);
    for (std::uint32_t i = 0; i < req.code_count; ++i) {
        if (req.code64)
            w.i64(req.codes[i]);
        else
            w.u32(static_cast<std::uint32_t>(static_cast<std::uint64_t>(req.codes[i]))); // CAST_DOWN: low 32 bits
    }
    if (carries_state(req.kind)) {
        w.i32(req.flavor);
        w.u32(states);
        for (std::uint32_t i = 0; i < states; ++i) w.u32(req.state[i]);
    }
    if (!w.ok() || w.pos() != size) return mach_errc::buffer_too_small;
    return size;
}

/// Decodes a reply to one of the requests above (id = request id + 100).
/// A state routine's reply carries the new state unless it is an error reply
/// (36 bytes, RetCode not KERN_SUCCESS), exactly as a MIG client accepts it.
/// Errors: mach_errc::truncated, size_mismatch, unknown_id, bad_descriptor,
/// oversized_state.
[[nodiscard]] inline std::error_code decode_reply(std::span<const std::byte> in, exception_reply& out) noexcept
{
    message_header h;
    if (auto ec = decode_header(in, h)) return ec;
    const auto info = lookup_request_id(request_id_of_reply(h.id));
    if (!info) return mach_errc::unknown_id;
    if ((h.bits & msgh_bits_complex) != 0) return mach_errc::bad_descriptor;
    detail::wire_reader r(in.first(h.size), header_size);
    out.header = h;
    r.skip(ndr_size);
    out.ret_code = r.i32();
    out.has_state = false;
    out.flavor = 0;
    out.state_count = 0;
    if (!r.ok()) return mach_errc::size_mismatch;
    if (carries_state(info->kind) && !(h.size == error_reply_size && out.ret_code != kern_success)) {
        out.has_state = true;
        out.flavor = r.i32();
        out.state_count = r.u32();
        if (!r.ok()) return mach_errc::size_mismatch;
        if (out.state_count > max_state_words) return mach_errc::oversized_state;
        for (std::uint32_t i = 0; i < out.state_count; ++i) out.state[i] = r.u32();
    }
    if (!r.ok() || r.pos() != h.size) return mach_errc::size_mismatch;
    return {};
}

/// Encodes a reply and returns its size (msgh_size computed).
/// Errors: mach_errc::unknown_id (id - 100 is no request), bad_reply (a state
/// routine answered with success but no state), oversized_state, buffer_too_small.
[[nodiscard]] inline result<std::size_t> encode_reply(const exception_reply& rep, std::span<std::byte> out) noexcept
{
    const auto info = lookup_request_id(request_id_of_reply(rep.header.id));
    if (!info) return mach_errc::unknown_id;
    const bool with_state = carries_state(info->kind) && rep.has_state;
    if (carries_state(info->kind) && !rep.has_state && rep.ret_code == kern_success) return mach_errc::bad_reply;
    if (with_state && rep.state_count > max_state_words) return mach_errc::oversized_state;
    const std::size_t size = error_reply_size + (with_state ? 8 + std::size_t{rep.state_count} * 4 : 0);
    if (out.size() < size) return mach_errc::buffer_too_small;
    detail::wire_writer w(out);
    message_header h = rep.header;
    h.bits &= ~msgh_bits_complex;
    detail::write_header(w, h, static_cast<std::uint32_t>(size));
    w.bytes(ndr_record);
    w.i32(rep.ret_code);
    if (with_state) {
        w.i32(rep.flavor);
        w.u32(rep.state_count);
        for (std::uint32_t i = 0; i < rep.state_count; ++i) w.u32(rep.state[i]);
    }
    if (!w.ok() || w.pos() != size) return mach_errc::buffer_too_small;
    return size;
}

/// Whether a server can answer the message with this header: its reply port
/// is valid and arrived as a send or send-once right.
[[nodiscard]] constexpr bool can_reply(const message_header& h) noexcept
{
    const std::uint32_t type = msgh_bits_remote(h.bits);
    return port_valid(h.remote) && (type == msg_type_port_send || type == msg_type_port_send_once);
}

/// The header of the reply to a request with header `req`: to its reply port,
/// moving the right it arrived as, id + 100.
[[nodiscard]] constexpr message_header reply_header_for(const message_header& req) noexcept
{
    return {msgh_bits(msgh_bits_remote(req.bits), 0), 0, req.remote, port_null, port_null, reply_id(req.id)};
}

/// Fills `out` with the reply to `req` carrying `rc`. A state routine's
/// successful reply echoes the old state as the new one; an error reply
/// carries no state, as MIG sends it.
inline void make_reply(const exception_request& req, kern_return rc, exception_reply& out) noexcept
{
    out.header = reply_header_for(req.header);
    out.ret_code = rc;
    out.has_state = carries_state(req.kind) && rc == kern_success;
    out.flavor = out.has_state ? req.flavor : 0;
    out.state_count = out.has_state ? req.state_count : 0;
    if (out.has_state) std::copy_n(req.state.begin(), std::min(req.state_count, max_state_words), out.state.begin());
}

/// Encodes the 36-byte error reply (mig_reply_error_t) to a request with
/// header `req`: MIG_BAD_ID for an unknown id, MIG_BAD_ARGUMENTS for a
/// malformed one, and so on. Works for any id.
/// Errors: mach_errc::bad_reply if the request has no reply port; buffer_too_small.
[[nodiscard]] inline result<std::size_t> encode_error_reply(const message_header& req, kern_return rc,
                                                            std::span<std::byte> out) noexcept
{
    if (!can_reply(req)) return mach_errc::bad_reply;
    if (out.size() < error_reply_size) return mach_errc::buffer_too_small;
    detail::wire_writer w(out);
    detail::write_header(w, reply_header_for(req), static_cast<std::uint32_t>(error_reply_size));
    w.bytes(ndr_record);
    w.i32(rc);
    return error_reply_size;
}

/// Encodes a message that is only a header (msgh_size 24), e.g. a wake-up.
/// Errors: mach_errc::buffer_too_small.
[[nodiscard]] inline result<std::size_t> encode_header_only(const message_header& h, std::span<std::byte> out) noexcept
{
    if (out.size() < header_size) return mach_errc::buffer_too_small;
    detail::wire_writer w(out);
    message_header simple = h;
    simple.bits &= ~msgh_bits_complex;
    detail::write_header(w, simple, static_cast<std::uint32_t>(header_size));
    return header_size;
}

/// Marks the reply port of a received message as used: after a server has
/// replied (moving the send-once right), destroying the message must not
/// destroy that right a second time. `msg` must hold at least a header.
inline void clear_reply_port(std::span<std::byte> msg) noexcept
{
    if (msg.size() < header_size) return;
    message_header h;
    detail::wire_reader r(msg);
    h.bits = r.u32();
    detail::wire_writer w(msg);
    w.u32(h.bits & ~std::uint32_t{0x1f}); // remote disposition: none
    w.u32(r.u32());                       // msgh_size unchanged
    w.u32(port_null);                     // msgh_remote_port
}

} // namespace squib::mach
