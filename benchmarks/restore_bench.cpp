// squib-pager: a whole restore, measured. A snapshot file (pseudo-random
// bytes, page cache warm) is restored into fresh anonymous memory in several
// ways, and every page is touched once, sequentially and in a shuffled order:
//
//   eager                   read the whole file into anonymous memory, then touch
//   mmap                    mmap(MAP_PRIVATE) of the file: the kernel's demand paging
//   baseline_handler        a minimal userfaultfd handler written here (the man page's
//                           loop: poll, read one message, pread one page, UFFDIO_COPY)
//   squib_file              squib's uffd backend, one page per fault, file_source
//   squib_mapped            the same with mapped_file_source (installs from the mapping)
//   squib_fault_around_N    mapped_file_source, N-page fault-around clusters
//   copy_bound_2mib         a handler written here doing one 2 MiB UFFDIO_COPY per fault
//                           straight from a mapping of the file: the kernel's copy bound
//   *_same_cpu, *_other_cpu baseline_handler and squib_mapped with the handler thread pinned
//                           to the toucher's CPU / to another one (a cross-CPU wake-up is
//                           costly on small VMs; --handler-cpu picks the main rows' setting;
//                           a row pinned unlike the main rows touches the first
//                           --subset-mib only, to keep the run short)
//   kvm_eager, kvm_lazy     a tiny KVM guest (examples/kvm_guest.hpp) walking its RAM, loaded
//                           eagerly vs served by squib's uffd backend: time to the guest's
//                           first instruction and to its end, from the start of the restore,
//                           each run in a fresh child process as a real restore would be
//
// Each measurement is the wall time of the touch loop (eager: the read of the
// file too) divided by the pages touched. The touch loop folds one byte of
// every page into a checksum that must equal the eager run's, so a wrong page
// is an error (exit 1), not a fast result; the guest's checksum and the words
// it wrote must match the C++ model's. Rows are measured round-robin, --repeat
// times each, and report their fastest run (--stat median for the median).
// One-shot, seconds-long restores do not fit Google Benchmark's iteration
// model, hence the plain timers. Linux on x86-64 only (userfaultfd, KVM).
//
//     g++ -std=c++20 -O2 -Iinclude benchmarks/restore_bench.cpp -lfmt -pthread -o restore_bench
//     ./restore_bench [--size-mib 1024] [--json] [--repeat 3] [--handler-cpu same|other|none]
//
// The table goes to stdout, or to stderr under --json, which prints one JSON
// object per row on stdout instead.

#include <squib/backend/uffd.hpp>
#include <squib/core/page.hpp>
#include <squib/core/pager.hpp>
#include <squib/core/region.hpp>
#include <squib/index/flat.hpp>
#include <squib/source/file.hpp>
#include <squib/source/mapped_file.hpp>
#include <squib/stats/atomic.hpp>

#include "../examples/kvm_guest.hpp"

#include <fmt/format.h>

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <charconv>
#include <chrono>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

namespace kd = squib::kvm_demo;

constexpr std::uint64_t page = squib::page_4k;
constexpr std::uint64_t huge = squib::page_2m;

// ---- targets (informational) -----------------------------------------------------

constexpr double target_single_page_ratio = 1.1;    // squib one page per fault vs baseline_handler
constexpr double target_fault_around_speed = 0.8;   // squib_fault_around_512 seq vs copy_bound_2mib seq
constexpr double target_first_instruction_ms = 5.0; // kvm_lazy, 1 GiB guest

// ---- failure and cleanup ---------------------------------------------------------

std::filesystem::path g_temp_dir; // removed on every exit path, handler threads' included
char g_signal_file[4096];         // the snapshot and its directory as C strings, for the signal handler
char g_signal_dir[4096];

/// Ctrl-C must not leave a GiB-sized file behind. unlink/rmdir/_exit only:
/// they are async-signal-safe.
extern "C" void on_terminate_signal(int signo)
{
    ::unlink(g_signal_file);
    ::rmdir(g_signal_dir);
    ::_exit(128 + signo);
}

void remove_temp_dir() noexcept
{
    if (g_temp_dir.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(g_temp_dir, ec);
    g_temp_dir.clear();
}

/// For setup failures and for handler threads that cannot serve a fault
/// (the toucher would otherwise hang): say why, clean up, leave.
[[noreturn]] void fatal(std::string_view what) noexcept
{
    std::fprintf(stderr, "restore_bench: error: %.*s\n", static_cast<int>(what.size()), what.data());
    std::fflush(stderr);
    remove_temp_dir();
    std::_Exit(1);
}

[[noreturn]] void fatal_errno(std::string_view what) noexcept
{
    const std::string msg = fmt::format("{}: {}", what, std::strerror(errno));
    fatal(msg);
}

[[noreturn]] void fatal_ec(std::string_view what, std::error_code ec) noexcept
{
    const std::string msg = fmt::format("{}: {} ({}:{})", what, ec.message(), ec.category().name(), ec.value());
    fatal(msg);
}

[[nodiscard]] double seconds_between(std::chrono::steady_clock::time_point a,
                                     std::chrono::steady_clock::time_point b) noexcept
{
    return std::chrono::duration<double>(b - a).count();
}

// ---- CPUs ---------------------------------------------------------------------------

cpu_set_t g_startup_cpus; // the affinity we started with; threads go back to it after a pinned phase

[[nodiscard]] std::vector<int> allowed_cpus()
{
    std::vector<int> cpus;
    for (int c = 0; c < CPU_SETSIZE; ++c)
        if (CPU_ISSET(c, &g_startup_cpus)) cpus.push_back(c);
    return cpus;
}

void pin_self(int cpu) noexcept
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (const int rc = ::pthread_setaffinity_np(::pthread_self(), sizeof set, &set); rc != 0) {
        errno = rc;
        fatal_errno(fmt::format("pinning a thread to CPU {}", cpu));
    }
}

/// Back to the startup set: threads spawned now (squib's handlers with no
/// handler_cpus) inherit it instead of the toucher's pin.
void unpin_self() noexcept
{
    ::pthread_setaffinity_np(::pthread_self(), sizeof g_startup_cpus, &g_startup_cpus); // cannot fail: it was ours
}

/// Where handler threads run relative to the thread that touches memory.
enum class placement { same, other, none };

[[nodiscard]] std::string_view name_of(placement p) noexcept
{
    switch (p) {
    case placement::same: return "same";
    case placement::other: return "other";
    case placement::none: return "none";
    }
    return "?";
}

struct cpu_plan {
    int touch = 0;  // the toucher (and the vCPU thread) runs here
    int other = -1; // another allowed CPU, -1 when there is none

    /// The handler CPU for placement `p`, -1 for "let the scheduler choose".
    [[nodiscard]] int handler(placement p) const noexcept
    {
        switch (p) {
        case placement::same: return touch;
        case placement::other: return other;
        case placement::none: return -1;
        }
        return -1;
    }
    [[nodiscard]] std::vector<int> handler_cpus(placement p) const
    {
        const int c = handler(p);
        return c < 0 ? std::vector<int>{} : std::vector<int>{c};
    }
};

// ---- the snapshot ----------------------------------------------------------------------

[[nodiscard]] constexpr std::uint64_t splitmix64(std::uint64_t x) noexcept
{
    x += 0x9e37'79b9'7f4a'7c15;
    x = (x ^ (x >> 30)) * 0xbf58'476d'1ce4'e5b9;
    x = (x ^ (x >> 27)) * 0x94d0'49bb'1331'11eb;
    return x ^ (x >> 31);
}

void pread_all(int fd, std::byte* dst, std::uint64_t len, std::uint64_t offset) noexcept
{
    while (len > 0) {
        const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(len, 1u << 30));
        const ssize_t n = ::pread(fd, dst, want, static_cast<off_t>(offset)); // raw syscall: positional read
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fatal_errno("pread of the snapshot");
        if (n == 0) fatal("the snapshot file ended early");
        dst += n;
        len -= static_cast<std::uint64_t>(n);
        offset += static_cast<std::uint64_t>(n);
    }
}

/// Writes `size` pseudo-random bytes, then the guest program's code at its
/// load address (so a lazily restored guest faults its code in like its
/// data), flushes it to disk (no writeback during the measurements) and reads
/// it once so the page cache is warm.
void make_snapshot(const std::filesystem::path& path, std::uint64_t size, const kd::guest_program& program)
{
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600); // raw syscall: closed below
    if (fd < 0) fatal_errno(fmt::format("creating {}", path.string()));
    std::vector<std::uint64_t> chunk((8u << 20) / sizeof(std::uint64_t));
    std::uint64_t word = 0;
    for (std::uint64_t done = 0; done < size;) {
        for (auto& w : chunk) w = splitmix64(word++);
        const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(size - done, chunk.size() * 8));
        const auto* bytes = reinterpret_cast<const char*>(chunk.data()); // write() takes raw bytes
        for (std::size_t off = 0; off < want;) {
            const ssize_t n = ::write(fd, bytes + off, want - off);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) fatal_errno(fmt::format("writing {}", path.string()));
            off += static_cast<std::size_t>(n);
        }
        done += want;
    }
    if (program.load_gpa + program.code.size() <= size) {
        if (::pwrite(fd, program.code.data(), program.code.size(), static_cast<off_t>(program.load_gpa)) !=
            static_cast<ssize_t>(program.code.size()))
            fatal_errno("writing the guest program into the snapshot");
    }
    if (::fsync(fd) != 0) fatal_errno("fsync of the snapshot");
    std::vector<std::byte> sink(8u << 20);
    for (std::uint64_t off = 0; off < size; off += sink.size())
        pread_all(fd, sink.data(), std::min<std::uint64_t>(sink.size(), size - off), off);
    ::close(fd);
}

// ---- memory -----------------------------------------------------------------------------

/// Fresh anonymous memory whose base is 2 MiB aligned, so fault-around blocks
/// and 2 MiB copies line up with the region. Unmapped on destruction.
class anon_region {
public:
    explicit anon_region(std::uint64_t size) : size_(size)
    {
        void* p = ::mmap(nullptr, size + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                         -1, 0);
        if (p == MAP_FAILED) fatal_errno("mmap of anonymous memory");
        const auto raw = reinterpret_cast<std::uintptr_t>(p); // address arithmetic to align the base
        const std::uint64_t aligned = squib::align_up(raw, huge);
        if (aligned > raw) ::munmap(p, aligned - raw); // trim the unaligned head
        if (const std::uint64_t tail = raw + size + huge - (aligned + size); tail > 0)
            ::munmap(reinterpret_cast<void*>(aligned + size), tail); // and the tail past the region
        base_ = reinterpret_cast<std::byte*>(aligned); // the aligned start of our own mapping
    }
    anon_region(const anon_region&) = delete;
    anon_region& operator=(const anon_region&) = delete;
    ~anon_region() { ::munmap(base_, size_); }

    [[nodiscard]] std::byte* data() const noexcept { return base_; }
    [[nodiscard]] std::uint64_t addr() const noexcept { return reinterpret_cast<std::uintptr_t>(base_); }
    [[nodiscard]] std::uint64_t size() const noexcept { return size_; }

private:
    std::byte* base_ = nullptr;
    std::uint64_t size_ = 0;
};

/// A mapping of the snapshot, fresh per use so no run inherits another's
/// page tables: read-only for the demand-paging and copy-bound rows, private
/// and writable for the guest's reference model.
class file_mapping {
public:
    file_mapping(const std::filesystem::path& path, std::uint64_t size, int flags, int prot = PROT_READ) : size_(size)
    {
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC); // raw syscall: only needed for mmap
        if (fd < 0) fatal_errno("open of the snapshot");
        void* p = ::mmap(nullptr, size, prot, flags, fd, 0);
        ::close(fd);
        if (p == MAP_FAILED) fatal_errno("mmap of the snapshot");
        base_ = static_cast<std::byte*>(p);
    }
    file_mapping(const file_mapping&) = delete;
    file_mapping& operator=(const file_mapping&) = delete;
    ~file_mapping() { ::munmap(base_, size_); }

    [[nodiscard]] std::byte* data() const noexcept { return base_; }

private:
    std::byte* base_ = nullptr;
    std::uint64_t size_ = 0;
};

// ---- the touch loop ---------------------------------------------------------------------------

/// Reads one byte of every page in `order` (a real load each, in that order)
/// and folds it with its page number. The byte's offset depends on the page,
/// so a page installed at the wrong address, or shifted, changes the sum; the
/// sum does not depend on the order, so seq and rand agree with eager.
[[gnu::noinline]] std::uint64_t touch_pages(const std::byte* base, std::span<const std::uint32_t> order) noexcept
{
    std::uint64_t sum = 0;
    for (const std::uint32_t i : order) {
        const std::uint64_t at = std::uint64_t{i} * page + ((i * 0x9e37'79b1u) & (page - 1));
        const volatile std::byte* p = base + at; // volatile: the load must happen, in this order
        sum += (std::to_integer<std::uint64_t>(*p) + 1) * (2 * std::uint64_t{i} + 1);
    }
    return sum;
}

enum class pattern { seq, rand };

[[nodiscard]] std::string_view name_of(pattern p) noexcept { return p == pattern::seq ? "seq" : "rand"; }

/// One timed touch of every page.
struct measurement {
    double seconds = 0;
    std::uint64_t checksum = 0;
    std::uint64_t faults = 0; // userfaults served (0 where nobody counts them)
    bool counted_faults = false;
};

// ---- the hand-written handlers --------------------------------------------------------------------

/// The userfaultfd man page's handler, one thread, nothing of squib's: poll,
/// read one message, then either pread the page and UFFDIO_COPY it
/// (baseline_handler) or UFFDIO_COPY the whole 2 MiB block around it from a
/// mapping of the file (copy_bound_2mib).
class raw_handler {
public:
    enum class mode { pread_page, copy_2mib };

    raw_handler(mode m, const anon_region& ram, int file_fd, const std::byte* file_map, int cpu)
        : mode_(m), base_(ram.addr()), end_(ram.addr() + ram.size()), file_fd_(file_fd), file_map_(file_map),
          cpu_(cpu)
    {
        // Raw syscall: glibc has no wrapper. Root may use it; otherwise try the device.
        uffd_ = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
        if (uffd_ < 0) {
            const int dev = ::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
            if (dev >= 0) uffd_ = ::ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
            if (dev >= 0) ::close(dev);
        }
        if (uffd_ < 0) fatal_errno("userfaultfd");
        uffdio_api api{};
        api.api = UFFD_API;
        if (::ioctl(uffd_, UFFDIO_API, &api) != 0) fatal_errno("UFFDIO_API");
        uffdio_register reg{};
        reg.range.start = base_;
        reg.range.len = end_ - base_;
        reg.mode = UFFDIO_REGISTER_MODE_MISSING;
        if (::ioctl(uffd_, UFFDIO_REGISTER, &reg) != 0) fatal_errno("UFFDIO_REGISTER");
        stop_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (stop_ < 0) fatal_errno("eventfd");
        thread_ = std::thread([this] { run(); });
    }
    raw_handler(const raw_handler&) = delete;
    raw_handler& operator=(const raw_handler&) = delete;
    ~raw_handler() { finish(); }

    /// Stops and joins the handler thread; the fault count is final after it.
    void finish() noexcept
    {
        if (!thread_.joinable()) return;
        const std::uint64_t one = 1;
        [[maybe_unused]] const ssize_t n = ::write(stop_, &one, sizeof one); // wakes the poll
        thread_.join();
        ::close(stop_);
        ::close(uffd_); // before the memory goes: closing wakes and unregisters everything
    }

    [[nodiscard]] std::uint64_t faults() const noexcept { return faults_; } // after finish()

private:
    void run() noexcept
    {
        ::pthread_setname_np(::pthread_self(), mode_ == mode::pread_page ? "baseline-uffd" : "copybound-uffd");
        if (cpu_ >= 0) pin_self(cpu_);
        else unpin_self();
        alignas(page) static thread_local std::byte buf[page];
        for (;;) {
            pollfd fds[2] = {{uffd_, POLLIN, 0}, {stop_, POLLIN, 0}};
            if (::poll(fds, 2, -1) < 0) {
                if (errno == EINTR) continue;
                fatal_errno("poll in the hand-written handler");
            }
            if ((fds[1].revents & POLLIN) != 0) return;
            uffd_msg msg{};
            if (::read(uffd_, &msg, sizeof msg) != static_cast<ssize_t>(sizeof msg)) {
                if (errno == EAGAIN || errno == EINTR) continue;
                fatal_errno("read of the userfaultfd");
            }
            if (msg.event != UFFD_EVENT_PAGEFAULT) continue; // no events were negotiated
            ++faults_;
            const std::uint64_t addr = squib::align_down(msg.arg.pagefault.address, page);
            if (mode_ == mode::pread_page) {
                pread_all(file_fd_, buf, page, addr - base_);
                copy(addr, buf, page);
            } else {
                const std::uint64_t block = std::max(squib::align_down(addr, huge), base_);
                copy(block, file_map_ + (block - base_), std::min(huge, end_ - block));
            }
        }
    }

    /// UFFDIO_COPY with the partial-copy and EEXIST cases a correct handler needs.
    void copy(std::uint64_t dst, const std::byte* src, std::uint64_t len) noexcept
    {
        while (len > 0) {
            uffdio_copy c{};
            c.dst = dst;
            c.src = reinterpret_cast<std::uintptr_t>(src); // the kernel reads the bytes from our address space
            c.len = len;
            if (::ioctl(uffd_, UFFDIO_COPY, &c) == 0) return;
            std::uint64_t done = c.copy > 0 ? static_cast<std::uint64_t>(c.copy) : 0;
            if (done == 0 && errno == EEXIST) done = page; // already there: skip it
            else if (done == 0 && errno != EAGAIN) fatal_errno("UFFDIO_COPY in the hand-written handler");
            dst += done;
            src += done;
            len -= done;
        }
    }

    mode mode_;
    std::uint64_t base_;
    std::uint64_t end_;
    int file_fd_;
    const std::byte* file_map_;
    int cpu_;
    int uffd_ = -1;
    int stop_ = -1;
    std::uint64_t faults_ = 0;
    std::thread thread_;
};

// ---- the bench -----------------------------------------------------------------------------------

struct settings {
    std::uint64_t size_mib = 1024;
    bool json = false;
    unsigned repeat = 3;
    placement main_placement = placement::same;
    int touch_cpu = -1; // -1: the first allowed CPU
    bool kvm = true;
    bool pinning_rows = true;      // the squib_mapped_{same,other}_cpu rows
    std::uint64_t subset_mib = 32; // a cross-CPU row touches only this much: each of its faults costs ~8x
    std::uint64_t kvm_fault_around = 1;
    kd::walk_order kvm_walk = kd::walk_order::pseudo_random;
    std::filesystem::path dir;
    std::vector<std::string> only; // empty: every row; baseline_handler always runs (the ratios need it)
    bool use_min = true;           // report the fastest run, not the median
};

template <class Source>
using uffd_pager = squib::pager<Source, squib::flat_index, squib::uffd_backend, squib::atomic_stats>;

class bench {
public:
    bench(const settings& s, std::filesystem::path snapshot, cpu_plan cpus)
        : s_(s), path_(std::move(snapshot)), size_(s.size_mib << 20), pages_(size_ / page),
          subset_pages_(std::min(pages_, (s.subset_mib << 20) / page)), cpus_(cpus)
    {
        file_fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC); // raw syscall: for the readers written here
        if (file_fd_ < 0) fatal_errno("open of the snapshot");
        std::vector<std::uint32_t> all(pages_);
        for (std::uint32_t i = 0; i < pages_; ++i) all[i] = i;
        orders_[0] = all;
        std::mt19937_64 rng(0x5eed);
        std::shuffle(all.begin(), all.end(), rng);
        orders_[1] = all;
        // The subset rows touch the first pages only, in the same relative orders.
        for (int p = 0; p < 2; ++p)
            std::copy_if(orders_[p].begin(), orders_[p].end(), std::back_inserter(orders_[2 + p]),
                         [&](std::uint32_t i) { return i < subset_pages_; });
        // Their reference is the eager checksum of those pages: read them, touch them.
        std::vector<std::byte> first(subset_pages_ * page);
        pread_all(file_fd_, first.data(), first.size(), 0);
        subset_reference_ = touch_pages(first.data(), orders_[2]);
    }
    bench(const bench&) = delete;
    bench& operator=(const bench&) = delete;
    ~bench() { ::close(file_fd_); }

    [[nodiscard]] std::uint64_t pages() const noexcept { return pages_; }
    [[nodiscard]] std::uint64_t subset_pages() const noexcept { return subset_pages_; }
    [[nodiscard]] std::uint64_t subset_reference() const noexcept { return subset_reference_; }

    /// Page numbers to touch, in order: every page, or the first subset_pages().
    [[nodiscard]] std::span<const std::uint32_t> order(pattern p, bool subset = false) const noexcept
    {
        return orders_[(subset ? 2 : 0) + (p == pattern::seq ? 0 : 1)];
    }

    measurement eager(std::span<const std::uint32_t> order) const
    {
        const auto t0 = std::chrono::steady_clock::now();
        anon_region ram(size_);
        pread_all(file_fd_, ram.data(), size_, 0);
        return timed_touch(ram.data(), order, t0);
    }

    measurement demand_mmap(std::span<const std::uint32_t> order) const
    {
        const auto t0 = std::chrono::steady_clock::now();
        file_mapping map(path_, size_, MAP_PRIVATE);
        return timed_touch(map.data(), order, t0);
    }

    measurement baseline(std::span<const std::uint32_t> order, placement where) const
    {
        anon_region ram(size_);
        raw_handler h(raw_handler::mode::pread_page, ram, file_fd_, nullptr, cpus_.handler(where));
        measurement m = timed_touch(ram.data(), order);
        h.finish();
        m.faults = h.faults();
        m.counted_faults = true;
        return m;
    }

    measurement copy_bound(std::span<const std::uint32_t> order, placement where) const
    {
        anon_region ram(size_);
        file_mapping map(path_, size_, MAP_SHARED);
        raw_handler h(raw_handler::mode::copy_2mib, ram, file_fd_, map.data(), cpus_.handler(where));
        measurement m = timed_touch(ram.data(), order);
        h.finish();
        m.faults = h.faults();
        m.counted_faults = true;
        return m;
    }

    template <class Source>
    measurement squib(std::span<const std::uint32_t> order, std::uint64_t around, placement where) const
    {
        anon_region ram(size_); // declared first: unmapped after the pager closed the userfaultfd
        auto src = Source::open(path_);
        if (!src) fatal_ec("opening the squib source", src.error());
        auto backend = squib::uffd_backend::create(
            {.threads = 1, .fault_around_pages = around, .handler_cpus = cpus_.handler_cpus(where)});
        if (!backend) fatal_ec("squib::uffd_backend::create", backend.error());
        uffd_pager<Source> pager{std::move(*src), {}, std::in_place, std::move(*backend)};
        if (auto ec = pager.register_region({.base = ram.addr(), .size = size_})) fatal_ec("register_region", ec);
        if (auto ec = pager.start()) fatal_ec("pager start", ec);
        measurement m = timed_touch(ram.data(), order);
        pager.stop(); // joins the handler: its counts are final
        const auto st = pager.stats().snapshot();
        if (st.errors != 0) fatal(fmt::format("squib reported {} fault errors", st.errors));
        m.faults = st.faults;
        m.counted_faults = true;
        return m;
    }

    // ---- the KVM guest --------------------------------------------------------------------

    struct guest_run {
        double first_instruction_ms = 0;
        double total_ms = 0;
        std::uint64_t faults = 0;
        std::uint32_t checksum = 0;
        bool final_words_match = true;
    };

    [[nodiscard]] kd::walk_params walk() const noexcept
    {
        kd::walk_params w;
        w.first_page_gpa = 0x10000; // past the code page
        const std::uint64_t room = (size_ - w.first_page_gpa) / page;
        w.area_pages = s_.kvm_walk == kd::walk_order::pseudo_random ? std::bit_floor(room) : room;
        w.touch_pages = w.area_pages;
        w.order = s_.kvm_walk;
        w.seed = 0x5eed;
        return w;
    }

    /// The guest's expected checksum and final words, from the reference
    /// model run on a private (copy-on-write) mapping of the snapshot.
    struct guest_model {
        std::uint32_t checksum = 0;
        std::vector<std::uint64_t> visited;
        std::vector<std::uint32_t> final_words; // the word each visit wrote, per visited page
    };

    [[nodiscard]] guest_model model() const
    {
        const auto prog = kd::guest_program::walker();
        const auto w = walk();
        file_mapping map(path_, size_, MAP_PRIVATE, PROT_READ | PROT_WRITE);
        auto sum = kd::simulate(prog, w, std::span<std::byte>{map.data(), size_});
        if (!sum) fatal_ec("the guest model", sum.error());
        guest_model out;
        out.checksum = *sum;
        out.visited = kd::visited_pages(w);
        out.final_words.reserve(out.visited.size());
        for (const std::uint64_t gpa : out.visited)
            out.final_words.push_back(word_at(map.data(), gpa + kd::write_offset));
        return out;
    }

    guest_run kvm_eager(const guest_model& want) const
    {
        const auto t0 = std::chrono::steady_clock::now();
        anon_region ram(size_);
        pread_all(file_fd_, ram.data(), size_, 0); // the code bytes are in the snapshot
        auto vm = kd::tiny_vm::create(ram.data(), size_);
        if (!vm) fatal_ec("tiny_vm::create", vm.error());
        return run_guest(*vm, ram, t0, want);
    }

    guest_run kvm_lazy(const guest_model& want) const
    {
        const auto t0 = std::chrono::steady_clock::now();
        anon_region ram(size_);
        auto src = squib::mapped_file_source::open(path_);
        if (!src) fatal_ec("mapped_file_source::open", src.error());
        auto backend = squib::uffd_backend::create({.threads = 1,
                                                    .fault_around_pages = s_.kvm_fault_around,
                                                    .handler_cpus = cpus_.handler_cpus(s_.main_placement)});
        if (!backend) fatal_ec("squib::uffd_backend::create", backend.error());
        uffd_pager<squib::mapped_file_source> pager{std::move(*src), {}, std::in_place, std::move(*backend)};
        if (auto ec = pager.register_region({.base = ram.addr(), .size = size_})) fatal_ec("register_region", ec);
        if (auto ec = pager.start()) fatal_ec("pager start", ec);
        auto vm = kd::tiny_vm::create(ram.data(), size_);
        if (!vm) fatal_ec("tiny_vm::create", vm.error());
        guest_run r = run_guest(*vm, ram, t0, want);
        pager.stop();
        const auto st = pager.stats().snapshot();
        if (st.errors != 0) fatal(fmt::format("squib reported {} fault errors in the guest run", st.errors));
        r.faults = st.faults;
        return r;
    }

private:
    /// Times the touch loop on the toucher's CPU, from `t0` (the restore's
    /// start where it has one) or from just before the loop.
    measurement timed_touch(const std::byte* base, std::span<const std::uint32_t> order,
                            std::optional<std::chrono::steady_clock::time_point> t0 = std::nullopt) const
    {
        pin_self(cpus_.touch);
        const auto start = t0.value_or(std::chrono::steady_clock::now());
        measurement m;
        m.checksum = touch_pages(base, order);
        m.seconds = seconds_between(start, std::chrono::steady_clock::now());
        unpin_self();
        return m;
    }

    static std::uint32_t word_at(const std::byte* ram, std::uint64_t at) noexcept
    {
        std::uint32_t w = 0;
        std::memcpy(&w, ram + at, sizeof w);
        return w;
    }

    guest_run run_guest(kd::tiny_vm& vm, const anon_region& ram, std::chrono::steady_clock::time_point t0,
                        const guest_model& want) const
    {
        const auto prog = kd::guest_program::walker();
        if (auto ec = vm.load(prog.load_gpa, prog, walk())) fatal_ec("tiny_vm::load", ec);
        pin_self(cpus_.touch); // the vCPU thread sits where the toucher does
        const auto run_start = std::chrono::steady_clock::now();
        auto rep = vm.run({.timeout = std::chrono::seconds(120)});
        unpin_self();
        if (!rep) fatal_ec(fmt::format("guest run ({})", vm.last_exit()), rep.error());
        const double setup_ms = seconds_between(t0, run_start) * 1e3;
        guest_run r;
        r.first_instruction_ms = setup_ms + static_cast<double>(rep->first_instruction_ns) / 1e6;
        r.total_ms = setup_ms + static_cast<double>(rep->total_ns) / 1e6;
        r.checksum = rep->checksum;
        for (std::size_t i = 0; i < want.visited.size(); ++i)
            if (word_at(ram.data(), want.visited[i] + kd::write_offset) != want.final_words[i])
                r.final_words_match = false;
        return r;
    }

    const settings& s_;
    std::filesystem::path path_;
    std::uint64_t size_;
    std::uint64_t pages_;
    std::uint64_t subset_pages_;
    cpu_plan cpus_;
    std::uint64_t subset_reference_ = 0;
    std::vector<std::uint32_t> orders_[4]; // seq, rand, then both over the subset
    int file_fd_ = -1;
};

// ---- rows, table, JSON -----------------------------------------------------------------------------

struct row {
    std::string variant;
    std::string pattern;
    double us_per_page = 0;
    double min_us = 0; // the spread over the repeats (guest rows: of the first-instruction time, in ms)
    double median_us = 0;
    double max_us = 0;
    std::optional<double> ratio; // vs baseline_handler, same pattern
    std::optional<std::uint64_t> faults;
    std::string note;
    // guest rows only
    std::optional<double> first_instruction_ms;
    std::optional<double> total_ms;
};

/// The fastest, the median and the slowest of a row's runs.
struct spread {
    double min = 0;
    double median = 0;
    double max = 0;

    explicit spread(std::vector<double> v)
    {
        std::sort(v.begin(), v.end());
        const std::size_t n = v.size();
        min = v.front();
        max = v.back();
        median = n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
    }
    [[nodiscard]] double pick(bool use_min) const noexcept { return use_min ? min : median; }
};

[[nodiscard]] std::string json_num(std::optional<double> v, int digits)
{
    return v ? fmt::format("{:.{}f}", *v, digits) : std::string{"null"};
}

[[nodiscard]] std::string json_line(const row& r)
{
    std::string out = fmt::format(R"({{"variant":"{}","pattern":"{}","us_per_page":{},"ratio_vs_baseline":{})",
                                  r.variant, r.pattern, json_num(r.us_per_page, 4), json_num(r.ratio, 3));
    if (r.pattern == "guest")
        out += fmt::format(R"(,"first_instruction_ms":{},"total_ms":{},"faults":{})",
                           json_num(r.first_instruction_ms, 3), json_num(r.total_ms, 3), r.faults.value_or(0));
    return out + "}";
}

// ---- command line ---------------------------------------------------------------------------------------

constexpr std::string_view usage = R"(usage: restore_bench [options]
  --size-mib N         snapshot size in MiB (default 1024)
  --json               one JSON object per row on stdout (the table goes to stderr)
  --repeat N           measurements per row (default 3), interleaved across rows
  --stat min|median    which run a row reports (default min: on a shared machine noise only adds)
  --handler-cpu WHERE  handler threads of the main rows: same (the toucher's CPU), other, none
                       (the scheduler's choice); default same
  --touch-cpu N        CPU of the touching thread and of the vCPU (default: the first allowed CPU)
  --no-pinning-rows    skip the squib_mapped_same_cpu / squib_mapped_other_cpu rows
  --subset-mib N       rows whose handler runs on another CPU than the toucher (other than the
                       main rows) touch only the first N MiB, in the same orders (default 32)
  --no-kvm             skip the KVM guest rows
  --kvm-fault-around N fault-around pages for kvm_lazy (default 1: one page per fault)
  --kvm-walk seq|rand  the guest's walk (default rand: a pseudo-random walk over a power-of-two area)
  --dir PATH           where the temporary snapshot goes (default $TMPDIR, else /tmp)
  --only A,B,...       measure only these rows (eager and baseline_handler always run: the
                       checksum and the ratios need them; kvm_eager,kvm_lazy name the guest rows)
)";

template <class T>
[[nodiscard]] T parse_number(std::string_view flag, std::string_view text)
{
    T v{};
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc{} || end != text.data() + text.size()) fatal(fmt::format("{}: not a number: '{}'", flag, text));
    return v;
}

[[nodiscard]] settings parse(int argc, char** argv)
{
    settings s;
    const char* tmp = std::getenv("TMPDIR");
    s.dir = tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
    for (int i = 1; i < argc; ++i) {
        const std::string_view a{argv[i]};
        auto value = [&]() -> std::string_view {
            if (i + 1 >= argc) fatal(fmt::format("{} needs a value\n{}", a, usage));
            return argv[++i];
        };
        if (a == "--size-mib") s.size_mib = parse_number<std::uint64_t>(a, value());
        else if (a == "--json") s.json = true;
        else if (a == "--repeat") s.repeat = parse_number<unsigned>(a, value());
        else if (a == "--touch-cpu") s.touch_cpu = parse_number<int>(a, value());
        else if (a == "--no-kvm") s.kvm = false;
        else if (a == "--no-pinning-rows") s.pinning_rows = false;
        else if (a == "--subset-mib") s.subset_mib = parse_number<std::uint64_t>(a, value());
        else if (a == "--kvm-fault-around") s.kvm_fault_around = parse_number<std::uint64_t>(a, value());
        else if (a == "--dir") s.dir = value();
        else if (a == "--stat") {
            const auto v = value();
            if (v != "min" && v != "median") fatal(fmt::format("--stat: want min or median, not '{}'", v));
            s.use_min = v == "min";
        } else if (a == "--only") {
            const std::string_view list = value();
            for (std::size_t at = 0; at <= list.size();) {
                const std::size_t comma = std::min(list.find(',', at), list.size());
                if (comma > at) s.only.emplace_back(list.substr(at, comma - at));
                at = comma + 1;
            }
        } else if (a == "--handler-cpu") {
            const auto v = value();
            if (v == "same") s.main_placement = placement::same;
            else if (v == "other") s.main_placement = placement::other;
            else if (v == "none") s.main_placement = placement::none;
            else fatal(fmt::format("--handler-cpu: want same, other or none, not '{}'", v));
        } else if (a == "--kvm-walk") {
            const auto v = value();
            if (v == "seq") s.kvm_walk = kd::walk_order::sequential;
            else if (v == "rand") s.kvm_walk = kd::walk_order::pseudo_random;
            else fatal(fmt::format("--kvm-walk: want seq or rand, not '{}'", v));
        } else if (a == "--help" || a == "-h") {
            std::fputs(usage.data(), stdout);
            std::exit(0);
        } else {
            fatal(fmt::format("unknown option '{}'\n{}", a, usage));
        }
    }
    if (s.size_mib < 2 || s.size_mib > 16384)
        fatal("--size-mib: want 2 to 16384 (16 GiB)");
    if (s.repeat == 0) fatal("--repeat: want at least 1");
    if (s.subset_mib == 0) fatal("--subset-mib: want at least 1");
    if (!squib::is_power_of_two(s.kvm_fault_around) || s.kvm_fault_around > 512)
        fatal("--kvm-fault-around: want a power of two up to 512");
    return s;
}

/// Runs `fn` in a forked child and returns its trivially copyable result: a
/// restore starts in a fresh process, whose first allocations still fault
/// their pages in, not in one warmed by the rows before. Call it with no
/// other thread running (every handler thread has been joined by then).
template <class Fn>
[[nodiscard]] auto in_child(Fn fn) -> decltype(fn())
{
    using result_type = decltype(fn());
    static_assert(std::is_trivially_copyable_v<result_type>, "the result crosses a pipe as bytes");
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) fatal_errno("pipe2");
    std::fflush(nullptr); // nothing buffered gets printed twice
    const pid_t pid = ::fork();
    if (pid < 0) fatal_errno("fork");
    if (pid == 0) {
        // The parent owns the snapshot: a failing child must not delete it.
        g_temp_dir.clear();
        for (const int signo : {SIGINT, SIGTERM, SIGHUP}) ::signal(signo, SIG_DFL);
        ::close(fds[0]);
        const result_type r = fn();
        const bool sent = ::write(fds[1], &r, sizeof r) == static_cast<ssize_t>(sizeof r);
        ::_exit(sent ? 0 : 1); // no atexit handlers or stdio flushes of the parent's state
    }
    ::close(fds[1]);
    result_type r{};
    ssize_t got = 0;
    do {
        got = ::read(fds[0], &r, sizeof r);
    } while (got < 0 && errno == EINTR);
    ::close(fds[0]);
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (got != static_cast<ssize_t>(sizeof r) || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fatal("a guest run's child process failed (its error is above)");
    return r;
}

[[nodiscard]] std::string read_first_line(const char* path)
{
    std::ifstream in(path);
    std::string line;
    std::getline(in, line);
    return line;
}

} // namespace

int main(int argc, char** argv)
{
    const settings s = parse(argc, argv);
    if (::sched_getaffinity(0, sizeof g_startup_cpus, &g_startup_cpus) != 0) fatal_errno("sched_getaffinity");
    const std::vector<int> cpus = allowed_cpus();
    cpu_plan plan;
    plan.touch = s.touch_cpu >= 0 ? s.touch_cpu : cpus.front();
    if (std::find(cpus.begin(), cpus.end(), plan.touch) == cpus.end())
        fatal(fmt::format("--touch-cpu {} is not in this process's CPU set", plan.touch));
    for (const int c : cpus)
        if (c != plan.touch) {
            plan.other = c;
            break;
        }
    if (s.main_placement == placement::other && plan.other < 0) fatal("--handler-cpu other: only one CPU is allowed");

    std::string load_at_start = read_first_line("/proc/loadavg"); // others' work on this machine shows up as noise
    load_at_start = load_at_start.substr(0, load_at_start.find(' '));

    // ---- the snapshot ----
    std::string templ = (s.dir / "squib-restore-XXXXXX").string();
    if (::mkdtemp(templ.data()) == nullptr) fatal_errno(fmt::format("mkdtemp in {}", s.dir.string()));
    g_temp_dir = templ;
    const std::filesystem::path snapshot = g_temp_dir / "vm.mem";
    if (snapshot.native().size() < sizeof g_signal_file) {
        std::strcpy(g_signal_file, snapshot.c_str());
        std::strcpy(g_signal_dir, g_temp_dir.c_str());
        struct sigaction act {};
        act.sa_handler = on_terminate_signal;
        ::sigemptyset(&act.sa_mask);
        for (const int signo : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(signo, &act, nullptr);
    }
    const std::uint64_t size = s.size_mib << 20;
    const auto prog = kd::guest_program::walker();
    const auto t_make = std::chrono::steady_clock::now();
    make_snapshot(snapshot, size, prog);
    const double make_s = seconds_between(t_make, std::chrono::steady_clock::now());

    bench b(s, snapshot, plan);

    // ---- the rows, measured round-robin so drift hits every row alike ----
    using order_span = std::span<const std::uint32_t>;
    struct touch_case {
        std::string variant;
        std::function<measurement(order_span)> run;
        std::string note;
        bool subset = false;  // touches only the first subset_pages()
        std::string alias_of; // the same configuration as that row: its measurements are shown
        std::vector<double> seconds[2]{};
        std::uint64_t faults[2] = {0, 0};
        bool counted = false;
    };
    const placement mp = s.main_placement;
    std::vector<touch_case> cases;
    auto add = [&](std::string variant, std::function<measurement(order_span)> run, std::string note) {
        cases.push_back({std::move(variant), std::move(run), std::move(note), false, {}, {}, {0, 0}, false});
    };
    add("eager", [&](order_span o) { return b.eager(o); }, "time includes reading the whole file");
    add("mmap", [&](order_span o) { return b.demand_mmap(o); },
        "MAP_PRIVATE of the file: read faults map page-cache pages, 16 at a time");
    add("baseline_handler", [&](order_span o) { return b.baseline(o, mp); },
        "hand-written: pread + UFFDIO_COPY, 1 page");
    add("squib_file", [&](order_span o) { return b.squib<squib::file_source>(o, 1, mp); },
        "file_source, 1 page per fault");
    add("squib_mapped", [&](order_span o) { return b.squib<squib::mapped_file_source>(o, 1, mp); },
        "mapped_file_source, 1 page per fault");
    add("squib_fault_around_16", [&](order_span o) { return b.squib<squib::mapped_file_source>(o, 16, mp); },
        "mapped_file_source, 16-page clusters");
    add("squib_fault_around_512", [&](order_span o) { return b.squib<squib::mapped_file_source>(o, 512, mp); },
        "mapped_file_source, 512-page clusters");
    add("copy_bound_2mib", [&](order_span o) { return b.copy_bound(o, mp); },
        "hand-written: one 2 MiB UFFDIO_COPY per fault from a mapping");
    if (s.pinning_rows) {
        for (const placement where : {placement::same, placement::other}) {
            if (where == placement::other && plan.other < 0) continue; // one CPU: nothing to compare
            const std::string suffix = where == placement::same ? "_same_cpu" : "_other_cpu";
            const std::string cpu = fmt::format("handler on CPU {}", plan.handler(where));
            add("baseline_handler" + suffix, [&, where](order_span o) { return b.baseline(o, where); }, cpu);
            add("squib_mapped" + suffix,
                [&, where](order_span o) { return b.squib<squib::mapped_file_source>(o, 1, where); }, cpu);
            for (auto it = cases.end() - 2; it != cases.end(); ++it) {
                if (where == mp) {
                    it->alias_of = it->variant.substr(0, it->variant.size() - suffix.size());
                    it->note += fmt::format(" (= the {} row)", it->alias_of);
                } else if (where == placement::other && b.subset_pages() < b.pages()) {
                    it->subset = true;
                    it->note += fmt::format("; first {} MiB only", b.subset_pages() * page >> 20);
                }
            }
        }
    }

    for (const auto& name : s.only) {
        const bool known = name == "kvm_eager" || name == "kvm_lazy" ||
                           std::any_of(cases.begin(), cases.end(),
                                       [&](const touch_case& c) { return c.variant == name; });
        if (!known) fatal(fmt::format("--only: no row is called '{}'", name));
    }
    std::vector<std::string> only = s.only;
    for (const auto& c : cases) // a row shown as another's needs that one measured
        if (!c.alias_of.empty() && std::find(only.begin(), only.end(), c.variant) != only.end())
            only.push_back(c.alias_of);
    auto wanted = [&](std::string_view v) {
        return only.empty() || v == "eager" || v == "baseline_handler" ||
               std::find(only.begin(), only.end(), v) != only.end();
    };
    std::erase_if(cases, [&](const touch_case& c) { return !wanted(c.variant); });

    constexpr pattern patterns[2] = {pattern::seq, pattern::rand};
    std::vector<std::string> errors;
    std::optional<std::uint64_t> reference; // the eager checksum
    const auto t_measure = std::chrono::steady_clock::now();
    for (unsigned rep = 0; rep < s.repeat; ++rep) {
        for (auto& c : cases) {
            if (!c.alias_of.empty()) continue;
            for (int pi = 0; pi < 2; ++pi) {
                const measurement m = c.run(b.order(patterns[pi], c.subset));
                if (!reference) reference = m.checksum; // eager seq comes first
                const std::uint64_t want = c.subset ? b.subset_reference() : *reference;
                if (m.checksum != want)
                    errors.push_back(fmt::format("checksum mismatch: {} {} run {}: {:#018x}, eager gave {:#018x}",
                                                 c.variant, name_of(patterns[pi]), rep + 1, m.checksum, want));
                c.seconds[pi].push_back(m.seconds);
                c.faults[pi] = m.faults;
                c.counted = m.counted_faults;
            }
        }
    }
    for (auto& c : cases) {
        if (c.alias_of.empty()) continue;
        for (const auto& o : cases)
            if (o.variant == c.alias_of) {
                std::copy(std::begin(o.seconds), std::end(o.seconds), std::begin(c.seconds));
                std::copy(std::begin(o.faults), std::end(o.faults), std::begin(c.faults));
                c.counted = o.counted;
            }
    }

    // ---- the guest ----
    struct guest_case {
        std::string variant;
        std::vector<double> first, total;
        std::uint64_t faults = 0;
        std::uint32_t checksum = 0;
    };
    std::vector<guest_case> guests;
    std::string kvm_skip;
    const kd::walk_params walk = b.walk();
    if (!s.kvm || !(wanted("kvm_eager") || wanted("kvm_lazy"))) {
        kvm_skip = s.kvm ? "not in --only" : "--no-kvm";
    } else if (const int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC); fd < 0) {
        kvm_skip = fmt::format("/dev/kvm not available: {}", std::strerror(errno));
    } else if (::close(fd); size > kd::max_ram_size) {
        kvm_skip = "the snapshot is larger than a 32-bit guest can address";
    } else {
        const auto want = b.model();
        guests = {{"kvm_eager", {}, {}, 0, 0}, {"kvm_lazy", {}, {}, 0, 0}};
        for (unsigned rep = 0; rep < s.repeat; ++rep) {
            for (int g = 0; g < 2; ++g) {
                const auto r = in_child([&] { return g == 0 ? b.kvm_eager(want) : b.kvm_lazy(want); });
                if (r.checksum != want.checksum)
                    errors.push_back(fmt::format("guest checksum mismatch: {} run {}: {:#010x}, the model gives "
                                                 "{:#010x}",
                                                 guests[g].variant, rep + 1, r.checksum, want.checksum));
                if (!r.final_words_match)
                    errors.push_back(fmt::format("guest memory mismatch: {} run {}: a word the guest wrote differs "
                                                 "from the model",
                                                 guests[g].variant, rep + 1));
                guests[g].first.push_back(r.first_instruction_ms);
                guests[g].total.push_back(r.total_ms);
                guests[g].faults = r.faults;
                guests[g].checksum = r.checksum;
            }
        }
        if (guests[0].checksum != guests[1].checksum)
            errors.push_back(fmt::format("kvm_eager and kvm_lazy checksums differ: {:#010x} vs {:#010x}",
                                         guests[0].checksum, guests[1].checksum));
    }
    const double measure_s = seconds_between(t_measure, std::chrono::steady_clock::now());

    // ---- rows ----
    const double pages = static_cast<double>(b.pages());
    std::vector<row> rows;
    double baseline_us[2] = {0, 0};
    for (const auto& c : cases)
        if (c.variant == "baseline_handler")
            for (int pi = 0; pi < 2; ++pi) baseline_us[pi] = spread(c.seconds[pi]).pick(s.use_min) * 1e6 / pages;
    for (int pi = 0; pi < 2; ++pi) {
        for (const auto& c : cases) {
            if (c.seconds[pi].empty()) continue;
            const double touched = c.subset ? static_cast<double>(b.subset_pages()) : pages;
            row r;
            r.variant = c.variant;
            r.pattern = std::string{name_of(patterns[pi])};
            const spread sp(c.seconds[pi]);
            r.us_per_page = sp.pick(s.use_min) * 1e6 / touched;
            r.min_us = sp.min * 1e6 / touched;
            r.median_us = sp.median * 1e6 / touched;
            r.max_us = sp.max * 1e6 / touched;
            r.ratio = r.us_per_page / baseline_us[pi];
            if (c.counted) r.faults = c.faults[pi];
            r.note = c.note;
            rows.push_back(std::move(r));
        }
    }
    for (const auto& g : guests) {
        row r;
        r.variant = g.variant;
        r.pattern = "guest";
        const spread first(g.first);
        r.total_ms = spread(g.total).pick(s.use_min);
        r.first_instruction_ms = first.pick(s.use_min);
        r.min_us = first.min; // the spread of the first-instruction time, in ms
        r.median_us = first.median;
        r.max_us = first.max;
        r.us_per_page = *r.total_ms * 1e3 / static_cast<double>(walk.touch_pages);
        if (g.variant == "kvm_lazy") r.faults = g.faults; // the eager run takes no userfaults
        r.note = g.variant == "kvm_eager"
                     ? std::string{"read the whole file, then run"}
                     : fmt::format("squib uffd, mapped source, {}-page faults", s.kvm_fault_around);
        rows.push_back(std::move(r));
    }
    auto find = [&](std::string_view v, std::string_view p) -> const row* {
        for (const auto& r : rows)
            if (r.variant == v && r.pattern == p) return &r;
        return nullptr;
    };

    // ---- the table ----
    std::string t;
    t += fmt::format("restore_bench: {} MiB snapshot ({} pages of 4 KiB, page cache warm), {} {} per row, "
                     "{} CPUs, load average {} at start, THP {}\n",
                     s.size_mib, b.pages(), s.repeat, s.repeat == 1 ? "run" : "runs", cpus.size(), load_at_start,
                     read_first_line("/sys/kernel/mm/transparent_hugepage/enabled"));
    const std::string main_where = mp == placement::none ? std::string{"unpinned (the scheduler's choice)"}
                                   : fmt::format("pinned to CPU {}, {} CPU", plan.handler(mp),
                                                 mp == placement::same ? "the toucher's" : "not the toucher's");
    t += fmt::format("toucher (and vCPU) thread pinned to CPU {}; handler thread of every uffd row and of kvm_lazy "
                     "{} (--handler-cpu {}), except in rows named *_same_cpu / *_other_cpu\n",
                     plan.touch, main_where, name_of(mp));
    t += "time = wall time to touch every page once, one byte per page (eager also reads the file); "
         "ratio = us/page / baseline_handler us/page, same pattern: lower is better\n";
    t += s.use_min ? "us/page (and every figure below) is the fastest run: other work on this machine only ever adds "
                     "time (--stat median for the median)\n\n"
                   : "us/page (and every figure below) is the median run (--stat min for the fastest)\n\n";
    t += fmt::format("{:<26} {:<7} {:>9} {:>7} {:>8} {:>23}  {}\n", "variant", "pattern", "us/page", "ratio",
                     "faults", "runs min/median/max", "notes");
    for (const auto& r : rows) {
        if (r.pattern == "guest") continue;
        t += fmt::format("{:<26} {:<7} {:>9.3f} {:>6.2f}x {:>8} {:>23}  {}\n", r.variant, r.pattern, r.us_per_page,
                         r.ratio.value_or(0), r.faults ? fmt::format("{}", *r.faults) : std::string{"-"},
                         fmt::format("{:.3f}/{:.3f}/{:.3f}", r.min_us, r.median_us, r.max_us), r.note);
    }
    for (const char* v : {"baseline_handler", "squib_mapped"}) {
        const row *same = nullptr, *other = nullptr;
        std::string line;
        for (const char* p : {"seq", "rand"}) {
            same = find(fmt::format("{}_same_cpu", v), p);
            other = find(fmt::format("{}_other_cpu", v), p);
            if (same && other)
                line += fmt::format("{}{} {:.1f}x", line.empty() ? "" : ", ", p,
                                    other->us_per_page / same->us_per_page);
        }
        if (!line.empty())
            t += fmt::format("{}: handler on the other CPU costs {} the time per page of the same CPU\n", v, line);
    }
    if (!guests.empty()) {
        t += fmt::format("\nKVM guest: {} MiB RAM, {} walk over {} pages from {:#x}, code at {:#x} faulted in from "
                         "the snapshot; vCPU on CPU {}\n",
                         s.size_mib, walk.order == kd::walk_order::sequential ? "sequential" : "pseudo-random",
                         walk.touch_pages, walk.first_page_gpa, prog.load_gpa, plan.touch);
        t += "each run in a fresh child process; first instruction and total are timed from the start of the restore "
             "(mapping guest RAM, loading it or registering it with squib, creating the VM)\n";
        t += "us/page = total time / pages the guest walks\n";
        t += fmt::format("{:<26} {:<7} {:>9} {:>14} {:>10} {:>8} {:>26}  {}\n", "variant", "pattern", "us/page",
                         "first instr ms", "total ms", "faults", "first instr min/med/max", "notes");
        for (const auto& r : rows) {
            if (r.pattern != "guest") continue;
            t += fmt::format("{:<26} {:<7} {:>9.3f} {:>14.3f} {:>10.1f} {:>8} {:>26}  {}\n", r.variant, r.pattern,
                             r.us_per_page, *r.first_instruction_ms, *r.total_ms,
                             r.faults ? fmt::format("{}", *r.faults) : std::string{"-"},
                             fmt::format("{:.3f}/{:.3f}/{:.3f}", r.min_us, r.median_us, r.max_us), r.note);
        }
        t += fmt::format("guest checksum {:#010x} (kvm_eager, kvm_lazy and the C++ model agree unless an error "
                         "follows); guest rows have no ratio: no hand-written handler runs a guest\n",
                         guests[1].checksum);
    } else {
        t += fmt::format("\nKVM guest rows skipped: {}\n", kvm_skip);
    }

    t += "\ntargets (informational):\n";
    auto verdict = [](bool met) { return met ? "met" : "MISSED"; };
    for (const char* v : {"squib_file", "squib_mapped"})
        for (const char* p : {"seq", "rand"})
            if (const row* r = find(v, p))
                t += fmt::format("  squib single page <= {:.1f}x baseline_handler: {:<13} {:<4} {:.2f}x  {}\n",
                                 target_single_page_ratio, v, p, *r->ratio,
                                 verdict(*r->ratio <= target_single_page_ratio));
    if (const row *fa = find("squib_fault_around_512", "seq"), *cb = find("copy_bound_2mib", "seq"); fa && cb) {
        const double speed = cb->us_per_page / fa->us_per_page;
        t += fmt::format("  seq, 512-page fault-around >= {:.1f}x the speed of copy_bound_2mib: {:.2f}x ({:.3f} vs "
                         "{:.3f} us/page)  {}\n",
                         target_fault_around_speed, speed, fa->us_per_page, cb->us_per_page,
                         verdict(speed >= target_fault_around_speed));
    }
    if (const row* k = find("kvm_lazy", "guest")) {
        t += fmt::format("  KVM first guest instruction < {:.0f} ms for a 1 GiB guest: {:.3f} ms  {}{}\n",
                         target_first_instruction_ms, *k->first_instruction_ms,
                         verdict(*k->first_instruction_ms < target_first_instruction_ms),
                         s.size_mib == 1024 ? "" : fmt::format(" (this guest has {} MiB)", s.size_mib));
    }
    t += fmt::format("\nsnapshot written in {:.1f} s, rows measured in {:.1f} s\n", make_s, measure_s);
    for (const auto& e : errors) t += fmt::format("error: {}\n", e);

    std::FILE* table_out = s.json ? stderr : stdout;
    std::fputs(t.c_str(), table_out);
    std::fflush(table_out);
    if (s.json) {
        for (const auto& r : rows) std::printf("%s\n", json_line(r).c_str());
        std::fflush(stdout);
    }
    remove_temp_dir();
    return errors.empty() ? 0 : 1;
}
