// squib-pager: the MachApi model for macOS — the real Mach calls, one thin
// wrapper each, written against the signatures in the macOS SDK headers
// (<mach/mach.h>, <mach/mach_vm.h>). Everything else (parsing, decisions,
// the server loop) is portable and tested on Linux against the simulated
// kernel in backend/mach/sim.hpp; this file is the only part that needs a Mac.
#pragma once

#if defined(__APPLE__)

#include <squib/backend/mach/api.hpp>
#include <squib/backend/mach/codec.hpp>
#include <squib/backend/mach/policy.hpp>
#include <squib/core/result.hpp>

#include <mach/mach.h>
#include <mach/mach_vm.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <system_error>

namespace squib::mach {

/// The calling task's Mach calls. Stateless: copies are the same task.
class darwin_api {
public:
    static constexpr std::int32_t thread_state_none = THREAD_STATE_NONE;

    [[nodiscard]] result<port_name> allocate_port() noexcept
    {
        mach_port_name_t name = MACH_PORT_NULL;
        kern_return_t kr = ::mach_port_allocate(::mach_task_self(), MACH_PORT_RIGHT_RECEIVE, &name);
        if (kr != KERN_SUCCESS) return kern_error(kr);
        // A send right under the same name: the kernel's exception table holds a copy of it.
        kr = ::mach_port_insert_right(::mach_task_self(), name, name, MACH_MSG_TYPE_MAKE_SEND);
        if (kr != KERN_SUCCESS) {
            ::mach_port_mod_refs(::mach_task_self(), name, MACH_PORT_RIGHT_RECEIVE, -1);
            return kern_error(kr);
        }
        return port_name{name};
    }

    [[nodiscard]] result<port_name> allocate_port_set() noexcept
    {
        mach_port_name_t name = MACH_PORT_NULL;
        const kern_return_t kr = ::mach_port_allocate(::mach_task_self(), MACH_PORT_RIGHT_PORT_SET, &name);
        if (kr != KERN_SUCCESS) return kern_error(kr);
        return port_name{name};
    }

    [[nodiscard]] std::error_code add_to_set(port_name port, port_name set) noexcept
    {
        return kern_error(::mach_port_move_member(::mach_task_self(), port, set));
    }

    void release_port(port_name name) noexcept
    {
        mach_port_type_t type = 0;
        if (!port_valid(name) || ::mach_port_type(::mach_task_self(), name, &type) != KERN_SUCCESS) return;
        if ((type & MACH_PORT_TYPE_SEND) != 0) ::mach_port_deallocate(::mach_task_self(), name);
        if ((type & MACH_PORT_TYPE_RECEIVE) != 0) ::mach_port_mod_refs(::mach_task_self(), name, MACH_PORT_RIGHT_RECEIVE, -1);
        if ((type & MACH_PORT_TYPE_PORT_SET) != 0)
            ::mach_port_mod_refs(::mach_task_self(), name, MACH_PORT_RIGHT_PORT_SET, -1);
    }

    void deallocate(port_name name) noexcept
    {
        if (port_valid(name)) ::mach_port_deallocate(::mach_task_self(), name);
    }

    [[nodiscard]] result<std::uint32_t> port_type(port_name name) noexcept
    {
        mach_port_type_t type = 0;
        const kern_return_t kr = ::mach_port_type(::mach_task_self(), name, &type);
        if (kr != KERN_SUCCESS) return kern_error(kr);
        return std::uint32_t{type};
    }

    [[nodiscard]] std::error_code get_exception_ports(std::uint32_t mask, handler_table& table) noexcept
    {
        raw_table raw;
        const kern_return_t kr = ::task_get_exception_ports(::mach_task_self(), mask, raw.masks, &raw.count, raw.ports,
                                                            raw.behaviors, raw.flavors);
        return raw.into(kr, table);
    }

    [[nodiscard]] std::error_code swap_exception_ports(std::uint32_t mask, port_name port, std::uint32_t behavior,
                                                       std::int32_t flavor, handler_table& old) noexcept
    {
        raw_table raw;
        const kern_return_t kr = ::task_swap_exception_ports(
            ::mach_task_self(), mask, port, static_cast<exception_behavior_t>(behavior), flavor, raw.masks, &raw.count,
            raw.ports, raw.behaviors, raw.flavors);
        return raw.into(kr, old);
    }

    [[nodiscard]] std::error_code set_exception_ports(std::uint32_t mask, port_name port, std::uint32_t behavior,
                                                      std::int32_t flavor) noexcept
    {
        return kern_error(::task_set_exception_ports(::mach_task_self(), mask, port,
                                                     static_cast<exception_behavior_t>(behavior), flavor));
    }

    [[nodiscard]] result<std::size_t> receive(port_name port, std::span<std::byte> buffer,
                                              std::chrono::nanoseconds timeout) noexcept
    {
        if (!header_fits(buffer)) return kern_error(KERN_INVALID_ARGUMENT);
        // The buffer is aligned storage of the backend's; the kernel writes a message there.
        auto* header = reinterpret_cast<mach_msg_header_t*>(buffer.data());
        const mach_msg_return_t mr =
            ::mach_msg(header, MACH_RCV_MSG | MACH_RCV_TIMEOUT, 0, static_cast<mach_msg_size_t>(buffer.size()), port,
                       to_ms(timeout), MACH_PORT_NULL);
        if (mr != MACH_MSG_SUCCESS) return kern_error(mr);
        return std::size_t{header->msgh_size};
    }

    [[nodiscard]] std::error_code send(std::span<std::byte> message, std::chrono::nanoseconds timeout) noexcept
    {
        if (!header_fits(message)) return kern_error(KERN_INVALID_ARGUMENT);
        // The codec wrote a complete message in Mach's layout into this aligned buffer.
        auto* header = reinterpret_cast<mach_msg_header_t*>(message.data());
        return kern_error(::mach_msg(header, MACH_SEND_MSG | MACH_SEND_TIMEOUT,
                                     static_cast<mach_msg_size_t>(message.size()), 0, MACH_PORT_NULL, to_ms(timeout),
                                     MACH_PORT_NULL));
    }

    void destroy_message(std::span<std::byte> message) noexcept
    {
        if (!header_fits(message)) return;
        // A message receive() wrote into this buffer: mach_msg_destroy walks its header and descriptors.
        ::mach_msg_destroy(reinterpret_cast<mach_msg_header_t*>(message.data()));
    }

    [[nodiscard]] std::error_code protect(std::uint64_t addr, std::uint64_t len, int prot) noexcept
    {
        return kern_error(::mach_vm_protect(::mach_task_self(), addr, len, FALSE, prot));
    }

    [[nodiscard]] std::error_code write(std::uint64_t addr, std::span<const std::byte> bytes) noexcept
    {
        // addr is a page of our own address space that protect() just made writable.
        std::memcpy(reinterpret_cast<void*>(static_cast<std::uintptr_t>(addr)), bytes.data(), bytes.size());
        return {};
    }

    [[nodiscard]] std::error_code fill_zero(std::uint64_t addr, std::uint64_t len) noexcept
    {
        // As write(): our own page, writable.
        std::memset(reinterpret_cast<void*>(static_cast<std::uintptr_t>(addr)), 0, static_cast<std::size_t>(len));
        return {};
    }

    [[nodiscard]] result<std::uint32_t> get_thread_state(port_name thread, std::int32_t flavor,
                                                         std::span<std::uint32_t> words) noexcept
    {
        static_assert(sizeof(natural_t) == sizeof(std::uint32_t), "thread state words are natural_t");
        mach_msg_type_number_t count = static_cast<mach_msg_type_number_t>(words.size());
        // thread_state_t is natural_t*: the same 32-bit words.
        const kern_return_t kr =
            ::thread_get_state(thread, flavor, reinterpret_cast<thread_state_t>(words.data()), &count);
        if (kr != KERN_SUCCESS) return kern_error(kr);
        return std::uint32_t{count};
    }

    [[nodiscard]] std::error_code set_thread_state(port_name thread, std::int32_t flavor,
                                                   std::span<const std::uint32_t> words) noexcept
    {
        // thread_set_state takes a non-const thread_state_t but only reads it.
        auto* state = reinterpret_cast<thread_state_t>(const_cast<std::uint32_t*>(words.data()));
        return kern_error(
            ::thread_set_state(thread, flavor, state, static_cast<mach_msg_type_number_t>(words.size())));
    }

private:
    /// The out-arrays task_get/swap_exception_ports fill.
    struct raw_table {
        exception_mask_t masks[handler_table::capacity] = {};
        mach_port_t ports[handler_table::capacity] = {};
        exception_behavior_t behaviors[handler_table::capacity] = {};
        thread_state_flavor_t flavors[handler_table::capacity] = {};
        mach_msg_type_number_t count = handler_table::capacity;

        std::error_code into(kern_return_t kr, handler_table& out) const noexcept
        {
            out.count = 0;
            if (kr != KERN_SUCCESS) return kern_error(kr);
            out.count = std::min<std::uint32_t>(count, handler_table::capacity);
            for (std::uint32_t i = 0; i < out.count; ++i)
                out.entries[i] = {masks[i], ports[i], static_cast<std::uint32_t>(behaviors[i]), flavors[i]};
            return {};
        }
    };

    static bool header_fits(std::span<std::byte> buffer) noexcept
    {
        return buffer.size() >= sizeof(mach_msg_header_t) &&
               reinterpret_cast<std::uintptr_t>(buffer.data()) % alignof(mach_msg_header_t) == 0; // address check only
    }

    /// mach_msg timeouts are whole milliseconds (rounded up, so a short wait is not a poll).
    static mach_msg_timeout_t to_ms(std::chrono::nanoseconds t) noexcept
    {
        if (t <= std::chrono::nanoseconds::zero()) return 0;
        const auto ms = std::chrono::ceil<std::chrono::milliseconds>(t).count();
        return static_cast<mach_msg_timeout_t>(std::min<long long>(ms, 0x7fff'ffff));
    }
};

static_assert(MachApi<darwin_api>, "darwin_api must model MachApi");

} // namespace squib::mach

#endif // defined(__APPLE__)
