// The main demo: a KVM guest restored lazily from a snapshot file.
//
//   kvm_lazy_restore [--ram-mib N] [--touch-pages N] [--order seq|rand]
//                    [--fault-around PAGES] [--threads N] [--dir DIR]
//
// 1. Builds a snapshot: guest RAM of pseudo-random bytes with a tiny 32-bit
//    guest program in it (examples/kvm_guest.hpp), written to DIR/guest.mem.
// 2. Eager restore: reads the whole file into guest RAM, runs the guest.
// 3. Lazy restore: fresh guest RAM registered with the userfaultfd backend,
//    the snapshot file as the source (mapped, then read with pread), the
//    code page prewarmed, and the same guest run; pages come in on first touch.
// Prints the two side by side and checks checksum and memory are identical.
// Without /dev/kvm it says so and restores process memory instead: a host
// thread runs the same walk on the lazily restored memory.
#include <squib/backend/uffd.hpp>
#include <squib/pager.hpp>

#include "kvm_guest.hpp"

#include <fmt/format.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace {

namespace kvm = squib::kvm_demo;
using clock_type = std::chrono::steady_clock;

struct args {
    std::uint64_t ram_mib = 256;
    std::uint64_t touch_pages = 0; // 0: the whole walk area
    kvm::walk_order order = kvm::walk_order::pseudo_random;
    std::uint64_t fault_around = 1;
    unsigned threads = 1;
    std::string dir;
};

[[noreturn]] void usage()
{
    fmt::print(stderr, "usage: kvm_lazy_restore [--ram-mib N] [--touch-pages N] [--order seq|rand] "
                       "[--fault-around PAGES] [--threads N] [--dir DIR]\n");
    std::exit(2);
}

args parse(int argc, char** argv)
{
    args a;
    for (int i = 1; i < argc; ++i) {
        const std::string_view flag = argv[i];
        if (i + 1 >= argc) usage();
        const std::string value = argv[++i];
        if (flag == "--ram-mib") a.ram_mib = std::strtoull(value.c_str(), nullptr, 10);
        else if (flag == "--touch-pages") a.touch_pages = std::strtoull(value.c_str(), nullptr, 10);
        else if (flag == "--order" && (value == "seq" || value == "rand"))
            a.order = value == "seq" ? kvm::walk_order::sequential : kvm::walk_order::pseudo_random;
        else if (flag == "--fault-around") a.fault_around = std::strtoull(value.c_str(), nullptr, 10);
        else if (flag == "--threads") a.threads = static_cast<unsigned>(std::strtoul(value.c_str(), nullptr, 10));
        else if (flag == "--dir") a.dir = value;
        else usage();
    }
    // The walk area is a power of two of pages for the random order; RAM must hold it past 1 MiB.
    if (a.ram_mib < 4 || a.ram_mib > 3072 || a.threads == 0 || !squib::is_power_of_two(a.fault_around)) usage();
    return a;
}

double ms(std::uint64_t ns) { return static_cast<double>(ns) / 1e6; }
std::uint64_t ns_since(clock_type::time_point t0)
{
    return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(clock_type::now() - t0).count());
}

/// Anonymous guest RAM, unmapped on destruction.
struct guest_ram {
    explicit guest_ram(std::uint64_t n) : size(n)
    {
        void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            fmt::print(stderr, "mmap of {} bytes failed\n", n);
            std::exit(1);
        }
        data = static_cast<std::byte*>(p);
        ::madvise(p, n, MADV_NOHUGEPAGE); // 4 KiB pages, as the pager installs them
    }
    ~guest_ram() { ::munmap(data, size); }
    guest_ram(const guest_ram&) = delete;
    guest_ram& operator=(const guest_ram&) = delete;
    [[nodiscard]] std::uint64_t addr() const { return reinterpret_cast<std::uint64_t>(data); } // for regions
    std::byte* data = nullptr;
    std::uint64_t size;
};

/// One restore's figures.
struct row {
    std::string name;
    double setup_ms = 0;       // restore start to guest memory ready (loaded, or registered and the pager started)
    double first_insn_ms = 0;  // restore start to the guest's first instruction
    double total_ms = 0;       // restore start to the guest's final hlt
    std::uint64_t faults = 0;
    std::uint32_t checksum = 0;
    bool memory_matches = false;
};

template <class Fn>
[[noreturn]] void die(std::string_view what, Fn&& detail)
{
    fmt::print(stderr, "kvm_lazy_restore: {}: {}\n", what, detail());
    std::exit(1);
}

/// Runs the guest (or, without KVM, the host-side walk) on `ram`.
struct run_result {
    std::uint32_t checksum = 0;
    std::uint64_t first_insn_ns = 0; // from the start of the restore (`t0`), VM creation included
};

run_result run_guest(bool use_kvm, guest_ram& ram, const kvm::guest_program& prog, const kvm::walk_params& walk,
                     clock_type::time_point t0)
{
    if (!use_kvm) {
        auto sum = kvm::simulate(prog, walk, std::span(ram.data, ram.size));
        if (!sum) die("walk", [&] { return sum.error().message(); });
        return {*sum, 0};
    }
    auto vm = kvm::tiny_vm::create(ram.data, ram.size);
    if (!vm) die("create VM", [&] { return vm.error().message(); });
    if (auto ec = vm->load(prog.load_gpa, prog, walk)) die("load guest", [&] { return ec.message(); });
    const std::uint64_t before_run = ns_since(t0);
    auto report = vm->run();
    if (!report) die("run guest", [&] { return report.error().message(); });
    return {report->checksum, before_run + report->first_instruction_ns};
}

template <class Source>
row lazy_restore(const std::string& name, Source source, bool use_kvm, const args& a, const kvm::guest_program& prog,
                 const kvm::walk_params& walk, std::span<const std::byte> eager_final)
{
    using pager_type = squib::pager<Source, squib::flat_index, squib::uffd_backend, squib::histogram_stats>;
    row r;
    r.name = name;
    const auto t0 = clock_type::now();
    guest_ram ram(a.ram_mib << 20);
    auto backend = squib::uffd_backend::create({.threads = a.threads, .fault_around_pages = a.fault_around});
    if (!backend) die("userfaultfd", [&] { return backend.error().message(); });
    pager_type pager{std::move(source), {}, std::in_place, std::move(*backend)};
    if (auto ec = pager.register_region({.base = ram.addr(), .size = ram.size}))
        die("register guest RAM", [&] { return ec.message(); });
    // The page the vCPU starts on, before its first instruction.
    const std::vector<std::uint64_t> boot{ram.addr() + prog.load_gpa};
    const auto warm = pager.prewarm(boot);
    if (warm.failed != 0) die("prewarm", [&] { return warm.first_error.message(); });
    if (auto ec = pager.start()) die("start pager", [&] { return ec.message(); });
    const std::uint64_t setup_ns = ns_since(t0);

    const run_result run = run_guest(use_kvm, ram, prog, walk, t0);
    r.total_ms = ms(ns_since(t0));
    r.setup_ms = ms(setup_ns);
    r.first_insn_ms = use_kvm ? ms(run.first_insn_ns) : 0;
    r.checksum = run.checksum;
    // The guest is done, so every fault it raised has been served; the handler
    // may still be bumping the counter of the very last one.
    r.faults = pager.stats().snapshot().counters.faults;
    // Reading every byte faults in the pages the guest never touched, from the snapshot.
    r.memory_matches = std::memcmp(ram.data, eager_final.data(), ram.size) == 0;
    pager.stop();
    return r;
}

} // namespace

int main(int argc, char** argv)
{
    const args a = parse(argc, argv);
    const std::uint64_t ram_size = a.ram_mib << 20;
    const int kvm_fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
    const bool use_kvm = kvm_fd >= 0;
    if (use_kvm) ::close(kvm_fd);
    else
        fmt::print("NOTE: /dev/kvm is not available ({}): restoring process memory instead, a host thread "
                   "running the guest's walk.\n",
                   std::strerror(errno));

    // The walk covers the largest power of two of pages that fits above 1 MiB.
    std::uint64_t area = 1;
    while ((area * 2) * squib::page_4k + (1u << 20) <= ram_size) area *= 2;
    const kvm::walk_params walk{.first_page_gpa = 1u << 20,
                                .area_pages = area,
                                .touch_pages = a.touch_pages != 0 ? std::min(a.touch_pages, area) : area,
                                .order = a.order,
                                .seed = 0x5eed};
    const kvm::guest_program prog = kvm::guest_program::walker();

    // 1. The snapshot file.
    const std::string dir = !a.dir.empty() ? a.dir : std::filesystem::temp_directory_path().string();
    const std::string path = dir + "/squib-guest-" + std::to_string(::getpid()) + ".mem";
    {
        std::vector<std::byte> bytes(ram_size);
        std::mt19937_64 rng(2026);
        for (std::uint64_t i = 0; i < ram_size; i += 8) {
            const std::uint64_t v = rng();
            std::memcpy(bytes.data() + i, &v, sizeof v);
        }
        if (auto ec = kvm::write_program(bytes, prog)) die("write program", [&] { return ec.message(); });
        std::ofstream out(path, std::ios::binary | std::ios::trunc);
        out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size())); // bytes as chars
        if (!out) die("write snapshot", [&] { return path; });
    }
    struct remove_file {
        std::string p;
        ~remove_file() { std::filesystem::remove(p); }
    } cleanup{path};

    // 2. Eager: the whole file read into guest RAM first.
    row eager;
    eager.name = "eager";
    std::vector<std::byte> eager_final;
    {
        const auto t0 = clock_type::now();
        guest_ram ram(ram_size);
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) die("open snapshot", [&] { return std::strerror(errno); });
        for (std::uint64_t done = 0; done < ram_size;) {
            const ssize_t n = ::pread(fd, ram.data + done, ram_size - done, static_cast<off_t>(done));
            if (n <= 0) die("read snapshot", [&] { return std::strerror(errno); });
            done += static_cast<std::uint64_t>(n);
        }
        ::close(fd);
        const std::uint64_t setup_ns = ns_since(t0);
        const run_result run = run_guest(use_kvm, ram, prog, walk, t0);
        eager.total_ms = ms(ns_since(t0));
        eager.setup_ms = ms(setup_ns);
        eager.first_insn_ms = use_kvm ? ms(run.first_insn_ns) : 0;
        eager.checksum = run.checksum;
        eager.memory_matches = true;
        eager_final.assign(ram.data, ram.data + ram_size);
    }

    // 3. Lazy, from the page cache through a mapping, then through pread.
    auto mapped = squib::mapped_file_source::open(path);
    if (!mapped) die("map snapshot", [&] { return mapped.error().message(); });
    const row lazy_mapped = lazy_restore("lazy (mapped file)", std::move(*mapped), use_kvm, a, prog, walk, eager_final);
    auto file = squib::file_source::open(path);
    if (!file) die("open snapshot", [&] { return file.error().message(); });
    const row lazy_file = lazy_restore("lazy (pread)", std::move(*file), use_kvm, a, prog, walk, eager_final);

    const auto touched = kvm::touched_pages(prog, walk).size();
    fmt::print("\nsquib-pager: {} restore of a {} MiB guest ({} of {} pages touched by the guest, {} order, "
               "fault-around {} page{})\n\n",
               use_kvm ? "KVM guest" : "process memory (no KVM)", a.ram_mib, touched, ram_size / squib::page_4k,
               a.order == kvm::walk_order::sequential ? "sequential" : "random", a.fault_around,
               a.fault_around == 1 ? "" : "s");
    fmt::print("  {:<20} {:>12} {:>20} {:>20}\n", "", "eager", lazy_mapped.name, lazy_file.name);
    auto line = [](std::string_view label, auto get) {
        fmt::print("  {:<20} {:>12} {:>20} {:>20}\n", label, get(0), get(1), get(2));
    };
    const row* rows[3] = {&eager, &lazy_mapped, &lazy_file};
    line("memory ready", [&](int i) { return fmt::format("{:.2f} ms", rows[i]->setup_ms); });
    if (use_kvm) line("first instruction", [&](int i) { return fmt::format("{:.2f} ms", rows[i]->first_insn_ms); });
    line("guest finished", [&](int i) { return fmt::format("{:.1f} ms", rows[i]->total_ms); });
    line("pages faulted", [&](int i) { return i == 0 ? std::string("-") : fmt::format("{}", rows[i]->faults); });
    line("checksum", [&](int i) { return fmt::format("{:#010x}", rows[i]->checksum); });
    line("memory vs eager", [&](int i) {
        return i == 0 ? std::string("-") : std::string(rows[i]->memory_matches ? "identical" : "DIFFERS");
    });

    const bool ok = lazy_mapped.checksum == eager.checksum && lazy_file.checksum == eager.checksum &&
                    lazy_mapped.memory_matches && lazy_file.memory_matches;
    fmt::print("\n  {}\n", ok ? "OK: the lazily restored guest computed exactly what the eager one did."
                              : "FAILED: the lazy restore differs from the eager one.");
    return ok ? 0 : 1;
}
