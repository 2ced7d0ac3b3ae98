// The proof: a real KVM guest runs on memory restored lazily by the pager.
//
// The guest (examples/kvm_guest.hpp) reads and writes pages of its RAM and
// reports a checksum. It runs once on eagerly loaded memory, then on fresh
// memory registered with the userfaultfd backend and served from the snapshot
// file; checksum and final memory must match exactly.
#include <squib/backend/uffd.hpp>
#include <squib/core/pager.hpp>
#include <squib/index/flat.hpp>
#include <squib/source/file.hpp>
#include <squib/source/mapped_file.hpp>
#include <squib/stats/atomic.hpp>

#include "../../examples/kvm_guest.hpp"
#include "../support/support.hpp"
#include "../support/uffd.hpp"

#include <doctest/doctest.h>

#include <fcntl.h>

#include <cstring>
#include <string>
#include <vector>

namespace {

namespace kvm = squib::kvm_demo;
using squib::page_4k;

constexpr std::uint64_t ram_size = 32u << 20;

/// Why the KVM tests cannot run here, or empty when they can.
std::string kvm_unavailable()
{
    const int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fd < 0) return std::string("/dev/kvm: ") + std::strerror(errno);
    ::close(fd);
    return squib::test::uffd_unavailable();
}

#define SQUIB_REQUIRE_KVM(name)                                                                                        \
    do {                                                                                                               \
        if (auto why = kvm_unavailable(); !why.empty()) {                                                              \
            squib::test::skip(name, "KVM guest on userfaultfd memory not possible: " + why);                           \
            return;                                                                                                    \
        }                                                                                                              \
    } while (false)

/// The snapshot: RAM of pseudo-random bytes with the guest's code at its load address.
struct snapshot {
    squib::test::temp_dir dir;
    std::string path = dir.file("guest.mem");
    std::vector<std::byte> bytes = squib::test::pattern(ram_size);
    kvm::guest_program program = kvm::guest_program::walker();

    snapshot()
    {
        REQUIRE_FALSE(kvm::write_program(bytes, program));
        squib::test::write_file(path, bytes);
    }
};

const snapshot& shared_snapshot()
{
    static const snapshot s;
    return s;
}

/// What one run left behind.
struct outcome {
    kvm::run_report report;
    std::vector<std::byte> final_ram;
};

/// The eager run: the whole snapshot read into anonymous memory first.
outcome run_eager(const snapshot& snap, const kvm::walk_params& walk)
{
    squib::test::anon_memory ram(ram_size);
    std::memcpy(ram.data(), snap.bytes.data(), ram_size);
    auto vm = kvm::tiny_vm::create(ram.data(), ram_size);
    REQUIRE(vm);
    REQUIRE_FALSE(vm->load(snap.program.load_gpa, snap.program, walk));
    auto report = vm->run();
    REQUIRE(report);
    return {*report, std::vector<std::byte>(ram.data(), ram.data() + ram_size)};
}

template <class Source>
using guest_pager = squib::pager<Source, squib::flat_index, squib::uffd_backend, squib::atomic_stats>;

template <class Source>
Source open_source(const std::string& path)
{
    auto s = Source::open(path);
    REQUIRE(s);
    return std::move(*s);
}

} // namespace

TEST_SUITE("kvm_lazy_restore")
{
    TEST_CASE_TEMPLATE("a guest on lazily restored memory computes what it computes on eager memory", Source,
                       squib::file_source, squib::mapped_file_source)
    {
        SQUIB_REQUIRE_KVM("kvm lazy restore full walk");
        const auto& snap = shared_snapshot();
        for (auto order : {kvm::walk_order::sequential, kvm::walk_order::pseudo_random}) {
            CAPTURE(static_cast<int>(order));
            const kvm::walk_params walk{.first_page_gpa = 0x10000,
                                        .area_pages = 4096, // 16 MiB, every page of it
                                        .touch_pages = 4096,
                                        .order = order,
                                        .seed = 0x5eed};
            const auto model = kvm::expected_checksum(snap.program, walk, snap.bytes);
            REQUIRE(model);
            const outcome eager = run_eager(snap, walk);
            CHECK(eager.report.checksum == model->checksum);
            CHECK(eager.final_ram == model->final_ram);

            squib::test::anon_memory ram(ram_size);
            auto backend = squib::uffd_backend::create({.threads = 1});
            REQUIRE(backend);
            guest_pager<Source> pager{open_source<Source>(snap.path), {}, std::in_place, std::move(*backend)};
            REQUIRE_FALSE(pager.register_region({.base = ram.addr(), .size = ram_size}));
            REQUIRE_FALSE(pager.start());
            auto vm = kvm::tiny_vm::create(ram.data(), ram_size);
            REQUIRE(vm);
            REQUIRE_FALSE(vm->load(snap.program.load_gpa, snap.program, walk));
            auto lazy = vm->run();
            REQUIRE(lazy);
            CHECK(lazy->checksum == eager.report.checksum);
            // The host reads every byte: pages the guest never touched fault in from the snapshot now.
            CHECK(std::memcmp(ram.data(), eager.final_ram.data(), ram_size) == 0);
            pager.stop();
            CHECK(pager.stats().snapshot().errors == 0);
            CHECK(pager.stats().snapshot().faults >= kvm::touched_pages(snap.program, walk).size());
        }
    }

    TEST_CASE("a guest touching part of its RAM faults in exactly those pages")
    {
        SQUIB_REQUIRE_KVM("kvm lazy restore partial walk");
        const auto& snap = shared_snapshot();
        const kvm::walk_params walk{.first_page_gpa = 0x100000,
                                    .area_pages = 2048,
                                    .touch_pages = 300, // of 8192 pages of RAM
                                    .order = kvm::walk_order::pseudo_random,
                                    .seed = 7};
        const auto model = kvm::expected_checksum(snap.program, walk, snap.bytes);
        REQUIRE(model);
        const auto touched = kvm::touched_pages(snap.program, walk);

        squib::test::anon_memory ram(ram_size);
        auto backend = squib::uffd_backend::create();
        REQUIRE(backend);
        guest_pager<squib::mapped_file_source> pager{open_source<squib::mapped_file_source>(snap.path), {},
                                                     std::in_place, std::move(*backend)};
        REQUIRE_FALSE(pager.register_region({.base = ram.addr(), .size = ram_size}));
        REQUIRE_FALSE(pager.start());
        auto vm = kvm::tiny_vm::create(ram.data(), ram_size);
        REQUIRE(vm);
        REQUIRE_FALSE(vm->load(snap.program.load_gpa, snap.program, walk));
        auto lazy = vm->run();
        REQUIRE(lazy);
        CHECK(lazy->checksum == model->checksum);
        pager.stop(); // every fault the guest raised was served (it finished); the counts are final now

        // One fault per touched page, and nothing else was read from the snapshot.
        const auto s = pager.stats().snapshot();
        CHECK(s.faults == touched.size());
        CHECK(s.bytes_served == touched.size() * page_4k);
        std::size_t installed = 0;
        for (std::uint64_t gpa = 0; gpa < ram_size; gpa += page_4k) {
            const bool in = pager.backend().is_installed(ram.addr() + gpa);
            installed += in ? 1 : 0;
            const bool should = std::binary_search(touched.begin(), touched.end(), gpa);
            if (in != should) FAIL_CHECK("page " << gpa << " installed=" << in << " touched=" << should);
        }
        CHECK(installed == touched.size());
        // The pages it did touch hold exactly what the model says.
        for (std::uint64_t gpa : touched)
            REQUIRE(std::memcmp(ram.data() + gpa, model->final_ram.data() + gpa, page_4k) == 0);
    }

    TEST_CASE("prewarming the code page and fault-around give the same result")
    {
        SQUIB_REQUIRE_KVM("kvm lazy restore prewarm and fault-around");
        const auto& snap = shared_snapshot();
        const kvm::walk_params walk{.first_page_gpa = 0x200000,
                                    .area_pages = 1024,
                                    .touch_pages = 1024,
                                    .order = kvm::walk_order::sequential,
                                    .seed = 99};
        const auto model = kvm::expected_checksum(snap.program, walk, snap.bytes);
        REQUIRE(model);

        squib::test::anon_memory ram(ram_size);
        auto backend = squib::uffd_backend::create({.threads = 2, .fault_around_pages = 64});
        REQUIRE(backend);
        guest_pager<squib::mapped_file_source> pager{open_source<squib::mapped_file_source>(snap.path), {},
                                                     std::in_place, std::move(*backend)};
        REQUIRE_FALSE(pager.register_region({.base = ram.addr(), .size = ram_size}));
        // The code page before the first guest instruction.
        const std::vector<std::uint64_t> boot{ram.addr() + snap.program.load_gpa};
        CHECK(pager.prewarm(boot).installed == 1);
        REQUIRE_FALSE(pager.start());
        auto vm = kvm::tiny_vm::create(ram.data(), ram_size);
        REQUIRE(vm);
        REQUIRE_FALSE(vm->load(snap.program.load_gpa, snap.program, walk));
        auto lazy = vm->run();
        REQUIRE(lazy);
        CHECK(lazy->checksum == model->checksum);
        pager.stop();
        const auto s = pager.stats().snapshot();
        CHECK(s.prewarmed == 1);
        CHECK(s.errors == 0);
        // 1024 pages in 64-page clusters: 16 faults, give or take a race between the two handlers.
        CHECK(s.faults >= 16);
        CHECK(s.faults <= 32);
        for (std::uint64_t p = 0; p < walk.area_pages; ++p) {
            const std::uint64_t gpa = walk.first_page_gpa + p * page_4k;
            REQUIRE(std::memcmp(ram.data() + gpa, model->final_ram.data() + gpa, page_4k) == 0);
        }
    }
}
