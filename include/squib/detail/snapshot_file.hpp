// squib-pager: what file_source and mapped_file_source share: opening the
// snapshot file and turning a source address into a file offset.
#pragma once

#include <squib/core/page.hpp>
#include <squib/core/result.hpp>
#include <squib/detail/fd.hpp>
#include <squib/error.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <system_error>
#include <utility>

namespace squib::detail {

/// How source addresses map onto a snapshot file.
struct file_layout {
    std::uint64_t ram_start = 0;       ///< source address of file offset 0
    std::uint64_t page_size = page_4k; ///< granularity of requests; a power of two

    /// The file offset of a `len`-byte request at source address `addr`:
    /// align_down(addr - ram_start, page_size).
    /// Errors: errc::below_ram_start, errc::bad_length (`len` not a positive
    /// multiple of page_size).
    [[nodiscard]] result<std::uint64_t> offset_of(std::uint64_t addr, std::uint64_t len) const noexcept
    {
        if (addr < ram_start) return errc::below_ram_start;
        if (len == 0 || !is_aligned(len, page_size)) return errc::bad_length;
        return align_down(addr - ram_start, page_size);
    }
};

/// A snapshot file opened read-only, and its size at open.
struct opened_file {
    unique_fd fd;
    std::uint64_t size = 0;
};

/// Opens `path` read-only (O_CLOEXEC, retrying EINTR) and stats it.
/// Errors: errc::bad_page_size unless `page_size` is a power of two; the
/// errno of open/fstat as a system code; EISDIR for a directory, which opens
/// fine O_RDONLY but could never serve a page.
[[nodiscard]] inline result<opened_file> open_snapshot_file(const std::filesystem::path& path,
                                                            std::uint64_t page_size) noexcept
{
    if (!is_power_of_two(page_size)) return errc::bad_page_size;
    int raw = -1;
    do {
        raw = ::open(path.c_str(), O_RDONLY | O_CLOEXEC); // raw syscall: owned by unique_fd below
    } while (raw < 0 && errno == EINTR);
    if (raw < 0) return last_os_error();
    opened_file f{unique_fd{raw}, 0};
    struct stat st {};
    if (::fstat(f.fd.get(), &st) != 0) return last_os_error(); // raw syscall: the size
    if (S_ISDIR(st.st_mode)) return std::error_code{EISDIR, std::system_category()};
    f.size = static_cast<std::uint64_t>(st.st_size);
    return f;
}

} // namespace squib::detail
