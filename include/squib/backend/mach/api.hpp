// squib-pager: the MachApi policy — the Mach calls the Mach backend's server
// loop is written against. Two models ship: squib::mach::darwin_api
// (backend/mach/darwin.hpp, the real calls, Apple only) and
// squib::mach::sim::task_api (backend/mach/sim.hpp, a simulated kernel for
// tests on any host). One server loop (backend/mach/backend.hpp) runs on both.
#pragma once

#include <squib/backend/mach/codec.hpp>
#include <squib/backend/mach/policy.hpp>
#include <squib/core/result.hpp>

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <system_error>

namespace squib::mach {

inline constexpr int vm_prot_read = 1;  ///< VM_PROT_READ
inline constexpr int vm_prot_write = 2; ///< VM_PROT_WRITE

/// MachApi: the Mach calls of one task, as error values.
///
/// Every call is `noexcept`. OS failures are kern_category() codes carrying
/// the kern_return_t / mach_msg_return_t (see kern_error()). Names are port
/// names in the calling task's IPC space.
///
/// 1. `A::thread_state_none` is the platform's THREAD_STATE_NONE flavor.
/// 2. `a.allocate_port()` returns `result<port_name>`: a new receive right
///    with one send right under the same name (mach_port_allocate +
///    mach_port_insert_right MAKE_SEND).
/// 3. `a.allocate_port_set()` returns `result<port_name>`;
///    `a.add_to_set(port, set)` returns `std::error_code` (mach_port_move_member).
/// 4. `a.release_port(name)` destroys a port or port set made by 2 or 3 with
///    every right we hold to it; `a.deallocate(name)` drops one user
///    reference of a send, send-once or dead-name right (mach_port_deallocate).
/// 5. `a.port_type(name)` returns `result<std::uint32_t>`, mach_port_type's bits
///    (is_dead_name() reads them).
/// 6. `a.get_exception_ports(mask, table)`, `a.swap_exception_ports(mask,
///    port, behavior, flavor, old_table)` and `a.set_exception_ports(mask,
///    port, behavior, flavor)` return `std::error_code` and act on the
///    task's exception ports like task_get/swap/set_exception_ports; rows
///    come back as send rights in our space.
/// 7. `a.receive(port_or_set, buffer, timeout)` returns `result<std::size_t>`:
///    waits at most `timeout` (0: poll) for one message, writes it to
///    `buffer` and returns its msgh_size. A timeout is
///    kern_error(mach_rcv_timed_out). A message larger than `buffer` is
///    destroyed (no MACH_RCV_LARGE).
/// 8. `a.send(message, timeout)` returns `std::error_code`: sends the encoded
///    message (header names and dispositions as written), waiting at most
///    `timeout` for queue space. `a.destroy_message(message)` releases every
///    right a received message still carries (mach_msg_destroy).
/// 9. `a.protect(addr, len, prot)`, `a.write(addr, bytes)` and
///    `a.fill_zero(addr, len)` return `std::error_code`: change protection
///    (mach_vm_protect), then copy or zero bytes in our own address space.
/// 10. `a.get_thread_state(thread, flavor, words)` returns
///    `result<std::uint32_t>` (words written); `a.set_thread_state(thread,
///    flavor, words)` returns `std::error_code`.
/// 11. `send`, `deallocate`, `protect`, `write` and `fill_zero` may be called
///    from any thread at once (a stop request and prewarm use them); the
///    rest are called from one thread at a time. A copy of the api is the
///    same task.
/// 12. No call allocates memory in the process after the backend started
///    (the simulated kernel may: it is not the process under test).
///
/// Models: squib::mach::darwin_api (backend/mach/darwin.hpp),
/// squib::mach::sim::task_api (backend/mach/sim.hpp).
template <class A>
concept MachApi =
    std::copy_constructible<A> &&
    requires(A& a, port_name name, std::uint32_t mask, std::uint32_t behavior, std::int32_t flavor,
             handler_table& table, std::span<std::byte> buffer, std::span<const std::byte> bytes,
             std::chrono::nanoseconds timeout, std::uint64_t addr, std::uint64_t len, int prot,
             std::span<std::uint32_t> words, std::span<const std::uint32_t> cwords) {
        { A::thread_state_none } -> std::convertible_to<std::int32_t>;
        { a.allocate_port() } noexcept -> std::same_as<result<port_name>>;
        { a.allocate_port_set() } noexcept -> std::same_as<result<port_name>>;
        { a.add_to_set(name, name) } noexcept -> std::same_as<std::error_code>;
        { a.release_port(name) } noexcept;
        { a.deallocate(name) } noexcept;
        { a.port_type(name) } noexcept -> std::same_as<result<std::uint32_t>>;
        { a.get_exception_ports(mask, table) } noexcept -> std::same_as<std::error_code>;
        { a.swap_exception_ports(mask, name, behavior, flavor, table) } noexcept -> std::same_as<std::error_code>;
        { a.set_exception_ports(mask, name, behavior, flavor) } noexcept -> std::same_as<std::error_code>;
        { a.receive(name, buffer, timeout) } noexcept -> std::same_as<result<std::size_t>>;
        { a.send(buffer, timeout) } noexcept -> std::same_as<std::error_code>;
        { a.destroy_message(buffer) } noexcept;
        { a.protect(addr, len, prot) } noexcept -> std::same_as<std::error_code>;
        { a.write(addr, bytes) } noexcept -> std::same_as<std::error_code>;
        { a.fill_zero(addr, len) } noexcept -> std::same_as<std::error_code>;
        { a.get_thread_state(name, flavor, words) } noexcept -> std::same_as<result<std::uint32_t>>;
        { a.set_thread_state(name, flavor, cwords) } noexcept -> std::same_as<std::error_code>;
    };

namespace detail {
/// The smallest MachApi: every call fails. Lets headers check their
/// templates against the concept without a kernel.
struct mach_api_archetype {
    static constexpr std::int32_t thread_state_none = 0;
    static std::error_code no() noexcept { return kern_error(kern_failure); }
    result<port_name> allocate_port() noexcept { return no(); }
    result<port_name> allocate_port_set() noexcept { return no(); }
    std::error_code add_to_set(port_name, port_name) noexcept { return no(); }
    void release_port(port_name) noexcept {}
    void deallocate(port_name) noexcept {}
    result<std::uint32_t> port_type(port_name) noexcept { return no(); }
    std::error_code get_exception_ports(std::uint32_t, handler_table&) noexcept { return no(); }
    std::error_code swap_exception_ports(std::uint32_t, port_name, std::uint32_t, std::int32_t, handler_table&) noexcept
    {
        return no();
    }
    std::error_code set_exception_ports(std::uint32_t, port_name, std::uint32_t, std::int32_t) noexcept { return no(); }
    result<std::size_t> receive(port_name, std::span<std::byte>, std::chrono::nanoseconds) noexcept { return no(); }
    std::error_code send(std::span<std::byte>, std::chrono::nanoseconds) noexcept { return no(); }
    void destroy_message(std::span<std::byte>) noexcept {}
    std::error_code protect(std::uint64_t, std::uint64_t, int) noexcept { return no(); }
    std::error_code write(std::uint64_t, std::span<const std::byte>) noexcept { return no(); }
    std::error_code fill_zero(std::uint64_t, std::uint64_t) noexcept { return no(); }
    result<std::uint32_t> get_thread_state(port_name, std::int32_t, std::span<std::uint32_t>) noexcept { return no(); }
    std::error_code set_thread_state(port_name, std::int32_t, std::span<const std::uint32_t>) noexcept { return no(); }
};
static_assert(MachApi<mach_api_archetype>, "the archetype must model the concept it stands for");
} // namespace detail

} // namespace squib::mach
