// squib-uffd-handler: a Firecracker-compatible userfaultfd page-fault handler.
// The testable parts: the handshake (receive, parse, validate), one VM's
// session, and the multi-VM server with its run loop. main.cpp adds the
// command line and the signals.
//
// Firecracker's side of the protocol (src/vmm/src/persist.rs,
// docs/snapshotting/handling-page-faults-on-snapshot-resume.md): it creates a
// non-blocking userfaultfd with UFFD_FEATURE_EVENT_REMOVE, maps guest memory
// anonymously (MAP_PRIVATE, hugetlbfs 2 MiB pages when configured), registers
// every region in MISSING mode, connects to our Unix stream socket and sends
// ONE message: a JSON array of
//     {"base_host_virt_addr": u64, "size": u64, "offset": u64,
//      "page_size": u64, "page_size_kib": u64}
// with the userfaultfd attached as SCM_RIGHTS. `offset` is where the region
// starts in the memory file; `page_size` is in bytes, and so, despite its
// name, is the deprecated `page_size_kib` (the only one sent before 1.12).
// Firecracker 1.12 and later keep the socket open for the VM's lifetime;
// older versions close it right after the message. Firecracker keeps its own
// copy of the userfaultfd, so a handler that lets go of a VM leaves that VM's
// next fault blocked, not served with zeros.
//
// Only this daemon uses nlohmann::json; the library headers do not.
#pragma once

#if !defined(__linux__)
#error "examples/uffd_handler/handler.hpp needs Linux userfaultfd"
#endif

#include <squib/backend/uffd.hpp>
#include <squib/core/page.hpp>
#include <squib/core/pager.hpp>
#include <squib/core/region.hpp>
#include <squib/core/result.hpp>
#include <squib/detail/fd.hpp>
#include <squib/error.hpp>
#include <squib/format.hpp>
#include <squib/index/flat.hpp>
#include <squib/source/mapped_file.hpp>
#include <squib/source/ref.hpp>
#include <squib/stats/histogram.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h> // fmt::join (in format.h before fmt 11)
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77 // Linux 6.5; glibc 2.36's headers predate it
#endif

namespace squib::uffd_handler {

// ---------------------------------------------------------------------------
// Errors: why a peer was refused
// ---------------------------------------------------------------------------

/// Why a connection was refused or a VM could not be served. Zero is never used.
enum class errc : int {
    peer_closed = 1,      ///< the peer hung up before sending its handshake
    receive_failed,       ///< recvmsg failed
    oversized,            ///< the handshake is larger than handshake_limits::max_message
    no_descriptor,        ///< no file descriptor came with the handshake
    too_many_descriptors, ///< more than one file descriptor came with it
    not_a_userfaultfd,    ///< the descriptor is something else (a pipe, a file, ...)
    not_json,             ///< the message does not parse as JSON
    not_region_array,     ///< valid JSON, but not an array of objects
    bad_field,            ///< a region field is missing or not a non-negative integer
    no_regions,           ///< an empty array
    too_many_regions,     ///< more regions than handshake_limits::max_regions
    bad_page_size,        ///< a page size other than 4096 or 2097152
    unaligned_region,     ///< base, size or offset not a multiple of the region's page size
    bad_region,           ///< an empty region, or one that wraps the address space
    overlapping_regions,  ///< two regions share an address
    past_end_of_file,     ///< offset + size reaches past the end of the memory file
    handshake_timeout,    ///< connected, but sent nothing in time
    setup_failed,         ///< the handshake was fine but serving could not start (threads, memory)
};

namespace detail {
class error_category_impl final : public std::error_category {
public:
    [[nodiscard]] const char* name() const noexcept override { return "squib.uffd_handler"; }
    [[nodiscard]] std::string message(int v) const override
    {
        switch (static_cast<errc>(v)) {
        case errc::peer_closed: return "peer closed the connection before sending its handshake";
        case errc::receive_failed: return "could not receive the handshake";
        case errc::oversized: return "handshake message is larger than the size limit";
        case errc::no_descriptor: return "handshake carries no file descriptor";
        case errc::too_many_descriptors: return "handshake carries more than one file descriptor";
        case errc::not_a_userfaultfd: return "descriptor sent is not a userfaultfd";
        case errc::not_json: return "handshake is not valid JSON";
        case errc::not_region_array: return "handshake is not a JSON array of region objects";
        case errc::bad_field: return "region field is missing or not a non-negative integer";
        case errc::no_regions: return "handshake lists no regions";
        case errc::too_many_regions: return "handshake lists more regions than the limit";
        case errc::bad_page_size: return "region page size is neither 4096 nor 2097152";
        case errc::unaligned_region: return "region base, size or offset is not a multiple of its page size";
        case errc::bad_region: return "region is empty or wraps around the address space";
        case errc::overlapping_regions: return "regions overlap";
        case errc::past_end_of_file: return "region reaches past the end of the memory file";
        case errc::handshake_timeout: return "no handshake arrived in time";
        case errc::setup_failed: return "could not start serving the VM";
        }
        return "unknown squib.uffd_handler error";
    }
};
} // namespace detail

[[nodiscard]] inline const std::error_category& error_category() noexcept
{
    static const detail::error_category_impl category;
    return category;
}
[[nodiscard]] inline std::error_code make_error_code(errc e) noexcept
{
    return {static_cast<int>(e), error_category()};
}

} // namespace squib::uffd_handler

template <>
struct std::is_error_code_enum<squib::uffd_handler::errc> : std::true_type {
};

namespace squib::uffd_handler {

using squib::detail::unique_fd;

/// A refused handshake: the reason, and the specifics for the log line.
struct refusal {
    std::error_code code; ///< an errc value; empty means "not refused"
    std::string detail;   ///< what exactly was wrong, e.g. "region 1: page size 8192"

    explicit operator bool() const noexcept { return static_cast<bool>(code); }
};

[[nodiscard]] inline refusal refuse(errc e, std::string detail = {})
{
    return {make_error_code(e), std::move(detail)};
}

/// `message (detail)`, the text logged after "refused: ".
[[nodiscard]] inline std::string describe(const refusal& r)
{
    if (r.detail.empty()) return r.code.message();
    return fmt::format("{} ({})", r.code.message(), r.detail);
}

// ---------------------------------------------------------------------------
// The handshake
// ---------------------------------------------------------------------------

/// One region of Firecracker's GuestRegionUffdMapping, validated.
struct guest_region_mapping {
    std::uint64_t base_host_virt_addr = 0; ///< where the region lives in Firecracker's address space
    std::uint64_t size = 0;                ///< bytes
    std::uint64_t offset = 0;              ///< where its contents start in the memory file
    std::uint64_t page_size = page_4k;     ///< 4096 or 2097152

    [[nodiscard]] region to_region() const noexcept { return {base_host_virt_addr, size, offset, page_size}; }
    friend bool operator==(const guest_region_mapping&, const guest_region_mapping&) = default;
};

/// Bounds on what a peer may send.
struct handshake_limits {
    /// Largest handshake in bytes. Kept below the ~36 KiB in which the kernel
    /// hands a descriptor-carrying stream message to the reader (one skb:
    /// about 4 KiB linear + 32 KiB of fragments, and recvmsg stops after the
    /// skb that carries descriptors): any larger message then overfills the
    /// one read, so "oversized" is detected exactly. Firecracker sends about
    /// 130 bytes per region.
    std::size_t max_message = 32 * 1024;
    /// Most regions one VM may declare (Firecracker sends one per memory slot).
    std::size_t max_regions = 256;
};

/// What parse_handshake() found: the regions, or why the message is refused.
struct parsed_handshake {
    std::vector<guest_region_mapping> regions;
    refusal error;
};

namespace detail {

/// `"field"` of region `index` as an unsigned integer, or a refusal.
inline std::optional<std::uint64_t> unsigned_field(const nlohmann::json& item, const char* field, std::size_t index,
                                                   refusal& error)
{
    const auto it = item.find(field);
    if (it == item.end()) {
        error = refuse(errc::bad_field, fmt::format("region {}: \"{}\" is missing", index, field));
        return std::nullopt;
    }
    // nlohmann keeps non-negative integers as number_unsigned; negatives,
    // fractions and integers beyond 64 bits are other types.
    if (!it->is_number_unsigned()) {
        error = refuse(errc::bad_field, fmt::format("region {}: \"{}\" is a JSON {} ({}), not a non-negative integer",
                                                    index, field, it->type_name(), it->dump().substr(0, 40)));
        return std::nullopt;
    }
    return it->get<std::uint64_t>();
}

} // namespace detail

/// Parses and validates Firecracker's handshake message against a memory
/// file of `mem_file_size` bytes. Unknown fields are ignored (forward
/// compatibility); `page_size` wins over the deprecated `page_size_kib`,
/// which is used when it is the only one.
///
/// Refusals: errc::not_json, not_region_array, no_regions, too_many_regions,
/// bad_field, bad_page_size, bad_region, unaligned_region, past_end_of_file,
/// overlapping_regions; the detail names the region and the values.
///
/// **Example**
///
///     auto p = parse_handshake(R"([{"base_host_virt_addr":140737345937408,"size":4096,
///                                    "offset":0,"page_size":4096,"page_size_kib":4096}])", 4096);
///     if (p.error) log(describe(p.error)); else serve(p.regions);
[[nodiscard]] inline parsed_handshake parse_handshake(std::string_view message, std::uint64_t mem_file_size,
                                                      const handshake_limits& limits = {})
{
    parsed_handshake out;
    nlohmann::json doc;
    try {
        doc = nlohmann::json::parse(message.begin(), message.end());
    } catch (const nlohmann::json::parse_error& e) {
        out.error = refuse(errc::not_json, fmt::format("{} bytes; {}", message.size(), e.what()));
        return out;
    }
    if (!doc.is_array()) {
        out.error = refuse(errc::not_region_array, fmt::format("got a JSON {}", doc.type_name()));
        return out;
    }
    if (doc.empty()) {
        out.error = refuse(errc::no_regions);
        return out;
    }
    if (doc.size() > limits.max_regions) {
        out.error = refuse(errc::too_many_regions, fmt::format("{} regions, limit {}", doc.size(), limits.max_regions));
        return out;
    }

    std::vector<guest_region_mapping> regions;
    regions.reserve(doc.size());
    for (std::size_t i = 0; i < doc.size(); ++i) {
        const nlohmann::json& item = doc[i];
        if (!item.is_object()) {
            out.error = refuse(errc::not_region_array, fmt::format("element {} is a JSON {}", i, item.type_name()));
            return out;
        }
        const auto base = detail::unsigned_field(item, "base_host_virt_addr", i, out.error);
        if (!base) return out;
        const auto size = detail::unsigned_field(item, "size", i, out.error);
        if (!size) return out;
        const auto offset = detail::unsigned_field(item, "offset", i, out.error);
        if (!offset) return out;
        const char* page_field =
            item.contains("page_size") || !item.contains("page_size_kib") ? "page_size" : "page_size_kib";
        const auto page = detail::unsigned_field(item, page_field, i, out.error);
        if (!page) return out;

        if (*page != page_4k && *page != page_2m) {
            out.error = refuse(errc::bad_page_size, fmt::format("region {}: {} {}", i, page_field, *page));
            return out;
        }
        if (*size == 0 || *base + *size < *base) {
            out.error = refuse(errc::bad_region, fmt::format("region {}: base {:#x} size {:#x}", i, *base, *size));
            return out;
        }
        if (!is_aligned(*base, *page) || !is_aligned(*size, *page) || !is_aligned(*offset, *page)) {
            out.error = refuse(errc::unaligned_region, fmt::format("region {}: base {:#x} size {:#x} offset {:#x}, "
                                                                   "page size {}",
                                                                   i, *base, *size, *offset, *page));
            return out;
        }
        if (*offset + *size < *offset || *offset + *size > mem_file_size) {
            out.error = refuse(errc::past_end_of_file,
                               fmt::format("region {}: file bytes [{:#x}, {:#x}) but the memory file has {:#x}", i,
                                           *offset, *offset + *size, mem_file_size));
            return out;
        }
        regions.push_back({*base, *size, *offset, *page});
    }

    // Sorted by base, a region overlaps another only if it overlaps its successor.
    std::vector<std::size_t> order(regions.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
        return regions[a].base_host_virt_addr < regions[b].base_host_virt_addr;
    });
    for (std::size_t k = 1; k < order.size(); ++k) {
        const auto& lo = regions[order[k - 1]];
        const auto& hi = regions[order[k]];
        if (lo.base_host_virt_addr + lo.size > hi.base_host_virt_addr) {
            out.error = refuse(errc::overlapping_regions,
                               fmt::format("region {} [{:#x}, {:#x}) and region {} [{:#x}, {:#x})", order[k - 1],
                                           lo.base_host_virt_addr, lo.base_host_virt_addr + lo.size, order[k],
                                           hi.base_host_virt_addr, hi.base_host_virt_addr + hi.size));
            return out;
        }
    }
    out.regions = std::move(regions);
    return out;
}

/// What one recvmsg() of a handshake brought.
struct received_handshake {
    std::string bytes;          ///< the message
    std::vector<unique_fd> fds; ///< every descriptor that came with it (closed when this is destroyed)
    bool would_block = false;   ///< nothing to read yet: poll again
    refusal error;              ///< closed, failed, oversized, or not exactly one descriptor
};

/// Reads a handshake from the connected stream socket `sock` with ONE
/// recvmsg (non-blocking, MSG_CMSG_CLOEXEC) into a buffer one byte larger
/// than `limits.max_message`. More bytes than the limit, or bytes still
/// queued after the read, mean the message is oversized (Firecracker sends
/// one message and nothing after it). Exactly one descriptor must come with it.
///
/// Refusals: errc::peer_closed, receive_failed, oversized, no_descriptor,
/// too_many_descriptors.
[[nodiscard]] inline received_handshake receive_handshake(int sock, const handshake_limits& limits = {})
{
    constexpr std::size_t max_fds = 8; // room to count a few extra descriptors and close them all
    received_handshake out;
    std::string buffer(limits.max_message + 1, '\0');
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds)] = {};
    iovec iov{buffer.data(), buffer.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    const int err = errno;
    if (n >= 0) {
        for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (std::size_t i = 0; i < count; ++i) {
                int fd = -1;
                std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd); // cmsg data need not be int-aligned
                out.fds.emplace_back(fd);
            }
        }
    }
    if (n < 0) {
        if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR)
            out.would_block = true;
        else
            out.error = refuse(errc::receive_failed, std::strerror(err));
        return out;
    }
    if (n == 0) {
        out.error = refuse(errc::peer_closed);
        return out;
    }
    const auto got = static_cast<std::size_t>(n);
    if (got > limits.max_message) {
        out.error = refuse(errc::oversized, fmt::format("more than {} bytes", limits.max_message));
        return out;
    }
    int queued = 0;
    if (::ioctl(sock, FIONREAD, &queued) == 0 && queued > 0) {
        out.error = refuse(errc::oversized, fmt::format("{} bytes in one read and {} more queued; a handshake is one "
                                                        "message of at most {} bytes",
                                                        got, queued, limits.max_message));
        return out;
    }
    if ((msg.msg_flags & MSG_CTRUNC) != 0) {
        out.error = refuse(errc::too_many_descriptors, fmt::format("more than {}", max_fds));
        return out;
    }
    if (out.fds.empty()) {
        out.error = refuse(errc::no_descriptor);
        return out;
    }
    if (out.fds.size() > 1) {
        out.error = refuse(errc::too_many_descriptors, fmt::format("{} descriptors", out.fds.size()));
        return out;
    }
    buffer.resize(got);
    out.bytes = std::move(buffer);
    return out;
}

/// Who is on the other end of a connection (SO_PEERCRED: as of connect()).
struct peer_info {
    pid_t pid = 0; ///< 0 when the peer's pid is not visible from our pid namespace
    uid_t uid = static_cast<uid_t>(-1);
    gid_t gid = static_cast<gid_t>(-1);
};

[[nodiscard]] inline peer_info peer_credentials(int sock) noexcept
{
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return {};
    return {cred.pid, cred.uid, cred.gid};
}

/// A pidfd for the peer: readable once its process has exited, and a way to
/// signal exactly that process (no pid reuse race). SO_PEERPIDFD (Linux 6.5)
/// names the process that connected; pidfd_open(pid) is the fallback. Empty
/// when neither works (an older kernel, or a peer in another pid namespace).
[[nodiscard]] inline unique_fd peer_pidfd(int sock, pid_t pid) noexcept
{
    int fd = -1;
    socklen_t len = sizeof fd;
    if (::getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD, &fd, &len) == 0 && fd >= 0) return unique_fd{fd};
    if (pid <= 0) return {};
    return unique_fd{static_cast<int>(::syscall(SYS_pidfd_open, pid, 0))}; // raw syscall: glibc 2.36 has no wrapper
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable then).
[[nodiscard]] inline bool process_exited(int pidfd) noexcept
{
    pollfd p{pidfd, POLLIN, 0};
    return ::poll(&p, 1, 0) == 1 && (p.revents & (POLLIN | POLLHUP | POLLERR)) != 0;
}

/// Whether process `pid` is on its way out: a zombie, or its leader past
/// the start of exit (PF_EXITING in /proc/<pid>/stat). A process that exits
/// closes its files (our socket's peer) before its pidfd turns readable, so a
/// hang-up from an exiting process must not read as "closed its socket but
/// still running". Call it while holding a pidfd for `pid`: that keeps the
/// pid number from being reused.
[[nodiscard]] inline bool process_exiting(pid_t pid) noexcept
{
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
    unique_fd f{::open(path, O_RDONLY | O_CLOEXEC)};
    if (!f) return true; // gone from /proc: reaped already
    char buf[1024];
    const ssize_t n = ::read(f.get(), buf, sizeof buf - 1);
    if (n <= 0) return true;
    buf[n] = '\0';
    const char* p = std::strrchr(buf, ')'); // the command name may hold spaces and parentheses
    if (p == nullptr) return false;
    char state = 0;
    unsigned long flags = 0;
    // After ")": state ppid pgrp session tty_nr tpgid flags ...
    if (std::sscanf(p + 1, " %c %*d %*d %*d %*d %*d %lu", &state, &flags) != 2) return false;
    constexpr unsigned long pf_exiting = 0x4; // include/linux/sched.h
    return state == 'Z' || state == 'X' || (flags & pf_exiting) != 0;
}

/// What `fd` is, as /proc/self/fd shows it ("pipe:[123]", "anon_inode:[eventfd]").
[[nodiscard]] inline std::string describe_fd(int fd)
{
    char link[64];
    char target[256] = {};
    std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    const ssize_t n = ::readlink(link, target, sizeof target - 1);
    return n > 0 ? std::string(target, static_cast<std::size_t>(n)) : std::string("unknown");
}

// ---------------------------------------------------------------------------
// One VM
// ---------------------------------------------------------------------------

/// Every VM's pager: pages from the one shared snapshot mapping, regions in a
/// flat index, faults through the adopted userfaultfd, counters and latency.
using vm_pager = pager<source_ref<mapped_file_source>, flat_index, uffd_backend, histogram_stats>;

/// How each VM is served.
struct session_options {
    unsigned threads = 1;                 ///< handler threads per VM
    std::uint64_t fault_around_pages = 1; ///< see uffd_options::fault_around_pages
};

/// A fault that could not be served (published once by a handler thread).
struct unserved_fault {
    std::uint64_t addr = 0;
    std::error_code ec;
};

/// One VM's state and stats, for the log and the JSON report.
struct vm_report {
    std::uint64_t id = 0; ///< connection number, from 1
    pid_t pid = 0;
    std::string state; ///< "serving", or how it ended ("process exited", "socket closed", ...)
    std::vector<guest_region_mapping> regions;
    histogram_stats::snapshot_type stats{};
    uffd_counters uffd{};
    double seconds = 0; ///< since the handshake was accepted
};

/// One line: `faults=... zero_pages=... bytes=... errors=... p50_ns=... p99_ns=... max_ns=... removes=...
/// unserved=...`.
[[nodiscard]] inline std::string stats_line(const vm_report& r)
{
    const auto& c = r.stats.counters;
    const auto& l = r.stats.latency;
    return fmt::format("faults={} zero_pages={} bytes={} errors={} p50_ns={} p99_ns={} max_ns={} removes={} "
                       "unserved={}",
                       c.faults, c.zero_pages, c.bytes_served, c.errors, l.p50_ns, l.p99_ns, l.max_ns,
                       r.uffd.remove_events, r.uffd.unserved);
}

[[nodiscard]] inline nlohmann::json to_json(const vm_report& r)
{
    nlohmann::json regions = nlohmann::json::array();
    std::uint64_t guest_bytes = 0;
    for (const auto& m : r.regions) {
        regions.push_back({{"base_host_virt_addr", m.base_host_virt_addr},
                           {"size", m.size},
                           {"offset", m.offset},
                           {"page_size", m.page_size}});
        guest_bytes += m.size;
    }
    const auto& c = r.stats.counters;
    const auto& l = r.stats.latency;
    return {{"id", r.id},
            {"pid", r.pid},
            {"state", r.state},
            {"seconds", r.seconds},
            {"guest_bytes", guest_bytes},
            {"regions", std::move(regions)},
            {"faults", c.faults},
            {"zero_pages", c.zero_pages},
            {"bytes_served", c.bytes_served},
            {"errors", c.errors},
            {"latency_ns", {{"count", l.count}, {"p50", l.p50_ns}, {"p99", l.p99_ns}, {"max", l.max_ns}}},
            {"remove_events", r.uffd.remove_events},
            {"unmap_events", r.uffd.unmap_events},
            {"unserved", r.uffd.unserved},
            {"redundant_faults", r.uffd.redundant}};
}

/// One connection, i.e. one VM: its socket, its peer, and, once the
/// handshake is accepted, a pager over the shared snapshot serving faults
/// through the adopted userfaultfd. Not movable: handler threads hold it.
class vm_session {
public:
    enum class phase : std::uint8_t { handshake, serving, finished };
    using clock = std::chrono::steady_clock;

    /// `wake_fd` is written (eventfd semantics) when a fault cannot be served.
    vm_session(std::uint64_t id, unique_fd socket, peer_info peer, unique_fd pidfd, int wake_fd) noexcept
        : id_(id), socket_(std::move(socket)), peer_(peer), pidfd_(std::move(pidfd)), wake_fd_(wake_fd)
    {
    }
    vm_session(const vm_session&) = delete;
    vm_session& operator=(const vm_session&) = delete;
    ~vm_session() { stop(); }

    /// Adopts `uffd` (it must be a userfaultfd: checked), registers
    /// `regions` with a new pager over `snapshot` and starts serving.
    /// Errors: squib::uffd_errc::not_a_userfaultfd, std::errc::invalid_argument
    /// for bad options, the pager's registration and start errors
    /// (a thread that cannot be spawned included).
    [[nodiscard]] std::error_code start(mapped_file_source& snapshot, unique_fd uffd,
                                        std::vector<guest_region_mapping> regions, const session_options& opts)
    {
        uffd_options o;
        o.threads = opts.threads;
        o.fault_around_pages = opts.fault_around_pages;
        o.thread_name = fmt::format("uffd-vm{}", id_);
        o.on_unserved = &vm_session::note_unserved; // log and release this VM instead of aborting the daemon
        o.on_unserved_context = this;
        auto backend = uffd_backend::adopt(uffd.release(), std::move(o));
        if (!backend) return backend.error();
        auto p = std::make_unique<vm_pager>(source_ref<mapped_file_source>{snapshot}, pager_options{}, std::in_place,
                                            std::move(*backend));
        for (const auto& m : regions)
            if (auto ec = p->register_region(m.to_region())) return ec;
        if (auto ec = p->start()) return ec;
        regions_ = std::move(regions);
        pager_ = std::move(p);
        started_ = clock::now();
        phase_ = phase::serving;
        return {};
    }

    /// Stops the handler threads, keeps the final stats and closes our copy
    /// of the userfaultfd. Safe to call more than once.
    void stop() noexcept
    {
        if (!pager_) return;
        pager_->stop();
        final_stats_ = pager_->stats().snapshot();
        final_uffd_ = pager_->backend().counters();
        stopped_ = clock::now();
        pager_.reset();
    }

    /// The first fault a handler thread could not serve, once published.
    [[nodiscard]] std::optional<unserved_fault> unserved() const noexcept
    {
        if (unserved_state_.load(std::memory_order_acquire) != 2) return std::nullopt;
        return unserved_;
    }

    [[nodiscard]] vm_report report() const
    {
        vm_report r;
        r.id = id_;
        r.pid = peer_.pid;
        r.state = phase_ == phase::finished ? end_reason_ : phase_ == phase::serving ? "serving" : "handshake";
        r.regions = regions_;
        if (pager_) {
            r.stats = pager_->stats().snapshot();
            r.uffd = pager_->backend().counters();
        } else {
            r.stats = final_stats_;
            r.uffd = final_uffd_;
        }
        if (started_ != clock::time_point{}) {
            const auto end = pager_ || stopped_ == clock::time_point{} ? clock::now() : stopped_;
            r.seconds = std::chrono::duration<double>(end - started_).count();
        }
        return r;
    }

    /// `vm#3 pid=1234`, the start of every log line about this VM.
    [[nodiscard]] std::string name() const { return fmt::format("vm#{} pid={}", id_, peer_.pid); }

    [[nodiscard]] std::uint64_t id() const noexcept { return id_; }
    [[nodiscard]] const peer_info& peer() const noexcept { return peer_; }
    [[nodiscard]] phase current_phase() const noexcept { return phase_; }
    [[nodiscard]] int socket() const noexcept { return socket_.get(); }
    [[nodiscard]] int pidfd() const noexcept { return pidfd_.get(); }
    [[nodiscard]] const std::vector<guest_region_mapping>& regions() const noexcept { return regions_; }

    /// Marks the session over (after stop()); `why` becomes its state.
    void finish(std::string why) noexcept
    {
        stop();
        end_reason_ = std::move(why);
        phase_ = phase::finished;
        socket_.reset();
        pidfd_.reset();
    }
    /// Stops watching the socket (the peer closed it) but keeps serving.
    void close_socket() noexcept { socket_.reset(); }
    /// Sends `sig` to the peer through its pidfd. Errors: errno of pidfd_send_signal, or ESRCH without a pidfd.
    [[nodiscard]] std::error_code signal_peer(int sig) const noexcept
    {
        if (!pidfd_) return std::make_error_code(std::errc::no_such_process);
        if (::syscall(SYS_pidfd_send_signal, pidfd_.get(), sig, nullptr, 0) != 0)
            return last_os_error(); // no glibc wrapper
        return {};
    }

    clock::time_point handshake_deadline{}; ///< when a silent peer is refused
    bool warned_extra_bytes = false;        ///< logged bytes sent after the handshake once

private:
    static void note_unserved(void* ctx, std::uint64_t addr, std::error_code ec) noexcept
    {
        auto* self = static_cast<vm_session*>(ctx);
        int expected = 0;
        // The first failure is kept; the server loop reads it after the release store.
        if (self->unserved_state_.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
            self->unserved_ = {addr, ec};
            self->unserved_state_.store(2, std::memory_order_release);
            const std::uint64_t one = 1;
            [[maybe_unused]] auto n = ::write(self->wake_fd_, &one, sizeof one); // wakes the server loop
        }
    }

    std::uint64_t id_;
    unique_fd socket_;
    peer_info peer_;
    unique_fd pidfd_;
    int wake_fd_; // the server's eventfd, not owned
    phase phase_ = phase::handshake;
    std::string end_reason_;
    std::vector<guest_region_mapping> regions_;
    std::unique_ptr<vm_pager> pager_;
    histogram_stats::snapshot_type final_stats_{};
    uffd_counters final_uffd_{};
    clock::time_point started_{};
    clock::time_point stopped_{};
    std::atomic<int> unserved_state_{0}; // 0 none, 1 being written, 2 published
    unserved_fault unserved_{};
};

// ---------------------------------------------------------------------------
// The server: many VMs, one snapshot
// ---------------------------------------------------------------------------

/// Writes one log line (no trailing newline). Must not call back into the server.
using log_sink = std::function<void(std::string_view)>;

/// `2025-01-31T12:00:00.123Z squib-uffd-handler: <line>` on stderr.
inline void log_to_stderr(std::string_view line)
{
    timespec ts{};
    ::clock_gettime(CLOCK_REALTIME, &ts);
    tm utc{};
    ::gmtime_r(&ts.tv_sec, &utc);
    char when[32];
    std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &utc);
    fmt::print(stderr, "{}.{:03}Z squib-uffd-handler: {}\n", when, ts.tv_nsec / 1000000, line);
    std::fflush(stderr);
}

struct server_options {
    std::string socket_path;     ///< Unix socket to listen on (Firecracker's mem_backend.backend_path)
    std::string mem_file;        ///< the snapshot's memory file
    session_options session{};   ///< per-VM handler threads and fault-around
    handshake_limits limits{};   ///< message size and region count bounds
    std::string stats_json_path; ///< where request_stats() and shutdown write the JSON report; empty: nowhere
    /// A peer that connects and sends nothing for this long is refused.
    std::chrono::milliseconds handshake_timeout{10000};
    /// After an unserved fault, also SIGKILL the VM's process (through its
    /// pidfd) instead of leaving its vCPU blocked on the page forever.
    bool kill_on_unserved = false;
    std::size_t finished_history = 256; ///< finished VMs kept for the JSON report
    log_sink log = &log_to_stderr;
};

/// Listens on a Unix socket and serves every Firecracker that connects from
/// one mapped snapshot: one connection is one VM with its own pager, adopted
/// userfaultfd, handler threads and stats.
///
/// A VM is released (threads joined, its userfaultfd closed, stats logged)
/// when its process exits (watched through a pidfd) or, when no pidfd can be
/// had, when its socket closes; after a fault that cannot be served; and at
/// shutdown. A socket closed by a live process (Firecracker before 1.12 does
/// that after the handshake) is not a release. A bad peer is refused with
/// one log line naming its pid and the reason, and only its connection is
/// closed.
///
/// run() is the loop; stop() and request_stats() may be called from any
/// thread and from a signal handler (an atomic flag and an eventfd write).
///
/// **Example**
///
///     auto srv = squib::uffd_handler::server::create({.socket_path = "/run/fc/uffd.sock",
///                                                      .mem_file = "/snap/vm.mem"});
///     if (!srv) return 1;
///     std::thread loop([&] { (*srv)->run(); });
///     ...
///     (*srv)->stop();
///     loop.join();
class server {
public:
    /// Maps the memory file and binds the socket. A stale socket file (no
    /// one listening) is replaced; a live one or any other file is an error.
    /// Errors: mapped_file_source::open's errors; std::errc::filename_too_long,
    /// std::errc::address_in_use, std::errc::file_exists; the errno of
    /// socket/bind/listen/eventfd. Each is also logged with its context.
    [[nodiscard]] static result<std::unique_ptr<server>> create(server_options opts)
    {
        if (!opts.log) opts.log = &log_to_stderr;
        std::unique_ptr<server> s(new server(std::move(opts)));
        auto& o = s->opts_;
        auto snapshot = mapped_file_source::open(o.mem_file);
        if (!snapshot) {
            s->logf("cannot map the memory file {}: {}", o.mem_file, snapshot.error().message());
            return snapshot.error();
        }
        s->snapshot_ = std::move(*snapshot);
        s->wake_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (!s->wake_) return s->failed("eventfd", last_os_error());
        if (auto ec = s->listen()) return ec;
        s->logf("listening on {}; memory file {} ({} bytes, {} data extents); {} handler thread(s) per VM, "
                "fault-around {} pages",
                o.socket_path, o.mem_file, s->snapshot_.size(), s->snapshot_.data_extent_count(), o.session.threads,
                o.session.fault_around_pages);
        return s;
    }

    server(const server&) = delete;
    server& operator=(const server&) = delete;
    ~server()
    {
        sessions_.clear(); // their pagers stop before the snapshot mapping goes
        close_listener();
    }

    /// Serves until stop(). Then releases every VM (logging its stats),
    /// writes the stats file and returns. Errors: the errno of a failed poll.
    std::error_code run()
    {
        std::error_code result;
        std::vector<pollfd> fds;
        std::vector<std::pair<vm_session*, bool>> owners; // per pollfd after the first two: session, is_pidfd
        std::unique_lock lock(mutex_);
        for (;;) {
            if (stop_.load(std::memory_order_acquire)) break;
            fds.clear();
            owners.clear();
            fds.push_back({listener_.get(), static_cast<short>(listen_paused_ ? 0 : POLLIN), 0});
            fds.push_back({wake_.get(), POLLIN, 0});
            int timeout = -1;
            const auto now = vm_session::clock::now();
            for (auto& s : sessions_) {
                if (s->socket() >= 0) {
                    fds.push_back({s->socket(), POLLIN | POLLRDHUP, 0});
                    owners.emplace_back(s.get(), false);
                }
                if (s->current_phase() == vm_session::phase::serving && s->pidfd() >= 0) {
                    fds.push_back({s->pidfd(), POLLIN, 0});
                    owners.emplace_back(s.get(), true);
                }
                if (s->current_phase() == vm_session::phase::handshake) {
                    const auto left = std::chrono::ceil<std::chrono::milliseconds>(s->handshake_deadline - now);
                    const int ms = static_cast<int>(std::clamp<std::int64_t>(left.count(), 0, 1 << 30));
                    timeout = timeout < 0 ? ms : std::min(timeout, ms);
                }
            }
            lock.unlock();
            const int n = ::poll(fds.data(), fds.size(), timeout);
            const int poll_errno = errno;
            lock.lock();
            if (n < 0) {
                if (poll_errno == EINTR) continue;
                result = {poll_errno, std::system_category()};
                logf("poll failed: {}; shutting down", result.message());
                break;
            }
            if ((fds[1].revents & POLLIN) != 0) {
                std::uint64_t count = 0;
                [[maybe_unused]] auto r = ::read(wake_.get(), &count, sizeof count); // reset the eventfd
            }
            if (stop_.load(std::memory_order_acquire)) break;
            for (auto& s : sessions_) check_unserved(*s);
            for (std::size_t i = 2; i < fds.size(); ++i) {
                if (fds[i].revents == 0) continue;
                vm_session& s = *owners[i - 2].first;
                if (s.current_phase() == vm_session::phase::finished) continue;
                if (owners[i - 2].second)
                    release(s, "process exited");
                else
                    on_socket(s, fds[i].revents);
            }
            if ((fds[0].revents & POLLIN) != 0) accept_all();
            expire_handshakes();
            if (stats_requested_.exchange(false)) emit_stats();
            sweep();
        }
        if (!sessions_.empty()) {
            std::size_t serving = 0;
            for (auto& s : sessions_) serving += s->current_phase() == vm_session::phase::serving ? 1 : 0;
            if (serving > 0)
                logf("shutting down with {} VM(s) still running: their next page faults will wait forever", serving);
        }
        for (auto& s : sessions_) {
            if (s->current_phase() == vm_session::phase::serving)
                release(*s, "daemon shutdown");
            else if (s->current_phase() == vm_session::phase::handshake)
                s->finish("daemon shutdown");
        }
        sweep();
        close_listener(); // no new Firecracker connects to a daemon that is gone
        if (!opts_.stats_json_path.empty()) write_stats_file();
        logf("stopped: {} VM(s) served, {} refused", accepted_, refused_);
        return result;
    }

    /// Ends run() soon. Async-signal-safe; idempotent.
    void stop() noexcept
    {
        stop_.store(true, std::memory_order_release);
        poke();
    }

    /// Makes run() log each live VM's stats and write the stats file (if
    /// any). Async-signal-safe.
    void request_stats() noexcept
    {
        stats_requested_.store(true, std::memory_order_release);
        poke();
    }

    /// The JSON report: the daemon's counters, the live VMs and the most
    /// recently finished ones. Thread-safe.
    [[nodiscard]] nlohmann::json stats() const
    {
        std::lock_guard lock(mutex_);
        return stats_locked();
    }

    /// VMs being served right now. Thread-safe.
    [[nodiscard]] std::size_t active_vms() const
    {
        std::lock_guard lock(mutex_);
        std::size_t n = 0;
        for (const auto& s : sessions_) n += s->current_phase() == vm_session::phase::serving ? 1 : 0;
        return n;
    }

    [[nodiscard]] const server_options& options() const noexcept { return opts_; }
    [[nodiscard]] std::uint64_t mem_file_size() const noexcept { return snapshot_.size(); }

private:
    explicit server(server_options opts) : opts_(std::move(opts)) {}

    template <class... Args>
    void logf(fmt::format_string<Args...> format, Args&&... args)
    {
        try {
            opts_.log(fmt::format(format, std::forward<Args>(args)...));
        } catch (...) { // a log line that cannot be formatted or written must not end the daemon
        }
    }

    std::error_code failed(const char* what, std::error_code ec)
    {
        logf("cannot listen on {}: {} failed: {}", opts_.socket_path, what, ec.message());
        return ec;
    }

    void poke() noexcept
    {
        const std::uint64_t one = 1;
        [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof one);
    }

    std::error_code listen()
    {
        const std::string& path = opts_.socket_path;
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        if (path.empty() || path.size() >= sizeof addr.sun_path)
            return failed("checking the path length", std::make_error_code(std::errc::filename_too_long));
        std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
        const auto addr_len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);

        struct stat st {};
        if (::lstat(path.c_str(), &st) == 0) {
            if (!S_ISSOCK(st.st_mode)) return failed("checking the path", std::make_error_code(std::errc::file_exists));
            // A socket file: replace it only if nobody answers on it.
            unique_fd probe{::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
            if (!probe) return failed("socket", last_os_error());
            // The cast is how the sockets API takes every address family.
            if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), addr_len) == 0)
                return failed("checking for another handler", std::make_error_code(std::errc::address_in_use));
            if (errno != ECONNREFUSED) return failed("probing the old socket", last_os_error());
            if (::unlink(path.c_str()) != 0) return failed("removing the stale socket", last_os_error());
            logf("replaced the stale socket {}", path);
        }
        listener_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
        if (!listener_) return failed("socket", last_os_error());
        if (::bind(listener_.get(), reinterpret_cast<const sockaddr*>(&addr), addr_len) != 0) { // sockets API cast
            auto ec = last_os_error();
            listener_.reset();
            return failed("bind", ec);
        }
        if (::stat(path.c_str(), &st) == 0) {
            socket_ino_ = st.st_ino;
            socket_dev_ = st.st_dev;
        }
        if (::listen(listener_.get(), 128) != 0) return failed("listen", last_os_error());
        return {};
    }

    void close_listener() noexcept
    {
        if (!listener_) return;
        listener_.reset();
        struct stat st {};
        // Remove the socket file only if it is still the one we bound.
        if (::stat(opts_.socket_path.c_str(), &st) == 0 && st.st_ino == socket_ino_ && st.st_dev == socket_dev_)
            ::unlink(opts_.socket_path.c_str());
    }

    void accept_all()
    {
        for (;;) {
            unique_fd conn{::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK)};
            if (!conn) {
                const int err = errno;
                if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR) return;
                if (err == ECONNABORTED || err == EPROTO) continue; // that peer is gone already
                // Out of descriptors or memory: stop accepting until a VM is released, or poll would spin.
                logf("accept failed: {}; not accepting new VMs until one is released", std::strerror(err));
                listen_paused_ = true;
                return;
            }
            const peer_info peer = peer_credentials(conn.get());
            unique_fd pidfd = peer_pidfd(conn.get(), peer.pid);
            auto s = std::make_unique<vm_session>(++connections_, std::move(conn), peer, std::move(pidfd), wake_.get());
            s->handshake_deadline = vm_session::clock::now() + opts_.handshake_timeout;
            logf("{}: connected (uid {}{})", s->name(), peer.uid,
                 s->pidfd() >= 0 ? "" : "; no pidfd, so a closed socket will mean the VM is gone");
            sessions_.push_back(std::move(s));
        }
    }

    void on_socket(vm_session& s, short revents)
    {
        if (s.current_phase() == vm_session::phase::handshake) {
            on_handshake(s);
            return;
        }
        // Serving: Firecracker sends nothing more; anything else is a hang-up.
        if ((revents & POLLIN) != 0) {
            char buf[512];
            const ssize_t n = ::recv(s.socket(), buf, sizeof buf, MSG_DONTWAIT);
            if (n > 0) {
                if (!s.warned_extra_bytes)
                    logf("{}: ignoring bytes sent after the handshake (the protocol has no further messages)",
                         s.name());
                s.warned_extra_bytes = true;
                return;
            }
            if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        } else if ((revents & (POLLHUP | POLLERR | POLLRDHUP)) == 0) {
            return;
        }
        on_socket_closed(s);
    }

    void on_socket_closed(vm_session& s)
    {
        if (s.pidfd() >= 0 && !process_exited(s.pidfd()) && !process_exiting(s.peer().pid)) {
            logf("{}: closed its socket but is still running; serving it until it exits "
                 "(Firecracker before 1.12 closes the socket after the handshake)",
                 s.name());
            s.close_socket();
            return;
        }
        release(s, s.pidfd() >= 0 ? "process exited" : "socket closed");
    }

    void on_handshake(vm_session& s)
    {
        auto msg = receive_handshake(s.socket(), opts_.limits);
        if (msg.would_block) return;
        if (msg.error) {
            refuse_peer(s, msg.error);
            return;
        }
        auto parsed = parse_handshake(msg.bytes, snapshot_.size(), opts_.limits);
        if (parsed.error) {
            refuse_peer(s, parsed.error);
            return;
        }
        const std::string what = describe_fd(msg.fds.front().get()); // before adopt() takes it
        if (auto ec = s.start(snapshot_, std::move(msg.fds.front()), parsed.regions, opts_.session)) {
            if (ec == uffd_errc::not_a_userfaultfd)
                refuse_peer(s, refuse(errc::not_a_userfaultfd, fmt::format("it is {}", what)));
            else
                refuse_peer(s, refuse(errc::setup_failed, ec.message()));
            return;
        }
        ++accepted_;
        std::uint64_t bytes = 0;
        std::vector<std::uint64_t> sizes;
        for (const auto& r : parsed.regions) {
            bytes += r.size;
            if (std::find(sizes.begin(), sizes.end(), r.page_size) == sizes.end()) sizes.push_back(r.page_size);
        }
        logf("{}: serving {} region(s), {} bytes of guest memory, page size {}", s.name(), parsed.regions.size(), bytes,
             fmt::join(sizes, "/"));
    }

    void refuse_peer(vm_session& s, const refusal& why)
    {
        ++refused_;
        logf("{}: refused: {}; connection closed", s.name(), describe(why));
        s.finish("refused");
        listen_paused_ = false;
    }

    void expire_handshakes()
    {
        const auto now = vm_session::clock::now();
        for (auto& s : sessions_)
            if (s->current_phase() == vm_session::phase::handshake && now >= s->handshake_deadline)
                refuse_peer(*s, refuse(errc::handshake_timeout,
                                       fmt::format("nothing within {} ms", opts_.handshake_timeout.count())));
    }

    void check_unserved(vm_session& s)
    {
        if (s.current_phase() != vm_session::phase::serving) return;
        const auto u = s.unserved();
        if (!u) return;
        if (u->ec == std::errc::no_such_process || (s.pidfd() >= 0 && process_exited(s.pidfd()))) {
            release(s, "process exited");
            return;
        }
        std::string action = "releasing this VM; its vCPU stays blocked on that page until its Firecracker is stopped";
        if (opts_.kill_on_unserved) {
            const auto ec = s.signal_peer(SIGKILL);
            action = ec ? fmt::format("releasing this VM; could not kill it: {}", ec.message())
                        : std::string("killed it (--kill-on-unserved) and releasing it");
        }
        logf("{}: cannot serve the page fault at {:#x}: {}; {}", s.name(), u->addr, u->ec.message(), action);
        release(s, "unserved fault");
    }

    void release(vm_session& s, const char* why)
    {
        s.finish(why);
        const vm_report r = s.report();
        logf("{}: released ({}) after {:.3f} s: {}", s.name(), why, r.seconds, stats_line(r));
        finished_.push_back(r);
        while (finished_.size() > opts_.finished_history) finished_.pop_front();
        listen_paused_ = false;
    }

    void sweep()
    {
        std::erase_if(sessions_, [](const auto& s) { return s->current_phase() == vm_session::phase::finished; });
    }

    nlohmann::json stats_locked() const
    {
        nlohmann::json vms = nlohmann::json::array();
        std::size_t active = 0;
        for (const auto& s : sessions_) {
            if (s->current_phase() != vm_session::phase::serving) continue;
            vms.push_back(to_json(s->report()));
            ++active;
        }
        for (const auto& r : finished_) vms.push_back(to_json(r));
        return {{"mem_file", opts_.mem_file},  {"mem_file_bytes", snapshot_.size()},
                {"socket", opts_.socket_path}, {"vms_active", active},
                {"vms_served", accepted_},     {"vms_refused", refused_},
                {"vms", std::move(vms)}};
    }

    void emit_stats()
    {
        for (const auto& s : sessions_)
            if (s->current_phase() == vm_session::phase::serving) {
                const vm_report r = s->report();
                logf("{}: serving for {:.3f} s: {}", s->name(), r.seconds, stats_line(r));
            }
        if (!opts_.stats_json_path.empty()) write_stats_file();
    }

    void write_stats_file()
    {
        try {
            const nlohmann::json report = stats_locked();
            const std::string text = report.dump(2) + "\n";
            const std::string tmp = opts_.stats_json_path + ".tmp";
            unique_fd f{::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
            if (!f) throw std::system_error(last_os_error(), "open " + tmp);
            std::size_t done = 0;
            while (done < text.size()) {
                const ssize_t n = ::write(f.get(), text.data() + done, text.size() - done);
                if (n < 0 && errno == EINTR) continue;
                if (n <= 0) throw std::system_error(last_os_error(), "write " + tmp);
                done += static_cast<std::size_t>(n);
            }
            f.reset();
            // Readers see the old report or the new one, never half of one.
            if (::rename(tmp.c_str(), opts_.stats_json_path.c_str()) != 0)
                throw std::system_error(last_os_error(), "rename to " + opts_.stats_json_path);
            logf("wrote stats of {} VM(s) to {}", report["vms"].size(), opts_.stats_json_path);
        } catch (const std::exception& e) {
            logf("cannot write the stats file: {}", e.what());
        }
    }

    server_options opts_;
    mapped_file_source snapshot_; // shared by every VM; declared before sessions_ so it outlives them
    unique_fd wake_;              // eventfd: stop, stats requests, unserved faults
    unique_fd listener_;
    ino_t socket_ino_ = 0;
    dev_t socket_dev_ = 0;
    mutable std::mutex mutex_; // guards sessions_, finished_ and the counters against stats() readers
    std::vector<std::unique_ptr<vm_session>> sessions_;
    std::deque<vm_report> finished_;
    std::uint64_t connections_ = 0;
    std::uint64_t accepted_ = 0;
    std::uint64_t refused_ = 0;
    bool listen_paused_ = false;
    std::atomic<bool> stop_{false};
    std::atomic<bool> stats_requested_{false};
};

} // namespace squib::uffd_handler
