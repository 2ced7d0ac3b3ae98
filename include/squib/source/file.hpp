// squib-pager: a page source that reads a snapshot file with pread.
#pragma once

#include <squib/core/page.hpp>
#include <squib/core/result.hpp>
#include <squib/detail/fd.hpp>
#include <squib/detail/snapshot_file.hpp>
#include <squib/error.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <span>
#include <system_error>
#include <utility>

namespace squib {

/// Serves pages from a snapshot file by `pread`, one syscall per request in
/// the common case. Source address `a` is file offset `a - ram_start`,
/// rounded down to the page, so a VMM whose guest RAM starts at a non-zero
/// guest-physical address can pass fault addresses unchanged.
///
/// Safe to read from several threads at once (`pread` has no shared file
/// position). Move-only: it owns the descriptor.
///
/// **Example**
///
///     auto src = squib::file_source::open("vm.mem", {.ram_start = 0x8000'0000});
///     if (!src) return src.error();
///     std::array<std::byte, 4096> page;
///     if (auto ec = src->read(0x8000'1000, page)) log(ec);
class file_source {
public:
    /// How source addresses map onto the file.
    struct options {
        std::uint64_t ram_start = 0;       ///< source address of file offset 0
        std::uint64_t page_size = page_4k; ///< granularity of reads; a power of two
    };

    /// An empty source with no file: every read fails with EBADF. Exists so
    /// result<file_source> can hold an error; use open() to get a real one.
    file_source() = default;

    file_source(file_source&&) noexcept = default;
    file_source& operator=(file_source&&) noexcept = default;
    file_source(const file_source&) = delete;
    file_source& operator=(const file_source&) = delete;
    ~file_source() = default;

    /// Opens `path` read-only with default options (ram_start 0, 4 KiB pages).
    [[nodiscard]] static result<file_source> open(const std::filesystem::path& path) noexcept
    {
        return open(path, options{});
    }

    /// Opens `path` read-only (O_CLOEXEC) and records its size.
    ///
    /// Errors: errc::bad_page_size if `opts.page_size` is not a power of two;
    /// the errno of a failed open/fstat as a std::system_category() code
    /// (ENOENT, EACCES, ...); EISDIR for a directory.
    [[nodiscard]] static result<file_source> open(const std::filesystem::path& path, options opts) noexcept
    {
        auto f = detail::open_snapshot_file(path, opts.page_size);
        if (!f) return f.error();
        file_source src;
        src.fd_ = std::move(f->fd);
        src.size_ = f->size;
        src.layout_ = {opts.ram_start, opts.page_size};
        return src;
    }

    /// Fills `dst` with the bytes at file offset align_down(addr - ram_start,
    /// page_size). Does not allocate; retries EINTR and partial reads.
    ///
    /// Errors: errc::below_ram_start if `addr < ram_start`; errc::bad_length
    /// unless `dst.size()` is a positive multiple of page_size;
    /// errc::short_read if the file ends before `dst` is full (a partial last
    /// page included); otherwise the errno of the failed `pread` (EIO, EBADF
    /// on an empty source, ...).
    [[nodiscard]] std::error_code read(std::uint64_t addr, std::span<std::byte> dst) const noexcept
    {
        const auto at = layout_.offset_of(addr, dst.size());
        if (!at) return at.error();
        const std::uint64_t offset = *at;
        // Bytes beyond what off_t can address cannot be in the file.
        constexpr auto max_off = static_cast<std::uint64_t>(std::numeric_limits<off_t>::max());
        if (offset > max_off || dst.size() > max_off - offset) return errc::short_read;

        std::size_t done = 0;
        while (done < dst.size()) {
            // pread's count above SSIZE_MAX is implementation defined; chunk it.
            const std::size_t want = std::min<std::size_t>(dst.size() - done, SSIZE_MAX);
            const ssize_t n = ::pread(fd_.get(), dst.data() + done, want, // raw syscall: positional read, thread safe
                                      static_cast<off_t>(offset + done));
            if (n < 0) {
                if (errno == EINTR) continue;
                return last_os_error();
            }
            if (n == 0) return errc::short_read; // EOF inside the requested range
            done += static_cast<std::size_t>(n);
        }
        return {};
    }

    /// The file size in bytes, as fstat reported it at open().
    [[nodiscard]] std::uint64_t size() const noexcept { return size_; }
    /// The granularity of reads given at open().
    [[nodiscard]] std::uint64_t page_size() const noexcept { return layout_.page_size; }
    /// The source address of file offset 0.
    [[nodiscard]] std::uint64_t ram_start() const noexcept { return layout_.ram_start; }

private:
    detail::unique_fd fd_;
    std::uint64_t size_ = 0;
    detail::file_layout layout_;
};

} // namespace squib
