// The userfaultfd backend on real process memory: real faults, real UFFDIO_COPY.
#include <squib/backend/uffd.hpp>
#include <squib/core/pager.hpp>
#include <squib/index/flat.hpp>
#include <squib/source/file.hpp>
#include <squib/source/mapped_file.hpp>
#include <squib/source/memory.hpp>
#include <squib/stats/atomic.hpp>

#include "../support/support.hpp"
#include "../support/uffd.hpp"

#include <doctest/doctest.h>

#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <atomic>
#include <fstream>
#include <iterator>
#include <barrier>
#include <condition_variable>
#include <cstring>
#include <latch>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

namespace {

using squib::page_4k;
using squib::test::anon_memory;

constexpr std::uint64_t ram_size = 64u << 20;

/// One snapshot file shared by the tests of this file.
struct snapshot {
    squib::test::temp_dir dir;
    std::string path = dir.file("vm.mem");
    std::vector<std::byte> bytes = squib::test::pattern(ram_size);
    snapshot() { squib::test::write_file(path, bytes); }
};

const snapshot& shared_snapshot()
{
    static const snapshot s;
    return s;
}

template <class Source>
Source open_source(const std::string& path)
{
    auto s = Source::open(path);
    REQUIRE(s);
    return std::move(*s);
}

template <class Source>
using uffd_pager = squib::pager<Source, squib::flat_index, squib::uffd_backend, squib::atomic_stats>;

squib::uffd_backend make_backend(squib::uffd_options opts = {})
{
    auto b = squib::uffd_backend::create(std::move(opts));
    REQUIRE(b);
    return std::move(*b);
}

#define SQUIB_REQUIRE_UFFD(name)                                                                                       \
    do {                                                                                                               \
        if (auto why = squib::test::uffd_unavailable(); !why.empty()) {                                                \
            squib::test::skip(name, "userfaultfd not available: " + why);                                              \
            return;                                                                                                    \
        }                                                                                                              \
    } while (false)

template <std::uint64_t Pages>
struct around {
    static constexpr std::uint64_t pages = Pages;
};

template <class Source, class Around>
struct combo {
    using source = Source;
    static constexpr std::uint64_t around_pages = Around::pages;
};

/// Records unserved faults instead of aborting.
struct unserved_log {
    std::mutex m;
    std::condition_variable cv;
    std::vector<std::pair<std::uint64_t, std::error_code>> seen;

    static void record(void* ctx, std::uint64_t addr, std::error_code ec) noexcept
    {
        auto* self = static_cast<unserved_log*>(ctx);
        std::lock_guard lock(self->m);
        self->seen.emplace_back(addr, ec);
        self->cv.notify_all();
    }
    void wait_for(std::size_t n)
    {
        std::unique_lock lock(m);
        cv.wait(lock, [&] { return seen.size() >= n; });
    }
};

/// A source whose reads wait at a gate, to hold a fault in the handler.
class gated_source {
public:
    explicit gated_source(std::span<const std::byte> bytes) : inner_(bytes), state_(std::make_shared<gate>()) {}
    std::error_code read(std::uint64_t addr, std::span<std::byte> dst) const noexcept
    {
        {
            std::unique_lock lock(state_->m);
            ++state_->entered;
            state_->cv.notify_all();
            state_->cv.wait(lock, [&] { return state_->open; });
        }
        return inner_.read(addr, dst);
    }
    void wait_entered(int n) const
    {
        std::unique_lock lock(state_->m);
        state_->cv.wait(lock, [&] { return state_->entered >= n; });
    }
    void open() const
    {
        std::lock_guard lock(state_->m);
        state_->open = true;
        state_->cv.notify_all();
    }

private:
    struct gate {
        std::mutex m;
        std::condition_variable cv;
        int entered = 0;
        bool open = false;
    };
    squib::memory_source inner_;
    std::shared_ptr<gate> state_;
};

} // namespace

TEST_SUITE("uffd")
{
    TEST_CASE_TEMPLATE("threads touching random pages see the snapshot byte for byte", C,
                       combo<squib::file_source, around<1>>, combo<squib::mapped_file_source, around<1>>,
                       combo<squib::file_source, around<16>>, combo<squib::mapped_file_source, around<512>>)
    {
        SQUIB_REQUIRE_UFFD("uffd random touches");
        const auto& snap = shared_snapshot();
        anon_memory ram(ram_size);
        uffd_pager<typename C::source> p{open_source<typename C::source>(snap.path), {}, std::in_place,
                                         make_backend({.threads = 2, .fault_around_pages = C::around_pages})};
        REQUIRE_FALSE(p.register_region({.base = ram.addr(), .size = ram_size}));
        REQUIRE_FALSE(p.start());

        constexpr int threads = 4;
        std::atomic<std::uint64_t> wrong{0};
        std::vector<std::thread> touchers;
        for (int t = 0; t < threads; ++t) {
            touchers.emplace_back([&, t] {
                std::mt19937_64 rng(static_cast<std::uint64_t>(t) + 1);
                for (int i = 0; i < 2000; ++i) {
                    const std::uint64_t off = rng() % ram_size;
                    if (ram.data()[off] != snap.bytes[off]) wrong.fetch_add(1);
                }
            });
        }
        for (auto& t : touchers) t.join();
        CHECK(wrong.load() == 0);
        // Then every byte of the region, which faults in whatever is left.
        CHECK(std::memcmp(ram.data(), snap.bytes.data(), ram_size) == 0);
        p.stop(); // joins the handlers: a thread resumes before its handler counts the fault
        const auto s = p.stats().snapshot();
        CHECK(s.errors == 0);
        if (C::around_pages == 1) {
            // Two threads may fault the same page at once: the later fault finds it in and only wakes.
            const auto redundant = p.backend().counters().redundant;
            CHECK(s.faults == ram_size / page_4k + redundant);
            CHECK(s.bytes_served == ram_size + redundant * page_4k);
        } else {
            CHECK(s.bytes_served >= ram_size); // whole clusters count, pages found present included
            CHECK(s.faults < ram_size / page_4k / 4);
        }
    }

    TEST_CASE("only touched pages are read from the source")
    {
        SQUIB_REQUIRE_UFFD("uffd partial touch");
        const auto& snap = shared_snapshot();
        anon_memory ram(ram_size);
        uffd_pager<squib::file_source> p{open_source<squib::file_source>(snap.path), {}, std::in_place,
                                         make_backend()};
        REQUIRE_FALSE(p.register_region({.base = ram.addr(), .size = ram_size}));
        REQUIRE_FALSE(p.start());
        std::uint64_t touched = 0;
        for (std::uint64_t off = 0; off < ram_size; off += 37 * page_4k, ++touched)
            REQUIRE(ram.data()[off + 5] == snap.bytes[off + 5]);
        p.stop();
        const auto s = p.stats().snapshot();
        CHECK(s.faults == touched);
        CHECK(s.bytes_served == touched * page_4k);
        CHECK(p.backend().is_installed(ram.addr()));
        CHECK_FALSE(p.backend().is_installed(ram.addr() + page_4k));
    }

    TEST_CASE("two threads faulting the same page both get it")
    {
        SQUIB_REQUIRE_UFFD("uffd same page");
        const auto& snap = shared_snapshot();
        anon_memory ram(ram_size);
        uffd_pager<squib::mapped_file_source> p{open_source<squib::mapped_file_source>(snap.path), {},
                                                std::in_place, make_backend({.threads = 2})};
        REQUIRE_FALSE(p.register_region({.base = ram.addr(), .size = ram_size}));
        REQUIRE_FALSE(p.start());
        for (std::uint64_t page = 0; page < 200; ++page) {
            const std::uint64_t off = page * page_4k + 100;
            std::barrier sync(2);
            std::byte a{}, b{};
            std::thread t1([&] {
                sync.arrive_and_wait();
                a = ram.data()[off];
            });
            std::thread t2([&] {
                sync.arrive_and_wait();
                b = ram.data()[off];
            });
            t1.join();
            t2.join();
            REQUIRE(a == snap.bytes[off]);
            REQUIRE(b == snap.bytes[off]);
        }
        p.stop();
        const auto s = p.stats().snapshot();
        CHECK(s.errors == 0);
        CHECK(s.bytes_served >= 200 * page_4k);
        // A second fault on an installed page installs nothing: races show up as EEXIST or as a skipped page.
        CHECK(s.faults >= 200);
    }

    TEST_CASE("fault-around clusters stop at the region edges")
    {
        SQUIB_REQUIRE_UFFD("uffd fault-around edges");
        const auto& snap = shared_snapshot();
        // Map 3 MiB, and register 40 pages starting 3 pages into a 64 KiB block, leaving neighbours unregistered.
        anon_memory ram(3u << 20);
        const std::uint64_t block = squib::align_up(ram.addr(), 16 * page_4k);
        const std::uint64_t base = block + 3 * page_4k;
        const std::uint64_t size = 40 * page_4k;
        uffd_pager<squib::mapped_file_source> p{open_source<squib::mapped_file_source>(snap.path), {},
                                                std::in_place, make_backend({.fault_around_pages = 16})};
        REQUIRE_FALSE(p.register_region({.base = base, .size = size, .source_offset = 8 * page_4k}));
        REQUIRE_FALSE(p.start());

        auto at = [&](std::uint64_t addr) { return *reinterpret_cast<volatile std::byte*>(addr); }; // a real load
        CHECK(at(base) == snap.bytes[8 * page_4k]);                              // first block: 13 pages
        CHECK(at(base + size - 1) == snap.bytes[8 * page_4k + size - 1]);        // last block: clipped
        CHECK(at(block + 16 * page_4k + 5) == snap.bytes[8 * page_4k + 13 * page_4k + 5]); // a whole block
        // Everything in the region now reads right without more faults.
        CHECK(std::memcmp(reinterpret_cast<const void*>(base), snap.bytes.data() + 8 * page_4k, size) == 0);
        p.stop();
        const auto s = p.stats().snapshot();
        CHECK(s.faults == 3);
        CHECK(s.bytes_served == size); // 13 + 16 + 11 pages
        // Outside the region the memory is ordinary: untouched by the pager.
        CHECK(at(block) == std::byte{0});
        CHECK(at(base + size) == std::byte{0});
    }

    TEST_CASE("MADV_DONTNEED then re-touch gives zeros, never stale snapshot bytes")
    {
        SQUIB_REQUIRE_UFFD("uffd dontneed");
        const auto& snap = shared_snapshot();
        anon_memory ram(ram_size);
        uffd_pager<squib::mapped_file_source> p{open_source<squib::mapped_file_source>(snap.path), {},
                                                std::in_place, make_backend({.fault_around_pages = 16})};
        REQUIRE_FALSE(p.register_region({.base = ram.addr(), .size = ram_size}));
        REQUIRE_FALSE(p.start());
        // Bring in the first 4 MiB, give back 1 MiB in the middle, touch again.
        REQUIRE(std::memcmp(ram.data(), snap.bytes.data(), 4u << 20) == 0);
        REQUIRE(::madvise(ram.data() + (1u << 20), 1u << 20, MADV_DONTNEED) == 0);
        for (std::uint64_t off = 1u << 20; off < (2u << 20); off += page_4k) {
            REQUIRE(ram.data()[off] == std::byte{0});
            REQUIRE(ram.data()[off + page_4k - 1] == std::byte{0});
        }
        // Around the given-back range the snapshot bytes are intact.
        CHECK(std::memcmp(ram.data(), snap.bytes.data(), 1u << 20) == 0);
        CHECK(std::memcmp(ram.data() + (2u << 20), snap.bytes.data() + (2u << 20), 2u << 20) == 0);
        // Pages never touched before the madvise but inside it also read as zeros.
        REQUIRE(::madvise(ram.data() + (8u << 20), 1u << 20, MADV_DONTNEED) == 0);
        CHECK(ram.data()[(8u << 20) + 12345] == std::byte{0});
        // Writes after that stick.
        ram.data()[(1u << 20) + 7] = std::byte{42};
        CHECK(ram.data()[(1u << 20) + 7] == std::byte{42});
        p.stop();
        CHECK(p.backend().counters().remove_events >= 2);
        CHECK(p.stats().snapshot().errors == 0);
    }

    TEST_CASE("unmapping a registered range while it is served")
    {
        SQUIB_REQUIRE_UFFD("uffd unmap");
        const auto& snap = shared_snapshot();
        anon_memory keep(8u << 20);
        anon_memory gone(8u << 20);
        uffd_pager<squib::mapped_file_source> p{open_source<squib::mapped_file_source>(snap.path), {},
                                                std::in_place, make_backend()};
        REQUIRE_FALSE(p.register_region({.base = keep.addr(), .size = keep.size()}));
        REQUIRE_FALSE(p.register_region({.base = gone.addr(), .size = gone.size(), .source_offset = 8u << 20}));
        REQUIRE_FALSE(p.start());
        CHECK(gone.data()[100] == snap.bytes[(8u << 20) + 100]);
        REQUIRE(::munmap(gone.data(), gone.size()) == 0);
        const std::uint64_t gone_addr = gone.addr();
        gone.release();
        // The other range goes on being served; the event was seen.
        CHECK(std::memcmp(keep.data(), snap.bytes.data(), keep.size()) == 0);
        CHECK(p.backend().counters().unmap_events == 1);
        CHECK_FALSE(p.backend().is_installed(gone_addr));
        // Unregistering the retired range is fine.
        CHECK_FALSE(p.unregister_region(gone_addr));
        CHECK(p.stats().snapshot().errors == 0);
    }

    TEST_CASE("shutdown while faults are pending returns, and destroying the pager releases the waiters")
    {
        SQUIB_REQUIRE_UFFD("uffd shutdown pending");
        const auto& snap = shared_snapshot();
        anon_memory ram(16 * page_4k);
        std::byte first{}, second{};
        std::thread t1, t2;
        {
            gated_source src{snap.bytes};
            uffd_pager<gated_source> p{src, {}, std::in_place, make_backend({.threads = 1})};
            REQUIRE_FALSE(p.register_region({.base = ram.addr(), .size = ram.size()}));
            REQUIRE_FALSE(p.start());
            t1 = std::thread([&] { first = ram.data()[0]; });   // held in the handler by the gate
            src.wait_entered(1);
            t2 = std::thread([&] { second = ram.data()[5 * page_4k]; }); // queued behind it
            p.request_shutdown();
            src.open();
            p.stop(); // the handler finishes the fault it holds, sees the shutdown, and leaves
            t1.join();
            CHECK(first == snap.bytes[0]);
        } // the userfaultfd closes: the kernel releases the queued fault as ordinary memory
        t2.join();
        CHECK(second == std::byte{0});
    }

    TEST_CASE("a fault the source cannot serve goes to the error callback")
    {
        SQUIB_REQUIRE_UFFD("uffd error callback");
        const auto& snap = shared_snapshot();
        anon_memory ram(16 * page_4k);
        unserved_log log;
        std::thread toucher;
        {
            // The region reaches past the end of the source: its last page is a short read.
            squib::memory_source short_src{std::span(snap.bytes).first(15 * page_4k)};
            uffd_pager<squib::memory_source> p{
                short_src, {}, std::in_place,
                make_backend({.on_unserved = &unserved_log::record, .on_unserved_context = &log})};
            REQUIRE_FALSE(p.register_region({.base = ram.addr(), .size = ram.size()}));
            REQUIRE_FALSE(p.start());
            CHECK(ram.data()[14 * page_4k] == snap.bytes[14 * page_4k]);
            toucher = std::thread([&] { static_cast<void>(*reinterpret_cast<volatile std::byte*>(ram.data() + 15 * page_4k + 8)); });
            log.wait_for(1);
            // userfaultfd reports the page, not the byte (no UFFD_FEATURE_EXACT_ADDRESS).
            CHECK(log.seen[0].first == ram.addr() + 15 * page_4k);
            CHECK(log.seen[0].second == squib::errc::short_read);
            p.stop();
            CHECK(p.backend().counters().unserved == 1);
            CHECK(p.stats().snapshot().errors == 1);
        }
        toucher.join(); // released when the userfaultfd closed
    }

    TEST_CASE("by default an unserved fault ends the process with the address and the error")
    {
        SQUIB_REQUIRE_UFFD("uffd default abort");
        squib::test::temp_dir dir;
        const std::string err_path = dir.file("stderr");
        const pid_t child = ::fork();
        REQUIRE(child >= 0);
        if (child == 0) {
            // The child: no doctest here, only the fault and the default callback.
            squib::test::default_crash_signals();
            FILE* err = std::freopen(err_path.c_str(), "w", stderr);
            if (err == nullptr) ::_exit(3);
            void* mem = ::mmap(nullptr, 4 * page_4k, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (mem == MAP_FAILED) ::_exit(4);
            std::vector<std::byte> two_pages(2 * page_4k);
            auto b = squib::uffd_backend::create();
            if (!b) ::_exit(5);
            uffd_pager<squib::memory_source> p{squib::memory_source{two_pages}, {}, std::in_place, std::move(*b)};
            if (p.register_region({.base = reinterpret_cast<std::uint64_t>(mem), .size = 4 * page_4k})) ::_exit(6);
            if (p.start()) ::_exit(7);
            static_cast<void>(*(static_cast<volatile std::byte*>(mem) + 3 * page_4k)); // past the source's end
            ::_exit(0);                                                                 // not reached
        }
        int status = 0;
        REQUIRE(::waitpid(child, &status, 0) == child);
        REQUIRE(WIFSIGNALED(status));
        CHECK(WTERMSIG(status) == SIGABRT);
        std::ifstream in(err_path);
        const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        CHECK(text.find("cannot serve the page fault at 0x") != std::string::npos);
        CHECK(text.find("short read") != std::string::npos);
    }

    TEST_CASE("prewarm installs pages so they never fault")
    {
        SQUIB_REQUIRE_UFFD("uffd prewarm");
        const auto& snap = shared_snapshot();
        anon_memory ram(4u << 20);
        uffd_pager<squib::file_source> p{open_source<squib::file_source>(snap.path), {}, std::in_place,
                                         make_backend()};
        REQUIRE_FALSE(p.register_region({.base = ram.addr(), .size = ram.size()}));
        const std::vector<std::uint64_t> pages{ram.addr(), ram.addr() + 10 * page_4k + 7, ram.addr() + (3u << 20)};
        const auto report = p.prewarm(pages); // before start, as before a guest's first instruction
        CHECK(report.installed == 3);
        REQUIRE_FALSE(p.start());
        CHECK(ram.data()[10 * page_4k + 7] == snap.bytes[10 * page_4k + 7]);
        CHECK(ram.data()[3u << 20] == snap.bytes[3u << 20]);
        CHECK(ram.data()[page_4k] == snap.bytes[page_4k]); // not prewarmed: one fault
        p.stop();
        CHECK(p.stats().snapshot().faults == 1);
        CHECK(p.stats().snapshot().prewarmed == 3);
    }

    TEST_CASE("adopt a userfaultfd received over a Unix socket from another process")
    {
        SQUIB_REQUIRE_UFFD("uffd adopt");
        const auto& snap = shared_snapshot();
        int sv[2];
        REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        constexpr std::uint64_t child_ram = 8u << 20;
        const pid_t child = ::fork();
        REQUIRE(child >= 0);
        if (child == 0) {
            // The child plays the VMM: creates and registers the userfaultfd, hands it over, touches its memory.
            squib::test::default_crash_signals();
            ::close(sv[0]);
            const int uffd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
            if (uffd < 0) ::_exit(10);
            uffdio_api api{};
            api.api = UFFD_API;
            api.features = UFFD_FEATURE_EVENT_REMOVE;
            if (::ioctl(uffd, UFFDIO_API, &api) != 0) ::_exit(11);
            auto* mem = static_cast<std::byte*>(
                ::mmap(nullptr, child_ram, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
            if (mem == MAP_FAILED) ::_exit(12);
            uffdio_register reg{};
            reg.range.start = reinterpret_cast<std::uint64_t>(mem);
            reg.range.len = child_ram;
            reg.mode = UFFDIO_REGISTER_MODE_MISSING;
            if (::ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) ::_exit(13);
            std::uint64_t base = reg.range.start;
            iovec iov{&base, sizeof base};
            alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
            msghdr msg{};
            msg.msg_iov = &iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control;
            msg.msg_controllen = sizeof control;
            cmsghdr* c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int));
            std::memcpy(CMSG_DATA(c), &uffd, sizeof uffd);
            if (::sendmsg(sv[1], &msg, 0) != static_cast<ssize_t>(sizeof base)) ::_exit(14);
            // Every page, in a scattered order, must come back as the snapshot has it.
            for (std::uint64_t i = 0; i < child_ram / page_4k; ++i) {
                const std::uint64_t page = (i * 7919) % (child_ram / page_4k);
                if (std::memcmp(mem + page * page_4k, snap.bytes.data() + page * page_4k, page_4k) != 0) ::_exit(20);
            }
            ::_exit(0);
        }
        ::close(sv[1]);
        std::uint64_t base = 0;
        iovec iov{&base, sizeof base};
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
        msghdr msg{};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        REQUIRE(::recvmsg(sv[0], &msg, MSG_CMSG_CLOEXEC) == static_cast<ssize_t>(sizeof base));
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        REQUIRE(c != nullptr);
        REQUIRE(c->cmsg_type == SCM_RIGHTS);
        int received = -1;
        std::memcpy(&received, CMSG_DATA(c), sizeof received);
        ::close(sv[0]);

        auto adopted = squib::uffd_backend::adopt(received, {.threads = 2});
        REQUIRE(adopted);
        CHECK_FALSE(adopted->owns_registration());
        uffd_pager<squib::mapped_file_source> p{open_source<squib::mapped_file_source>(snap.path), {},
                                                std::in_place, std::move(*adopted)};
        REQUIRE_FALSE(p.register_region({.base = base, .size = child_ram}));
        REQUIRE_FALSE(p.start());
        int status = 0;
        REQUIRE(::waitpid(child, &status, 0) == child);
        REQUIRE(WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 0);
        p.stop();
        CHECK(p.stats().snapshot().faults == child_ram / page_4k);
        CHECK(p.stats().snapshot().errors == 0);
    }

    TEST_CASE("adopt refuses what is not a userfaultfd; bad options are refused")
    {
        SQUIB_REQUIRE_UFFD("uffd adopt refusal");
        int pipefd[2];
        REQUIRE(::pipe2(pipefd, O_CLOEXEC) == 0);
        ::close(pipefd[1]);
        CHECK(squib::uffd_backend::adopt(pipefd[0]).error() == squib::uffd_errc::not_a_userfaultfd);
        CHECK(squib::uffd_backend::adopt(-1).error() == squib::uffd_errc::not_a_userfaultfd);
        CHECK(squib::uffd_backend::create({.threads = 0}).error() == std::errc::invalid_argument);
        CHECK(squib::uffd_backend::create({.fault_around_pages = 3}).error() == std::errc::invalid_argument);
        squib::uffd_backend empty;
        squib::detail::fault_handler_archetype h;
        CHECK(empty.start(h) == squib::errc::not_running);
        const std::byte page[16] = {};
        CHECK(empty.install(0x1000, page) == squib::errc::not_running);
    }

    TEST_CASE("stop returns at once with idle handler threads, then start is refused")
    {
        SQUIB_REQUIRE_UFFD("uffd stop idle");
        const auto& snap = shared_snapshot();
        anon_memory ram(16 * page_4k);
        // An hour's poll interval: the eventfd, not a timeout, must end the threads.
        uffd_pager<squib::memory_source> p{squib::memory_source{snap.bytes},
                                           squib::pager_options{.poll_interval = std::chrono::hours{1}}, std::in_place,
                                           make_backend({.threads = 4})};
        REQUIRE_FALSE(p.register_region({.base = ram.addr(), .size = ram.size()}));
        REQUIRE_FALSE(p.start());
        CHECK(p.start() == squib::errc::already_running);
        p.stop();
        CHECK(p.start() == squib::errc::shutting_down);
    }

    TEST_CASE("registering overlapping or bad ranges fails cleanly")
    {
        SQUIB_REQUIRE_UFFD("uffd register errors");
        anon_memory ram(16 * page_4k);
        std::vector<std::byte> bytes(16 * page_4k);
        uffd_pager<squib::memory_source> p{squib::memory_source{bytes}, {}, std::in_place, make_backend()};
        REQUIRE_FALSE(p.register_region({.base = ram.addr(), .size = 8 * page_4k}));
        CHECK(p.register_region({.base = ram.addr(), .size = 4 * page_4k}) == squib::errc::overlapping_region);
        // Not mapped at all: the kernel refuses, and the pager keeps nothing.
        const std::uint64_t unmapped = 0x10000;
        CHECK(p.register_region({.base = unmapped, .size = page_4k}));
        CHECK_FALSE(p.contains(unmapped));
        CHECK(p.region_count() == 1);
    }

    TEST_CASE("a fault whose range is unregistered meanwhile is released, not reported")
    {
        SQUIB_REQUIRE_UFFD("uffd unregister during fault");
        const auto& snap = shared_snapshot();
        anon_memory ram(16 * page_4k);
        unserved_log log;
        gated_source src{snap.bytes};
        uffd_pager<gated_source> p{src, {}, std::in_place,
                                   make_backend({.on_unserved = &unserved_log::record, .on_unserved_context = &log})};
        REQUIRE_FALSE(p.register_region({.base = ram.addr(), .size = ram.size()}));
        REQUIRE_FALSE(p.start());
        std::byte seen{0x55};
        std::thread toucher([&] { seen = ram.data()[3 * page_4k]; });
        src.wait_entered(1); // the handler holds the fault inside the source
        REQUIRE_FALSE(p.unregister_region(ram.addr()));
        src.open(); // UFFDIO_COPY now finds no registered range (ENOENT)
        toucher.join(); // woken: it faults again on memory that is now ordinary
        CHECK(seen == std::byte{0});
        p.stop();
        CHECK(log.seen.empty());
        CHECK(p.backend().counters().moot == 1);
    }

    TEST_CASE("fault-around never costs the faulting page when neighbours are past the source's end")
    {
        SQUIB_REQUIRE_UFFD("uffd fault-around past source end");
        const auto& snap = shared_snapshot();
        anon_memory ram(64 * page_4k);
        unserved_log log;
        squib::memory_source short_src{std::span(snap.bytes).first(15 * page_4k)};
        uffd_pager<squib::memory_source> p{
            short_src, {}, std::in_place,
            make_backend({.fault_around_pages = 16, .on_unserved = &unserved_log::record, .on_unserved_context = &log})};
        const std::uint64_t base = squib::align_up(ram.addr(), 16 * page_4k);
        REQUIRE_FALSE(p.register_region({.base = base, .size = 16 * page_4k}));
        REQUIRE_FALSE(p.start());
        // Page 14 is in the source; its 16-page block is not (page 15 is past the end).
        CHECK(*reinterpret_cast<volatile std::byte*>(base + 14 * page_4k + 3) == snap.bytes[14 * page_4k + 3]);
        CHECK(*reinterpret_cast<volatile std::byte*>(base + 2 * page_4k) == snap.bytes[2 * page_4k]);
        p.stop();
        CHECK(log.seen.empty());
    }
}
