// squib-pager KVM demo: a tiny 32-bit guest that walks its RAM, and the
// smallest VM that runs it.
//
// The guest proves a restore end to end: it reads one word of every page it
// visits, folds it into a checksum, writes a word derived from that checksum
// back into the page, and reports the checksum through an I/O port. If any
// page it read held the wrong bytes, both the checksum and the final memory
// differ from the plain C++ model in this header.
//
//     std::vector<std::byte> initial = load_snapshot();           // guest RAM image
//     void* ram = mmap(...);                                      // page aligned, maybe userfaultfd backed
//     auto prog = squib::kvm_demo::guest_program::walker();       // code at guest physical 0x1000
//     squib::kvm_demo::walk_params walk{.first_page_gpa = 0x10000, .area_pages = 1024,
//                                       .touch_pages = 1024, .order = squib::kvm_demo::walk_order::pseudo_random};
//     auto vm = squib::kvm_demo::tiny_vm::create(ram, ram_size);  // never touches `ram`
//     if (!vm) return vm.error();
//     if (auto ec = vm->load(prog.load_gpa, prog, walk)) return ec;
//     auto report = vm->run();                                    // checksum, time to first instruction, ...
//     auto model = squib::kvm_demo::expected_checksum(prog, walk, initial);
//     // report->checksum == model->checksum, and RAM == model->final_ram
//
// On userfaultfd-backed RAM (a lazy restore), every page the guest touches
// is faulted by KVM from kernel context, so the userfaultfd must not be
// created with UFFD_USER_MODE_ONLY (KVM_RUN then fails with
// KVM_EXIT_INTERNAL_ERROR). The first fault is the code page, before the
// marker; touched_pages() lists every page a run faults in.
//
// Linux and x86-64 only. Errors are std::error_code values: errno as
// std::system_category(), everything the harness detects itself as
// squib::kvm_demo::errc. Nothing here throws except the allocating model
// helpers (std::bad_alloc).
#pragma once

#if !defined(__linux__) || !defined(__x86_64__)
#error "examples/kvm_guest.hpp needs Linux KVM on x86-64"
#endif

#include <squib/core/result.hpp>
#include <squib/detail/fd.hpp>
#include <squib/error.hpp>

#include <fmt/format.h>

#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace squib::kvm_demo {

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Failures the harness detects itself. Zero is never used.
enum class errc : int {
    api_version_mismatch = 1, ///< KVM_GET_API_VERSION did not return 12
    bad_ram,                  ///< host RAM is null, not page aligned, empty, or too big for a 32-bit guest
    bad_program,              ///< code or walk outside RAM, overlapping, or a random walk's area not a power of two
    not_created,              ///< the tiny_vm is empty (default constructed or moved from)
    not_loaded,               ///< run() before load()
    exit_shutdown,            ///< KVM_EXIT_SHUTDOWN: the guest triple-faulted (garbage code, any exception)
    exit_fail_entry,          ///< KVM_EXIT_FAIL_ENTRY: the CPU refused to enter the guest (bad register state)
    exit_internal_error,      ///< KVM_EXIT_INTERNAL_ERROR: KVM could not emulate or deliver something
    exit_mmio,                ///< KVM_EXIT_MMIO: the guest touched guest-physical memory outside its RAM
    exit_unexpected,          ///< any other exit reason; last_exit() names it
    unexpected_io,            ///< port I/O other than one marker byte then one result dword
    marker_missing,           ///< the guest reported a result without the first-instruction marker
    no_result,                ///< the guest halted without reporting a checksum
    timed_out,                ///< run() hit its timeout (the guest spins without exiting, or a fault is never served)
};

namespace detail {

class error_category_impl final : public std::error_category {
public:
    [[nodiscard]] const char* name() const noexcept override { return "squib-kvm-demo"; }

    [[nodiscard]] std::string message(int value) const override
    {
        switch (static_cast<errc>(value)) {
        case errc::api_version_mismatch: return "KVM API version is not 12";
        case errc::bad_ram: return "guest RAM is null, unaligned, empty or larger than a 32-bit guest can use";
        case errc::bad_program: return "guest code or walk does not fit in guest RAM, or they overlap";
        case errc::not_created: return "the VM is empty (moved from or default constructed)";
        case errc::not_loaded: return "run() called before load()";
        case errc::exit_shutdown: return "guest triple-faulted (KVM_EXIT_SHUTDOWN)";
        case errc::exit_fail_entry: return "CPU refused to enter the guest (KVM_EXIT_FAIL_ENTRY)";
        case errc::exit_internal_error: return "KVM internal error, e.g. emulation failure (KVM_EXIT_INTERNAL_ERROR)";
        case errc::exit_mmio: return "guest touched memory outside its RAM (KVM_EXIT_MMIO)";
        case errc::exit_unexpected: return "unexpected KVM exit reason";
        case errc::unexpected_io: return "guest did port I/O other than its marker and result";
        case errc::marker_missing: return "guest reported a result before its first-instruction marker";
        case errc::no_result: return "guest halted without reporting a checksum";
        case errc::timed_out: return "guest did not finish before the timeout";
        }
        return "unknown squib-kvm-demo error";
    }
};

} // namespace detail

/// The category of every squib::kvm_demo::errc value.
[[nodiscard]] inline const std::error_category& error_category() noexcept
{
    static const detail::error_category_impl category;
    return category;
}

/// Lets `std::error_code ec = kvm_demo::errc::no_result;` and comparisons work.
[[nodiscard]] inline std::error_code make_error_code(errc e) noexcept
{
    return {static_cast<int>(e), error_category()};
}

} // namespace squib::kvm_demo

template <>
struct std::is_error_code_enum<squib::kvm_demo::errc> : std::true_type {};

namespace squib::kvm_demo {

// ---------------------------------------------------------------------------
// The guest program
// ---------------------------------------------------------------------------

inline constexpr std::uint64_t guest_page_size = 4096;    ///< the guest runs without paging; this is the walk's unit
inline constexpr std::uint16_t result_port = 0x10;        ///< `out 0x10, eax`: the checksum
inline constexpr std::uint16_t marker_port = 0x11;        ///< `out 0x11, al`: the very first guest instruction
inline constexpr std::uint32_t lcg_multiplier = 1664525;  ///< ≡ 1 mod 4: full period modulo any power of two
inline constexpr std::uint32_t lcg_increment = 1013904223; ///< odd: full period modulo any power of two
inline constexpr std::uint64_t tss_gpa = 0xfffbd000;       ///< KVM_SET_TSS_ADDR (3 pages), the usual spot below 4 GiB
inline constexpr std::uint64_t max_ram_size = 0xfffbc000;  ///< RAM ends below KVM's identity-map page and the TSS
inline constexpr std::uint64_t default_load_gpa = 0x1000;  ///< code page; page 0 stays free so a null rip is not code

namespace detail {

template <std::size_t N>
consteval std::array<std::byte, N> to_bytes(const std::uint8_t (&in)[N])
{
    std::array<std::byte, N> out{};
    for (std::size_t i = 0; i < N; ++i) out[i] = std::byte{in[i]};
    return out;
}

// 32-bit protected mode, flat segments, no stack, no paging. Assembled with
// `as --32` (Intel syntax) and checked with `objdump -d`.
//
// In:  eax = checksum seed     ebx = gpa of the walk area's first page
//      ecx = pages to visit    edx = 0 (byte offset of the first visited page)
//      esi = multiplier        edi = increment in bytes    ebp = mask in bytes
// Each visit: offset' = (offset * esi + edi) & ebp. With offsets kept in bytes
// (page index << 12) the 32-bit arithmetic equals the page-index LCG exactly,
// because the area has fewer than 2^20 pages.
// clang-format off
inline constexpr std::uint8_t walker_listing[] = {
    0xe6, 0x11,                               // 00 start: out  0x11, al              ; marker: first instruction
    0x85, 0xc9,                               // 02        test ecx, ecx
    0x74, 0x19,                               // 04        jz   done (0x1f)           ; nothing to visit
    0xc1, 0xc0, 0x05,                         // 06 next:  rol  eax, 5
    0x33, 0x04, 0x13,                         // 09        xor  eax, [ebx + edx]      ; READ word 0 of the page
    0x01, 0xd0,                               // 0c        add  eax, edx              ; order matters, zero pages count
    0x89, 0x84, 0x13, 0xfc, 0x0f, 0x00, 0x00, // 0e        mov  [ebx + edx + 0xffc], eax ; WRITE the last word
    0x0f, 0xaf, 0xd6,                         // 15        imul edx, esi
    0x01, 0xfa,                               // 18        add  edx, edi
    0x21, 0xea,                               // 1a        and  edx, ebp              ; next page offset
    0x49,                                     // 1c        dec  ecx
    0x75, 0xe7,                               // 1d        jnz  next (0x06)
    0xe7, 0x10,                               // 1f done:  out  0x10, eax             ; report the checksum
    0xf4,                                     // 21 halt:  hlt                        ; KVM_EXIT_HLT: finished
    0xeb, 0xfd,                               // 22        jmp  halt (0x21)           ; if ever resumed, halt again
};
// clang-format on

} // namespace detail

/// The walker's machine code (36 bytes).
inline constexpr auto walker_code = detail::to_bytes(detail::walker_listing);

/// Offset of the word each visit reads, and of the word it writes.
inline constexpr std::uint64_t read_offset = 0;
inline constexpr std::uint64_t write_offset = guest_page_size - 4;

/// How the guest picks the next page of its walk area.
enum class walk_order : std::uint8_t {
    sequential,    ///< pages 0, 1, 2, ... of the area
    pseudo_random, ///< page 0, then i' = (i * lcg_multiplier + lcg_increment) mod area_pages; distinct pages
};

/// What the guest does; passed to it in registers by tiny_vm::load().
struct walk_params {
    std::uint64_t first_page_gpa = 0x10000; ///< first page of the walk area; page aligned
    std::uint64_t area_pages = 0;           ///< pages in the area; a power of two for pseudo_random
    std::uint64_t touch_pages = 0;          ///< pages visited, ≤ area_pages; each at most once
    walk_order order = walk_order::sequential;
    std::uint32_t seed = 0; ///< initial checksum (also the marker byte, which the host ignores)
};

/// Guest code bytes and where they go. Build one with walker(); tests may
/// make their own with other bytes.
struct guest_program {
    std::span<const std::byte> code; ///< static storage; the program does not own it
    std::uint64_t load_gpa = default_load_gpa;

    /// The RAM walker at `load_gpa` (its entry point is `load_gpa`).
    [[nodiscard]] static constexpr guest_program walker(std::uint64_t load_gpa = default_load_gpa) noexcept
    {
        return {walker_code, load_gpa};
    }

    /// The pages the code occupies, [first, last) as guest-physical addresses.
    [[nodiscard]] constexpr std::uint64_t first_page() const noexcept { return load_gpa & ~(guest_page_size - 1); }
    [[nodiscard]] constexpr std::uint64_t end_page() const noexcept
    {
        return (load_gpa + code.size() + guest_page_size - 1) & ~(guest_page_size - 1);
    }
};

/// Checks that `program` and `walk` fit in `ram_size` bytes of guest RAM at
/// guest-physical 0 and do not overlap (the guest writes into every page it
/// visits, so a walk over its own code would rewrite it).
///
/// Errors: errc::bad_program.
[[nodiscard]] inline std::error_code validate(const guest_program& program, const walk_params& walk,
                                              std::uint64_t ram_size) noexcept
{
    const auto bad = make_error_code(errc::bad_program);
    if (program.code.empty() || program.load_gpa > ram_size || program.code.size() > ram_size - program.load_gpa)
        return bad;
    if (walk.first_page_gpa % guest_page_size != 0 || walk.first_page_gpa > ram_size) return bad;
    if (walk.area_pages == 0 || walk.area_pages > (ram_size - walk.first_page_gpa) / guest_page_size) return bad;
    if (walk.touch_pages > walk.area_pages) return bad;
    if (walk.order == walk_order::pseudo_random && (walk.area_pages & (walk.area_pages - 1)) != 0) return bad;
    const std::uint64_t area_end = walk.first_page_gpa + walk.area_pages * guest_page_size;
    if (area_end > max_ram_size) return bad; // the guest addresses with 32-bit registers
    if (walk.first_page_gpa < program.end_page() && program.first_page() < area_end) return bad;
    return {};
}

/// Copies the program's code into `ram` (guest-physical 0 = `ram[0]`). For
/// the eager run and for building a snapshot; tiny_vm::load() never writes
/// guest memory, so a lazily restored VM faults the code page in itself.
///
/// Errors: errc::bad_program when the code does not fit.
[[nodiscard]] inline std::error_code write_program(std::span<std::byte> ram, const guest_program& program) noexcept
{
    if (program.load_gpa > ram.size() || program.code.size() > ram.size() - program.load_gpa)
        return errc::bad_program;
    std::copy(program.code.begin(), program.code.end(),
              ram.begin() + static_cast<std::ptrdiff_t>(program.load_gpa));
    return {};
}

/// Guest-physical address of every page the walk visits, in visit order.
[[nodiscard]] inline std::vector<std::uint64_t> visited_pages(const walk_params& walk)
{
    std::vector<std::uint64_t> pages;
    pages.reserve(walk.touch_pages);
    std::uint64_t index = 0;
    for (std::uint64_t i = 0; i < walk.touch_pages; ++i) {
        pages.push_back(walk.first_page_gpa + index * guest_page_size);
        index = walk.order == walk_order::sequential ? index + 1
                                                     : (index * lcg_multiplier + lcg_increment) & (walk.area_pages - 1);
    }
    return pages;
}

/// Every guest page the run touches, sorted: the code pages and the visited
/// pages. With one page per fault this is the fault count of a lazy restore.
[[nodiscard]] inline std::vector<std::uint64_t> touched_pages(const guest_program& program, const walk_params& walk)
{
    std::vector<std::uint64_t> pages = visited_pages(walk);
    for (std::uint64_t p = program.first_page(); p < program.end_page(); p += guest_page_size) pages.push_back(p);
    std::sort(pages.begin(), pages.end());
    pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
    return pages;
}

/// Runs the walk in plain C++ on `ram` (guest-physical 0 = `ram[0]`), in
/// place, and returns the checksum the guest reports. The code bytes are not
/// needed in `ram`; `program` is only checked against the walk.
///
/// Errors: errc::bad_program (see validate()).
[[nodiscard]] inline result<std::uint32_t> simulate(const guest_program& program, const walk_params& walk,
                                                    std::span<std::byte> ram) noexcept
{
    if (auto ec = validate(program, walk, ram.size())) return ec;
    std::uint32_t checksum = walk.seed;
    std::uint64_t index = 0;
    for (std::uint64_t i = 0; i < walk.touch_pages; ++i) {
        const std::uint64_t offset = index * guest_page_size; // < 2^32: validate() keeps the area below 4 GiB
        std::byte* page = ram.data() + walk.first_page_gpa + offset;
        std::uint32_t word = 0;
        std::memcpy(&word, page + read_offset, sizeof word); // x86 is little-endian, like this host
        checksum = ((checksum << 5) | (checksum >> 27)) ^ word;
        checksum += static_cast<std::uint32_t>(offset);
        std::memcpy(page + write_offset, &checksum, sizeof checksum);
        index = walk.order == walk_order::sequential ? index + 1
                                                     : (index * lcg_multiplier + lcg_increment) & (walk.area_pages - 1);
    }
    return checksum;
}

/// What the guest should leave behind.
struct expected_run {
    std::uint32_t checksum = 0;
    std::vector<std::byte> final_ram; ///< the whole RAM after the run, code bytes as they were in `initial_ram`
};

/// The reference model: the checksum and final RAM the guest must produce
/// from `initial_ram`. Allocates a copy of the RAM.
///
/// Errors: errc::bad_program (see validate()).
[[nodiscard]] inline result<expected_run> expected_checksum(const guest_program& program, const walk_params& walk,
                                                            std::span<const std::byte> initial_ram)
{
    expected_run out;
    out.final_ram.assign(initial_ram.begin(), initial_ram.end());
    auto sum = simulate(program, walk, out.final_ram);
    if (!sum) return sum.error();
    out.checksum = *sum;
    return out;
}

// ---------------------------------------------------------------------------
// The VM
// ---------------------------------------------------------------------------

/// What one run() measured.
struct run_report {
    std::uint32_t checksum = 0;            ///< what the guest sent to result_port
    std::uint64_t first_instruction_ns = 0; ///< run() start to the marker exit (includes faulting in the code page)
    std::uint64_t total_ns = 0;            ///< from run() start to the final hlt
    std::uint32_t exits = 0;               ///< KVM_RUN returns that were exits (3 for the walker: marker, result, hlt)
    std::uint32_t marker_exit = 0;         ///< 1-based exit number of the marker
    std::uint32_t result_exit = 0;         ///< 1-based exit number of the result
};

/// The last exit KVM reported, for diagnostics after an error.
struct exit_info {
    std::uint32_t reason = KVM_EXIT_UNKNOWN; ///< kvm_run::exit_reason
    /// IO: port; MMIO: guest-physical address; FAIL_ENTRY: hardware reason; INTERNAL_ERROR: suberror.
    std::uint64_t detail = 0;
    std::uint64_t rip = 0;    ///< guest rip after the exit (read back on error exits only)
};

/// The name of a KVM exit reason, e.g. "KVM_EXIT_SHUTDOWN".
[[nodiscard]] inline const char* exit_reason_name(std::uint32_t reason) noexcept
{
    switch (reason) {
    case KVM_EXIT_UNKNOWN: return "KVM_EXIT_UNKNOWN";
    case KVM_EXIT_EXCEPTION: return "KVM_EXIT_EXCEPTION";
    case KVM_EXIT_IO: return "KVM_EXIT_IO";
    case KVM_EXIT_HYPERCALL: return "KVM_EXIT_HYPERCALL";
    case KVM_EXIT_DEBUG: return "KVM_EXIT_DEBUG";
    case KVM_EXIT_HLT: return "KVM_EXIT_HLT";
    case KVM_EXIT_MMIO: return "KVM_EXIT_MMIO";
    case KVM_EXIT_IRQ_WINDOW_OPEN: return "KVM_EXIT_IRQ_WINDOW_OPEN";
    case KVM_EXIT_SHUTDOWN: return "KVM_EXIT_SHUTDOWN";
    case KVM_EXIT_FAIL_ENTRY: return "KVM_EXIT_FAIL_ENTRY";
    case KVM_EXIT_INTR: return "KVM_EXIT_INTR";
    case KVM_EXIT_NMI: return "KVM_EXIT_NMI";
    case KVM_EXIT_INTERNAL_ERROR: return "KVM_EXIT_INTERNAL_ERROR";
    case KVM_EXIT_SYSTEM_EVENT: return "KVM_EXIT_SYSTEM_EVENT";
    case KVM_EXIT_X86_RDMSR: return "KVM_EXIT_X86_RDMSR";
    case KVM_EXIT_X86_WRMSR: return "KVM_EXIT_X86_WRMSR";
    case KVM_EXIT_X86_BUS_LOCK: return "KVM_EXIT_X86_BUS_LOCK";
    case KVM_EXIT_NOTIFY: return "KVM_EXIT_NOTIFY";
    default: return "KVM_EXIT_(other)";
    }
}

/// Options for tiny_vm::run().
struct run_options {
    /// Zero: wait forever. Otherwise a POSIX timer kicks the calling thread
    /// out of KVM_RUN with `kick_signal` (again every millisecond, so a kick
    /// that lands between two KVM_RUN calls is not lost) and run() returns
    /// errc::timed_out. A hang guard for tests, not a measurement.
    ///
    /// It catches a guest that spins. It cannot rescue a vCPU waiting for a
    /// userfaultfd page nobody serves: on a kvm-pvm host (as on the machines
    /// this was written on) the pending signal makes the vCPU thread spin in
    /// the kernel retrying the fault, and only SIGKILL ends it. Run such tests
    /// in a child process.
    std::chrono::nanoseconds timeout{0};
    /// Used only with a timeout. If its disposition is SIG_DFL or SIG_IGN a
    /// no-op handler is installed (process-wide, left in place); a handler
    /// you installed yourself is kept. Unblocked in the calling thread while
    /// run() waits.
    int kick_signal = SIGRTMAX - 1;
};

namespace detail {

inline void kick_handler(int /*signo*/) noexcept {} // only there so the signal interrupts KVM_RUN instead of killing

/// A per-thread POSIX timer that keeps signalling the calling thread once
/// the deadline has passed.
class watchdog {
public:
    watchdog() = default;
    watchdog(const watchdog&) = delete;
    watchdog& operator=(const watchdog&) = delete;
    ~watchdog()
    {
        if (armed_) ::timer_delete(timer_);
        if (unblocked_) ::pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
    }

    [[nodiscard]] std::error_code arm(std::chrono::nanoseconds timeout, int signo) noexcept
    {
        struct sigaction current {};
        if (::sigaction(signo, nullptr, &current) != 0) return last_os_error();
        if ((current.sa_flags & SA_SIGINFO) == 0 && (current.sa_handler == SIG_DFL || current.sa_handler == SIG_IGN)) {
            struct sigaction act {};
            act.sa_handler = kick_handler;
            ::sigemptyset(&act.sa_mask);
            if (::sigaction(signo, &act, nullptr) != 0) return last_os_error();
        }
        sigset_t kick;
        ::sigemptyset(&kick);
        ::sigaddset(&kick, signo);
        if (const int rc = ::pthread_sigmask(SIG_UNBLOCK, &kick, &old_mask_); rc != 0)
            return {rc, std::system_category()};
        unblocked_ = true;

        sigevent ev{};
        ev.sigev_notify = SIGEV_THREAD_ID;
        ev.sigev_signo = signo;
#ifdef sigev_notify_thread_id
        ev.sigev_notify_thread_id = ::gettid();
#else
        ev._sigev_un._tid = ::gettid(); // glibc before 2.35 has no public name for this field
#endif
        if (::timer_create(CLOCK_MONOTONIC, &ev, &timer_) != 0) return last_os_error();
        armed_ = true;
        deadline_ = std::chrono::steady_clock::now() + timeout;

        const auto secs = std::chrono::duration_cast<std::chrono::seconds>(timeout);
        itimerspec spec{};
        spec.it_value.tv_sec = static_cast<time_t>(secs.count());
        spec.it_value.tv_nsec = static_cast<long>((timeout - secs).count());
        if (spec.it_value.tv_sec == 0 && spec.it_value.tv_nsec == 0) spec.it_value.tv_nsec = 1; // zero would disarm
        spec.it_interval.tv_nsec = 1'000'000;
        if (::timer_settime(timer_, 0, &spec, nullptr) != 0) return last_os_error();
        return {};
    }

    [[nodiscard]] bool expired() const noexcept { return armed_ && std::chrono::steady_clock::now() >= deadline_; }

private:
    timer_t timer_{};
    bool armed_ = false;
    bool unblocked_ = false;
    sigset_t old_mask_{};
    std::chrono::steady_clock::time_point deadline_{};
};

template <class Fn>
int retry_eintr(Fn fn) noexcept
{
    int rc = 0;
    do {
        rc = fn();
    } while (rc < 0 && errno == EINTR);
    return rc;
}

} // namespace detail

/// One VM with one vCPU and one memory slot: guest-physical [0, ram_size)
/// is the caller's `host_ram`. No BIOS, no irqchip, no devices; the guest
/// talks through port I/O exits and stops with `hlt`.
///
/// Move-only; the destructor unmaps the vCPU's kvm_run area and closes the
/// VM. The caller keeps `host_ram` alive and mapped for the VM's lifetime.
///
/// **Example**
///
///     auto vm = tiny_vm::create(ram, size);
///     if (!vm) return vm.error();
///     auto prog = guest_program::walker();
///     if (auto ec = vm->load(prog.load_gpa, prog, walk)) return ec;
///     auto rep = vm->run({.timeout = std::chrono::seconds(30)});
///     if (!rep) fmt::print("{} ({})\n", rep.error().message(), exit_reason_name(vm->last_exit().reason));
class tiny_vm {
public:
    /// An empty VM: load() and run() fail with errc::not_created. Exists so
    /// result<tiny_vm> can hold an error; use create() to get a real one.
    tiny_vm() noexcept = default;

    tiny_vm(tiny_vm&& other) noexcept
        : vm_(std::move(other.vm_)), vcpu_(std::move(other.vcpu_)), run_(std::exchange(other.run_, nullptr)),
          run_size_(std::exchange(other.run_size_, 0)), ram_(std::exchange(other.ram_, nullptr)),
          ram_size_(std::exchange(other.ram_size_, 0)), loaded_(std::exchange(other.loaded_, false)),
          last_(other.last_)
    {
    }
    tiny_vm& operator=(tiny_vm&& other) noexcept
    {
        tiny_vm moved(std::move(other));
        swap(moved);
        return *this;
    }
    tiny_vm(const tiny_vm&) = delete;
    tiny_vm& operator=(const tiny_vm&) = delete;
    ~tiny_vm()
    {
        if (run_ != nullptr) ::munmap(run_, run_size_); // munmap of our own mapping cannot fail usefully here
    }

    /// Opens /dev/kvm, checks the API version, creates the VM (TSS at
    /// tss_gpa), maps `host_ram` as slot 0 at guest-physical 0, and creates
    /// vCPU 0. Never reads or writes `host_ram`: it may be backed lazily
    /// (userfaultfd), and KVM faults it in from the kernel when the guest
    /// first touches each page.
    ///
    /// Errors: errc::bad_ram (null or unaligned pointer, size zero, not a
    /// page multiple, or above max_ram_size); errc::api_version_mismatch;
    /// the errno of a failed open/ioctl/mmap (ENOENT or EACCES when there is
    /// no usable /dev/kvm).
    [[nodiscard]] static result<tiny_vm> create(void* host_ram, std::uint64_t ram_size) noexcept
    {
        const auto address = reinterpret_cast<std::uintptr_t>(host_ram); // only to check alignment and hand to KVM
        if (host_ram == nullptr || address % guest_page_size != 0 || ram_size == 0 || ram_size % guest_page_size != 0 ||
            ram_size > max_ram_size)
            return make_error_code(errc::bad_ram);

        const int raw_kvm = detail::retry_eintr([] { return ::open("/dev/kvm", O_RDWR | O_CLOEXEC); });
        if (raw_kvm < 0) return last_os_error();
        const squib::detail::unique_fd kvm{raw_kvm};

        const int version = ::ioctl(kvm.get(), KVM_GET_API_VERSION, 0);
        if (version < 0) return last_os_error();
        if (version != KVM_API_VERSION) return make_error_code(errc::api_version_mismatch);

        tiny_vm vm;
        vm.ram_ = host_ram;
        vm.ram_size_ = ram_size;

        const int raw_vm = detail::retry_eintr([&] { return ::ioctl(kvm.get(), KVM_CREATE_VM, 0); });
        if (raw_vm < 0) return last_os_error();
        vm.vm_.reset(raw_vm);

        // Intel needs a TSS area for real-mode emulation; AMD ignores it. Outside RAM.
        if (::ioctl(vm.vm_.get(), KVM_SET_TSS_ADDR, static_cast<unsigned long>(tss_gpa)) < 0) return last_os_error();

        kvm_userspace_memory_region slot{};
        slot.slot = 0;
        slot.flags = 0;
        slot.guest_phys_addr = 0;
        slot.memory_size = ram_size;
        slot.userspace_addr = address;
        if (::ioctl(vm.vm_.get(), KVM_SET_USER_MEMORY_REGION, &slot) < 0) return last_os_error();

        const int raw_vcpu = detail::retry_eintr([&] { return ::ioctl(vm.vm_.get(), KVM_CREATE_VCPU, 0); });
        if (raw_vcpu < 0) return last_os_error();
        vm.vcpu_.reset(raw_vcpu);

        const int run_size = ::ioctl(kvm.get(), KVM_GET_VCPU_MMAP_SIZE, 0);
        if (run_size < 0) return last_os_error();
        if (static_cast<std::size_t>(run_size) < sizeof(kvm_run))
            return std::make_error_code(std::errc::invalid_argument);
        void* area = ::mmap(nullptr, static_cast<std::size_t>(run_size), PROT_READ | PROT_WRITE, MAP_SHARED,
                            vm.vcpu_.get(), 0);
        if (area == MAP_FAILED) return last_os_error();
        vm.run_ = static_cast<kvm_run*>(area); // the kernel's kvm_run layout lives at the start of this mapping
        vm.run_size_ = static_cast<std::size_t>(run_size);
        return vm;
    }

    /// Puts vCPU 0 in flat 32-bit protected mode (CR0.PE, no paging, base-0
    /// 4 GiB segments, IDT limit 0 so any exception triple-faults into
    /// KVM_EXIT_SHUTDOWN instead of running garbage handlers) and sets rip to
    /// `entry_gpa` and the walk's parameter registers. Does not touch guest
    /// memory: write the code with write_program() (eager) or let a restore
    /// fault it in (lazy). `entry_gpa` is normally `program.load_gpa`; it is
    /// not checked, so a test can start the guest anywhere.
    ///
    /// Errors: errc::not_created; errc::bad_program (see validate()); the
    /// errno of a failed KVM_GET_SREGS/KVM_SET_SREGS/KVM_SET_REGS.
    [[nodiscard]] std::error_code load(std::uint64_t entry_gpa, const guest_program& program,
                                       const walk_params& walk) noexcept
    {
        if (!vcpu_) return errc::not_created;
        if (auto ec = validate(program, walk, ram_size_)) return ec;
        loaded_ = false;

        kvm_sregs sregs{};
        if (::ioctl(vcpu_.get(), KVM_GET_SREGS, &sregs) < 0) return last_os_error();
        kvm_segment seg{};
        seg.base = 0;
        seg.limit = 0xffffffff;
        seg.selector = 0x08; // GDT slot 1; never loaded from memory, KVM takes the cached descriptor below
        seg.type = 0xb;      // code: execute/read, accessed
        seg.present = 1;
        seg.dpl = 0;
        seg.db = 1; // 32-bit default operand size
        seg.s = 1;  // code/data, not system
        seg.l = 0;
        seg.g = 1; // limit in 4 KiB units
        sregs.cs = seg;
        seg.selector = 0x10;
        seg.type = 0x3; // data: read/write, accessed
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg;
        sregs.gdt.base = 0;
        sregs.gdt.limit = 0;
        sregs.idt.base = 0;
        sregs.idt.limit = 0; // no handlers: #UD/#GP/#PF escalate to a triple fault, a clean KVM_EXIT_SHUTDOWN
        constexpr std::uint64_t cr0_pe = 1u << 0, cr0_et = 1u << 4, cr0_nw = 1u << 29, cr0_cd = 1u << 30,
                                cr0_pg = 1u << 31;
        // Clear CD/NW from the reset value: on AMD a guest with caching disabled runs uncached and crawls.
        sregs.cr0 = (sregs.cr0 & ~(cr0_cd | cr0_nw | cr0_pg)) | cr0_pe | cr0_et;
        sregs.cr4 = 0;
        sregs.efer = 0;
        if (::ioctl(vcpu_.get(), KVM_SET_SREGS, &sregs) < 0) return last_os_error();

        const bool random = walk.order == walk_order::pseudo_random;
        kvm_regs regs{};
        regs.rip = entry_gpa;
        regs.rflags = 0x2; // bit 1 is reserved-one; IF clear, so no interrupts
        regs.rax = walk.seed;
        regs.rbx = walk.first_page_gpa;
        regs.rcx = walk.touch_pages;
        regs.rdx = 0;
        regs.rsi = random ? lcg_multiplier : 1;
        regs.rdi = static_cast<std::uint32_t>((random ? std::uint64_t{lcg_increment} : 1) * guest_page_size);
        regs.rbp = random ? (walk.area_pages - 1) * guest_page_size : 0xfffff000;
        if (::ioctl(vcpu_.get(), KVM_SET_REGS, &regs) < 0) return last_os_error();
        loaded_ = true;
        return {};
    }

    /// Runs the vCPU on the calling thread until the guest halts. Expects
    /// exactly: one byte to marker_port (timed as the first instruction),
    /// one dword to result_port (the checksum), then `hlt`. EINTR from
    /// KVM_RUN is retried (until the timeout, if one is set).
    ///
    /// Errors: errc::not_created, errc::not_loaded; the exit_* values for
    /// KVM_EXIT_SHUTDOWN/FAIL_ENTRY/INTERNAL_ERROR/MMIO/anything else (see
    /// last_exit()); errc::unexpected_io, errc::marker_missing,
    /// errc::no_result; errc::timed_out; the errno of a failed KVM_RUN
    /// (EFAULT when guest memory cannot be faulted in).
    [[nodiscard]] result<run_report> run(const run_options& options = {}) noexcept
    {
        if (!vcpu_) return make_error_code(errc::not_created);
        if (!loaded_) return make_error_code(errc::not_loaded);
        detail::watchdog guard;
        if (options.timeout.count() > 0)
            if (auto ec = guard.arm(options.timeout, options.kick_signal)) return ec;

        using clock = std::chrono::steady_clock;
        const auto since = [start = clock::now()] {
            return static_cast<std::uint64_t>(
                std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - start).count());
        };
        run_report report;
        bool marker = false;
        bool result_seen = false;
        last_ = {};
        for (;;) {
            if (::ioctl(vcpu_.get(), KVM_RUN, 0) < 0) {
                if (errno != EINTR) return last_os_error();
                if (guard.expired()) return fail(errc::timed_out);
                continue;
            }
            ++report.exits;
            last_ = {run_->exit_reason, 0, 0};
            switch (run_->exit_reason) {
            case KVM_EXIT_IO: {
                const auto& io = run_->io;
                last_.detail = io.port;
                if (io.direction != KVM_EXIT_IO_OUT || io.count != 1) return fail(errc::unexpected_io);
                // The data sits inside the kvm_run mapping at data_offset.
                const auto* data = reinterpret_cast<const unsigned char*>(run_) + io.data_offset;
                if (io.port == marker_port && io.size == 1 && !marker) {
                    marker = true;
                    report.first_instruction_ns = since();
                    report.marker_exit = report.exits;
                } else if (io.port == result_port && io.size == 4 && !result_seen) {
                    if (!marker) return fail(errc::marker_missing);
                    result_seen = true;
                    std::memcpy(&report.checksum, data, sizeof report.checksum);
                    report.result_exit = report.exits;
                } else {
                    return fail(errc::unexpected_io);
                }
                break;
            }
            case KVM_EXIT_HLT:
                if (!result_seen) return fail(errc::no_result);
                report.total_ns = since();
                loaded_ = false; // the guest is done; load() again to rerun
                return report;
            case KVM_EXIT_SHUTDOWN: return fail(errc::exit_shutdown);
            case KVM_EXIT_FAIL_ENTRY:
                last_.detail = run_->fail_entry.hardware_entry_failure_reason;
                return fail(errc::exit_fail_entry);
            case KVM_EXIT_INTERNAL_ERROR:
                last_.detail = run_->internal.suberror;
                return fail(errc::exit_internal_error);
            case KVM_EXIT_MMIO: last_.detail = run_->mmio.phys_addr; return fail(errc::exit_mmio);
            default: return fail(errc::exit_unexpected);
            }
        }
    }

    /// The last exit of the last run(): its reason (see exit_reason_name()),
    /// detail and, after an error exit, the guest rip.
    [[nodiscard]] exit_info last_exit() const noexcept { return last_; }

    [[nodiscard]] void* host_ram() const noexcept { return ram_; }
    [[nodiscard]] std::uint64_t ram_size() const noexcept { return ram_size_; }
    /// For callers that need more than this harness offers (dirty logging, more regs).
    [[nodiscard]] int vm_fd() const noexcept { return vm_.get(); }
    [[nodiscard]] int vcpu_fd() const noexcept { return vcpu_.get(); }

    void swap(tiny_vm& other) noexcept
    {
        std::swap(vm_, other.vm_);
        std::swap(vcpu_, other.vcpu_);
        std::swap(run_, other.run_);
        std::swap(run_size_, other.run_size_);
        std::swap(ram_, other.ram_);
        std::swap(ram_size_, other.ram_size_);
        std::swap(loaded_, other.loaded_);
        std::swap(last_, other.last_);
    }

private:
    /// Records the guest rip for last_exit() and ends the run with `e`.
    std::error_code fail(errc e) noexcept
    {
        kvm_regs regs{};
        if (::ioctl(vcpu_.get(), KVM_GET_REGS, &regs) == 0) last_.rip = regs.rip;
        loaded_ = false; // the vCPU state is whatever the failure left; load() again
        return e;
    }

    squib::detail::unique_fd vm_;   // declared first so the vCPU closes before the VM
    squib::detail::unique_fd vcpu_;
    kvm_run* run_ = nullptr; // shared with the kernel; exit reason and I/O data
    std::size_t run_size_ = 0;
    void* ram_ = nullptr;
    std::uint64_t ram_size_ = 0;
    bool loaded_ = false;
    exit_info last_{};
};

} // namespace squib::kvm_demo

/// `checksum=0x1234abcd first_instruction=41us total=2.3ms exits=3`.
template <>
struct fmt::formatter<squib::kvm_demo::run_report> : fmt::formatter<fmt::string_view> {
    template <class FormatContext>
    auto format(const squib::kvm_demo::run_report& r, FormatContext& ctx) const -> decltype(ctx.out())
    {
        return fmt::format_to(ctx.out(), "checksum={:#010x} first_instruction={:.1f}us total={:.3f}ms exits={}",
                              r.checksum, static_cast<double>(r.first_instruction_ns) / 1e3,
                              static_cast<double>(r.total_ns) / 1e6, r.exits);
    }
};

/// `KVM_EXIT_SHUTDOWN detail=0x0 rip=0x1000`.
template <>
struct fmt::formatter<squib::kvm_demo::exit_info> : fmt::formatter<fmt::string_view> {
    template <class FormatContext>
    auto format(const squib::kvm_demo::exit_info& e, FormatContext& ctx) const -> decltype(ctx.out())
    {
        return fmt::format_to(ctx.out(), "{} detail={:#x} rip={:#x}", squib::kvm_demo::exit_reason_name(e.reason),
                              e.detail, e.rip);
    }
};
