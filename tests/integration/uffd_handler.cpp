// The Firecracker-compatible handler daemon (examples/uffd_handler/) against
// fake Firecrackers: forked children that do what Firecracker does (create a
// non-blocking userfaultfd with EVENT_REMOVE, map guest memory MAP_PRIVATE |
// MAP_ANONYMOUS (hugetlbfs for 2 MiB pages), register it MISSING, connect,
// send the JSON and the descriptor in one sendmsg), then touch their memory
// and check every byte against the snapshot, reporting through their exit
// status. The daemon's server runs in this process on a thread; the tests
// synchronise on its log lines and on pipes, never on sleeps.
//
// The children run between fork() and _exit() while the server's threads
// run in the parent, so they only make system calls and compare memory:
// everything they need (messages, expected bytes) is prepared before fork().
#include "../../examples/kvm_guest.hpp"
#include "../../examples/uffd_handler/handler.hpp"

#include "../support/support.hpp"
#include "../support/uffd.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <linux/mman.h> // MAP_HUGE_2MB

namespace {

namespace uh = squib::uffd_handler;
using squib::page_2m;
using squib::page_4k;
using squib::detail::unique_fd;

/// How long a test waits for something that must happen before calling it
/// hung. A hang guard, not a timing threshold: nothing passes or fails by speed.
constexpr auto hang_guard = std::chrono::seconds(120);

constexpr std::uint64_t snapshot_size = 8u << 20;
constexpr std::uint64_t hole_begin = 2u << 20; // a hole in the memory file: zero pages
constexpr std::uint64_t hole_end = 4u << 20;

#define SQUIB_REQUIRE_UFFD(name)                                                                                       \
    do {                                                                                                               \
        if (auto why = squib::test::uffd_unavailable(); !why.empty()) {                                                \
            squib::test::skip(name, "userfaultfd not available: " + why);                                              \
            return;                                                                                                    \
        }                                                                                                              \
    } while (false)

// ---------------------------------------------------------------------------
// The snapshot: the test pattern with a hole
// ---------------------------------------------------------------------------

struct snapshot {
    squib::test::temp_dir dir;
    std::string path = dir.file("vm.mem");
    std::vector<std::byte> bytes = squib::test::pattern(snapshot_size);
    bool has_hole = false; // whether the file system kept [hole_begin, hole_end) as a hole

    snapshot()
    {
        std::fill(bytes.begin() + hole_begin, bytes.begin() + hole_end, std::byte{0});
        // Write around the hole so a file system that supports holes keeps one.
        unique_fd f{::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
        REQUIRE(f);
        REQUIRE(::pwrite(f.get(), bytes.data(), hole_begin, 0) == static_cast<ssize_t>(hole_begin));
        REQUIRE(::pwrite(f.get(), bytes.data() + hole_end, snapshot_size - hole_end, hole_end) ==
                static_cast<ssize_t>(snapshot_size - hole_end));
        auto src = squib::mapped_file_source::open(path);
        REQUIRE(src);
        has_hole = src->data_extent_count() == 2;
    }
};

const snapshot& shared_snapshot()
{
    static const snapshot s;
    return s;
}

// ---------------------------------------------------------------------------
// The daemon, in process
// ---------------------------------------------------------------------------

/// Collects the daemon's log lines; tests wait for the line they expect.
class log_capture {
public:
    void add(std::string_view line)
    {
        std::lock_guard lock(m_);
        lines_.emplace_back(line);
        if (std::getenv("SQUIB_TEST_VERBOSE") != nullptr)
            std::printf("  daemon: %.*s\n", static_cast<int>(line.size()), line.data());
        cv_.notify_all();
    }

    /// The first line holding every needle, waiting for it if needed; empty
    /// (and a failed check) if it does not come.
    std::string wait_for(const std::vector<std::string>& needles)
    {
        std::unique_lock lock(m_);
        std::string found;
        const bool ok = cv_.wait_for(lock, hang_guard, [&] {
            for (const auto& l : lines_) {
                if (std::all_of(needles.begin(), needles.end(),
                                [&](const std::string& n) { return l.find(n) != std::string::npos; })) {
                    found = l;
                    return true;
                }
            }
            return false;
        });
        if (!ok) {
            std::string want;
            for (const auto& n : needles) want += "[" + n + "] ";
            FAIL_CHECK("no daemon log line with " << want << "\nlog:\n" << joined());
        }
        return found;
    }

    [[nodiscard]] std::size_t count(const std::string& needle) const
    {
        std::lock_guard lock(m_);
        return static_cast<std::size_t>(std::count_if(
            lines_.begin(), lines_.end(), [&](const auto& l) { return l.find(needle) != std::string::npos; }));
    }

    [[nodiscard]] std::string joined() const
    {
        std::string all;
        for (const auto& l : lines_) all += "  " + l + "\n";
        return all;
    }

private:
    mutable std::mutex m_;
    std::condition_variable cv_;
    std::vector<std::string> lines_;
};

/// A server on a thread, listening in a fresh directory.
class daemon_fixture {
public:
    explicit daemon_fixture(const std::string& mem_file, const std::function<void(uh::server_options&)>& tweak = {})
    {
        uh::server_options o;
        o.socket_path = dir_.file("uffd.sock");
        o.mem_file = mem_file;
        o.stats_json_path = dir_.file("stats.json");
        o.log = [this](std::string_view line) { log.add(line); };
        if (tweak) tweak(o);
        auto s = uh::server::create(std::move(o));
        REQUIRE(s);
        server_ = std::move(*s);
        loop_ = std::thread([this] { run_result_ = server_->run(); });
    }
    daemon_fixture(const daemon_fixture&) = delete;
    daemon_fixture& operator=(const daemon_fixture&) = delete;
    ~daemon_fixture() { stop(); }

    void stop()
    {
        if (!loop_.joinable()) return;
        server_->stop();
        loop_.join();
        CHECK_FALSE(run_result_);
    }

    [[nodiscard]] uh::server& server() { return *server_; }
    [[nodiscard]] const std::string& socket_path() const { return server_->options().socket_path; }
    [[nodiscard]] std::string stats_path() const { return server_->options().stats_json_path; }

    log_capture log;

private:
    squib::test::temp_dir dir_;
    std::unique_ptr<uh::server> server_;
    std::thread loop_;
    std::error_code run_result_;
};

// ---------------------------------------------------------------------------
// The fake Firecracker
// ---------------------------------------------------------------------------

/// One guest memory region of a fake VM.
struct fake_region {
    std::uint64_t addr = 0; ///< where the child maps it (reserved in the parent)
    std::uint64_t size = 0;
    std::uint64_t offset = 0; ///< where it starts in the snapshot
    std::uint64_t page_size = page_4k;
    bool declared = true; ///< listed in the handshake (false: registered with the userfaultfd only)
};

/// Address space held in the parent so the child can map guest memory at a
/// known place (MAP_FIXED over the inherited reservation) and the handshake
/// can be written before fork().
class reservation {
public:
    reservation(std::uint64_t size, std::uint64_t align) : size_(size + align)
    {
        void* p = ::mmap(nullptr, size_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        REQUIRE(p != MAP_FAILED);
        raw_ = p;
        addr_ = squib::align_up(reinterpret_cast<std::uint64_t>(p), align); // an address, handed to the child
    }
    reservation(const reservation&) = delete;
    reservation& operator=(const reservation&) = delete;
    ~reservation() { ::munmap(raw_, size_); }
    [[nodiscard]] std::uint64_t addr() const noexcept { return addr_; }

private:
    void* raw_ = nullptr;
    std::uint64_t size_;
    std::uint64_t addr_ = 0;
};

enum class fd_mode { uffd, none, pipe, two };

/// The child's steps, in order.
enum class op {
    setup_memory,     // mmap the regions, create the userfaultfd, register every region MISSING
    connect,          // connect to the daemon
    send,             // the message and the descriptor(s), in one sendmsg
    close_socket,     // as Firecracker before 1.12 does after sending
    await_close,      // wait until the daemon closes the connection (a refusal)
    ready,            // tell the parent
    go,               // wait for the parent
    verify_first,     // check every byte of the first region
    verify_rest,      // ... of the other declared regions
    balloon,          // MADV_DONTNEED, then those pages must read as zeros
    churn,            // give back and re-touch pages forever (to be killed while faulting)
    touch_undeclared, // touch a registered but undeclared region: a fault the daemon cannot serve
    kvm_run,          // run the KVM guest over the registered memory
};

const std::vector<op> handshake_ops{op::setup_memory, op::connect, op::send};

struct kvm_plan {
    squib::kvm_demo::guest_program program;
    squib::kvm_demo::walk_params walk;
    squib::kvm_demo::expected_run expected;
};

struct fake_vm {
    std::vector<fake_region> regions;
    std::string message; ///< the handshake bytes; firecracker_json(regions) unless a test wants a bad one
    fd_mode fds = fd_mode::uffd;
    std::vector<op> ops;
    const std::byte* expected = nullptr; ///< snapshot bytes, indexed by file offset
    const kvm_plan* kvm = nullptr;
};

/// Exit statuses of a fake VM.
enum exit_code : int {
    ok = 0,
    e_mmap = 10,
    e_uffd,
    e_api,
    e_register,
    e_socket,
    e_connect,
    e_send,
    e_pipe,
    e_mismatch = 20,
    e_not_zero,
    e_write_lost,
    e_madvise,
    e_unexpected_data = 30,
    e_go,
    e_kvm_create = 40,
    e_kvm_load,
    e_kvm_run,
    e_kvm_checksum,
    e_kvm_ram,
    e_returned = 50,
};

/// Firecracker's handshake for the declared regions, as serde_json writes it.
std::string firecracker_json(const std::vector<fake_region>& regions)
{
    std::string s = "[";
    for (const auto& r : regions) {
        if (!r.declared) continue;
        if (s.size() > 1) s += ",";
        s += fmt::format(R"({{"base_host_virt_addr":{},"size":{},"offset":{},"page_size":{},"page_size_kib":{}}})",
                         r.addr, r.size, r.offset, r.page_size, r.page_size);
    }
    return s + "]";
}

/// The child's guest memory at `addr`. The one cast from a plan's number to
/// memory: the child mapped that address itself (MAP_FIXED).
template <class T = std::byte>
T* guest(std::uint64_t addr) noexcept
{
    return reinterpret_cast<T*>(addr);
}

/// Every byte of `r` against the snapshot, pages in a scattered order.
bool region_matches(const fake_region& r, const std::byte* expected) noexcept
{
    const std::uint64_t pages = r.size / page_4k;
    for (std::uint64_t i = 0; i < pages; ++i) {
        const std::uint64_t page = (i * 7919) % pages; // 7919 is prime, so this visits every page
        if (std::memcmp(guest(r.addr + page * page_4k), expected + r.offset + page * page_4k, page_4k) != 0)
            return false;
    }
    return true;
}

bool all_zero(std::uint64_t addr, std::uint64_t len) noexcept
{
    const auto* p = guest<const volatile std::byte>(addr); // real loads: each may fault
    for (std::uint64_t i = 0; i < len; i += 512)
        if (p[i] != std::byte{0}) return false;
    return p[len - 1] == std::byte{0};
}

/// The child's life: only system calls and memory compares (no allocation,
/// no locks: the parent has other threads), then _exit with a status.
[[noreturn]] void fake_firecracker(const fake_vm& vm, const char* socket_path, int ready_fd, int go_fd)
{
    int uffd = -1;
    int sock = -1;
    for (const op step : vm.ops) {
        switch (step) {
        case op::setup_memory: {
            for (const auto& r : vm.regions) {
                int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED;
                if (r.page_size == page_2m) flags |= MAP_HUGETLB | MAP_HUGE_2MB;
                // Over the reservation inherited from the parent.
                if (::mmap(guest<void>(r.addr), r.size, PROT_READ | PROT_WRITE, flags, -1, 0) == MAP_FAILED)
                    ::_exit(e_mmap);
            }
            // As Firecracker: non-blocking, close-on-exec, kernel faults included (no UFFD_USER_MODE_ONLY).
            uffd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)); // no glibc wrapper
            if (uffd < 0) {
                const int dev = ::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
                if (dev >= 0) uffd = ::ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
            }
            if (uffd < 0) ::_exit(e_uffd);
            uffdio_api api{};
            api.api = UFFD_API;
            api.features = UFFD_FEATURE_EVENT_REMOVE;
            if (::ioctl(uffd, UFFDIO_API, &api) != 0) ::_exit(e_api);
            for (const auto& r : vm.regions) {
                uffdio_register reg{};
                reg.range.start = r.addr;
                reg.range.len = r.size;
                reg.mode = UFFDIO_REGISTER_MODE_MISSING;
                if (::ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) ::_exit(e_register);
            }
            break;
        }
        case op::connect: {
            sock = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (sock < 0) ::_exit(e_socket);
            sockaddr_un addr{};
            addr.sun_family = AF_UNIX;
            std::strncpy(addr.sun_path, socket_path, sizeof addr.sun_path - 1);
            if (::connect(sock, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
                ::_exit(e_connect); // sockets API cast
            break;
        }
        case op::send: {
            int fds[2] = {uffd, uffd};
            std::size_t nfds = vm.fds == fd_mode::none ? 0 : vm.fds == fd_mode::two ? 2 : 1;
            if (vm.fds == fd_mode::pipe) {
                int p[2];
                if (::pipe2(p, O_CLOEXEC) != 0) ::_exit(e_pipe);
                fds[0] = p[0];
            }
            iovec iov{const_cast<char*>(vm.message.data()), vm.message.size()}; // sendmsg does not write through it
            alignas(cmsghdr) char control[CMSG_SPACE(2 * sizeof(int))] = {};
            msghdr msg{};
            msg.msg_iov = &iov;
            msg.msg_iovlen = 1;
            if (nfds > 0) {
                msg.msg_control = control;
                msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
                cmsghdr* c = CMSG_FIRSTHDR(&msg);
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_RIGHTS;
                c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
                std::memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
            }
            if (::sendmsg(sock, &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(vm.message.size())) ::_exit(e_send);
            break;
        }
        case op::close_socket: ::close(sock); break;
        case op::await_close: {
            char c = 0;
            const ssize_t n = ::recv(sock, &c, 1, 0);
            // ECONNRESET: the daemon closed with part of our message unread (an oversized one).
            if (n > 0 || (n < 0 && errno != ECONNRESET)) ::_exit(e_unexpected_data);
            break;
        }
        case op::ready: {
            const char c = 'r';
            if (::write(ready_fd, &c, 1) != 1) ::_exit(e_pipe);
            break;
        }
        case op::go: {
            char c = 0;
            if (::read(go_fd, &c, 1) < 0) ::_exit(e_go);
            break;
        }
        case op::verify_first:
            if (!region_matches(vm.regions.front(), vm.expected)) ::_exit(e_mismatch);
            break;
        case op::verify_rest:
            for (std::size_t i = 1; i < vm.regions.size(); ++i)
                if (vm.regions[i].declared && !region_matches(vm.regions[i], vm.expected)) ::_exit(e_mismatch);
            break;
        case op::balloon: {
            // The balloon gives back 1 MiB of the first region, and all of the second.
            const fake_region& a = vm.regions[0];
            const fake_region& b = vm.regions[1];
            if (::madvise(guest<void>(a.addr + (1u << 20)), 1u << 20, MADV_DONTNEED) != 0) ::_exit(e_madvise);
            if (::madvise(guest<void>(b.addr), b.size, MADV_DONTNEED) != 0) ::_exit(e_madvise);
            // Re-touched, given-back pages are zeros, never stale snapshot bytes.
            if (!all_zero(a.addr + (1u << 20), 1u << 20) || !all_zero(b.addr, b.size)) ::_exit(e_not_zero);
            // Around the given-back range the snapshot bytes are intact.
            const std::byte* mem = guest(a.addr);
            if (std::memcmp(mem, vm.expected + a.offset, 1u << 20) != 0 ||
                std::memcmp(mem + (2u << 20), vm.expected + a.offset + (2u << 20), a.size - (2u << 20)) != 0)
                ::_exit(e_mismatch);
            // Writes to a re-faulted page stick.
            auto* w = guest<volatile std::byte>(b.addr + 12345);
            *w = std::byte{42};
            if (*w != std::byte{42}) ::_exit(e_write_lost);
            break;
        }
        case op::churn: {
            const fake_region& a = vm.regions[0];
            bool told = false;
            for (;;) { // until the parent's SIGKILL
                if (::madvise(guest<void>(a.addr), 1u << 20, MADV_DONTNEED) != 0) ::_exit(e_madvise);
                if (!all_zero(a.addr, 1u << 20)) ::_exit(e_not_zero);
                if (!told) {
                    const char c = 'r';
                    if (::write(ready_fd, &c, 1) != 1) ::_exit(e_pipe);
                    told = true;
                }
            }
        }
        case op::touch_undeclared:
            for (const auto& r : vm.regions)
                if (!r.declared) static_cast<void>(*guest<const volatile std::byte>(r.addr + 100)); // blocks
            ::_exit(e_returned);
        case op::kvm_run: {
            namespace kd = squib::kvm_demo;
            const fake_region& r = vm.regions.front();
            void* ram = guest<void>(r.addr); // guest RAM at guest-physical 0
            auto guest = kd::tiny_vm::create(ram, r.size);
            if (!guest) ::_exit(e_kvm_create);
            if (guest->load(vm.kvm->program.load_gpa, vm.kvm->program, vm.kvm->walk)) ::_exit(e_kvm_load);
            kd::run_options run;
            run.timeout = hang_guard;
            auto report = guest->run(run);
            if (!report) ::_exit(e_kvm_run);
            if (report->checksum != vm.kvm->expected.checksum) ::_exit(e_kvm_checksum);
            // The pages the guest never touched fault in from here, host side.
            if (std::memcmp(ram, vm.kvm->expected.final_ram.data(), r.size) != 0) ::_exit(e_kvm_ram);
            break;
        }
        }
    }
    ::_exit(ok);
}

std::string describe_status(int status)
{
    if (WIFSIGNALED(status)) return fmt::format("killed by signal {}", WTERMSIG(status));
    if (!WIFEXITED(status)) return "did not exit";
    switch (WEXITSTATUS(status)) {
    case ok: return "exit 0";
    case e_mmap: return "exit e_mmap (guest memory mmap failed)";
    case e_uffd: return "exit e_uffd";
    case e_api: return "exit e_api";
    case e_register: return "exit e_register";
    case e_socket: return "exit e_socket";
    case e_connect: return "exit e_connect";
    case e_send: return "exit e_send";
    case e_pipe: return "exit e_pipe";
    case e_mismatch: return "exit e_mismatch (a byte differs from the snapshot)";
    case e_not_zero: return "exit e_not_zero (a given-back page is not zero)";
    case e_write_lost: return "exit e_write_lost";
    case e_madvise: return "exit e_madvise";
    case e_unexpected_data: return "exit e_unexpected_data (the daemon sent bytes)";
    case e_go: return "exit e_go";
    case e_kvm_create: return "exit e_kvm_create";
    case e_kvm_load: return "exit e_kvm_load";
    case e_kvm_run: return "exit e_kvm_run";
    case e_kvm_checksum: return "exit e_kvm_checksum (the guest read wrong bytes)";
    case e_kvm_ram: return "exit e_kvm_ram (guest RAM differs from the model)";
    case e_returned: return "exit e_returned (an unserved fault returned)";
    default: return fmt::format("exit {}", WEXITSTATUS(status));
    }
}

/// A running fake VM: its pid and its two pipes.
class child_vm {
public:
    child_vm(const fake_vm& vm, const std::string& socket_path)
    {
        int ready[2];
        int go[2];
        REQUIRE(::pipe2(ready, O_CLOEXEC) == 0);
        REQUIRE(::pipe2(go, O_CLOEXEC) == 0);
        std::fflush(nullptr); // nothing buffered twice
        pid_ = ::fork();
        REQUIRE(pid_ >= 0);
        if (pid_ == 0) {
            squib::test::default_crash_signals();
            ::close(ready[0]);
            ::close(go[1]);
            fake_firecracker(vm, socket_path.c_str(), ready[1], go[0]);
        }
        ::close(ready[1]);
        ::close(go[0]);
        ready_.reset(ready[0]);
        go_.reset(go[1]);
        pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0))); // no glibc wrapper
        REQUIRE(pidfd_);
    }
    child_vm(const child_vm&) = delete;
    child_vm& operator=(const child_vm&) = delete;
    ~child_vm()
    {
        if (!reaped_) {
            ::kill(pid_, SIGKILL);
            int status = 0;
            ::waitpid(pid_, &status, 0);
        }
    }

    [[nodiscard]] pid_t pid() const noexcept { return pid_; }
    /// `pid=1234:`, how the daemon's lines about this VM start after the connection number.
    [[nodiscard]] std::string tag() const { return fmt::format("pid={}:", pid_); }

    /// Waits for the child's `ready` step.
    void wait_ready()
    {
        pollfd p{ready_.get(), POLLIN, 0};
        const int n = ::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(hang_guard).count()));
        REQUIRE_MESSAGE(n == 1, "fake VM " << pid_ << " never got ready");
        char c = 0;
        REQUIRE_MESSAGE(::read(ready_.get(), &c, 1) == 1,
                        "fake VM " << pid_ << " ended before getting ready: " << describe_status(wait()));
    }

    /// Lets the child past its `go` step.
    void go()
    {
        const char c = 'g';
        REQUIRE(::write(go_.get(), &c, 1) == 1);
    }

    /// Waits for the child to end and returns its status (killing it after the hang guard).
    int wait()
    {
        if (reaped_) return status_;
        pollfd p{pidfd_.get(), POLLIN, 0};
        if (::poll(&p, 1, static_cast<int>(std::chrono::milliseconds(hang_guard).count())) != 1) {
            FAIL_CHECK("fake VM " << pid_ << " hung; killing it");
            ::kill(pid_, SIGKILL);
        }
        REQUIRE(::waitpid(pid_, &status_, 0) == pid_);
        reaped_ = true;
        return status_;
    }

    /// Waits and checks the child exited 0.
    void expect_success()
    {
        const int status = wait();
        CHECK_MESSAGE((WIFEXITED(status) && WEXITSTATUS(status) == 0),
                      "fake VM " << pid_ << ": " << describe_status(status));
    }

    void kill_now() const { ::kill(pid_, SIGKILL); }

private:
    pid_t pid_ = -1;
    unique_fd ready_;
    unique_fd go_;
    unique_fd pidfd_;
    bool reaped_ = false;
    int status_ = 0;
};

/// Guest memory laid out as Firecracker does on x86 for a VM with a gap:
/// two regions, back to back in the memory file.
struct vm_layout {
    std::uint64_t page_size;
    reservation space;
    std::vector<fake_region> regions;

    explicit vm_layout(std::uint64_t page = page_4k) : page_size(page), space(snapshot_size + (2u << 20), page_2m)
    {
        const std::uint64_t first = page == page_2m ? 4u << 20 : 6u << 20;
        // A 2 MiB unmapped gap between the regions, as between guest RAM below and above 4 GiB.
        regions.push_back({space.addr(), first, 0, page});
        regions.push_back({space.addr() + first + (2u << 20), snapshot_size - first, first, page});
    }
};

fake_vm make_vm(const std::vector<fake_region>& regions, std::vector<op> ops)
{
    fake_vm vm;
    vm.regions = regions;
    vm.message = firecracker_json(regions);
    vm.ops = std::move(ops);
    vm.expected = shared_snapshot().bytes.data();
    return vm;
}

std::vector<op> with(std::vector<op> first, std::initializer_list<op> more)
{
    first.insert(first.end(), more.begin(), more.end());
    return first;
}

nlohmann::json read_json(const std::string& path)
{
    std::ifstream in(path);
    REQUIRE(in);
    return nlohmann::json::parse(in);
}

/// The report entry of the VM whose pid is `pid`.
nlohmann::json vm_entry(const nlohmann::json& report, pid_t pid)
{
    for (const auto& v : report.at("vms"))
        if (v.at("pid").get<pid_t>() == pid) return v;
    FAIL_CHECK("no VM with pid " << pid << " in " << report.dump());
    return {};
}

/// Hugetlbfs pages for the 2 MiB cases: reserves more if there are not
/// enough free (root can), and puts the pool back afterwards.
class hugepage_pool {
public:
    explicit hugepage_pool(long need)
    {
        if (meminfo("Hugepagesize:") != 2048) return;
        const long free = meminfo("HugePages_Free:");
        if (free >= need) {
            ok_ = true;
            return;
        }
        original_ = read_long("/proc/sys/vm/nr_hugepages");
        if (original_ < 0 || !write_long("/proc/sys/vm/nr_hugepages", original_ + (need - std::max(free, 0L)))) return;
        changed_ = true;
        ok_ = meminfo("HugePages_Free:") >= need;
    }
    hugepage_pool(const hugepage_pool&) = delete;
    hugepage_pool& operator=(const hugepage_pool&) = delete;
    ~hugepage_pool()
    {
        if (changed_) static_cast<void>(write_long("/proc/sys/vm/nr_hugepages", original_));
    }
    [[nodiscard]] bool ok() const noexcept { return ok_; }

private:
    static long meminfo(const std::string& key)
    {
        std::ifstream in("/proc/meminfo");
        std::string k;
        long v = -1;
        std::string unit;
        while (in >> k) {
            if (k == key) {
                in >> v;
                return v;
            }
            std::getline(in, unit);
        }
        return -1;
    }
    static long read_long(const char* path)
    {
        std::ifstream in(path);
        long v = -1;
        in >> v;
        return v;
    }
    static bool write_long(const char* path, long v)
    {
        std::ofstream out(path);
        out << v << "\n";
        out.flush();
        return static_cast<bool>(out);
    }

    bool ok_ = false;
    bool changed_ = false;
    long original_ = -1;
};

std::string reason(uh::errc e)
{
    return "refused: " + uh::make_error_code(e).message();
}

/// The squib-uffd-handler program as a child process, its stderr read line by line.
class daemon_process {
public:
    daemon_process(const std::string& exe, const std::vector<std::string>& args)
    {
        std::vector<std::string> all{exe};
        all.insert(all.end(), args.begin(), args.end());
        std::vector<char*> argv;
        for (auto& a : all) argv.push_back(a.data());
        argv.push_back(nullptr);
        int err[2];
        REQUIRE(::pipe2(err, O_CLOEXEC) == 0);
        std::fflush(nullptr);
        pid_ = ::fork();
        REQUIRE(pid_ >= 0);
        if (pid_ == 0) {
            ::dup2(err[1], 2); // the copy on fd 2 survives exec
            ::execv(exe.c_str(), argv.data());
            ::_exit(127);
        }
        ::close(err[1]);
        err_.reset(err[0]);
    }
    daemon_process(const daemon_process&) = delete;
    daemon_process& operator=(const daemon_process&) = delete;
    ~daemon_process()
    {
        if (!reaped_) {
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, &status_, 0);
        }
    }

    /// The first stderr line holding every needle, reading more as it comes.
    std::string wait_for(const std::vector<std::string>& needles)
    {
        const auto deadline = std::chrono::steady_clock::now() + hang_guard;
        std::size_t seen = 0;
        for (;;) {
            for (; seen < lines_.size(); ++seen) {
                const auto& l = lines_[seen];
                if (std::all_of(needles.begin(), needles.end(),
                                [&](const std::string& n) { return l.find(n) != std::string::npos; }))
                    return l;
            }
            const auto left =
                std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
            pollfd p{err_.get(), POLLIN, 0};
            char buf[4096];
            ssize_t n = 0;
            if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) != 1 ||
                (n = ::read(err_.get(), buf, sizeof buf)) <= 0) {
                std::string log;
                for (const auto& l : lines_) log += "  " + l + "\n";
                FAIL_CHECK("squib-uffd-handler printed no line with " << needles.front() << "\nstderr:\n" << log);
                return {};
            }
            partial_.append(buf, static_cast<std::size_t>(n));
            for (std::size_t nl; (nl = partial_.find('\n')) != std::string::npos; partial_.erase(0, nl + 1))
                lines_.push_back(partial_.substr(0, nl));
        }
    }

    void signal(int sig) const { REQUIRE(::kill(pid_, sig) == 0); }

    int wait()
    {
        if (reaped_) return status_;
        REQUIRE(::waitpid(pid_, &status_, 0) == pid_); // it was told to stop; a hang here is the failure
        reaped_ = true;
        return status_;
    }

private:
    pid_t pid_ = -1;
    unique_fd err_;
    std::string partial_;
    std::vector<std::string> lines_;
    bool reaped_ = false;
    int status_ = 0;
};

} // namespace

TEST_SUITE("uffd_handler")
{
    // ---- the handshake parser, no userfaultfd needed --------------------------------

    TEST_CASE("parse_handshake accepts what Firecracker sends, before and after 1.12")
    {
        const std::uint64_t file = 16u << 20;
        // 1.12 and later: page_size and the deprecated page_size_kib, both in bytes.
        auto p = uh::parse_handshake(R"([{"base_host_virt_addr":139637976727552,"size":8388608,"offset":0,)"
                                     R"("page_size":4096,"page_size_kib":4096},)"
                                     R"({"base_host_virt_addr":139637987213312,"size":4194304,"offset":8388608,)"
                                     R"("page_size":2097152,"page_size_kib":2097152}])",
                                     file);
        CHECK_MESSAGE(!p.error, uh::describe(p.error));
        REQUIRE(p.regions.size() == 2);
        CHECK(p.regions[0] == uh::guest_region_mapping{0x7f0000000000, 8u << 20, 0, page_4k});
        CHECK(p.regions[1] == uh::guest_region_mapping{0x7f0000a00000, 4u << 20, 8u << 20, page_2m});
        CHECK(p.regions[1].to_region() == squib::region{0x7f0000a00000, 4u << 20, 8u << 20, page_2m});
        // Before 1.12: only page_size_kib (holding bytes). Unknown fields are ignored.
        p = uh::parse_handshake(R"([{"base_host_virt_addr":4096,"size":4096,"offset":4096,"page_size_kib":4096,)"
                                R"("future_field":[1,2]}])",
                                file);
        REQUIRE_FALSE(p.error);
        CHECK(p.regions[0] == uh::guest_region_mapping{4096, 4096, 4096, page_4k});
    }

    TEST_CASE("parse_handshake refuses each malformed handshake with its reason")
    {
        const std::uint64_t file = 4u << 20;
        const auto region = [](const std::string& base, const std::string& size, const std::string& offset,
                               const std::string& page) {
            return fmt::format(R"({{"base_host_virt_addr":{},"size":{},"offset":{},"page_size":{}}})", base, size,
                               offset, page);
        };
        const auto one = [&](const std::string& base, const std::string& size, const std::string& offset,
                             const std::string& page) { return "[" + region(base, size, offset, page) + "]"; };
        struct bad {
            std::string message;
            uh::errc expect;
            std::string detail; // in the refusal's detail
        };
        std::string many = "[";
        for (int i = 0; i < 5; ++i)
            many += (i ? "," : "") + region(std::to_string(4096 * (i + 1)), "4096", "0", "4096");
        many += "]";
        const std::vector<bad> cases{
            {"hello", uh::errc::not_json, "parse error"},
            {R"([{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}] trailing)", uh::errc::not_json,
             ""},
            {"", uh::errc::not_json, ""},
            {R"({"base_host_virt_addr":4096})", uh::errc::not_region_array, "object"},
            {"[1]", uh::errc::not_region_array, "element 0"},
            {"[]", uh::errc::no_regions, ""},
            {many, uh::errc::too_many_regions, "5 regions, limit 4"},
            {R"([{"size":4096,"offset":0,"page_size":4096}])", uh::errc::bad_field,
             "\"base_host_virt_addr\" is missing"},
            {R"([{"base_host_virt_addr":4096,"size":4096,"offset":0}])", uh::errc::bad_field,
             "\"page_size\" is missing"},
            {one("4096", "-4096", "0", "4096"), uh::errc::bad_field, "\"size\""},
            {one("4096", "4096.0", "0", "4096"), uh::errc::bad_field, "JSON number (4096.0)"},
            {one("\"4096\"", "4096", "0", "4096"), uh::errc::bad_field, "string"},
            {one("99999999999999999999999", "4096", "0", "4096"), uh::errc::bad_field, ""},
            {one("4096", "4096", "0", "8192"), uh::errc::bad_page_size, "8192"},
            {one("4096", "4096", "0", "4"), uh::errc::bad_page_size, ""},
            {one("4096", "0", "0", "4096"), uh::errc::bad_region, ""},
            {one("18446744073709547520", "8192", "0", "4096"), uh::errc::bad_region, ""},
            {one("4097", "4096", "0", "4096"), uh::errc::unaligned_region, "base 0x1001"},
            {one("2097152", "2097152", "4096", "2097152"), uh::errc::unaligned_region, ""},
            {one("4096", "6144", "0", "4096"), uh::errc::unaligned_region, ""},
            {one("4096", "8192", "4190208", "4096"), uh::errc::past_end_of_file, "has 0x400000"},
            {one("4096", "4096", "18446744073709547520", "4096"), uh::errc::past_end_of_file, ""},
            {"[" + region("8192", "8192", "0", "4096") + "," + region("12288", "4096", "0", "4096") + "]",
             uh::errc::overlapping_regions, "region 0"},
            {"[" + region("0", "2097152", "0", "2097152") + "," + region("1052672", "4096", "0", "4096") + "]",
             uh::errc::overlapping_regions, ""},
        };
        uh::handshake_limits limits;
        limits.max_regions = 4;
        for (const auto& c : cases) {
            CAPTURE(c.message);
            const auto p = uh::parse_handshake(c.message, file, limits);
            CHECK(p.error.code == c.expect);
            CHECK(p.regions.empty());
            CHECK(uh::describe(p.error).find(c.detail) != std::string::npos);
        }
        // Adjacent regions are fine.
        CHECK_FALSE(uh::parse_handshake("[" + region("8192", "8192", "0", "4096") + "," +
                                            region("16384", "4096", "0", "4096") + "]",
                                        file, limits)
                        .error);
    }

    // ---- the daemon against fake Firecrackers ---------------------------------------

    TEST_CASE("a fake Firecracker is restored byte for byte and its stats are reported")
    {
        SQUIB_REQUIRE_UFFD("uffd_handler restore");
        const auto& snap = shared_snapshot();
        daemon_fixture d(snap.path);
        vm_layout layout;
        child_vm vm(
            make_vm(layout.regions, with(handshake_ops, {op::verify_first, op::verify_rest, op::ready, op::go})),
            d.socket_path());
        vm.wait_ready(); // every byte checked; the VM is alive

        // Stats on request: the JSON file, while the VM runs. A faulting thread
        // resumes before its handler counts the fault, so the live counts may
        // trail by a fault or two; the final ones below are exact.
        d.server().request_stats();
        d.log.wait_for({"wrote stats of 1 VM(s)"});
        const auto live = vm_entry(read_json(d.stats_path()), vm.pid());
        CHECK(live.at("state") == "serving");
        const std::uint64_t pages = snapshot_size / page_4k;
        CHECK(live.at("faults").get<std::uint64_t>() > pages / 2);
        CHECK(live.at("faults").get<std::uint64_t>() <= pages + live.at("redundant_faults").get<std::uint64_t>());
        CHECK(live.at("errors") == 0);
        CHECK(live.at("guest_bytes") == snapshot_size);
        CHECK(live.at("regions").size() == 2);
        CHECK(live.at("regions")[1].at("offset") == layout.regions[1].offset);
        d.log.wait_for({vm.tag(), "serving for", "faults="});

        vm.go();
        vm.expect_success();
        // Released when its process exited, with its stats in the log line and the report.
        const std::string line = d.log.wait_for({vm.tag(), "released (process exited)"});
        CHECK(d.server().active_vms() == 0);
        const auto done = vm_entry(d.server().stats(), vm.pid());
        CHECK(done.at("state") == "process exited");
        const auto faults = done.at("faults").get<std::uint64_t>();
        const auto redundant = done.at("redundant_faults").get<std::uint64_t>();
        CHECK(faults == pages + redundant); // one per page: fault-around 1
        CHECK(done.at("bytes_served").get<std::uint64_t>() == snapshot_size + redundant * page_4k);
        CHECK(done.at("zero_pages").get<std::uint64_t>() == (snap.has_hole ? (hole_end - hole_begin) / page_4k : 0));
        CHECK(done.at("errors") == 0);
        CHECK(done.at("latency_ns").at("count").get<std::uint64_t>() == faults);
        CHECK(done.at("latency_ns").at("p50").get<std::uint64_t>() <=
              done.at("latency_ns").at("p99").get<std::uint64_t>());
        CHECK(done.at("latency_ns").at("p99").get<std::uint64_t>() <=
              done.at("latency_ns").at("max").get<std::uint64_t>());
        CHECK(line.find(fmt::format("faults={} ", faults)) != std::string::npos);
        CHECK(line.find(fmt::format("p99_ns={} ", done.at("latency_ns").at("p99").get<std::uint64_t>())) !=
              std::string::npos);
        CHECK(d.server().stats().at("vms_served") == 1);
    }

    TEST_CASE("balloon: pages given back read as zeros, the rest stays the snapshot")
    {
        SQUIB_REQUIRE_UFFD("uffd_handler balloon");
        const auto& snap = shared_snapshot();
        daemon_fixture d(snap.path, [](uh::server_options& o) { o.session.fault_around_pages = 16; });
        vm_layout layout;
        child_vm vm(make_vm(layout.regions, with(handshake_ops, {op::verify_first, op::verify_rest, op::balloon})),
                    d.socket_path());
        vm.expect_success();
        const std::string line = d.log.wait_for({vm.tag(), "released (process exited)"});
        CHECK(line.find("removes=0") == std::string::npos); // REMOVE events were seen
        CHECK(line.find("errors=0") != std::string::npos);
    }

    TEST_CASE("four fake VMs at once from one snapshot")
    {
        SQUIB_REQUIRE_UFFD("uffd_handler four VMs");
        const auto& snap = shared_snapshot();
        daemon_fixture d(snap.path, [](uh::server_options& o) { o.session.threads = 2; });
        std::vector<std::unique_ptr<vm_layout>> layouts;
        std::vector<std::unique_ptr<child_vm>> vms;
        for (int i = 0; i < 4; ++i) {
            layouts.push_back(std::make_unique<vm_layout>());
            vms.push_back(std::make_unique<child_vm>(
                make_vm(layouts.back()->regions,
                        with(handshake_ops, {op::ready, op::go, op::verify_rest, op::verify_first})),
                d.socket_path()));
        }
        for (auto& vm : vms) {
            vm->wait_ready();
            d.log.wait_for({vm->tag(), "serving 2 region(s)"});
        }
        CHECK(d.server().active_vms() == 4);
        for (auto& vm : vms) vm->go(); // all four fault at once
        for (auto& vm : vms) vm->expect_success();
        for (auto& vm : vms) d.log.wait_for({vm->tag(), "released (process exited)", "errors=0"});
        CHECK(d.server().active_vms() == 0);
        CHECK(d.server().stats().at("vms_served") == 4);
    }

    TEST_CASE("each bad peer is refused with its reason while a good VM keeps being served")
    {
        SQUIB_REQUIRE_UFFD("uffd_handler bad peers");
        const auto& snap = shared_snapshot();
        daemon_fixture d(snap.path, [](uh::server_options& o) { o.limits.max_regions = 8; });

        // The good VM: half its memory now, the other half after every bad peer.
        vm_layout good_layout;
        child_vm good(
            make_vm(good_layout.regions, with(handshake_ops, {op::verify_first, op::ready, op::go, op::verify_rest})),
            d.socket_path());
        good.wait_ready();

        vm_layout bad_layout; // each bad peer maps and registers real memory, as Firecracker would
        const auto& regions = bad_layout.regions;
        const auto region_json = [](std::uint64_t base, std::uint64_t size, std::uint64_t offset, std::uint64_t page) {
            return fmt::format(
                R"({{"base_host_virt_addr":{},"size":{},"offset":{},"page_size":{},"page_size_kib":{}}})", base, size,
                offset, page, page);
        };
        std::string too_many = "[";
        for (std::uint64_t i = 0; i < 9; ++i)
            too_many += (i ? "," : "") + region_json(regions[0].addr + i * page_4k, page_4k, i * page_4k, page_4k);
        too_many += "]";
        std::string oversized = firecracker_json(regions);
        oversized.insert(1, 40000, ' '); // valid JSON, but larger than the 32 KiB limit

        struct bad_peer {
            std::string name;
            std::string message;
            fd_mode fds;
            std::vector<op> ops;
            uh::errc expect;
        };
        const std::vector<op> refused_ops = with(handshake_ops, {op::await_close});
        const std::vector<bad_peer> peers{
            {"not JSON", "not json at all", fd_mode::uffd, refused_ops, uh::errc::not_json},
            {"not an array", R"({"base_host_virt_addr":4096})", fd_mode::uffd, refused_ops, uh::errc::not_region_array},
            {"no regions", "[]", fd_mode::uffd, refused_ops, uh::errc::no_regions},
            {"no descriptor", firecracker_json(regions), fd_mode::none, refused_ops, uh::errc::no_descriptor},
            {"a pipe, not a userfaultfd", firecracker_json(regions), fd_mode::pipe, refused_ops,
             uh::errc::not_a_userfaultfd},
            {"two descriptors", firecracker_json(regions), fd_mode::two, refused_ops, uh::errc::too_many_descriptors},
            {"too many regions", too_many, fd_mode::uffd, refused_ops, uh::errc::too_many_regions},
            {"overlapping regions",
             "[" + region_json(regions[0].addr, 8 * page_4k, 0, page_4k) + "," +
                 region_json(regions[0].addr + 4 * page_4k, 8 * page_4k, 0, page_4k) + "]",
             fd_mode::uffd, refused_ops, uh::errc::overlapping_regions},
            {"past the end of the memory file",
             "[" + region_json(regions[0].addr, 2 * page_4k, snapshot_size - page_4k, page_4k) + "]", fd_mode::uffd,
             refused_ops, uh::errc::past_end_of_file},
            {"page size 64 KiB", "[" + region_json(regions[0].addr, 1u << 20, 0, 65536) + "]", fd_mode::uffd,
             refused_ops, uh::errc::bad_page_size},
            {"unaligned base", "[" + region_json(regions[0].addr + 512, page_4k, 0, page_4k) + "]", fd_mode::uffd,
             refused_ops, uh::errc::unaligned_region},
            {"a negative size",
             fmt::format(R"([{{"base_host_virt_addr":{},"size":-4096,"offset":0,"page_size":4096}}])", regions[0].addr),
             fd_mode::uffd, refused_ops, uh::errc::bad_field},
            {"oversized message", oversized, fd_mode::uffd, refused_ops, uh::errc::oversized},
            {"hangs up before its handshake",
             "",
             fd_mode::none,
             {op::setup_memory, op::connect, op::close_socket},
             uh::errc::peer_closed},
        };
        for (const auto& p : peers) {
            CAPTURE(p.name);
            fake_vm vm = make_vm(regions, p.ops);
            vm.message = p.message;
            vm.fds = p.fds;
            child_vm peer(vm, d.socket_path());
            const std::string line = d.log.wait_for({peer.tag(), "refused"});
            CHECK_MESSAGE(line.find(reason(p.expect)) != std::string::npos, line);
            CHECK(line.find("connection closed") != std::string::npos);
            peer.expect_success(); // its connection was closed (await_close returned)
        }
        CHECK(d.server().stats().at("vms_refused") == peers.size());
        CHECK(d.server().active_vms() == 1);

        // Nothing else was affected: the good VM gets the rest of its memory.
        good.go();
        good.expect_success();
        d.log.wait_for({good.tag(), "released (process exited)", "errors=0"});
    }

    TEST_CASE("a peer that connects and sends nothing is refused after the handshake timeout")
    {
        SQUIB_REQUIRE_UFFD("uffd_handler handshake timeout");
        const auto& snap = shared_snapshot();
        daemon_fixture d(snap.path, [](uh::server_options& o) { o.handshake_timeout = std::chrono::milliseconds(50); });
        vm_layout layout;
        child_vm silent(make_vm(layout.regions, {op::setup_memory, op::connect, op::await_close}), d.socket_path());
        d.log.wait_for({silent.tag(), reason(uh::errc::handshake_timeout)});
        silent.expect_success();
    }

    TEST_CASE("the daemon survives a peer killed while faulting, and serves the next one")
    {
        SQUIB_REQUIRE_UFFD("uffd_handler peer dies");
        const auto& snap = shared_snapshot();
        daemon_fixture d(snap.path, [](uh::server_options& o) { o.session.threads = 2; });
        vm_layout layout;
        child_vm dying(make_vm(layout.regions, with(handshake_ops, {op::verify_first, op::churn})), d.socket_path());
        dying.wait_ready(); // it is giving back and re-faulting pages in a loop now
        dying.kill_now();
        const int status = dying.wait();
        CHECK((WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL));
        d.log.wait_for({dying.tag(), "released (process exited)"});
        CHECK(d.server().active_vms() == 0);

        vm_layout next_layout;
        child_vm next(make_vm(next_layout.regions, with(handshake_ops, {op::verify_first, op::verify_rest})),
                      d.socket_path());
        next.expect_success();
        d.log.wait_for({next.tag(), "released (process exited)", "errors=0"});
    }

    TEST_CASE("an unserved fault releases that VM only; --kill-on-unserved also kills it")
    {
        SQUIB_REQUIRE_UFFD("uffd_handler unserved");
        const auto& snap = shared_snapshot();
        for (const bool kill : {false, true}) {
            CAPTURE(kill);
            daemon_fixture d(snap.path, [kill](uh::server_options& o) { o.kill_on_unserved = kill; });
            // Registers a region with its userfaultfd that it does not declare, then touches it.
            vm_layout layout;
            layout.regions[1].declared = false;
            child_vm stuck(make_vm(layout.regions, with(handshake_ops, {op::verify_first, op::touch_undeclared})),
                           d.socket_path());
            const std::string line = d.log.wait_for({stuck.tag(), "cannot serve the page fault at"});
            CHECK(line.find(fmt::format("{:#x}", layout.regions[1].addr)) != std::string::npos);
            CHECK(line.find(squib::make_error_code(squib::errc::out_of_region).message()) != std::string::npos);
            d.log.wait_for({stuck.tag(), "released (unserved fault)", "unserved=1"});
            if (kill) {
                const int status = stuck.wait();
                CHECK((WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL));
            } else {
                // Firecracker keeps its copy of the userfaultfd: the vCPU waits, it is not fed zeros.
                CHECK(line.find("stays blocked") != std::string::npos);
                stuck.kill_now();
                stuck.wait();
            }
            // The daemon goes on serving.
            vm_layout next_layout;
            child_vm next(make_vm(next_layout.regions, with(handshake_ops, {op::verify_first, op::verify_rest})),
                          d.socket_path());
            next.expect_success();
            d.log.wait_for({next.tag(), "released (process exited)", "errors=0"});
        }
    }

    TEST_CASE("Firecracker before 1.12 closes its socket after the handshake and is still served")
    {
        SQUIB_REQUIRE_UFFD("uffd_handler closed socket");
        const auto& snap = shared_snapshot();
        daemon_fixture d(snap.path);
        vm_layout layout;
        // The old handshake: page_size_kib only.
        fake_vm plan =
            make_vm(layout.regions,
                    with(handshake_ops, {op::close_socket, op::ready, op::go, op::verify_first, op::verify_rest}));
        plan.message = fmt::format(R"([{{"base_host_virt_addr":{},"size":{},"offset":0,"page_size_kib":4096}},)"
                                   R"({{"base_host_virt_addr":{},"size":{},"offset":{},"page_size_kib":4096}}])",
                                   layout.regions[0].addr, layout.regions[0].size, layout.regions[1].addr,
                                   layout.regions[1].size, layout.regions[1].offset);
        child_vm vm(plan, d.socket_path());
        vm.wait_ready();
        d.log.wait_for({vm.tag(), "closed its socket but is still running"});
        vm.go();
        vm.expect_success();
        d.log.wait_for({vm.tag(), "released (process exited)", "errors=0"});
    }

    TEST_CASE("shutdown releases every VM, logs its stats and writes the stats file")
    {
        SQUIB_REQUIRE_UFFD("uffd_handler shutdown");
        const auto& snap = shared_snapshot();
        daemon_fixture d(snap.path);
        vm_layout layout;
        child_vm vm(
            make_vm(layout.regions, with(handshake_ops, {op::verify_first, op::verify_rest, op::ready, op::go})),
            d.socket_path());
        vm.wait_ready();
        d.stop();
        d.log.wait_for({"shutting down with 1 VM(s) still running"});
        d.log.wait_for({vm.tag(), "released (daemon shutdown)"});
        const auto entry = vm_entry(read_json(d.stats_path()), vm.pid());
        CHECK(entry.at("state") == "daemon shutdown");
        CHECK(entry.at("faults").get<std::uint64_t>() >= snapshot_size / page_4k);
        CHECK_FALSE(std::filesystem::exists(d.socket_path())); // no one may connect to a stopped daemon
        vm.go();                                               // it needs no more pages
        vm.expect_success();
    }

    TEST_CASE("the program: SIGUSR1 writes the stats file, SIGTERM stops it cleanly, bad arguments are refused")
    {
        // Set by the build (meson passes the built program); the in-process tests cover everything else.
        const char* exe = std::getenv("SQUIB_UFFD_HANDLER");
        if (exe == nullptr || ::access(exe, X_OK) != 0) {
            squib::test::skip("uffd_handler program", "SQUIB_UFFD_HANDLER does not name the built squib-uffd-handler");
            return;
        }
        SQUIB_REQUIRE_UFFD("uffd_handler program");
        const auto& snap = shared_snapshot();
        squib::test::temp_dir dir;
        const std::string sock = dir.file("uffd.sock");
        const std::string stats = dir.file("stats.json");
        {
            daemon_process bad(exe, {"--socket", sock, "--mem-file", snap.path, "--fault-around", "3"});
            const int status = bad.wait();
            CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 2));
            bad.wait_for({"--fault-around wants a power of two"});
        }
        daemon_process d(exe, {"--socket", sock, "--mem-file", snap.path, "--threads", "2", "--fault-around", "4",
                               "--stats-json", stats});
        d.wait_for({"listening on", sock});
        vm_layout layout;
        child_vm vm(
            make_vm(layout.regions, with(handshake_ops, {op::verify_first, op::verify_rest, op::ready, op::go})), sock);
        vm.wait_ready();
        d.signal(SIGUSR1);
        d.wait_for({vm.tag(), "serving for"});
        d.wait_for({"wrote stats of 1 VM(s)", stats});
        CHECK(vm_entry(read_json(stats), vm.pid()).at("state") == "serving");
        vm.go();
        vm.expect_success();
        d.wait_for({vm.tag(), "released (process exited)", "errors=0"});
        d.signal(SIGTERM);
        const int status = d.wait();
        CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
        d.wait_for({"stopped: 1 VM(s) served, 0 refused"});
        const auto entry = vm_entry(read_json(stats), vm.pid());
        CHECK(entry.at("state") == "process exited");
        CHECK(entry.at("bytes_served").get<std::uint64_t>() >= snapshot_size);
        CHECK_FALSE(std::filesystem::exists(sock));
    }

    TEST_CASE("2 MiB hugetlbfs pages, two VMs at once")
    {
        SQUIB_REQUIRE_UFFD("uffd_handler 2 MiB pages");
        hugepage_pool pool(2 * static_cast<long>(snapshot_size / page_2m));
        if (!pool.ok()) {
            squib::test::skip("uffd_handler 2 MiB pages", "cannot reserve 8 free 2 MiB hugetlbfs pages");
            return;
        }
        const auto& snap = shared_snapshot();
        daemon_fixture d(snap.path);
        vm_layout a(page_2m);
        vm_layout b(page_2m);
        child_vm first(make_vm(a.regions, with(handshake_ops, {op::ready, op::go, op::verify_first, op::verify_rest})),
                       d.socket_path());
        child_vm second(make_vm(b.regions, with(handshake_ops, {op::ready, op::go, op::verify_rest, op::verify_first})),
                        d.socket_path());
        first.wait_ready();
        second.wait_ready();
        d.log.wait_for({first.tag(), "serving 2 region(s)", "page size 2097152"});
        d.log.wait_for({second.tag(), "serving 2 region(s)", "page size 2097152"});
        first.go();
        second.go();
        first.expect_success();
        second.expect_success();
        for (auto* vm : {&first, &second}) {
            d.log.wait_for({vm->tag(), "released (process exited)", "errors=0"});
            // One fault per 2 MiB page (plus any a race made redundant); the hole, one huge page, as zeros.
            const auto e = vm_entry(d.server().stats(), vm->pid());
            const auto redundant = e.at("redundant_faults").get<std::uint64_t>();
            CHECK(e.at("faults").get<std::uint64_t>() == snapshot_size / page_2m + redundant);
            CHECK(e.at("bytes_served").get<std::uint64_t>() == snapshot_size + redundant * page_2m);
            CHECK(e.at("zero_pages").get<std::uint64_t>() == (snap.has_hole ? 1 : 0));
        }
    }

    TEST_CASE("a KVM guest's vCPU faults are served by the daemon")
    {
        SQUIB_REQUIRE_UFFD("uffd_handler KVM");
        namespace kd = squib::kvm_demo;
        {
            unique_fd kvm{::open("/dev/kvm", O_RDWR | O_CLOEXEC)};
            if (!kvm) {
                squib::test::skip("uffd_handler KVM", std::string("/dev/kvm not available: ") + std::strerror(errno));
                return;
            }
        }
        // A snapshot of a guest: the walker's code at 0x1000 over the test pattern.
        constexpr std::uint64_t ram = 8u << 20;
        squib::test::temp_dir dir;
        const std::string path = dir.file("guest.mem");
        auto image = squib::test::pattern(ram);
        const auto prog = kd::guest_program::walker();
        REQUIRE_FALSE(kd::write_program(image, prog));
        squib::test::write_file(path, image);

        kvm_plan plan{prog,
                      {.first_page_gpa = 4u << 20,
                       .area_pages = (4u << 20) / page_4k,
                       .touch_pages = (4u << 20) / page_4k,
                       .order = kd::walk_order::pseudo_random,
                       .seed = 0x5eed},
                      {}};
        auto model = kd::expected_checksum(plan.program, plan.walk, image);
        REQUIRE(model);
        plan.expected = std::move(*model);

        daemon_fixture d(path);
        reservation space(ram, page_2m);
        fake_vm vm;
        vm.regions = {{space.addr(), ram, 0, page_4k}};
        vm.message = firecracker_json(vm.regions);
        vm.ops = with(handshake_ops, {op::kvm_run});
        vm.expected = image.data();
        vm.kvm = &plan;
        child_vm guest(vm, d.socket_path());
        guest.expect_success();
        d.log.wait_for({guest.tag(), "released (process exited)", "errors=0"});
        // Every page was faulted in through the daemon: the guest's (code + walk) and the host's check of the rest.
        const auto e = vm_entry(d.server().stats(), guest.pid());
        CHECK(e.at("faults").get<std::uint64_t>() == ram / page_4k + e.at("redundant_faults").get<std::uint64_t>());
    }
}
