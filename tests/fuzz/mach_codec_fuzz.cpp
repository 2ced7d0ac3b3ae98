// libFuzzer target for the Mach exception codec and the forwarding policy
// (include/squib/backend/mach/codec.hpp, policy.hpp). Any byte string is a
// candidate request and reply; the properties checked:
//  * decoding never reads out of bounds (ASan) nor overflows (UBSan), and
//    accepts only messages exactly as long as their counts say;
//  * what decodes re-encodes to msgh_size bytes that decode to the same value,
//    and so do the replies made for it and its forwards in every behavior;
//  * what is refused can still be answered with a MIG error reply.
//
// Build and run: scripts/fuzz [seconds]. Regenerate the seed corpus in
// tests/fuzz/corpus/mach_codec: scripts/fuzz --seeds (compiles this file with
// SQUIB_MACH_WRITE_SEEDS, which adds a main() that writes them).
// tests/unit/mach_codec_corpus.cpp includes this file to replay the corpus
// through check_one() under doctest.
#include <squib/backend/mach/codec.hpp>
#include <squib/backend/mach/policy.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <span>
#include <system_error>

namespace squib_mach_fuzz {

namespace m = squib::mach;

/// What one input did.
struct outcome {
    const char* broken = nullptr;  ///< the property that failed, or nullptr
    std::int32_t request_id = 0;   ///< msgh_id when it decoded as a request
    std::error_code request_error; ///< why it did not
    bool reply_ok = false;         ///< it decoded as a reply
};

/// Scratch space, reused: a request is about 5 KiB.
struct scratch {
    m::exception_request req, again, fwd;
    m::exception_reply rep, rep_again;
    alignas(8) std::array<std::byte, m::receive_buffer_size> out{}, out2{};
};

/// Behaviors the forwarding policy is exercised with: every routine, both code widths.
constexpr std::array<m::handler_entry, 8> priors{{
    {m::exc_mask_bad_access, 0x2103, m::exception_default, 5},
    {m::exc_mask_bad_access, 0x2103, m::exception_default | m::mach_exception_codes, 5},
    {m::exc_mask_bad_access, 0x2103, m::exception_state, 1},
    {m::exc_mask_bad_access, 0x2103, m::exception_state | m::mach_exception_codes, 6},
    {m::exc_mask_bad_access, 0x2103, m::exception_state_identity, 6},
    {m::exc_mask_bad_access, 0x2103, m::exception_state_identity | m::mach_exception_codes, 1},
    {m::exc_mask_bad_access, 0x2103, m::exception_identity_protected | m::mach_exception_codes, 5},
    {m::exc_mask_bad_access, 0x2103, m::exception_state_identity_protected | m::mach_exception_codes, 6},
}};

/// A thread state source for forwards: flavor 1 has 4 words, 6 has 68.
inline squib::result<std::uint32_t> fake_state(m::port_name, std::int32_t flavor, std::span<std::uint32_t> out) noexcept
{
    const std::uint32_t words = flavor == 1 ? 4 : flavor == 6 ? 68 : 0;
    if (words == 0 || out.size() < words) return m::kern_error(m::kern_invalid_argument);
    for (std::uint32_t i = 0; i < words; ++i) out[i] = i * 0x01010101u;
    return words;
}

/// Encodes `rep`, decodes it back and compares.
inline const char* reply_round_trip(scratch& s, const m::exception_reply& rep) noexcept
{
    auto n = m::encode_reply(rep, s.out2);
    if (!n) return "a reply made for a decoded request does not encode";
    if (m::decode_reply(std::span<const std::byte>(s.out2).first(*n), s.rep_again)) return "an encoded reply does not decode";
    m::exception_reply expected = rep;
    expected.header.size = static_cast<std::uint32_t>(*n);
    if (!(s.rep_again == expected)) return "a reply does not round-trip";
    return nullptr;
}

/// Runs every property on one input.
inline outcome check_one(const std::uint8_t* data, std::size_t size) noexcept
{
    static scratch* s = new scratch; // one for the process: inputs are checked one at a time
    outcome o;
    auto fail = [&o](const char* why) noexcept {
        o.broken = why;
        return o;
    };
    // libFuzzer hands out unsigned chars; the codec reads std::byte.
    const std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);

    o.request_error = m::decode_request(in, s->req);
    if (!o.request_error) {
        o.request_id = s->req.header.id;
        if (s->req.header.size > size) return fail("accepted a msgh_size beyond the bytes");
        auto n = m::encode_request(s->req, s->out);
        if (!n) return fail("a decoded request does not encode");
        if (*n != s->req.header.size) return fail("a request re-encodes to another size");
        if (m::decode_request(std::span<const std::byte>(s->out).first(*n), s->again))
            return fail("a re-encoded request does not decode");
        if (!(s->again == s->req)) return fail("a request does not round-trip");

        for (m::kern_return rc : {m::kern_success, m::kern_failure}) {
            m::make_reply(s->req, rc, s->rep);
            if (const char* b = reply_round_trip(*s, s->rep)) return fail(b);
        }

        const auto c = m::classify(s->req, [](std::uint64_t a) noexcept { return (a >> 30) == 1; });
        if (c.action == m::verdict::handle && (c.address >> 56) != 0) return fail("a tagged address was handled");

        for (const m::handler_entry& prior : priors) {
            if (m::build_forward(s->req, prior, 0x2203, fake_state, s->fwd)) continue; // refusing is allowed
            auto f = m::encode_request(s->fwd, s->out);
            if (!f) return fail("a forward does not encode");
            if (m::decode_request(std::span<const std::byte>(s->out).first(*f), s->again))
                return fail("a forward does not decode");
            s->fwd.header.size = static_cast<std::uint32_t>(*f);
            s->fwd.header.bits = s->again.header.bits; // the encoder sets the complex bit
            if (!(s->again == s->fwd)) return fail("a forward does not round-trip");
            // The prior answers with its own state; we turn it into our answer.
            m::make_reply(s->fwd, m::kern_success, s->rep_again);
            const m::exception_reply prior_reply = s->rep_again;
            const m::forward_summary summary{s->fwd.kind, s->fwd.header.id, s->fwd.flavor};
            static_cast<void>(m::translate_reply(s->req, summary, prior_reply, s->rep));
            if (s->rep.header.id != m::reply_id(s->req.header.id)) return fail("a translated reply has the wrong id");
            if (const char* b = reply_round_trip(*s, s->rep)) return fail(b);
        }
    } else {
        if (o.request_error.category() != m::mach_category()) return fail("a request error outside the codec's category");
        m::message_header h;
        if (!m::decode_header(in, h) && m::can_reply(h)) {
            auto n = m::encode_error_reply(h, m::mig_return_for(o.request_error), s->out);
            if (!n || *n != m::error_reply_size) return fail("a refused request cannot be answered");
            if (m::decode_header(std::span<const std::byte>(s->out).first(*n), h) || h.size != m::error_reply_size)
                return fail("an error reply has a bad header");
        }
    }

    if (!m::decode_reply(in, s->rep)) {
        o.reply_ok = true;
        if (s->rep.header.size > size) return fail("accepted a reply size beyond the bytes");
        if (const char* b = reply_round_trip(*s, s->rep)) return fail(b);
    }
    return o;
}

} // namespace squib_mach_fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    const auto o = squib_mach_fuzz::check_one(data, size);
    if (o.broken != nullptr) {
        std::fprintf(stderr, "mach codec property violated: %s\n", o.broken);
        std::abort();
    }
    return 0;
}

#if defined(SQUIB_MACH_WRITE_SEEDS)
// ---- the seed corpus: valid messages of every kind, and one of each malformation

#include <fstream>
#include <string>
#include <vector>

namespace squib_mach_fuzz {

inline std::vector<std::byte> request_bytes(m::request_kind kind, bool code64, std::uint32_t codes, std::uint32_t states)
{
    auto r = std::make_unique<m::exception_request>();
    r->header = {m::msgh_bits(m::msg_type_port_send_once, m::msg_type_port_send), 0, 0x1707, 0x2303, 0,
                 *m::request_id(kind, code64)};
    r->kind = kind;
    r->code64 = code64;
    r->thread = {0x1103, static_cast<std::uint8_t>(m::msg_type_port_send)};
    r->task = {0x1203, static_cast<std::uint8_t>(m::msg_type_port_send)};
    r->thread_id = 0x1234;
    r->task_token = {0x1303, static_cast<std::uint8_t>(m::msg_type_port_send)};
    r->exception = m::exc_bad_access;
    r->code_count = codes;
    r->codes = {m::kern_protection_failure, 0x4000'1008};
    r->flavor = 6;
    r->state_count = m::carries_state(kind) ? states : 0;
    for (std::uint32_t i = 0; i < r->state_count; ++i) r->state[i] = i;
    std::vector<std::byte> out(m::receive_buffer_size);
    out.resize(*m::encode_request(*r, out));
    return out;
}

inline std::vector<std::byte> reply_bytes(m::request_kind kind, bool code64, m::kern_return rc)
{
    auto r = std::make_unique<m::exception_request>();
    const auto req = request_bytes(kind, code64, 2, 4);
    static_cast<void>(m::decode_request(req, *r));
    auto rep = std::make_unique<m::exception_reply>();
    m::make_reply(*r, rc, *rep);
    std::vector<std::byte> out(m::receive_buffer_size);
    out.resize(*m::encode_reply(*rep, out));
    return out;
}

inline void put32(std::vector<std::byte>& b, std::size_t off, std::uint32_t v)
{
    for (std::size_t i = 0; i < 4; ++i) b[off + i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
}

} // namespace squib_mach_fuzz

int main(int argc, char** argv)
{
    using namespace squib_mach_fuzz;
    using k = m::request_kind;
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    const std::string dir = argv[1];
    int written = 0;
    auto write = [&](const std::string& name, const std::vector<std::byte>& b) {
        std::ofstream f(dir + "/" + name, std::ios::binary | std::ios::trunc);
        f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size())); // ofstream wants char
        ++written;
    };

    // Valid requests: every kind, and every code count of the common ones.
    write("req-2401", request_bytes(k::raise, false, 2, 0));
    write("req-2402", request_bytes(k::raise_state, false, 2, 4));
    write("req-2403", request_bytes(k::raise_state_identity, false, 2, 4));
    write("req-2405", request_bytes(k::raise, true, 2, 0));
    write("req-2405-codes0", request_bytes(k::raise, true, 0, 0));
    write("req-2405-codes1", request_bytes(k::raise, true, 1, 0));
    write("req-2406", request_bytes(k::raise_state, true, 2, 4));
    write("req-2406-codes1", request_bytes(k::raise_state, true, 1, 4));
    write("req-2407", request_bytes(k::raise_state_identity, true, 2, 4));
    write("req-2407-nostate", request_bytes(k::raise_state_identity, true, 2, 0));
    write("req-2408", request_bytes(k::raise_identity_protected, true, 2, 0));
    write("req-2410", request_bytes(k::raise_state_identity_protected, true, 2, 4));
    auto trailer = request_bytes(k::raise, true, 2, 0);
    trailer.resize(trailer.size() + 8); // a format-0 trailer after msgh_size
    write("req-2405-trailer", trailer);

    // Valid replies.
    write("rep-2505", reply_bytes(k::raise, true, m::kern_success));
    write("rep-2506", reply_bytes(k::raise_state, true, m::kern_success));
    write("rep-2507-failure", reply_bytes(k::raise_state_identity, true, m::kern_failure));
    write("rep-2510", reply_bytes(k::raise_state_identity_protected, true, m::kern_success));
    std::vector<std::byte> bad_id(m::error_reply_size);
    const m::message_header unknown{m::msgh_bits(m::msg_type_port_send_once, 0), 24, 0x1707, 0x2303, 0, 2499};
    static_cast<void>(m::encode_error_reply(unknown, m::mig_bad_id, bad_id));
    write("rep-mig-bad-id", bad_id);

    // Malformed: one of each refusal.
    const auto good = request_bytes(k::raise_state_identity, true, 2, 4);
    write("bad-empty", {});
    write("bad-short-header", std::vector<std::byte>(good.begin(), good.begin() + 10));
    auto b = good;
    put32(b, 4, static_cast<std::uint32_t>(good.size() + 64));
    write("bad-size-beyond-bytes", b);
    b = good;
    put32(b, 4, 8);
    write("bad-size-below-header", b);
    b = good;
    put32(b, 4, static_cast<std::uint32_t>(good.size() - 4));
    write("bad-size-short", b);
    b = good;
    put32(b, 64, 3);
    write("bad-too-many-codes", b);
    b = good;
    put32(b, 64, 0xffff'ffffu);
    write("bad-code-count-huge", b);
    b = good;
    put32(b, 88, m::max_state_words + 1);
    write("bad-oversized-state", b);
    b = good;
    put32(b, 88, 9);
    write("bad-state-count-lies", b);
    b = good;
    put32(b, 0, m::msgh_bits(m::msg_type_port_send_once, m::msg_type_port_send));
    write("bad-not-complex", b);
    b = good;
    put32(b, 24, 3);
    write("bad-descriptor-count", b);
    b = good;
    b[39] = std::byte{1};
    write("bad-descriptor-type", b);
    b = good;
    put32(b, 20, 2409);
    write("bad-unknown-id", b);
    std::vector<std::byte> header_only(24);
    static_cast<void>(m::encode_header_only({m::msgh_bits(m::msg_type_port_send_once, 0), 0, 0x1707, 0x2303, 0, 2406},
                                            header_only));
    write("bad-header-only-2406", header_only);
    auto rep = reply_bytes(k::raise_state, true, m::kern_success);
    put32(rep, 4, 36);
    write("bad-reply-success-without-state", rep);
    std::printf("wrote %d seeds to %s\n", written, dir.c_str());
    return 0;
}
#endif
