// The Mach exception message codec (include/squib/backend/mach/codec.hpp):
// layouts checked byte by byte against MIG's packing, round trips of every
// message kind, and every malformed input refused.
#include <squib/backend/mach/codec.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <vector>

namespace {

namespace m = squib::mach;
using m::mach_errc;
using m::request_kind;

struct kind_case {
    request_kind kind;
    bool code64;
    std::int32_t id;
};

// Every request the codec decodes, with its msgh_id.
constexpr std::array<kind_case, 8> all_kinds{{
    {request_kind::raise, false, 2401},
    {request_kind::raise_state, false, 2402},
    {request_kind::raise_state_identity, false, 2403},
    {request_kind::raise, true, 2405},
    {request_kind::raise_state, true, 2406},
    {request_kind::raise_state_identity, true, 2407},
    {request_kind::raise_identity_protected, true, 2408},
    {request_kind::raise_state_identity_protected, true, 2410},
}};

std::uint32_t u32_at(std::span<const std::byte> b, std::size_t off)
{
    std::uint32_t v = 0;
    for (std::size_t i = 0; i < 4; ++i) v |= std::to_integer<std::uint32_t>(b[off + i]) << (8 * i);
    return v;
}
std::uint64_t u64_at(std::span<const std::byte> b, std::size_t off)
{
    return u32_at(b, off) | (std::uint64_t{u32_at(b, off + 4)} << 32);
}
void put_u32(std::span<std::byte> b, std::size_t off, std::uint32_t v)
{
    for (std::size_t i = 0; i < 4; ++i) b[off + i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
}

/// A request as the kernel would send it (after receive: reply right as send-once),
/// every field distinct so a field read from the wrong offset is caught.
std::unique_ptr<m::exception_request> sample(request_kind kind, bool code64, std::uint32_t codes, std::uint32_t states)
{
    auto r = std::make_unique<m::exception_request>();
    r->header = {m::msgh_bits(m::msg_type_port_send_once, m::msg_type_port_send), 0, 0x1707, 0x2303, 0,
                 *m::request_id(kind, code64)};
    r->kind = kind;
    r->code64 = code64;
    r->thread = {0x1103, static_cast<std::uint8_t>(m::msg_type_port_send)};
    r->task = {0x1203, static_cast<std::uint8_t>(m::msg_type_port_send)};
    r->thread_id = 0x0102'0304'0506'0708;
    r->task_token = {0x1303, static_cast<std::uint8_t>(m::msg_type_port_send)};
    r->exception = m::exc_bad_access;
    r->code_count = codes;
    const std::array<std::int64_t, 2> values{m::kern_protection_failure, code64 ? 0x0000'7fff'1234'5000 : -4096};
    for (std::uint32_t i = 0; i < codes; ++i) r->codes[i] = values[i];
    r->flavor = 6;
    r->state_count = states;
    for (std::uint32_t i = 0; i < states; ++i) r->state[i] = 0xa000'0000u + i;
    return r;
}

std::vector<std::byte> encode(const m::exception_request& r)
{
    std::vector<std::byte> out(m::receive_buffer_size);
    auto n = m::encode_request(r, out);
    REQUIRE(n);
    out.resize(*n);
    return out;
}

std::error_code decode(std::span<const std::byte> bytes)
{
    auto r = std::make_unique<m::exception_request>();
    return m::decode_request(bytes, *r);
}

} // namespace

TEST_SUITE("mach_codec")
{
    TEST_CASE("request ids of both subsystems, replies at id + 100")
    {
        for (const auto& k : all_kinds) {
            auto info = m::lookup_request_id(k.id);
            REQUIRE(info.has_value());
            CHECK(info->kind == k.kind);
            CHECK(info->code64 == k.code64);
            CHECK(m::request_id(k.kind, k.code64) == k.id);
        }
        for (std::int32_t id : {0, -1, 2400, 2404, 2409, 2411, 2501, 2505, 71})
            CHECK_FALSE(m::lookup_request_id(id).has_value());
        // The kernel has no protected message with 32-bit codes.
        CHECK_FALSE(m::request_id(request_kind::raise_identity_protected, false).has_value());
        CHECK_FALSE(m::request_id(request_kind::raise_state_identity_protected, false).has_value());
    }

    TEST_CASE("mach_exception_raise is laid out as MIG packs it (4-byte packing, no padding)")
    {
        const auto req = sample(request_kind::raise, true, 2, 0);
        const auto b = encode(*req);
        REQUIRE(b.size() == 84); // sizeof(__Request__mach_exception_raise_t)
        CHECK(u32_at(b, 0) == (m::msgh_bits(m::msg_type_port_send_once, m::msg_type_port_send) | m::msgh_bits_complex));
        CHECK(u32_at(b, 4) == 84);     // msgh_size
        CHECK(u32_at(b, 8) == 0x1707); // msgh_remote_port (the reply port)
        CHECK(u32_at(b, 12) == 0x2303);
        CHECK(u32_at(b, 16) == 0);    // voucher
        CHECK(u32_at(b, 20) == 2405); // msgh_id
        CHECK(u32_at(b, 24) == 2);    // msgh_descriptor_count
        CHECK(u32_at(b, 28) == 0x1103);                               // thread.name
        CHECK(std::to_integer<int>(b[38]) == m::msg_type_port_send); // thread.disposition
        CHECK(std::to_integer<int>(b[39]) == 0);                      // thread.type = MACH_MSG_PORT_DESCRIPTOR
        CHECK(u32_at(b, 40) == 0x1203);                               // task.name
        const std::array<int, 8> ndr{0, 0, 0, 0, 1, 0, 0, 0};
        for (std::size_t i = 0; i < 8; ++i) CHECK(std::to_integer<int>(b[52 + i]) == ndr[i]);
        CHECK(u32_at(b, 60) == 1); // exception = EXC_BAD_ACCESS
        CHECK(u32_at(b, 64) == 2); // codeCnt
        CHECK(u64_at(b, 68) == 2); // code[0] = KERN_PROTECTION_FAILURE
        CHECK(u64_at(b, 76) == 0x0000'7fff'1234'5000ull);
    }

    TEST_CASE("fields after the codes move with codeCnt")
    {
        for (std::uint32_t codes = 0; codes <= 2; ++codes) {
            CAPTURE(codes);
            // mach_exception_raise_state: header, NDR, exception, codeCnt, codes, flavor, old_stateCnt, old_state
            const auto b = encode(*sample(request_kind::raise_state, true, codes, 3));
            CHECK(b.size() == 48 + 8 * codes + 4 * 3);
            CHECK(u32_at(b, 36) == codes);
            CHECK(u32_at(b, 40 + 8 * codes) == 6);               // flavor
            CHECK(u32_at(b, 44 + 8 * codes) == 3);               // old_stateCnt
            CHECK(u32_at(b, 48 + 8 * codes) == 0xa000'0000u);    // old_state[0]
            CHECK(u32_at(b, 48 + 8 * codes + 8) == 0xa000'0002u); // old_state[2]
            // exception_raise_state: the same with 4-byte codes.
            const auto s = encode(*sample(request_kind::raise_state, false, codes, 3));
            CHECK(s.size() == 48 + 4 * codes + 4 * 3);
            CHECK(u32_at(s, 40 + 4 * codes) == 6);
            // mach_exception_raise_state_identity: after two descriptors.
            const auto i = encode(*sample(request_kind::raise_state_identity, true, codes, 3));
            CHECK(i.size() == 76 + 8 * codes + 4 * 3);
            CHECK(u32_at(i, 64) == codes);
            CHECK(u32_at(i, 68 + 8 * codes) == 6);
            CHECK(u32_at(i, 72 + 8 * codes) == 3);
        }
    }

    TEST_CASE("protected requests carry a thread id and a task identity token")
    {
        const auto b = encode(*sample(request_kind::raise_identity_protected, true, 2, 0));
        REQUIRE(b.size() == 80); // 64 + 8 * codeCnt
        CHECK(u32_at(b, 20) == 2408);
        CHECK(u32_at(b, 24) == 1);      // one descriptor: the token
        CHECK(u32_at(b, 28) == 0x1303); // task_id_token_t
        CHECK(std::to_integer<int>(b[44]) == 1); // NDR int_rep (little-endian) at 40 + 4
        CHECK(u64_at(b, 48) == 0x0102'0304'0506'0708ull); // thread_id
        CHECK(u32_at(b, 56) == 1);                         // exception
        CHECK(u32_at(b, 60) == 2);                         // codeCnt
        CHECK(u64_at(b, 72) == 0x0000'7fff'1234'5000ull);  // code[1]
        const auto s = encode(*sample(request_kind::raise_state_identity_protected, true, 1, 2));
        CHECK(s.size() == 72 + 8 * 1 + 4 * 2);
        CHECK(u32_at(s, 20) == 2410);
        CHECK(u32_at(s, 72) == 6); // flavor right after the one code
    }

    TEST_CASE("sizes follow the MIG structures")
    {
        CHECK(m::request_size(request_kind::raise, false, 2, 0) == 76);
        CHECK(m::request_size(request_kind::raise, true, 2, 0) == 84);
        CHECK(m::request_size(request_kind::raise, true, 0, 0) == 68);
        CHECK(m::request_size(request_kind::raise_state, true, 2, 0) == 64);
        CHECK(m::request_size(request_kind::raise_state_identity, true, 2, 224) == 92 + 224 * 4);
        CHECK(m::max_request_size == 76 + 16 + 1296 * 4);
        CHECK(m::max_reply_size == 44 + 1296 * 4);
    }

    TEST_CASE("every request kind round-trips, for every code count and state size")
    {
        for (const auto& k : all_kinds) {
            for (std::uint32_t codes = 0; codes <= 2; ++codes) {
                for (std::uint32_t states : {0u, 1u, 68u, m::max_state_words}) {
                    CAPTURE(k.id);
                    CAPTURE(codes);
                    CAPTURE(states);
                    const auto original = sample(k.kind, k.code64, codes, m::carries_state(k.kind) ? states : 0);
                    const auto bytes = encode(*original);
                    CHECK(bytes.size() == m::request_size(k.kind, k.code64, codes, original->state_count));
                    auto back = std::make_unique<m::exception_request>();
                    REQUIRE_FALSE(m::decode_request(bytes, *back));
                    auto expected = *original;
                    expected.header.size = static_cast<std::uint32_t>(bytes.size());
                    expected.header.bits |= m::descriptor_count(k.kind) != 0 ? m::msgh_bits_complex : 0;
                    CHECK(*back == expected);
                    CHECK(encode(*back) == bytes);
                }
            }
        }
    }

    TEST_CASE("32-bit codes keep their low word and come back sign-extended")
    {
        auto r = sample(request_kind::raise, false, 2, 0);
        r->codes[1] = 0x0000'0001'8000'1000; // a 64-bit address: only the low word fits
        const auto bytes = encode(*r);
        CHECK(u32_at(bytes, 64) == 2);            // codeCnt
        CHECK(u32_at(bytes, 72) == 0x8000'1000u); // code[1], 4 bytes after code[0]
        auto back = std::make_unique<m::exception_request>();
        REQUIRE_FALSE(m::decode_request(bytes, *back));
        CHECK(back->codes[1] == std::int64_t{static_cast<std::int32_t>(0x8000'1000u)});
        CHECK_FALSE(back->code64);
    }

    TEST_CASE("a trailer after msgh_size is ignored")
    {
        auto bytes = encode(*sample(request_kind::raise_state_identity, true, 2, 68));
        const std::size_t size = bytes.size();
        bytes.resize(size + 52, std::byte{0x5a}); // the kernel appends a trailer
        auto back = std::make_unique<m::exception_request>();
        REQUIRE_FALSE(m::decode_request(bytes, *back));
        CHECK(back->header.size == size);
        CHECK(back->state_count == 68);
    }

    TEST_CASE("replies: id + 100, state routines carry the new state, error replies do not")
    {
        for (const auto& k : all_kinds) {
            CAPTURE(k.id);
            const auto req = sample(k.kind, k.code64, 2, m::carries_state(k.kind) ? 68 : 0);
            auto ok = std::make_unique<m::exception_reply>();
            m::make_reply(*req, m::kern_success, *ok);
            CHECK(ok->header.id == k.id + 100);
            CHECK(ok->header.remote == 0x1707);
            CHECK(m::msgh_bits_remote(ok->header.bits) == m::msg_type_port_send_once);
            CHECK(ok->has_state == m::carries_state(k.kind));
            std::vector<std::byte> out(m::receive_buffer_size);
            auto n = m::encode_reply(*ok, out);
            REQUIRE(n);
            CHECK(*n == (m::carries_state(k.kind) ? 44 + 68 * 4 : 36));
            auto back = std::make_unique<m::exception_reply>();
            REQUIRE_FALSE(m::decode_reply(std::span(out).first(*n), *back));
            ok->header.size = static_cast<std::uint32_t>(*n);
            CHECK(*back == *ok);
            if (m::carries_state(k.kind)) CHECK(back->state[67] == 0xa000'0043u);

            auto failed = std::make_unique<m::exception_reply>();
            m::make_reply(*req, m::kern_failure, *failed);
            CHECK_FALSE(failed->has_state);
            n = m::encode_reply(*failed, out);
            REQUIRE(n);
            CHECK(*n == 36); // mig_reply_error_t
            REQUIRE_FALSE(m::decode_reply(std::span(out).first(*n), *back));
            CHECK(back->ret_code == m::kern_failure);
            CHECK_FALSE(back->has_state);
        }
    }

    TEST_CASE("malformed requests are rejected")
    {
        const auto good = encode(*sample(request_kind::raise_state_identity, true, 2, 4));
        const std::size_t size = good.size();

        SUBCASE("shorter than a header")
        {
            for (std::size_t n : {0u, 1u, 23u}) CHECK(decode(std::span(good).first(n)) == mach_errc::truncated);
        }
        SUBCASE("msgh_size claims more than arrived")
        {
            CHECK(decode(std::span(good).first(size - 4)) == mach_errc::truncated);
            auto b = good;
            put_u32(b, 4, 0xffff'fff0u);
            CHECK(decode(b) == mach_errc::truncated);
        }
        SUBCASE("msgh_size below a header")
        {
            auto b = good;
            put_u32(b, 4, 8);
            CHECK(decode(b) == mach_errc::size_mismatch);
        }
        SUBCASE("msgh_size disagrees with the counts")
        {
            auto b = good;
            b.resize(size + 4);
            put_u32(b, 4, static_cast<std::uint32_t>(size + 4)); // a word too long
            CHECK(decode(b) == mach_errc::size_mismatch);
            put_u32(b, 4, static_cast<std::uint32_t>(size - 4)); // a word too short
            CHECK(decode(b) == mach_errc::size_mismatch);
            put_u32(b, 4, static_cast<std::uint32_t>(size - 1)); // not even a whole word
            CHECK(decode(b) == mach_errc::size_mismatch);
        }
        SUBCASE("every cut of a valid message")
        {
            for (const auto& k : all_kinds) {
                const auto full = encode(*sample(k.kind, k.code64, 2, m::carries_state(k.kind) ? 3 : 0));
                for (std::size_t n = 0; n < full.size(); ++n) {
                    CAPTURE(k.id);
                    CAPTURE(n);
                    auto b = std::vector<std::byte>(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(n));
                    if (n >= 8) put_u32(b, 4, static_cast<std::uint32_t>(n)); // an honest but short size
                    CHECK(decode(b));
                }
            }
        }
        SUBCASE("too many codes")
        {
            auto b = good;
            put_u32(b, 64, 3);
            CHECK(decode(b) == mach_errc::too_many_codes);
            put_u32(b, 64, 0xffff'ffffu);
            CHECK(decode(b) == mach_errc::too_many_codes);
        }
        SUBCASE("a code count that lies about the size")
        {
            auto b = encode(*sample(request_kind::raise, true, 2, 0));
            put_u32(b, 64, 1); // says one code, carries two
            CHECK(decode(b) == mach_errc::size_mismatch);
        }
        SUBCASE("oversized state")
        {
            auto b = good;
            put_u32(b, 72 + 16, m::max_state_words + 1);
            CHECK(decode(b) == mach_errc::oversized_state);
            put_u32(b, 72 + 16, 0x4000'0000u);
            CHECK(decode(b) == mach_errc::oversized_state);
        }
        SUBCASE("a state count that lies about the size")
        {
            auto b = good;
            put_u32(b, 72 + 16, 5); // says five words, carries four
            CHECK(decode(b) == mach_errc::size_mismatch);
        }
        SUBCASE("wrong complex bit")
        {
            auto b = good;
            put_u32(b, 0, u32_at(b, 0) & ~m::msgh_bits_complex);
            CHECK(decode(b) == mach_errc::bad_descriptor);
            auto s = encode(*sample(request_kind::raise_state, true, 2, 2));
            put_u32(s, 0, u32_at(s, 0) | m::msgh_bits_complex);
            CHECK(decode(s) == mach_errc::bad_descriptor);
        }
        SUBCASE("wrong descriptor count or type")
        {
            auto b = good;
            put_u32(b, 24, 1);
            CHECK(decode(b) == mach_errc::bad_descriptor);
            put_u32(b, 24, 3);
            CHECK(decode(b) == mach_errc::bad_descriptor);
            b = good;
            b[39] = std::byte{1}; // MACH_MSG_OOL_DESCRIPTOR where a port belongs
            CHECK(decode(b) == mach_errc::bad_descriptor);
            b = good;
            b[51] = std::byte{4};
            CHECK(decode(b) == mach_errc::bad_descriptor);
        }
        SUBCASE("unknown ids")
        {
            for (std::int32_t id : {0, -1, 2404, 2409, 2411, 2507, 71}) {
                auto b = good;
                put_u32(b, 20, static_cast<std::uint32_t>(id));
                CHECK(decode(b) == mach_errc::unknown_id);
            }
        }
    }

    TEST_CASE("malformed replies are rejected")
    {
        const auto req = sample(request_kind::raise_state, true, 2, 4);
        auto rep = std::make_unique<m::exception_reply>();
        m::make_reply(*req, m::kern_success, *rep);
        std::vector<std::byte> good(m::receive_buffer_size);
        auto n = m::encode_reply(*rep, good);
        REQUIRE(n);
        good.resize(*n);
        auto back = std::make_unique<m::exception_reply>();
        auto decode_reply = [&](std::span<const std::byte> b) { return m::decode_reply(b, *back); };

        CHECK(decode_reply(std::span(good).first(20)) == mach_errc::truncated);
        auto b = good;
        put_u32(b, 4, 36); // a success that drops the state MIG must send
        CHECK(decode_reply(b) == mach_errc::size_mismatch);
        b = good;
        put_u32(b, 40, 5); // state count larger than what follows
        CHECK(decode_reply(b) == mach_errc::size_mismatch);
        put_u32(b, 40, m::max_state_words + 1);
        CHECK(decode_reply(b) == mach_errc::oversized_state);
        b = good;
        put_u32(b, 0, u32_at(b, 0) | m::msgh_bits_complex);
        CHECK(decode_reply(b) == mach_errc::bad_descriptor);
        b = good;
        put_u32(b, 20, 2406); // a request id, not a reply id
        CHECK(decode_reply(b) == mach_errc::unknown_id);
        // A plain (non-state) reply must be exactly 36 bytes.
        auto plain = std::make_unique<m::exception_reply>();
        m::make_reply(*sample(request_kind::raise, true, 2, 0), m::kern_success, *plain);
        std::vector<std::byte> p(64);
        auto pn = m::encode_reply(*plain, p);
        REQUIRE(pn);
        REQUIRE(*pn == 36);
        put_u32(p, 4, 40);
        CHECK(decode_reply(std::span(p).first(40)) == mach_errc::size_mismatch);
    }

    TEST_CASE("an unknown id gets a MIG_BAD_ID error reply to its reply port")
    {
        const m::message_header h{m::msgh_bits(m::msg_type_port_send_once, m::msg_type_port_send), 64, 0x1707, 0x2303,
                                  0, 2499};
        CHECK(m::mig_return_for(mach_errc::unknown_id) == m::mig_bad_id);
        CHECK(m::mig_return_for(mach_errc::bad_descriptor) == m::mig_type_error);
        CHECK(m::mig_return_for(mach_errc::size_mismatch) == m::mig_bad_arguments);
        CHECK(m::mig_return_for(mach_errc::too_many_codes) == m::mig_bad_arguments);
        std::array<std::byte, 64> out{};
        auto n = m::encode_error_reply(h, m::mig_bad_id, out);
        REQUIRE(n);
        REQUIRE(*n == 36);
        CHECK(u32_at(out, 0) == m::msg_type_port_send_once); // move the send-once reply right, nothing else
        CHECK(u32_at(out, 4) == 36);
        CHECK(u32_at(out, 8) == 0x1707);
        CHECK(u32_at(out, 12) == 0);
        CHECK(u32_at(out, 20) == 2599);
        CHECK(std::to_integer<int>(out[28]) == 1); // NDR int_rep
        CHECK(static_cast<std::int32_t>(u32_at(out, 32)) == -303);
        // No reply port, or one that is no send right: nothing to answer to.
        CHECK(m::encode_error_reply({h.bits, 64, 0, 0x2303, 0, 2499}, m::mig_bad_id, out).error() == mach_errc::bad_reply);
        CHECK(m::encode_error_reply({0, 64, 0x1707, 0x2303, 0, 2499}, m::mig_bad_id, out).error() == mach_errc::bad_reply);
        CHECK(m::encode_error_reply(h, m::mig_bad_id, std::span(out).first(35)).error() == mach_errc::buffer_too_small);
    }

    TEST_CASE("reply ids wrap instead of overflowing (found by the fuzzer)")
    {
        constexpr std::int32_t lowest = std::numeric_limits<std::int32_t>::min();
        constexpr std::int32_t highest = std::numeric_limits<std::int32_t>::max();
        CHECK(m::reply_id(2405) == 2505);
        CHECK(m::request_id_of_reply(2505) == 2405);
        CHECK(m::reply_id(highest) == lowest + 99);
        CHECK(m::request_id_of_reply(lowest + 18) == highest - 81);
        // A reply-sized message whose id is near INT32_MIN: refused, no overflow.
        std::array<std::byte, 36> msg{};
        REQUIRE(m::encode_header_only({0, 0, 0x1707, 0, 0, lowest + 18}, msg));
        put_u32(msg, 4, 36);
        auto rep = std::make_unique<m::exception_reply>();
        CHECK(m::decode_reply(msg, *rep) == mach_errc::unknown_id);
        // An unknown request id near INT32_MAX still gets its error reply.
        const m::message_header h{m::msg_type_port_send_once, 24, 0x1707, 0, 0, highest};
        std::array<std::byte, 36> out{};
        REQUIRE(m::encode_error_reply(h, m::mig_bad_id, out));
        CHECK(static_cast<std::int32_t>(u32_at(out, 20)) == lowest + 99);
    }

    TEST_CASE("encoding refuses what no kernel would accept")
    {
        std::vector<std::byte> out(m::receive_buffer_size);
        auto r = sample(request_kind::raise_state, true, 2, 4);
        r->code_count = 3;
        CHECK(m::encode_request(*r, out).error() == mach_errc::too_many_codes);
        r = sample(request_kind::raise_state, true, 2, 4);
        r->state_count = m::max_state_words + 1;
        CHECK(m::encode_request(*r, out).error() == mach_errc::oversized_state);
        r = sample(request_kind::raise_state, true, 2, 4);
        r->header.id = 2405; // the id of another kind
        CHECK(m::encode_request(*r, out).error() == mach_errc::unknown_id);
        r = sample(request_kind::raise_identity_protected, true, 2, 0);
        r->code64 = false;
        CHECK(m::encode_request(*r, out).error() == mach_errc::unknown_id);
        r = sample(request_kind::raise, true, 2, 0);
        CHECK(m::encode_request(*r, std::span(out).first(83)).error() == mach_errc::buffer_too_small);
        CHECK(m::encode_request(*r, std::span(out).first(84)).value() == 84);

        auto rep = std::make_unique<m::exception_reply>();
        m::make_reply(*sample(request_kind::raise_state, true, 2, 4), m::kern_success, *rep);
        rep->has_state = false;
        CHECK(m::encode_reply(*rep, out).error() == mach_errc::bad_reply);
        rep->header.id = 2450;
        CHECK(m::encode_reply(*rep, out).error() == mach_errc::unknown_id);
    }

    TEST_CASE("clear_reply_port forgets the reply right and keeps everything else")
    {
        auto b = encode(*sample(request_kind::raise, true, 2, 0));
        m::clear_reply_port(b);
        CHECK(u32_at(b, 8) == 0);
        CHECK(m::msgh_bits_remote(u32_at(b, 0)) == 0);
        CHECK(m::msgh_bits_local(u32_at(b, 0)) == m::msg_type_port_send);
        CHECK((u32_at(b, 0) & m::msgh_bits_complex) != 0);
        CHECK(u32_at(b, 4) == 84);
        CHECK_FALSE(decode(b));
    }

    TEST_CASE("header-only messages")
    {
        std::array<std::byte, 24> out{};
        auto n = m::encode_header_only({m::msgh_bits(m::msg_type_copy_send, 0), 999, 0x1703, 0, 0, 77}, out);
        REQUIRE(n);
        CHECK(*n == 24);
        m::message_header h;
        REQUIRE_FALSE(m::decode_header(out, h));
        CHECK(h.size == 24);
        CHECK(h.id == 77);
        CHECK(h.remote == 0x1703);
        CHECK(m::encode_header_only(h, std::span(out).first(23)).error() == mach_errc::buffer_too_small);
    }

    TEST_CASE("every error value has a message; kern_return codes keep their value")
    {
        for (int v = 1; v <= static_cast<int>(mach_errc::bad_reply); ++v) {
            const std::error_code ec = static_cast<mach_errc>(v);
            CHECK(ec.category() == m::mach_category());
            CHECK(ec.message() != "unknown squib-mach error");
        }
        CHECK_FALSE(m::kern_error(m::kern_success));
        const std::error_code timed_out = m::kern_error(m::mach_rcv_timed_out);
        CHECK(timed_out.value() == 0x1000'4003);
        CHECK(timed_out.message() == "MACH_RCV_TIMED_OUT");
        CHECK(m::is_kern(timed_out, m::mach_rcv_timed_out));
        CHECK_FALSE(m::is_kern(timed_out, m::mach_rcv_too_large));
        CHECK_FALSE(m::is_kern(std::make_error_code(std::errc::timed_out), m::mach_rcv_timed_out));
        CHECK(m::kern_error(12345).message() == "kern_return 12345");
    }
}
