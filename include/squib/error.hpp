// squib-pager: error codes.
//
// Every fallible operation in the library reports a std::error_code. Errors the
// library detects itself are squib::errc values in squib::error_category();
// failures of an OS call are passed through as std::system_category() codes so
// the caller sees the real errno (ENOENT from open, EAGAIN from pthread_create).
#pragma once

#include <cerrno>
#include <string>
#include <system_error>

namespace squib {

/// Errors detected by squib-pager itself. Zero is never used: a default
/// constructed std::error_code means success.
enum class errc : int {
    unaligned_address = 1,  ///< an address or length is not a multiple of the page size
    out_of_region,          ///< the address is in no registered region
    overlapping_region,     ///< a new region overlaps one already registered
    invalid_region,         ///< empty, unaligned or wrapping region
    bad_page_size,          ///< page size is zero or not a power of two
    below_ram_start,        ///< source address is below the source's ram_start
    short_read,             ///< the source ends before the requested bytes (past end of file)
    bad_length,             ///< a buffer length is not a positive multiple of the page size
    region_not_found,       ///< no region starts at the given base
    index_full,             ///< the region index cannot hold another region
    protocol_echo_mismatch, ///< a page-server reply echoed another address or size
    protocol_truncated,     ///< a page-server reply ended inside its header or payload
    peer_closed,            ///< the page-server peer closed the connection
    timed_out,              ///< the peer did not answer within the configured timeout
    bad_request,            ///< a page-server request is unaligned, out of range or absurd
    not_supported,          ///< the policy does not offer this operation
    not_running,            ///< the backend has not been started or was stopped
    already_running,        ///< the backend was started twice
    shutting_down,          ///< shutdown was requested; no new work is accepted
    install_failed,         ///< the backend could not install a page
};

namespace detail {

class error_category_impl final : public std::error_category {
public:
    [[nodiscard]] const char* name() const noexcept override { return "squib"; }

    [[nodiscard]] std::string message(int value) const override
    {
        switch (static_cast<errc>(value)) {
        case errc::unaligned_address: return "address or length is not page aligned";
        case errc::out_of_region: return "address is outside every registered region";
        case errc::overlapping_region: return "region overlaps a registered region";
        case errc::invalid_region: return "region is empty, unaligned or wraps the address space";
        case errc::bad_page_size: return "page size is not a power of two";
        case errc::below_ram_start: return "address is below the source's ram_start";
        case errc::short_read: return "source ends before the requested page (short read)";
        case errc::bad_length: return "buffer length is not a positive multiple of the page size";
        case errc::region_not_found: return "no region starts at this base address";
        case errc::index_full: return "region index is full";
        case errc::protocol_echo_mismatch: return "page server echoed a different address or size";
        case errc::protocol_truncated: return "page server reply is truncated";
        case errc::peer_closed: return "peer closed the connection";
        case errc::timed_out: return "peer did not answer in time";
        case errc::bad_request: return "bad page request";
        case errc::not_supported: return "operation not supported by this policy";
        case errc::not_running: return "backend is not running";
        case errc::already_running: return "backend is already running";
        case errc::shutting_down: return "shutdown requested";
        case errc::install_failed: return "backend failed to install the page";
        }
        return "unknown squib error";
    }
};

} // namespace detail

/// The category of every squib::errc value.
[[nodiscard]] inline const std::error_category& error_category() noexcept
{
    static const detail::error_category_impl category;
    return category;
}

/// Lets `std::error_code ec = squib::errc::short_read;` and `ec == squib::errc::short_read` work.
[[nodiscard]] inline std::error_code make_error_code(errc e) noexcept
{
    return {static_cast<int>(e), error_category()};
}

/// The current errno as a system error code, for wrapping failed OS calls.
[[nodiscard]] inline std::error_code last_os_error() noexcept
{
    return {errno, std::system_category()};
}

} // namespace squib

template <>
struct std::is_error_code_enum<squib::errc> : std::true_type {};
