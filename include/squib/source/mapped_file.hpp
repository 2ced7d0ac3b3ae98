// squib-pager: a page source over a read-only memory mapping of a snapshot file.
#pragma once

#include <squib/core/page.hpp>
#include <squib/core/result.hpp>
#include <squib/detail/fd.hpp>
#include <squib/detail/snapshot_file.hpp>
#include <squib/error.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <new>
#include <span>
#include <system_error>
#include <utility>
#include <vector>

namespace squib {

namespace detail {

/// One run of file bytes that hold data, [begin, end), as SEEK_DATA/SEEK_HOLE report it.
struct data_extent {
    std::uint64_t begin = 0;
    std::uint64_t end = 0;

    friend constexpr bool operator==(const data_extent&, const data_extent&) = default;
};

/// Walks [0, size) with `seek(offset, whence)` (lseek semantics: returns the
/// new offset or -1 with errno set) and returns the data extents in ascending
/// order. Taken as a parameter so tests can play a file system without
/// SEEK_DATA.
///
/// ENXIO from SEEK_DATA means "no data at or after this offset" (at offset 0:
/// the file is all hole). Any other failure (EINVAL: the file system does not
/// know SEEK_DATA) gives one extent covering the whole file, because calling
/// data a hole would serve zeros for real bytes while the reverse only costs a
/// read. Throws std::bad_alloc only.
template <class Seek>
[[nodiscard]] std::vector<data_extent> scan_data_extents(std::uint64_t size, Seek&& seek)
{
    std::vector<data_extent> extents;
    const auto all_data = [&] { return size == 0 ? std::vector<data_extent>{} : std::vector<data_extent>{{0, size}}; };
    constexpr auto max_off = static_cast<std::uint64_t>(std::numeric_limits<off_t>::max());
    if (size > max_off) return all_data(); // cannot express the offsets to lseek

    std::uint64_t offset = 0;
    while (offset < size) {
        const off_t data = seek(static_cast<off_t>(offset), SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO) break; // only hole from here to the end
            return all_data();
        }
        const auto begin = static_cast<std::uint64_t>(data);
        if (begin >= size) break; // the file grew after fstat; ignore the new part

        const off_t hole = seek(data, SEEK_HOLE);
        if (hole < 0) return all_data();
        const auto end = std::min(static_cast<std::uint64_t>(hole), size);
        if (end <= begin || begin < offset) return all_data(); // a confused file system: be safe

        extents.push_back({begin, end});
        offset = end;
    }
    return extents;
}

} // namespace detail

/// Serves pages from a snapshot file mapped read-only (PROT_READ,
/// MAP_SHARED): `view` hands out pointers into the page cache, so a backend
/// can install a page with no intermediate copy. Source address `a` is file
/// offset `a - ram_start`, rounded down to the page.
///
/// At open() it also records where the file holds data (SEEK_DATA /
/// SEEK_HOLE), so `is_zero` can tell a backend to install a zero page for a
/// hole without touching the file.
///
/// The mapping is taken once at open(): the file must not shrink while the
/// source lives (reading a page past the new end raises SIGBUS, as for any
/// mapping). Bytes written to the file later are seen by view/read; the hole
/// list is not refreshed. Safe to use from several threads at once.
/// Move-only: it owns the mapping. The descriptor is closed after open().
///
/// **Example**
///
///     auto src = squib::mapped_file_source::open("vm.mem");
///     if (!src) return src.error();
///     if (src->is_zero(addr, 4096)) install_zero(addr);
///     else if (auto page = src->view(addr, 4096)) install(addr, *page);
class mapped_file_source {
public:
    /// How source addresses map onto the file.
    struct options {
        std::uint64_t ram_start = 0;       ///< source address of file offset 0
        std::uint64_t page_size = page_4k; ///< granularity of views and reads; a power of two
    };

    /// An empty source with no mapping: every read is errc::short_read. Exists
    /// so result<mapped_file_source> can hold an error; use open().
    mapped_file_source() = default;

    mapped_file_source(mapped_file_source&& other) noexcept
        : data_(std::exchange(other.data_, nullptr)),
          size_(std::exchange(other.size_, 0)),
          layout_(other.layout_),
          extents_(std::move(other.extents_))
    {
        other.extents_.clear(); // a moved-from vector is unspecified; keep the empty-source invariant
    }

    mapped_file_source& operator=(mapped_file_source&& other) noexcept
    {
        if (this != &other) {
            unmap();
            data_ = std::exchange(other.data_, nullptr);
            size_ = std::exchange(other.size_, 0);
            layout_ = other.layout_;
            extents_ = std::move(other.extents_);
            other.extents_.clear();
        }
        return *this;
    }

    mapped_file_source(const mapped_file_source&) = delete;
    mapped_file_source& operator=(const mapped_file_source&) = delete;
    ~mapped_file_source() { unmap(); }

    /// Maps `path` with default options (ram_start 0, 4 KiB pages).
    [[nodiscard]] static result<mapped_file_source> open(const std::filesystem::path& path) noexcept
    {
        return open(path, options{});
    }

    /// Opens `path` read-only (O_CLOEXEC), maps all of it, and records its
    /// data extents. An empty file is allowed: nothing is mapped and every
    /// read is errc::short_read.
    ///
    /// Errors: errc::bad_page_size if `opts.page_size` is not a power of two;
    /// the errno of a failed open/fstat/mmap as a std::system_category() code
    /// (ENOENT, EACCES, ENODEV for something that cannot be mapped, ...);
    /// EISDIR for a directory; EFBIG if the file does not fit the address
    /// space; ENOMEM if the extent list cannot be allocated.
    [[nodiscard]] static result<mapped_file_source> open(const std::filesystem::path& path,
                                                         options opts) noexcept
    {
        auto f = detail::open_snapshot_file(path, opts.page_size);
        if (!f) return f.error();
        const detail::unique_fd fd = std::move(f->fd); // only needed during setup: the mapping outlives it
        const std::uint64_t size = f->size;
        if (size > std::numeric_limits<std::size_t>::max()) return std::error_code{EFBIG, std::system_category()};

        mapped_file_source src;
        src.layout_ = {opts.ram_start, opts.page_size};
        if (size == 0) return src; // mmap rejects length 0; an empty source is still valid

        void* p = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ, MAP_SHARED, fd.get(), 0); // raw syscall: the zero-copy view
        if (p == MAP_FAILED) return last_os_error();
        src.data_ = static_cast<const std::byte*>(p);
        src.size_ = size; // from here src's destructor unmaps on every error path

        try {
            src.extents_ = detail::scan_data_extents(size, [&](off_t off, int whence) noexcept {
                return ::lseek(fd.get(), off, whence); // raw syscall: SEEK_DATA/SEEK_HOLE walk
            });
        } catch (const std::bad_alloc&) {
            return std::error_code{ENOMEM, std::system_category()};
        }
        return src;
    }

    /// The `len` bytes at file offset align_down(addr - ram_start, page_size),
    /// without copying: the span points into the mapping and stays valid for
    /// the source's lifetime. Does not allocate.
    ///
    /// Errors: errc::below_ram_start if `addr < ram_start`; errc::bad_length
    /// unless `len` is a positive multiple of page_size; errc::short_read if
    /// the file ends before `len` bytes (a partial last page included).
    [[nodiscard]] result<std::span<const std::byte>> view(std::uint64_t addr, std::size_t len) const noexcept
    {
        const auto at = layout_.offset_of(addr, len);
        if (!at) return at.error();
        const std::uint64_t offset = *at;
        if (offset > size_ || len > size_ - offset) return errc::short_read;
        return std::span<const std::byte>{data_ + offset, len};
    }

    /// Copies the bytes view(addr, dst.size()) would return into `dst`. Same
    /// errors as view(). Does not allocate.
    [[nodiscard]] std::error_code read(std::uint64_t addr, std::span<std::byte> dst) const noexcept
    {
        auto v = view(addr, dst.size());
        if (!v) return v.error();
        std::memcpy(dst.data(), v->data(), dst.size());
        return {};
    }

    /// True only if view(addr, len) would succeed and every byte of it lies
    /// in a file hole, i.e. reads as zero. False for anything view() would
    /// reject, and whenever the file system could not say (no SEEK_DATA).
    /// Binary search over the data extents; does not allocate or touch the
    /// mapping.
    [[nodiscard]] bool is_zero(std::uint64_t addr, std::size_t len) const noexcept
    {
        const auto at = layout_.offset_of(addr, len);
        if (!at) return false;
        const std::uint64_t offset = *at;
        if (offset > size_ || len > size_ - offset) return false;
        const std::uint64_t end = offset + len;
        // The first extent that ends after `offset` is the only one that can overlap.
        auto it = std::partition_point(extents_.begin(), extents_.end(),
                                       [offset](const detail::data_extent& e) { return e.end <= offset; });
        return it == extents_.end() || it->begin >= end;
    }

    /// The file size in bytes, as fstat reported it at open().
    [[nodiscard]] std::uint64_t size() const noexcept { return size_; }
    /// The granularity of views and reads given at open().
    [[nodiscard]] std::uint64_t page_size() const noexcept { return layout_.page_size; }
    /// The source address of file offset 0.
    [[nodiscard]] std::uint64_t ram_start() const noexcept { return layout_.ram_start; }
    /// How many separate runs of data the file held at open(); 0 for an
    /// empty or all-hole file, 1 for a dense file.
    [[nodiscard]] std::size_t data_extent_count() const noexcept { return extents_.size(); }

private:
    void unmap() noexcept
    {
        if (data_ != nullptr) {
            // const_cast: munmap takes void*, but the pages are never written through it.
            ::munmap(const_cast<std::byte*>(data_), static_cast<std::size_t>(size_)); // raw syscall: release the mapping
        }
        data_ = nullptr;
        size_ = 0;
    }

    const std::byte* data_ = nullptr; // start of the mapping; null when empty
    std::uint64_t size_ = 0;          // mapped bytes == file size at open()
    detail::file_layout layout_;
    std::vector<detail::data_extent> extents_; // sorted, disjoint; see scan_data_extents
};

} // namespace squib
