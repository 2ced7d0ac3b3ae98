// Integration tests for the KVM demo guest and VM (examples/kvm_guest.hpp):
// the guest against its C++ model on real KVM, partial touches, error exits.
//
// Without a usable /dev/kvm each KVM test says why and skips, and prints
// `SQUIB-SKIP: <test>: /dev/kvm not available` for scripts to count.
#include "../../examples/kvm_guest.hpp"

#include "../support/support.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

namespace kd = squib::kvm_demo;
using kd::guest_program;
using kd::tiny_vm;
using kd::walk_order;
using kd::walk_params;

constexpr std::uint64_t page = kd::guest_page_size;
constexpr std::uint64_t ram_size = 16ull << 20;

static_assert(!std::is_copy_constructible_v<tiny_vm> && std::is_nothrow_move_constructible_v<tiny_vm>,
              "tiny_vm owns fds and a mapping: move-only");
static_assert(kd::walker_code.size() == 36, "the listing in kvm_guest.hpp and the bytes must agree");

/// True when /dev/kvm opens; otherwise reports the skip to doctest and on stdout.
bool kvm_available()
{
    const int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fd >= 0) {
        ::close(fd);
        return true;
    }
    const std::string reason = std::strerror(errno);
    const auto* test = doctest::getContextOptions()->currentTest;
    const char* name = test != nullptr ? test->m_name : "?";
    MESSAGE("skipped: /dev/kvm not available: " << reason);
    std::printf("SQUIB-SKIP: %s: /dev/kvm not available\n", name);
    std::fflush(stdout);
    return false;
}

#define REQUIRE_KVM()                                                                                                  \
    do {                                                                                                               \
        if (!kvm_available()) return;                                                                                  \
    } while (false)

/// Page-aligned anonymous guest RAM, nothing resident until touched.
class guest_ram {
public:
    explicit guest_ram(std::uint64_t size) : size_(size)
    {
        void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        REQUIRE(p != MAP_FAILED);
        // 4 KiB pages only, so mincore() shows exactly the pages someone touched.
        REQUIRE(::madvise(p, size, MADV_NOHUGEPAGE) == 0);
        data_ = static_cast<std::byte*>(p);
    }
    guest_ram(const guest_ram&) = delete;
    guest_ram& operator=(const guest_ram&) = delete;
    ~guest_ram() { ::munmap(data_, size_); }

    [[nodiscard]] std::byte* data() const noexcept { return data_; }
    [[nodiscard]] std::span<std::byte> span() const noexcept { return {data_, size_}; }

    void assign(std::span<const std::byte> bytes) const
    {
        REQUIRE(bytes.size() == size_);
        std::memcpy(data_, bytes.data(), size_);
    }

    /// Guest-physical addresses of the resident pages.
    [[nodiscard]] std::vector<std::uint64_t> resident_pages() const
    {
        std::vector<unsigned char> vec(size_ / page);
        REQUIRE(::mincore(data_, size_, vec.data()) == 0);
        std::vector<std::uint64_t> out;
        for (std::size_t i = 0; i < vec.size(); ++i)
            if ((vec[i] & 1u) != 0) out.push_back(i * page);
        return out;
    }

private:
    std::byte* data_ = nullptr;
    std::uint64_t size_;
};

/// Offset of the first differing byte, or -1 when equal; a failed check then
/// names the place instead of dumping megabytes.
std::int64_t first_difference(std::span<const std::byte> a, std::span<const std::byte> b)
{
    if (a.size() != b.size()) return 0;
    const auto [ia, ib] = std::mismatch(a.begin(), a.end(), b.begin());
    return ia == a.end() ? -1 : static_cast<std::int64_t>(ia - a.begin());
}

/// A generous hang guard: a broken guest fails the test instead of wedging the run.
kd::run_options guarded()
{
    kd::run_options o;
    o.timeout = std::chrono::seconds(120);
    return o;
}

/// The snapshot image every eager test starts from: the test pattern, with
/// the walker's code at its load address.
std::vector<std::byte> initial_image(const guest_program& prog)
{
    auto image = squib::test::pattern(ram_size);
    REQUIRE(!kd::write_program(image, prog));
    return image;
}

walk_params sequential_walk()
{
    // Everything from 64 KiB to the end of RAM.
    return {.first_page_gpa = 0x10000,
            .area_pages = (ram_size - 0x10000) / page,
            .touch_pages = (ram_size - 0x10000) / page,
            .order = walk_order::sequential,
            .seed = 0x5eed0001};
}

walk_params random_walk()
{
    // The upper 8 MiB, every page once in LCG order.
    return {.first_page_gpa = ram_size / 2,
            .area_pages = ram_size / 2 / page,
            .touch_pages = ram_size / 2 / page,
            .order = walk_order::pseudo_random,
            .seed = 0x5eed0002};
}

template <std::size_t N>
constexpr std::array<std::byte, N> code_bytes(const std::uint8_t (&in)[N])
{
    std::array<std::byte, N> out{};
    for (std::size_t i = 0; i < N; ++i) out[i] = std::byte{in[i]};
    return out;
}

/// Loads `code` at the default address and runs it with an empty walk.
std::error_code run_code(std::span<const std::byte> code, kd::run_options options = guarded())
{
    guest_ram ram(ram_size);
    const guest_program prog{code, kd::default_load_gpa};
    REQUIRE(!kd::write_program(ram.span(), prog));
    auto vm = tiny_vm::create(ram.data(), ram_size);
    REQUIRE(vm);
    const walk_params none{.first_page_gpa = 0x10000, .area_pages = 1, .touch_pages = 0};
    REQUIRE(!vm->load(prog.load_gpa, prog, none));
    auto rep = vm->run(options);
    const std::string last_exit = fmt::format("{}", vm->last_exit());
    INFO("last exit: " << last_exit);
    CHECK(!rep);
    return rep.error();
}

} // namespace

TEST_SUITE("kvm_guest")
{
    // ---- the model and the checks, no KVM needed ----------------------------

    TEST_CASE("model: a pseudo-random walk over the whole area visits every page once")
    {
        for (const std::uint64_t area : {1ull, 2ull, 4ull, 1024ull, 4096ull}) {
            const walk_params walk{.first_page_gpa = 0x10000, .area_pages = area, .touch_pages = area,
                                   .order = walk_order::pseudo_random};
            auto pages = kd::visited_pages(walk);
            CHECK(pages.front() == 0x10000);
            std::sort(pages.begin(), pages.end());
            std::vector<std::uint64_t> all;
            for (std::uint64_t i = 0; i < area; ++i) all.push_back(0x10000 + i * page);
            CHECK(pages == all);
        }
    }

    TEST_CASE("model: touched pages are the code page plus the visited pages")
    {
        const auto prog = guest_program::walker();
        const walk_params walk{.first_page_gpa = 0x10000, .area_pages = 8, .touch_pages = 3};
        CHECK(kd::touched_pages(prog, walk) == std::vector<std::uint64_t>{0x1000, 0x10000, 0x11000, 0x12000});
    }

    TEST_CASE("model: every visited page changes in its last word only, in a checksum-dependent way")
    {
        const auto prog = guest_program::walker();
        const auto walk = random_walk();
        const auto initial = initial_image(prog);
        auto model = kd::expected_checksum(prog, walk, initial);
        REQUIRE(model);
        CHECK(model->checksum != walk.seed);
        const auto visited = kd::visited_pages(walk);
        std::vector<bool> is_visited(ram_size / page);
        for (auto gpa : visited) is_visited[gpa / page] = true;
        for (std::uint64_t p = 0; p < ram_size / page; ++p) {
            const std::span<const std::byte> before(initial.data() + p * page, page);
            const std::span<const std::byte> after(model->final_ram.data() + p * page, page);
            if (is_visited[p]) {
                CHECK(first_difference(before.first(page - 4), after.first(page - 4)) == -1);
            } else if (first_difference(before, after) != -1) {
                FAIL("unvisited page " << p << " changed");
            }
        }
        // A different first word anywhere changes the result: the guest cannot fake its reads.
        auto tampered = initial;
        tampered[visited.back()] ^= std::byte{1};
        auto other = kd::expected_checksum(prog, walk, tampered);
        REQUIRE(other);
        CHECK(other->checksum != model->checksum);
    }

    TEST_CASE("validate rejects walks that do not fit or overlap the code")
    {
        const auto prog = guest_program::walker();
        const auto ok = sequential_walk();
        CHECK(!kd::validate(prog, ok, ram_size));
        const std::error_code bad = kd::errc::bad_program;

        auto w = ok;
        w.first_page_gpa = 0x10010; // unaligned
        CHECK(kd::validate(prog, w, ram_size) == bad);
        w = ok;
        w.area_pages += 1; // one page past the end of RAM
        CHECK(kd::validate(prog, w, ram_size) == bad);
        w = ok;
        w.touch_pages = w.area_pages + 1;
        CHECK(kd::validate(prog, w, ram_size) == bad);
        w = ok;
        w.area_pages = 0;
        w.touch_pages = 0;
        CHECK(kd::validate(prog, w, ram_size) == bad);
        w = ok;
        w.first_page_gpa = 0; // covers the code page
        CHECK(kd::validate(prog, w, ram_size) == bad);
        w = random_walk();
        w.area_pages = 3; // not a power of two
        w.touch_pages = 3;
        CHECK(kd::validate(prog, w, ram_size) == bad);
        CHECK(kd::validate(guest_program::walker(ram_size - 8), ok, ram_size) == bad); // code runs off the end
        std::vector<std::byte> small(page);
        CHECK(kd::write_program(small, guest_program::walker()) == bad);
    }

    TEST_CASE("create rejects null, unaligned and badly sized RAM before touching /dev/kvm")
    {
        guest_ram ram(ram_size);
        const std::error_code bad = kd::errc::bad_ram;
        CHECK(tiny_vm::create(nullptr, ram_size).error() == bad);
        CHECK(tiny_vm::create(ram.data() + 1, ram_size - page).error() == bad);
        CHECK(tiny_vm::create(ram.data() + 2048, ram_size - page).error() == bad);
        CHECK(tiny_vm::create(ram.data(), 0).error() == bad);
        CHECK(tiny_vm::create(ram.data(), page + 1).error() == bad);
        CHECK(tiny_vm::create(ram.data(), kd::max_ram_size + page).error() == bad);
        CHECK(ram.resident_pages().empty()); // create() never touches guest memory
    }

    TEST_CASE("an empty VM reports errors instead of crashing")
    {
        tiny_vm vm;
        const auto prog = guest_program::walker();
        CHECK(vm.load(prog.load_gpa, prog, sequential_walk()) == std::error_code(kd::errc::not_created));
        CHECK(vm.run().error() == std::error_code(kd::errc::not_created));
    }

    TEST_CASE("error codes have their own category and messages")
    {
        const std::error_code ec = kd::errc::exit_shutdown;
        CHECK(std::string(ec.category().name()) == "squib-kvm-demo");
        CHECK(ec.message().find("KVM_EXIT_SHUTDOWN") != std::string::npos);
        CHECK(std::string(kd::exit_reason_name(KVM_EXIT_MMIO)) == "KVM_EXIT_MMIO");
        CHECK(fmt::format("{}", kd::run_report{.checksum = 0xab, .exits = 3}).find("checksum=0x000000ab") == 0);
    }

    // ---- on KVM -------------------------------------------------------------

    TEST_CASE("eager sequential and pseudo-random walks over 16 MiB match the model exactly")
    {
        REQUIRE_KVM();
        const auto prog = guest_program::walker();
        const auto initial = initial_image(prog);
        for (const auto& walk : {sequential_walk(), random_walk()}) {
            const std::string order = walk.order == walk_order::sequential ? "sequential" : "pseudo_random";
            INFO("order " << order);
            guest_ram ram(ram_size);
            ram.assign(initial);
            auto vm = tiny_vm::create(ram.data(), ram_size);
            REQUIRE(vm);
            REQUIRE(!vm->load(prog.load_gpa, prog, walk));
            auto rep = vm->run(guarded());
            INFO("last exit: " << fmt::format("{}", vm->last_exit()));
            REQUIRE(rep);
            MESSAGE(fmt::format("{} pages: {}", walk.touch_pages, *rep));

            auto model = kd::expected_checksum(prog, walk, initial);
            REQUIRE(model);
            CHECK(rep->checksum == model->checksum);
            CHECK(first_difference(ram.span(), model->final_ram) == -1);
            CHECK(first_difference(ram.span(), initial) != -1); // the guest really wrote
        }
    }

    TEST_CASE("the first-instruction marker comes before the result, then hlt")
    {
        REQUIRE_KVM();
        const auto prog = guest_program::walker();
        guest_ram ram(ram_size);
        ram.assign(initial_image(prog));
        auto vm = tiny_vm::create(ram.data(), ram_size);
        REQUIRE(vm);
        REQUIRE(!vm->load(prog.load_gpa, prog, random_walk()));
        auto rep = vm->run(guarded());
        REQUIRE(rep);
        CHECK(rep->marker_exit == 1);
        CHECK(rep->result_exit == 2);
        CHECK(rep->exits == 3);
        CHECK(rep->first_instruction_ns > 0);
        CHECK(rep->first_instruction_ns <= rep->total_ns);
        CHECK(vm->last_exit().reason == KVM_EXIT_HLT);
        CHECK(vm->run().error() == std::error_code(kd::errc::not_loaded)); // finished; load() again to rerun
    }

    TEST_CASE("a partial walk touches only its pages: KVM faults in nothing else, the rest is unchanged")
    {
        REQUIRE_KVM();
        const auto prog = guest_program::walker();
        auto partial_random = random_walk();
        partial_random.touch_pages = 300;
        auto partial_sequential = sequential_walk();
        partial_sequential.touch_pages = 100;
        for (const auto& walk : {partial_random, partial_sequential}) {
            const std::string order = walk.order == walk_order::sequential ? "sequential" : "pseudo_random";
            INFO("order " << order);
            const auto touched = kd::touched_pages(prog, walk);
            REQUIRE(touched.size() == walk.touch_pages + 1);

            // The host writes exactly the pages the guest will touch; the rest stays unpopulated.
            guest_ram ram(ram_size);
            std::vector<std::byte> initial(ram_size);
            for (auto gpa : touched) {
                const auto bytes = squib::test::pattern(page, gpa);
                std::copy(bytes.begin(), bytes.end(), initial.begin() + static_cast<std::ptrdiff_t>(gpa));
            }
            REQUIRE(!kd::write_program(initial, prog));
            for (auto gpa : touched) std::memcpy(ram.data() + gpa, initial.data() + gpa, page);
            REQUIRE(ram.resident_pages() == touched);

            auto vm = tiny_vm::create(ram.data(), ram_size);
            REQUIRE(vm);
            REQUIRE(!vm->load(prog.load_gpa, prog, walk));
            auto rep = vm->run(guarded());
            REQUIRE(rep);
            CHECK(ram.resident_pages() == touched); // nothing else was faulted in, not even for reading

            auto model = kd::expected_checksum(prog, walk, initial);
            REQUIRE(model);
            CHECK(rep->checksum == model->checksum);
            CHECK(first_difference(ram.span(), model->final_ram) == -1);
        }
    }

    TEST_CASE("a partial walk over patterned RAM leaves every other page byte-for-byte unchanged")
    {
        REQUIRE_KVM();
        const auto prog = guest_program::walker();
        auto walk = random_walk();
        walk.touch_pages = 17;
        const auto initial = initial_image(prog);
        guest_ram ram(ram_size);
        ram.assign(initial);
        auto vm = tiny_vm::create(ram.data(), ram_size);
        REQUIRE(vm);
        REQUIRE(!vm->load(prog.load_gpa, prog, walk));
        auto rep = vm->run(guarded());
        REQUIRE(rep);

        const auto visited = kd::visited_pages(walk);
        std::size_t changed = 0;
        for (std::uint64_t gpa = 0; gpa < ram_size; gpa += page) {
            const bool was_visited = std::find(visited.begin(), visited.end(), gpa) != visited.end();
            const auto diff = first_difference(ram.span().subspan(gpa, page), std::span(initial).subspan(gpa, page));
            if (diff != -1) {
                ++changed;
                CHECK(was_visited);
                CHECK(static_cast<std::uint64_t>(diff) >= kd::write_offset);
            }
        }
        CHECK(changed <= walk.touch_pages);
        auto model = kd::expected_checksum(prog, walk, initial);
        REQUIRE(model);
        CHECK(rep->checksum == model->checksum);
    }

    TEST_CASE("a walk of zero pages reports its seed and writes nothing")
    {
        REQUIRE_KVM();
        const auto prog = guest_program::walker();
        auto walk = sequential_walk();
        walk.touch_pages = 0;
        const auto initial = initial_image(prog);
        guest_ram ram(ram_size);
        ram.assign(initial);
        auto vm = tiny_vm::create(ram.data(), ram_size);
        REQUIRE(vm);
        REQUIRE(!vm->load(prog.load_gpa, prog, walk));
        auto rep = vm->run(guarded());
        REQUIRE(rep);
        CHECK(rep->checksum == walk.seed);
        CHECK(first_difference(ram.span(), initial) == -1);
    }

    TEST_CASE("reloading the same image and rerunning, or moving the VM, reproduces the run")
    {
        REQUIRE_KVM();
        const auto prog = guest_program::walker();
        const auto walk = random_walk();
        const auto initial = initial_image(prog);
        guest_ram ram(ram_size);
        ram.assign(initial);
        auto created = tiny_vm::create(ram.data(), ram_size);
        REQUIRE(created);
        tiny_vm vm = std::move(*created);
        CHECK(created->run().error() == std::error_code(kd::errc::not_created)); // moved from
        REQUIRE(!vm.load(prog.load_gpa, prog, walk));
        auto first = vm.run(guarded());
        REQUIRE(first);

        ram.assign(initial); // "restore the snapshot" into the same memory
        REQUIRE(!vm.load(prog.load_gpa, prog, walk));
        auto second = vm.run(guarded());
        REQUIRE(second);
        CHECK(second->checksum == first->checksum);
        auto model = kd::expected_checksum(prog, walk, initial);
        REQUIRE(model);
        CHECK(first_difference(ram.span(), model->final_ram) == -1);
    }

    TEST_CASE("garbage code or a rip outside RAM ends in an error, not a crash or a hang")
    {
        REQUIRE_KVM();
        const std::error_code shutdown = kd::errc::exit_shutdown;
        const std::error_code internal = kd::errc::exit_internal_error;
        const std::error_code mmio = kd::errc::exit_mmio;

        SUBCASE("0xff bytes at rip: #UD, no IDT, triple fault")
        {
            static const std::array<std::byte, 64> garbage = [] {
                std::array<std::byte, 64> a{};
                a.fill(std::byte{0xff});
                return a;
            }();
            const auto ec = run_code(garbage);
            INFO("error: " << ec);
            CHECK((ec == shutdown || ec == internal));
        }
        SUBCASE("rip past the end of RAM")
        {
            guest_ram ram(ram_size);
            const auto prog = guest_program::walker();
            REQUIRE(!kd::write_program(ram.span(), prog));
            auto vm = tiny_vm::create(ram.data(), ram_size);
            REQUIRE(vm);
            REQUIRE(!vm->load(ram_size + 0x1000, prog, sequential_walk()));
            auto rep = vm->run(guarded());
            REQUIRE(!rep);
            INFO("error: " << rep.error() << ", last exit: " << fmt::format("{}", vm->last_exit()));
            CHECK((rep.error() == shutdown || rep.error() == internal || rep.error() == mmio));
        }
    }

    TEST_CASE("a guest that breaks the port protocol is reported precisely")
    {
        REQUIRE_KVM();
        static constexpr std::uint8_t wrong_port[] = {0xe6, 0x12, 0xf4};     // out 0x12, al; hlt
        static constexpr std::uint8_t no_marker[] = {0xe7, 0x10, 0xf4};      // out 0x10, eax; hlt
        static constexpr std::uint8_t no_result[] = {0xe6, 0x11, 0xf4};      // out 0x11, al; hlt
        static constexpr std::uint8_t two_markers[] = {0xe6, 0x11, 0xe6, 0x11, 0xf4};
        static constexpr std::uint8_t reads_port[] = {0xe6, 0x11, 0xe4, 0x10, 0xf4}; // in al, 0x10
        static constexpr auto a = code_bytes(wrong_port);
        static constexpr auto b = code_bytes(no_marker);
        static constexpr auto c = code_bytes(no_result);
        static constexpr auto d = code_bytes(two_markers);
        static constexpr auto e = code_bytes(reads_port);
        CHECK(run_code(a) == std::error_code(kd::errc::unexpected_io));
        CHECK(run_code(b) == std::error_code(kd::errc::marker_missing));
        CHECK(run_code(c) == std::error_code(kd::errc::no_result));
        CHECK(run_code(d) == std::error_code(kd::errc::unexpected_io));
        CHECK(run_code(e) == std::error_code(kd::errc::unexpected_io));
    }

    TEST_CASE("a guest spinning without exits is stopped by the timeout, and the VM stays usable")
    {
        REQUIRE_KVM();
        static constexpr std::uint8_t spin[] = {0xe6, 0x11, 0xeb, 0xfe}; // out 0x11, al; jmp $
        static constexpr auto spin_code = code_bytes(spin);
        const auto prog = guest_program::walker();
        const guest_program spinner{spin_code, 0x2000};
        const auto initial = initial_image(prog);
        guest_ram ram(ram_size);
        ram.assign(initial);
        REQUIRE(!kd::write_program(ram.span(), spinner));
        auto vm = tiny_vm::create(ram.data(), ram_size);
        REQUIRE(vm);

        const walk_params none{.first_page_gpa = 0x10000, .area_pages = 1, .touch_pages = 0};
        REQUIRE(!vm->load(spinner.load_gpa, spinner, none));
        kd::run_options quick;
        quick.timeout = std::chrono::milliseconds(20);
        CHECK(vm->run(quick).error() == std::error_code(kd::errc::timed_out));

        const auto walk = sequential_walk();
        REQUIRE(!vm->load(prog.load_gpa, prog, walk));
        auto rep = vm->run(guarded());
        REQUIRE(rep);
        auto model = kd::expected_checksum(prog, walk, initial);
        REQUIRE(model);
        CHECK(rep->checksum == model->checksum);
    }
}
