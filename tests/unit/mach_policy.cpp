// The Mach backend's decisions (include/squib/backend/mach/policy.hpp):
// handle or forward, re-encoding for the prior handler, reply translation,
// drift, and the chain of prior handlers.
#include <squib/backend/mach/codec.hpp>
#include <squib/backend/mach/policy.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace {

namespace m = squib::mach;
using m::request_kind;

constexpr std::uint64_t region_lo = 0x4000'0000;
constexpr std::uint64_t region_hi = 0x5000'0000;
constexpr m::port_name prior_port = 0x2103;
constexpr m::port_name reply_port = 0x2203;
constexpr m::port_name our_port = 0x1003;

bool in_region(std::uint64_t a) noexcept { return a >= region_lo && a < region_hi; }

/// An EXC_BAD_ACCESS as the kernel sends it to EXCEPTION_DEFAULT | MACH_EXCEPTION_CODES.
std::unique_ptr<m::exception_request> fault(std::int64_t code, std::int64_t address, bool code64 = true,
                                            request_kind kind = request_kind::raise)
{
    auto r = std::make_unique<m::exception_request>();
    r->header = {m::msgh_bits(m::msg_type_port_send_once, m::msg_type_port_send), 0, 0x1707, our_port, 0,
                 *m::request_id(kind, code64)};
    r->kind = kind;
    r->code64 = code64;
    r->thread = {0x1103, static_cast<std::uint8_t>(m::msg_type_port_send)};
    r->task = {0x1203, static_cast<std::uint8_t>(m::msg_type_port_send)};
    r->thread_id = 77;
    r->task_token = {0x1303, static_cast<std::uint8_t>(m::msg_type_port_send)};
    r->exception = m::exc_bad_access;
    r->code_count = 2;
    r->codes = {code, address};
    r->flavor = 6;
    if (m::carries_state(kind)) {
        r->state_count = 68;
        for (std::uint32_t i = 0; i < 68; ++i) r->state[i] = 0x5000 + i;
    }
    return r;
}

/// Thread state on demand: flavor 6 has 68 words, flavor 1 four; counts its calls.
struct fake_states {
    int* calls;
    squib::result<std::uint32_t> operator()(m::port_name thread, std::int32_t flavor, std::span<std::uint32_t> out) const noexcept
    {
        ++*calls;
        if (thread != 0x1103) return m::kern_error(m::kern_invalid_argument);
        const std::uint32_t words = flavor == 6 ? 68 : flavor == 1 ? 4 : 0;
        if (words == 0) return m::kern_error(m::kern_invalid_argument);
        for (std::uint32_t i = 0; i < words; ++i) out[i] = static_cast<std::uint32_t>(flavor) * 1000 + i;
        return words;
    }
};

m::handler_entry prior(std::uint32_t behavior, std::int32_t flavor = 5, m::port_name port = prior_port)
{
    return {m::exc_mask_bad_access, port, behavior, flavor};
}

} // namespace

TEST_SUITE("mach_policy")
{
    TEST_CASE("an EXC_BAD_ACCESS for a missing or protected page inside a region is handled")
    {
        for (std::int64_t code : {m::kern_invalid_address, m::kern_protection_failure}) {
            const auto c = m::classify(*fault(code, 0x4000'1234), in_region);
            CHECK(c.action == m::verdict::handle);
            CHECK(c.address == 0x4000'1234);
        }
        CHECK(m::classify(*fault(1, region_lo), in_region).action == m::verdict::handle);
        CHECK(m::classify(*fault(1, region_hi - 1), in_region).action == m::verdict::handle);
    }

    TEST_CASE("everything else is forwarded")
    {
        CHECK(m::classify(*fault(1, region_hi), in_region).action == m::verdict::forward);
        CHECK(m::classify(*fault(1, region_lo - 1), in_region).action == m::verdict::forward);
        CHECK(m::classify(*fault(1, 0), in_region).action == m::verdict::forward);
        CHECK(m::classify(*fault(0x101, 0x4000'1000), in_region).action == m::verdict::forward); // EXC_ARM_DA_ALIGN
        CHECK(m::classify(*fault(10 /* KERN_MEMORY_ERROR */, 0x4000'1000), in_region).action ==
              m::verdict::forward);
        auto r = fault(1, 0x4000'1000);
        r->exception = 6; // EXC_BREAKPOINT
        CHECK(m::classify(*r, in_region).action == m::verdict::forward);
        r = fault(1, 0x4000'1000);
        r->code_count = 1; // no subcode, no address
        CHECK(m::classify(*r, in_region).action == m::verdict::forward);
        r->code_count = 0;
        CHECK(m::classify(*r, in_region).action == m::verdict::forward);
        CHECK_FALSE(m::fault_address(*r).has_value());
    }

    TEST_CASE("the top (tag) byte of an address is ignored")
    {
        const auto c = m::classify(*fault(2, static_cast<std::int64_t>(0xb400'0000'4000'1000ull)), in_region);
        CHECK(c.action == m::verdict::handle);
        CHECK(c.address == 0x4000'1000);
    }

    TEST_CASE("32-bit codes: the subcode is the address's low word, not sign-extended")
    {
        auto r = fault(1, std::int64_t{static_cast<std::int32_t>(0xc000'2000u)}, false);
        CHECK(m::fault_address(*r) == 0xc000'2000ull);
        CHECK(m::classify(*r, [](std::uint64_t a) noexcept { return a == 0xc000'2000ull; }).action == m::verdict::handle);
    }

    TEST_CASE("behaviors name the request kind a handler receives")
    {
        CHECK(m::kind_for_behavior(m::exception_default)->kind == request_kind::raise);
        CHECK_FALSE(m::kind_for_behavior(m::exception_default)->code64);
        CHECK(m::kind_for_behavior(m::exception_default | m::mach_exception_codes)->code64);
        CHECK(m::kind_for_behavior(m::exception_state)->kind == request_kind::raise_state);
        CHECK(m::kind_for_behavior(m::exception_state_identity)->kind == request_kind::raise_state_identity);
        CHECK(m::kind_for_behavior(m::exception_identity_protected | m::mach_exception_codes)->kind ==
              request_kind::raise_identity_protected);
        CHECK(m::kind_for_behavior(m::exception_state_identity_protected | m::mach_exception_codes)->kind ==
              request_kind::raise_state_identity_protected);
        CHECK(m::kind_for_behavior(m::exception_default | 0x4000'0000u | 0x2000'0000u)); // other flags are ignored
        for (std::uint32_t bad : {0u, 6u, 0x8000'0000u, m::exception_identity_protected,
                                  m::exception_state_identity_protected})
            CHECK(m::kind_for_behavior(bad).error() == m::mach_errc::bad_behavior);
    }

    TEST_CASE("forwarding re-encodes in the prior handler's behavior and flavor")
    {
        struct target {
            std::uint32_t behavior;
            std::int32_t flavor;
            std::int32_t id;
        };
        const target targets[] = {
            {m::exception_default, 5, 2401},
            {m::exception_default | m::mach_exception_codes, 5, 2405},
            {m::exception_state, 1, 2402},
            {m::exception_state | m::mach_exception_codes, 6, 2406},
            {m::exception_state_identity, 1, 2403},
            {m::exception_state_identity | m::mach_exception_codes, 6, 2407},
        };
        const auto in = fault(2, 0x0000'7fff'8000'5000);
        for (const target& t : targets) {
            CAPTURE(t.id);
            int calls = 0;
            auto out = std::make_unique<m::exception_request>();
            REQUIRE_FALSE(m::build_forward(*in, prior(t.behavior, t.flavor), reply_port, fake_states{&calls}, *out));
            CHECK(out->header.id == t.id);
            CHECK(out->header.remote == prior_port);
            CHECK(out->header.local == reply_port);
            CHECK(m::msgh_bits_remote(out->header.bits) == m::msg_type_copy_send);
            CHECK(m::msgh_bits_local(out->header.bits) == m::msg_type_make_send_once);
            CHECK(out->exception == m::exc_bad_access);
            CHECK(out->code_count == 2);
            CHECK(out->codes[0] == 2);
            const bool codes64 = (t.behavior & m::mach_exception_codes) != 0;
            // Without MACH_EXCEPTION_CODES the prior gets the low word, as the kernel would send it.
            CHECK(out->codes[1] == (codes64 ? 0x0000'7fff'8000'5000 : std::int64_t{static_cast<std::int32_t>(0x8000'5000u)}));
            if (m::carries_ports(out->kind)) {
                CHECK(out->thread == m::port_descriptor{0x1103, static_cast<std::uint8_t>(m::msg_type_copy_send)});
                CHECK(out->task == m::port_descriptor{0x1203, static_cast<std::uint8_t>(m::msg_type_copy_send)});
            }
            if (m::carries_state(out->kind)) {
                CHECK(calls == 1); // fetched in the prior's flavor: the request carried no state
                CHECK(out->flavor == t.flavor);
                CHECK(out->state_count == (t.flavor == 6 ? 68u : 4u));
                CHECK(out->state[3] == static_cast<std::uint32_t>(t.flavor) * 1000 + 3);
            } else {
                CHECK(calls == 0);
            }
            // What we send decodes as what we meant.
            std::vector<std::byte> bytes(m::receive_buffer_size);
            auto n = m::encode_request(*out, bytes);
            REQUIRE(n);
            auto back = std::make_unique<m::exception_request>();
            REQUIRE_FALSE(m::decode_request(std::span(bytes).first(*n), *back));
            out->header.size = static_cast<std::uint32_t>(*n);
            out->header.bits = back->header.bits;
            CHECK(*back == *out);
        }
    }

    TEST_CASE("state carried in the prior's flavor is passed on without fetching")
    {
        const auto in = fault(1, 0x1000, true, request_kind::raise_state_identity); // flavor 6
        int calls = 0;
        auto out = std::make_unique<m::exception_request>();
        REQUIRE_FALSE(m::build_forward(*in, prior(m::exception_state | m::mach_exception_codes, 6), reply_port,
                                       fake_states{&calls}, *out));
        CHECK(calls == 0);
        CHECK(out->state_count == 68);
        CHECK(out->state[67] == 0x5000 + 67);
        REQUIRE_FALSE(m::build_forward(*in, prior(m::exception_state | m::mach_exception_codes, 1), reply_port,
                                       fake_states{&calls}, *out));
        CHECK(calls == 1); // another flavor: fetched through the thread port
        CHECK(out->state_count == 4);
    }

    TEST_CASE("protected identities pass through to a protected prior")
    {
        const auto in = fault(1, 0x1000, true, request_kind::raise_identity_protected);
        int calls = 0;
        auto out = std::make_unique<m::exception_request>();
        REQUIRE_FALSE(m::build_forward(*in, prior(m::exception_identity_protected | m::mach_exception_codes),
                                       reply_port, fake_states{&calls}, *out));
        CHECK(out->header.id == 2408);
        CHECK(out->thread_id == 77);
        CHECK(out->task_token == m::port_descriptor{0x1303, static_cast<std::uint8_t>(m::msg_type_copy_send)});
        CHECK((m::carries_token(out->kind) && !m::carries_ports(out->kind)));
    }

    TEST_CASE("what a request cannot provide is refused, not invented")
    {
        int calls = 0;
        auto out = std::make_unique<m::exception_request>();
        const auto protected_in = fault(1, 0x1000, true, request_kind::raise_identity_protected);
        CHECK(m::build_forward(*protected_in, prior(m::exception_default), reply_port, fake_states{&calls}, *out) ==
              m::mach_errc::cannot_translate); // no thread or task port to give
        const auto plain = fault(1, 0x1000);
        CHECK(m::build_forward(*plain, prior(m::exception_identity_protected | m::mach_exception_codes), reply_port,
                               fake_states{&calls}, *out) == m::mach_errc::cannot_translate); // no token
        const auto state_only = fault(1, 0x1000, true, request_kind::raise_state); // flavor 6, no ports
        CHECK(m::build_forward(*state_only, prior(m::exception_state, 1), reply_port, fake_states{&calls}, *out) ==
              m::mach_errc::cannot_translate); // another flavor and no thread port to fetch it
        CHECK(m::build_forward(*plain, prior(m::exception_state, 9), reply_port, fake_states{&calls}, *out) ==
              m::kern_error(m::kern_invalid_argument)); // the fetch's own error
        CHECK(m::build_forward(*plain, prior(0), reply_port, fake_states{&calls}, *out) == m::mach_errc::bad_behavior);
        CHECK(m::build_forward(*plain, prior(m::exception_identity_protected), reply_port, fake_states{&calls}, *out) ==
              m::mach_errc::bad_behavior);
    }

    TEST_CASE("the prior handler's reply becomes the reply the kernel expects")
    {
        auto out = std::make_unique<m::exception_reply>();
        auto prior_reply = std::make_unique<m::exception_reply>();

        SUBCASE("a plain request whose prior took state: the server sets the state itself")
        {
            const auto original = fault(1, 0x1000);
            prior_reply->ret_code = m::kern_success;
            prior_reply->has_state = true;
            prior_reply->flavor = 6;
            prior_reply->state_count = 68;
            const auto plan = m::translate_reply(*original, {request_kind::raise_state, 2406, 6}, *prior_reply, *out);
            CHECK(plan.set_state);
            CHECK_FALSE(plan.refresh_state);
            CHECK(out->header.id == 2505);
            CHECK(out->header.remote == 0x1707);
            CHECK(out->ret_code == m::kern_success);
            CHECK_FALSE(out->has_state);
        }
        SUBCASE("same flavor both ways: the prior's new state goes into our reply")
        {
            const auto original = fault(1, 0x1000, true, request_kind::raise_state_identity);
            prior_reply->ret_code = m::kern_success;
            prior_reply->has_state = true;
            prior_reply->flavor = 6;
            prior_reply->state_count = 68;
            prior_reply->state[0] = 0xfeed'face;
            const auto plan =
                m::translate_reply(*original, {request_kind::raise_state_identity, 2407, 6}, *prior_reply, *out);
            CHECK_FALSE(plan.set_state);
            CHECK(out->header.id == 2507);
            CHECK(out->has_state);
            CHECK(out->state[0] == 0xfeed'face);
            CHECK(out->state[1] == 0);      // the prior's whole state, not our old one (0x5001)
        }
        SUBCASE("different flavors: set the prior's state, then re-read ours")
        {
            const auto original = fault(1, 0x1000, true, request_kind::raise_state_identity);
            prior_reply->ret_code = m::kern_success;
            prior_reply->has_state = true;
            prior_reply->flavor = 1;
            prior_reply->state_count = 4;
            const auto plan = m::translate_reply(*original, {request_kind::raise_state, 2406, 1}, *prior_reply, *out);
            CHECK(plan.set_state);
            CHECK(plan.refresh_state);
            CHECK(out->has_state);
            CHECK(out->state_count == 68); // the old state until refreshed
        }
        SUBCASE("a failure is passed on, without state")
        {
            const auto original = fault(1, 0x1000, true, request_kind::raise_state_identity);
            prior_reply->ret_code = m::kern_failure;
            const auto plan =
                m::translate_reply(*original, {request_kind::raise_state_identity, 2407, 6}, *prior_reply, *out);
            CHECK_FALSE(plan.set_state);
            CHECK(out->ret_code == m::kern_failure);
            CHECK_FALSE(out->has_state);
        }
        SUBCASE("no thread port, no state to set")
        {
            const auto original = fault(1, 0x1000, true, request_kind::raise_state_identity_protected);
            prior_reply->ret_code = m::kern_success;
            prior_reply->has_state = true;
            prior_reply->flavor = 1;
            prior_reply->state_count = 4;
            const auto plan = m::translate_reply(*original, {request_kind::raise_state, 2406, 1}, *prior_reply, *out);
            CHECK_FALSE(plan.set_state);
            CHECK(out->header.id == 2510);
        }
    }

    TEST_CASE("we install with 64-bit codes, and with protected identities for a protected prior")
    {
        const m::install_behavior configured{m::exception_default, 5};
        CHECK(m::own_behavior(configured, nullptr) ==
              m::install_behavior{m::exception_default | m::mach_exception_codes, 5});
        const auto debugger = prior(m::exception_default | m::mach_exception_codes);
        CHECK(m::own_behavior(configured, &debugger).behavior == (m::exception_default | m::mach_exception_codes));
        const auto reporter = prior(m::exception_state_identity | m::mach_exception_codes, 6);
        CHECK(m::own_behavior(configured, &reporter).behavior == (m::exception_default | m::mach_exception_codes));
        const auto hardened = prior(m::exception_state_identity_protected | m::mach_exception_codes, 6);
        CHECK(m::own_behavior(configured, &hardened) ==
              m::install_behavior{m::exception_state_identity_protected | m::mach_exception_codes, 6});
        const auto gone = prior(m::exception_identity_protected | m::mach_exception_codes, 5, m::port_dead);
        CHECK(m::own_behavior(configured, &gone).behavior == (m::exception_default | m::mach_exception_codes));
    }

    TEST_CASE("drift: our port in the table or not")
    {
        m::handler_table t;
        CHECK(m::check_drift(our_port, t) == m::drift::replaced); // no row at all
        t.entries[0] = {1u << 6, our_port, m::exception_default, 5};
        t.count = 1;
        CHECK(m::check_drift(our_port, t) == m::drift::replaced); // a row for EXC_BREAKPOINT only
        t.entries[1] = {m::exc_mask_bad_access | (1u << 3), our_port, m::exception_default, 5};
        t.count = 2;
        CHECK(m::check_drift(our_port, t) == m::drift::none);
        CHECK(t.find(m::exc_bad_access) == &t.entries[1]);
        CHECK(t.find(3) == &t.entries[1]);
        CHECK(t.find(2) == nullptr);
        t.entries[1].port = prior_port;
        CHECK(m::check_drift(our_port, t) == m::drift::replaced);
        CHECK(t.rows().size() == 2);
    }

    TEST_CASE("dead names are recognised from mach_port_type bits")
    {
        CHECK(m::is_dead_name(m::port_type_dead_name));
        CHECK(m::is_dead_name(0x0010'0000u));
        CHECK_FALSE(m::is_dead_name(m::port_type_send));
        CHECK_FALSE(m::is_dead_name(m::port_type_send | m::port_type_receive));
        CHECK_FALSE(m::port_valid(m::port_null));
        CHECK_FALSE(m::port_valid(m::port_dead));
        CHECK(m::port_valid(0x1003));
    }

    TEST_CASE("the prior chain: newest on top, never our own port, dead ones dropped")
    {
        std::vector<m::port_name> released;
        auto release = [&](m::port_name n) noexcept { released.push_back(n); };
        m::prior_chain chain;
        CHECK(chain.top() == nullptr);

        chain.adopt(prior(m::exception_default | m::mach_exception_codes, 5, our_port), our_port, release);
        CHECK(chain.size() == 0); // never our own port...
        CHECK(released == std::vector<m::port_name>{our_port}); // ...and the right the table gave us goes back

        released.clear();
        chain.adopt(prior(m::exception_state, 1, 0x2103), our_port, release); // a crash reporter, at start
        chain.adopt(prior(m::exception_default | m::mach_exception_codes, 5, 0x2503), our_port, release); // a debugger
        REQUIRE(chain.top() != nullptr);
        CHECK(chain.top()->port == 0x2503);
        CHECK(released.empty());

        // The table went back to the reporter (the debugger restored what it saved): the debugger is dropped.
        chain.adopt(prior(m::exception_state, 1, 0x2103), our_port, release);
        CHECK(chain.size() == 1);
        CHECK(chain.top()->port == 0x2103);
        CHECK(released == std::vector<m::port_name>{0x2103, 0x2503}); // the duplicate right, the debugger

        released.clear();
        chain.adopt(prior(m::exception_default, 5, m::port_null), our_port, release); // "no handler"
        CHECK(chain.top()->port == m::port_null);
        chain.drop_top(release);
        CHECK(chain.top()->port == 0x2103);
        chain.drop_top(release);
        CHECK(chain.top() == nullptr);
        CHECK(released == std::vector<m::port_name>{0x2103}); // null has no right to release

        released.clear();
        for (m::port_name i = 0; i < m::prior_chain::capacity + 2; ++i)
            chain.adopt(prior(m::exception_default, 5, 0x3003 + (i << 8)), our_port, release);
        CHECK(chain.size() == m::prior_chain::capacity);
        CHECK(released == std::vector<m::port_name>{0x3003, 0x3103}); // the oldest two
        CHECK(chain.top()->port == 0x3003 + ((m::prior_chain::capacity + 1) << 8));
        CHECK(chain.entries().front().port == 0x3203);
        released.clear();
        chain.clear(release);
        CHECK(released.size() == m::prior_chain::capacity);
        CHECK(chain.size() == 0);
    }
}
