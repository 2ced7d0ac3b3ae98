// The Mach exception-port backend (include/squib/backend/mach/backend.hpp),
// driven through a real squib::pager against the simulated Mach kernel
// (include/squib/backend/mach/sim.hpp): served faults, forwarding to the
// prior handler in its own behavior, the two LLDB scenarios, dead handlers,
// shutdown. No sleeps: every wait is a join, a condition variable or an
// atomic wait.
#include <squib/backend/mach/backend.hpp>
#include <squib/backend/mach/sim.hpp>
#include <squib/core/pager.hpp>
#include <squib/index/flat.hpp>
#include <squib/source/memory.hpp>
#include <squib/stats/atomic.hpp>

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace {

namespace m = squib::mach;
namespace sim = squib::mach::sim;
using backend = squib::mach_backend<sim::task_api>;
using pager_type = squib::pager<squib::memory_source, squib::flat_index, backend, squib::atomic_stats>;
using status = sim::access_outcome::status;

constexpr std::uint64_t ram_base = 0x4000'0000;
constexpr std::uint64_t ram_size = 32 * squib::page_4k;
constexpr std::uint64_t outside = 0x1'2345'6000; // in no region, above 4 GiB (32-bit codes lose the top)
constexpr int rw = m::vm_prot_read | m::vm_prot_write;

static_assert(m::MachApi<sim::task_api>);
static_assert(squib::ExceptionBackend<backend>);
static_assert(!m::MachApi<int>);

namespace near_miss {
struct api_with_throwing_send : m::detail::mach_api_archetype {
    std::error_code send(std::span<std::byte>, std::chrono::nanoseconds) { return {}; } // may throw from a fault path
};
struct api_without_thread_state : m::detail::mach_api_archetype {
    void get_thread_state() = delete;
};
} // namespace near_miss
static_assert(!m::MachApi<near_miss::api_with_throwing_send>);
static_assert(!m::MachApi<near_miss::api_without_thread_state>);

/// A pager over `snapshot` with the Mach backend on the simulated task,
/// serving [ram_base, ram_base + ram_size) (mapped with no access).
std::unique_ptr<pager_type> make_pager(sim::kernel& k, std::span<const std::byte> snapshot,
                                       std::chrono::nanoseconds interval = std::chrono::milliseconds{1},
                                       backend::options opts = {})
{
    k.map(ram_base, ram_size, 0);
    auto p = std::make_unique<pager_type>(squib::memory_source{snapshot},
                                          squib::pager_options{.poll_interval = interval}, std::in_place,
                                          sim::task_api{k}, std::move(opts));
    REQUIRE_FALSE(p->register_region({.base = ram_base, .size = ram_size}));
    return p;
}

/// A handler that makes the faulting page accessible, sets register 0 when
/// it gets thread state, and answers KERN_SUCCESS.
sim::exception_server::respond_fn fix_page(sim::kernel& k, std::uint64_t addr)
{
    return [&k, addr](const m::exception_request&, m::exception_reply& rep) {
        k.map(addr & ~(sim::sim_page_size - 1), sim::sim_page_size, rw);
        if (rep.has_state && rep.state_count > 0) rep.state[0] = 0xfeed'face;
        return m::kern_success;
    };
}

/// As fix_page, for whatever address faulted (needs 64-bit codes).
sim::exception_server::respond_fn fix_any(sim::kernel& k)
{
    return [&k](const m::exception_request& req, m::exception_reply&) {
        const auto addr = m::fault_address(req);
        if (!addr || !req.code64) return m::kern_failure;
        k.map(*addr & ~(sim::sim_page_size - 1), sim::sim_page_size, rw);
        return m::kern_success;
    };
}

sim::exception_server::respond_fn refuse()
{
    return [](const m::exception_request&, m::exception_reply&) { return m::kern_failure; };
}

sim::port_id our_port(const sim::kernel& k, const pager_type& p)
{
    return k.port_of(k.task_space(), p.backend().port());
}

/// Waits for a drift check that started after this call, and returns.
void await_fresh_drift_check(pager_type& p)
{
    p.backend().await_drift_checks(p.backend().counters().drift_checks + 2);
}

void check_page_served(const sim::kernel& k, std::span<const std::byte> snapshot, std::uint64_t page)
{
    const auto got = k.peek(page, squib::page_4k);
    CHECK(std::equal(got.begin(), got.end(), snapshot.begin() + static_cast<std::ptrdiff_t>(page - ram_base)));
    CHECK(k.protection(page) == rw);
}

} // namespace

TEST_SUITE("mach_backend")
{
    TEST_CASE("a fault inside a region is served: the thread resumes and sees the snapshot bytes")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        auto p = make_pager(k, snapshot);
        REQUIRE_FALSE(p->start());
        CHECK(k.handler_port(sim::exception_target::task(), m::exc_bad_access) == our_port(k, *p));

        const sim::thread_id t = k.create_thread();
        const std::uint64_t addr = ram_base + 5 * squib::page_4k + 123;
        const auto out = k.touch(t, addr, sim::access::read);
        CHECK(out.result == status::completed);
        CHECK(out.exceptions == 1);
        CHECK(out.value == snapshot[addr - ram_base]);
        check_page_served(k, snapshot, ram_base + 5 * squib::page_4k);

        // Served once: the next touch does not fault.
        CHECK(k.touch(t, addr + 1, sim::access::read).exceptions == 0);
        // A store faults the same way and lands on top of the snapshot bytes.
        const auto w = k.touch(t, ram_base + 9 * squib::page_4k + 7, sim::access::write, std::byte{0xab});
        CHECK(w.result == status::completed);
        CHECK(w.exceptions == 1);
        CHECK(k.peek(ram_base + 9 * squib::page_4k + 7, 1)[0] == std::byte{0xab});
        CHECK(k.peek(ram_base + 9 * squib::page_4k + 8, 1)[0] == snapshot[9 * squib::page_4k + 8]);

        const auto s = p->stats().snapshot();
        CHECK(s.faults == 2);
        CHECK(s.forwarded == 0);
        CHECK(p->backend().counters().served == 2);
        p->stop();
    }

    TEST_CASE("two threads faulting on one page: one copy, both resume")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        auto p = make_pager(k, snapshot);
        REQUIRE_FALSE(p->start());
        const std::uint64_t addr = ram_base + 3 * squib::page_4k + 40;
        sim::access_outcome a, b;
        const sim::thread_id ta = k.create_thread();
        const sim::thread_id tb = k.create_thread();
        std::thread first([&] { a = k.touch(ta, addr, sim::access::read); });
        std::thread second([&] { b = k.touch(tb, addr + 8, sim::access::read); });
        first.join();
        second.join();
        CHECK(a.result == status::completed);
        CHECK(b.result == status::completed);
        CHECK(a.value == snapshot[addr - ram_base]);
        CHECK(b.value == snapshot[addr + 8 - ram_base]);
        CHECK(k.writes(addr) == 1); // the second fault found the page installed and did not copy again
    }

    TEST_CASE("faulting threads and prewarm at once: every page installed exactly once")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        auto p = make_pager(k, snapshot);
        REQUIRE_FALSE(p->start());
        constexpr std::uint64_t pages = ram_size / squib::page_4k;
        std::vector<std::thread> vcpus;
        std::atomic<int> wrong{0};
        for (int v = 0; v < 4; ++v) {
            vcpus.emplace_back([&, v] {
                const sim::thread_id t = k.create_thread();
                for (std::uint64_t i = 0; i < pages; ++i) {
                    const std::uint64_t page = (i * 7 + static_cast<std::uint64_t>(v) * 5) % pages;
                    const std::uint64_t addr = ram_base + page * squib::page_4k + page;
                    const auto out = k.touch(t, addr, sim::access::read);
                    // A read that faulted was resumed after its page was whole. (One that did
                    // not fault may race a prewarm copy: install makes the page accessible,
                    // then copies; see mach_backend's limits.)
                    if (out.result != status::completed || (out.exceptions > 0 && out.value != snapshot[addr - ram_base]))
                        wrong.fetch_add(1);
                }
            });
        }
        std::vector<std::uint64_t> warm;
        for (std::uint64_t i = 0; i < pages; i += 2) warm.push_back(ram_base + i * squib::page_4k);
        const auto report = p->prewarm(warm);
        for (auto& v : vcpus) v.join();
        CHECK(wrong.load() == 0);
        CHECK(report.failed == 0);
        for (std::uint64_t i = 0; i < pages; ++i) {
            CHECK(k.writes(ram_base + i * squib::page_4k) == 1);
            check_page_served(k, snapshot, ram_base + i * squib::page_4k);
        }
        const auto s = p->stats().snapshot();
        CHECK(s.faults + s.prewarmed >= pages); // racing installs count as served, copy once
    }

    TEST_CASE("a fault outside every region reaches the prior handler, in its behavior, and its answer reaches the thread")
    {
        struct behavior_case {
            const char* name;
            std::uint32_t behavior;
            std::int32_t flavor;
            std::int32_t id; // the request the prior handler receives
        };
        const behavior_case cases[] = {
            {"EXCEPTION_DEFAULT (32-bit codes)", m::exception_default, sim::thread_state_none, 2401},
            {"EXCEPTION_DEFAULT | MACH_EXCEPTION_CODES", m::exception_default | m::mach_exception_codes,
             sim::thread_state_none, 2405},
            {"EXCEPTION_STATE | MACH_EXCEPTION_CODES", m::exception_state | m::mach_exception_codes, sim::flavor_full,
             2406},
            {"EXCEPTION_STATE_IDENTITY (32-bit codes)", m::exception_state_identity, sim::flavor_basic, 2403},
            {"EXCEPTION_STATE_IDENTITY | MACH_EXCEPTION_CODES", m::exception_state_identity | m::mach_exception_codes,
             sim::flavor_full, 2407},
            {"EXCEPTION_IDENTITY_PROTECTED | MACH_EXCEPTION_CODES",
             m::exception_identity_protected | m::mach_exception_codes, sim::thread_state_none, 2408},
            {"EXCEPTION_STATE_IDENTITY_PROTECTED | MACH_EXCEPTION_CODES",
             m::exception_state_identity_protected | m::mach_exception_codes, sim::flavor_full, 2410},
        };
        for (const behavior_case& c : cases) {
            for (const bool succeed : {true, false}) {
                CAPTURE(c.name);
                CAPTURE(succeed);
                sim::kernel k;
                const auto snapshot = squib::test::pattern(ram_size);
                sim::exception_server prior(k, {c.behavior, c.flavor}, succeed ? fix_page(k, outside) : refuse());
                REQUIRE(prior.install(sim::exception_target::task(), m::exc_mask_bad_access) == m::kern_success);
                auto p = make_pager(k, snapshot);
                REQUIRE_FALSE(p->start());

                const sim::thread_id t = k.create_thread();
                const auto out = k.touch(t, outside + 0x10, sim::access::read);
                REQUIRE(prior.received() == 1);
                const auto seen = prior.request(0);
                CHECK(seen.header.id == c.id);
                CHECK(seen.exception == m::exc_bad_access);
                CHECK(seen.codes[0] == m::kern_invalid_address);
                if ((c.behavior & m::mach_exception_codes) != 0)
                    CHECK(seen.codes[1] == static_cast<std::int64_t>(outside + 0x10));
                else // cut to 32 bits, as the kernel itself would have sent it
                    CHECK(seen.codes[1] == std::int64_t{static_cast<std::int32_t>((outside + 0x10) & 0xffff'ffffu)});
                if (m::carries_state(seen.kind)) {
                    CHECK(seen.flavor == c.flavor);
                    CHECK(seen.state_count == sim::state_words(c.flavor));
                }
                if (m::carries_token(seen.kind)) CHECK(seen.thread_id == t);
                CHECK(p->stats().snapshot().forwarded == 1);
                CHECK(p->backend().counters().forwarded == 1);

                if (succeed) {
                    CHECK(out.result == status::completed);
                    CHECK(out.exceptions == 1);
                    if (m::carries_state(seen.kind)) // the prior's new state reached the thread
                        CHECK(k.thread_state(t, c.flavor).at(0) == 0xfeed'faceu);
                } else {
                    CHECK(out.result == status::signalled); // no host handler: the BSD layer would signal it
                    CHECK(out.last == m::kern_failure);
                }
                // Faults in the region are still ours, whatever we installed with.
                const auto in = k.touch(t, ram_base + squib::page_4k, sim::access::read);
                CHECK(in.result == status::completed);
                CHECK(in.value == snapshot[squib::page_4k]);
                CHECK(prior.received() == 1);
                p->stop();
            }
        }
    }

    TEST_CASE("with no prior handler a fault outside is left to the host level")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        auto p = make_pager(k, snapshot);
        REQUIRE_FALSE(p->start());
        const sim::thread_id t = k.create_thread();
        const auto out = k.touch(t, outside, sim::access::write, std::byte{1});
        CHECK(out.result == status::signalled);
        CHECK(p->backend().counters().unhandled == 1);
        CHECK(p->stats().snapshot().forwarded == 0);
        // A host-level handler (say, a crash reporter) gets it next, from the kernel.
        sim::exception_server host(k, {}, fix_page(k, outside));
        REQUIRE(host.install(sim::exception_target::host(), m::exc_mask_bad_access) == m::kern_success);
        CHECK(k.touch(t, outside, sim::access::write, std::byte{1}).result == status::completed);
        CHECK(host.received() == 1);
        CHECK(p->backend().counters().unhandled == 2);
    }

    TEST_CASE("LLDB attached before the pager starts: forwarded to, then its detach is repaired")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        sim::debugger lldb(k, fix_page(k, outside));
        REQUIRE(lldb.attach() == m::kern_success);
        auto p = make_pager(k, snapshot);
        REQUIRE_FALSE(p->start()); // the debugger's port becomes our prior handler

        const sim::thread_id t = k.create_thread();
        CHECK(k.touch(t, ram_base + 2 * squib::page_4k, sim::access::read).result == status::completed);
        CHECK(lldb.server().received() == 0); // ours: the debugger never sees it
        CHECK(k.touch(t, outside, sim::access::read).result == status::completed);
        CHECK(lldb.server().received() == 1); // not ours: the debugger gets it
        CHECK(lldb.server().request(0).header.id == 2405);
        await_fresh_drift_check(*p);
        CHECK(p->stats().snapshot().port_reinstalls == 0); // nothing drifted yet

        // Detach restores what the debugger saved before we existed, overwriting our port.
        REQUIRE(lldb.detach() == m::kern_success);
        await_fresh_drift_check(*p);
        CHECK(k.handler_port(sim::exception_target::task(), m::exc_bad_access) == our_port(k, *p));
        CHECK(p->stats().snapshot().port_reinstalls == 1);
        CHECK(p->backend().counters().reinstalls == 1);

        // Served again; what is not ours now has no handler (as before the debugger came).
        const auto in = k.touch(t, ram_base + 7 * squib::page_4k, sim::access::read);
        CHECK(in.result == status::completed);
        CHECK(in.value == snapshot[7 * squib::page_4k]);
        CHECK(k.touch(t, outside + squib::page_4k, sim::access::read).result == status::signalled);
        CHECK(lldb.server().received() == 1);
        CHECK(k.sends_to_dead_names() == 0);
        CHECK(p->stats().snapshot().forwarded == 1);
    }

    TEST_CASE("LLDB attached after the pager starts: re-installed within an interval, still gets what is not ours")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        sim::exception_server reporter(k, {m::exception_state_identity | m::mach_exception_codes, sim::flavor_full},
                                       fix_page(k, outside + squib::page_4k));
        REQUIRE(reporter.install(sim::exception_target::task(), m::exc_mask_bad_access) == m::kern_success);
        auto p = make_pager(k, snapshot);
        REQUIRE_FALSE(p->start());

        sim::debugger lldb(k, fix_page(k, outside));
        REQUIRE(lldb.attach() == m::kern_success); // saves our port, installs its own
        await_fresh_drift_check(*p);
        CHECK(k.handler_port(sim::exception_target::task(), m::exc_bad_access) == our_port(k, *p));
        CHECK(p->stats().snapshot().port_reinstalls == 1);

        const sim::thread_id t = k.create_thread();
        CHECK(k.touch(t, outside, sim::access::read).result == status::completed);
        CHECK(lldb.server().received() == 1); // the debugger is now our prior handler
        CHECK(reporter.received() == 0);
        CHECK(k.touch(t, ram_base, sim::access::read).result == status::completed);
        CHECK(lldb.server().received() == 1);

        // Detach restores our port (what it saved): no drift. Its port dies with it.
        REQUIRE(lldb.detach() == m::kern_success);
        await_fresh_drift_check(*p);
        CHECK(p->stats().snapshot().port_reinstalls == 1);
        // The dead debugger is dropped, not sent to; the reporter below it is the prior again.
        const auto out = k.touch(t, outside + squib::page_4k, sim::access::read);
        CHECK(out.result == status::completed);
        CHECK(reporter.received() == 1);
        CHECK(reporter.request(0).header.id == 2407);
        CHECK(k.sends_to_dead_names() == 0);
        CHECK(p->backend().counters().dead_priors == 1);
        CHECK(p->stats().snapshot().forwarded == 2);
    }

    TEST_CASE("the prior handler dies: no forward to a dead name, no crash")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        sim::exception_server prior(k, {}, fix_page(k, outside));
        REQUIRE(prior.install(sim::exception_target::task(), m::exc_mask_bad_access) == m::kern_success);
        auto p = make_pager(k, snapshot);
        REQUIRE_FALSE(p->start());
        prior.exit(); // its port is a dead name in our space now

        const sim::thread_id t = k.create_thread();
        CHECK(k.touch(t, outside, sim::access::read).result == status::signalled);
        CHECK(k.sends_to_dead_names() == 0);
        CHECK(prior.received() == 0);
        const auto c = p->backend().counters();
        CHECK(c.dead_priors == 1);
        CHECK(c.unhandled == 1);
        CHECK(c.forwarded == 0);
        CHECK(k.touch(t, ram_base + squib::page_4k, sim::access::read).result == status::completed);
        // Dropped once, not looked at again.
        CHECK(k.touch(t, outside, sim::access::read).result == status::signalled);
        CHECK(p->backend().counters().dead_priors == 1);
    }

    TEST_CASE("the prior handler dies holding a forwarded exception: the thread is not left hanging")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        sim::exception_server prior(k, {}, fix_page(k, outside));
        REQUIRE(prior.install(sim::exception_target::task(), m::exc_mask_bad_access) == m::kern_success);
        prior.hold_replies();
        auto p = make_pager(k, snapshot);
        REQUIRE_FALSE(p->start());
        const sim::thread_id t = k.create_thread();
        sim::access_outcome out;
        std::thread vcpu([&] { out = k.touch(t, outside, sim::access::read); });
        prior.await_received(1);
        prior.exit(); // the reply right dies unused: a send-once notification reaches our reply port
        vcpu.join();
        CHECK(out.result == status::signalled);
        CHECK(p->backend().counters().prior_lost == 1);
        CHECK(k.sends_to_dead_names() == 0);
    }

    TEST_CASE("more exceptions waiting on the prior than forward slots: the rest are answered, not queued forever")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        sim::exception_server prior(k, {}, fix_page(k, outside));
        REQUIRE(prior.install(sim::exception_target::task(), m::exc_mask_bad_access) == m::kern_success);
        prior.hold_replies();
        backend::options opts;
        opts.forward_slots = 1;
        auto p = make_pager(k, snapshot, std::chrono::milliseconds{1}, opts);
        REQUIRE_FALSE(p->start());
        sim::access_outcome held;
        const sim::thread_id t1 = k.create_thread();
        std::thread vcpu([&] { held = k.touch(t1, outside, sim::access::read); });
        prior.await_received(1);
        const sim::thread_id t2 = k.create_thread();
        CHECK(k.touch(t2, outside + squib::page_4k, sim::access::read).result == status::signalled);
        CHECK(p->backend().counters().forward_failures == 1);
        prior.release_replies();
        vcpu.join();
        CHECK(held.result == status::completed);
        CHECK(p->stats().snapshot().forwarded == 1);
    }

    TEST_CASE("shutdown returns within one poll interval, restores the prior handler and releases every right")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        sim::exception_server prior(k, {m::exception_state, sim::flavor_basic}, fix_page(k, outside));
        REQUIRE(prior.install(sim::exception_target::task(), m::exc_mask_bad_access) == m::kern_success);
        CHECK(k.rights(k.task_space()) == 0);
        // An hour between receive timeouts and drift checks: if stop waited for
        // the interval this test would not end.
        auto p = make_pager(k, snapshot, std::chrono::hours{1});
        REQUIRE_FALSE(p->start());
        const sim::port_id ours = our_port(k, *p);
        const sim::thread_id t = k.create_thread();
        CHECK(k.touch(t, ram_base, sim::access::read).result == status::completed); // the loop runs

        p->stop();
        CHECK(k.handler_port(sim::exception_target::task(), m::exc_bad_access) == prior.id());
        CHECK_FALSE(k.is_alive(ours));
        CHECK(p->backend().port() == m::port_null);
        CHECK(k.rights(k.task_space()) == 0); // no port, no thread/task right, no prior right left behind
        // The kernel now goes straight to the prior handler.
        CHECK(k.touch(t, outside, sim::access::read).result == status::completed);
        CHECK(prior.received() == 1);
        CHECK(prior.request(0).header.id == 2402);
    }

    TEST_CASE("shutdown with an exception still waiting on the prior handler hands the thread to it")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        sim::exception_server prior(k, {}, fix_page(k, outside));
        REQUIRE(prior.install(sim::exception_target::task(), m::exc_mask_bad_access) == m::kern_success);
        prior.hold_replies();
        auto p = make_pager(k, snapshot, std::chrono::hours{1});
        REQUIRE_FALSE(p->start());
        const sim::thread_id t = k.create_thread();
        sim::access_outcome out;
        std::thread vcpu([&] { out = k.touch(t, outside, sim::access::read); });
        prior.await_received(1); // forwarded by us, held by the prior
        p->stop();               // we answer "retry"; the retried access goes to the restored prior directly
        prior.await_received(2);
        prior.release_replies();
        vcpu.join();
        CHECK(out.result == status::completed);
        CHECK(out.exceptions == 2);
        CHECK(k.rights(k.task_space()) == 0);
    }

    TEST_CASE("malformed requests to our port get MIG error replies and change nothing")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        auto p = make_pager(k, snapshot);
        REQUIRE_FALSE(p->start());
        // A process that got a send right to our port (as anyone can, from the task's exception table).
        const sim::space_id rogue = k.create_space();
        const auto reply_port = k.allocate_receive(rogue);
        REQUIRE(reply_port);
        m::handler_table table;
        REQUIRE(k.get_exception_ports(rogue, sim::exception_target::task(), m::exc_mask_bad_access, table) ==
                m::kern_success);
        const m::port_name to_us = table.entries[0].port;

        auto ask = [&](std::int32_t id) {
            std::array<std::byte, 24> msg{};
            REQUIRE(m::encode_header_only(
                {m::msgh_bits(m::msg_type_copy_send, m::msg_type_make_send_once), 0, to_us, *reply_port, 0, id}, msg));
            REQUIRE(k.send(rogue, msg) == m::kern_success);
            std::vector<std::byte> in(m::receive_buffer_size);
            auto n = k.receive(rogue, *reply_port, in, std::nullopt);
            REQUIRE(n);
            m::message_header h;
            REQUIRE_FALSE(m::decode_header(std::span(in).first(*n), h));
            CHECK(h.id == id + 100);
            CHECK(*n == 36);
            std::int32_t rc = 0;
            std::memcpy(&rc, in.data() + 32, 4); // RetCode, host order is little-endian here
            return rc;
        };
        CHECK(ask(2499) == m::mig_bad_id);         // no such routine
        CHECK(ask(2406) == m::mig_bad_arguments);  // a state request cut after its header
        CHECK(ask(2405) == m::mig_type_error);     // no descriptors where two belong
        CHECK(p->backend().counters().malformed == 3);
        const sim::thread_id t = k.create_thread();
        CHECK(k.touch(t, ram_base, sim::access::read).result == status::completed);
    }

    TEST_CASE("a thread that cannot be spawned is an error value and leaves the table as it was")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        sim::exception_server prior(k, {}, refuse());
        REQUIRE(prior.install(sim::exception_target::task(), m::exc_mask_bad_access) == m::kern_success);
        backend::options opts;
        opts.stack_size = std::size_t{1} << 50; // no system gives a thread a 1 PiB stack
        auto p = make_pager(k, snapshot, std::chrono::milliseconds{1}, opts);
        const std::error_code ec = p->start();
        CHECK(ec);
        CHECK(ec.category() == std::system_category());
        CHECK(k.handler_port(sim::exception_target::task(), m::exc_bad_access) == prior.id());
        CHECK(k.rights(k.task_space()) == 0);
        CHECK(p->backend().port() == m::port_null);
        p->stop(); // nothing to join
    }

    TEST_CASE("regions: page sizes are checked, an unregistered region is no longer served")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        backend::options opts;
        opts.max_page_size = squib::page_4k;
        auto p = make_pager(k, snapshot, std::chrono::milliseconds{1}, opts);
        CHECK(p->register_region({.base = 0x8000'0000, .size = squib::page_2m, .page_size = squib::page_2m}) ==
              squib::errc::bad_page_size);
        REQUIRE_FALSE(p->start());
        REQUIRE_FALSE(p->unregister_region(ram_base));
        const sim::thread_id t = k.create_thread();
        CHECK(k.touch(t, ram_base, sim::access::read).result == status::signalled); // forwarded: nobody wants it
        CHECK(p->backend().counters().served == 0);
        CHECK(p->backend().install(ram_base, std::span<const std::byte>(snapshot).first(squib::page_4k)) ==
              squib::errc::out_of_region);
    }

    TEST_CASE("installer: alignment and length are checked, a second install is a no-op")
    {
        sim::kernel k;
        const auto snapshot = squib::test::pattern(ram_size);
        auto p = make_pager(k, snapshot);
        auto& b = p->backend();
        const auto page = std::span<const std::byte>(snapshot).first(squib::page_4k);
        CHECK(b.install(ram_base + 1, page) == squib::errc::unaligned_address);
        CHECK(b.install(ram_base, page.first(100)) == squib::errc::bad_length);
        CHECK_FALSE(b.install(ram_base, page));
        CHECK_FALSE(b.install(ram_base, page));
        CHECK(k.writes(ram_base) == 1);
        CHECK_FALSE(b.install_zero(ram_base + squib::page_4k, squib::page_4k));
        CHECK(k.peek(ram_base + squib::page_4k, 16) == std::vector<std::byte>(16));
        // A failed protect (nothing mapped there) gives the page back for the next attempt.
        constexpr std::uint64_t unmapped = 0x7000'0000;
        REQUIRE_FALSE(p->register_region({.base = unmapped, .size = squib::page_4k}));
        CHECK(b.install(unmapped, page) == m::kern_error(m::kern_invalid_address));
        k.map(unmapped, squib::page_4k, 0);
        CHECK_FALSE(b.install(unmapped, page));
        CHECK(k.writes(unmapped) == 1);
    }

    TEST_CASE("start twice, stop and start again: each run restores the table and releases its ports")
    {
        sim::kernel k;
        backend b{sim::task_api{k}};
        squib::detail::fault_handler_archetype h;
        REQUIRE_FALSE(b.start(h));
        CHECK(b.start(h) == squib::errc::already_running);
        const sim::port_id first = k.port_of(k.task_space(), b.port());
        CHECK(k.handler_port(sim::exception_target::task(), m::exc_bad_access) == first);
        b.stop();
        CHECK(k.handler_port(sim::exception_target::task(), m::exc_bad_access) == sim::no_port);
        CHECK(k.rights(k.task_space()) == 0);
        REQUIRE_FALSE(b.start(h));
        CHECK(k.port_of(k.task_space(), b.port()) != first);
        b.stop();
        b.stop();
        CHECK(k.rights(k.task_space()) == 0);
    }

    TEST_CASE("the simulated kernel: triage order thread, task, host; dead handlers are skipped")
    {
        sim::kernel k;
        const sim::thread_id t = k.create_thread();
        sim::exception_server thread_level(k, {}, refuse());
        sim::exception_server task_level(k, {}, refuse());
        sim::exception_server host_level(k, {}, fix_any(k));
        REQUIRE(thread_level.install(sim::exception_target::of_thread(t), m::exc_mask_bad_access) == m::kern_success);
        REQUIRE(task_level.install(sim::exception_target::task(), m::exc_mask_bad_access) == m::kern_success);
        REQUIRE(host_level.install(sim::exception_target::host(), m::exc_mask_bad_access) == m::kern_success);
        CHECK(k.touch(t, outside, sim::access::read).result == status::completed);
        CHECK(thread_level.received() == 1);
        CHECK(task_level.received() == 1);
        CHECK(host_level.received() == 1);
        // Another thread has no thread-level handler; a dead task-level one is skipped.
        task_level.exit();
        const sim::thread_id u = k.create_thread();
        CHECK(k.touch(u, outside + squib::page_4k, sim::access::read).result == status::completed);
        CHECK(host_level.received() == 2);
        // Rights moved with messages and were released by the handlers.
        CHECK(k.rights(k.task_space()) == 0);
    }
}
