// The main demo: restore a snapshot lazily from a page server.
//
//   page_server_demo --socket PATH --mem FILE [--threads N] [--connections N]
//
// Connects to a page server (examples/page_server) that serves FILE, builds a
// pager whose source is the page-server client, prewarms the boot-critical
// pages, then lets N threads fault every other page of guest RAM in, in a
// shuffled order. The mock backend stands in for the hardware: it records
// each installed page, and the demo checks every byte against FILE.
#include <squib/pager.hpp>
#include <squib/source/mapped_file.hpp>
#include <squib/source/socket.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

constexpr std::uint64_t guest_ram_base = 0x8000'0000;

using demo_pager = squib::pager<squib::socket_source, squib::flat_index, squib::mock_backend, squib::histogram_stats>;

struct args {
    std::string socket;
    std::string mem;
    unsigned threads = 2;
    std::size_t connections = 2;
};

[[noreturn]] void usage()
{
    fmt::print(stderr, "usage: page_server_demo --socket PATH --mem FILE [--threads N] [--connections N]\n");
    std::exit(2);
}

args parse(int argc, char** argv)
{
    args a;
    for (int i = 1; i < argc; ++i) {
        const std::string_view flag = argv[i];
        if (i + 1 >= argc) usage();
        const char* value = argv[++i];
        if (flag == "--socket") a.socket = value;
        else if (flag == "--mem") a.mem = value;
        else if (flag == "--threads") a.threads = static_cast<unsigned>(std::strtoul(value, nullptr, 10));
        else if (flag == "--connections") a.connections = std::strtoul(value, nullptr, 10);
        else usage();
    }
    if (a.socket.empty() || a.mem.empty() || a.threads == 0 || a.connections == 0) usage();
    return a;
}

double ms_since(std::chrono::steady_clock::time_point t0)
{
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

} // namespace

int main(int argc, char** argv)
{
    const args a = parse(argc, argv);

    // The snapshot itself, mapped, only to check what the pager installs.
    auto reference = squib::mapped_file_source::open(a.mem);
    if (!reference) {
        fmt::print(stderr, "open {}: {}\n", a.mem, reference.error());
        return 1;
    }
    const std::uint64_t ram_size = squib::align_down(reference->size(), squib::page_4k);
    const std::uint64_t pages = ram_size / squib::page_4k;
    if (pages == 0) {
        fmt::print(stderr, "{} is smaller than a page\n", a.mem);
        return 1;
    }

    auto client = squib::socket_source::connect(a.socket, {.connections = a.connections});
    if (!client) {
        fmt::print(stderr, "connect {}: {}\n", a.socket, client.error());
        return 1;
    }
    demo_pager pager{std::move(*client)};
    if (auto ec = pager.register_region({.base = guest_ram_base, .size = ram_size})) {
        fmt::print(stderr, "register_region: {}\n", ec);
        return 1;
    }
    if (auto ec = pager.start()) {
        fmt::print(stderr, "start: {}\n", ec);
        return 1;
    }

    // Boot-critical pages first, as a VMM would before the first guest instruction.
    const auto t_prewarm = std::chrono::steady_clock::now();
    squib::boot_layout layout;
    layout.kernel_entry = guest_ram_base + std::min<std::uint64_t>(ram_size / 2, 2u << 20);
    layout.vcpu0_stack_pointer = guest_ram_base + ram_size - 64;
    layout.fdt_address = guest_ram_base + ram_size / 4;
    const auto boot_pages = squib::boot_critical_pages(layout, squib::page_4k);
    const auto prewarm = pager.prewarm(boot_pages);
    const double prewarm_ms = ms_since(t_prewarm);

    // Every page not yet present faults once, from several threads, in a shuffled order.
    std::vector<std::uint64_t> order;
    order.reserve(pages);
    for (std::uint64_t i = 0; i < pages; ++i) {
        const std::uint64_t addr = guest_ram_base + i * squib::page_4k;
        if (!std::binary_search(boot_pages.begin(), boot_pages.end(), addr)) order.push_back(addr);
    }
    std::shuffle(order.begin(), order.end(), std::mt19937_64{2026});

    std::atomic<std::uint64_t> fault_errors{0};
    const auto t_faults = std::chrono::steady_clock::now();
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < a.threads; ++t) {
        threads.emplace_back([&, t] {
            for (std::size_t i = t; i < order.size(); i += a.threads) {
                if (auto ec = pager.backend().inject_fault(order[i], squib::page_4k)) {
                    if (fault_errors.fetch_add(1) == 0) fmt::print(stderr, "fault at {:#x}: {}\n", order[i], ec);
                }
            }
        });
    }
    for (auto& t : threads) t.join();
    const double fault_ms = ms_since(t_faults);

    // Every page of guest RAM must now hold exactly the snapshot's bytes.
    std::uint64_t wrong = 0;
    for (std::uint64_t i = 0; i < pages; ++i) {
        const auto got = pager.backend().page_at(guest_ram_base + i * squib::page_4k);
        auto want = reference->view(i * squib::page_4k, squib::page_4k);
        if (!got || !want || got->size() != squib::page_4k ||
            std::memcmp(got->data(), want->data(), squib::page_4k) != 0)
            ++wrong;
    }
    pager.stop();

    const auto s = pager.stats().snapshot();
    const double mib = static_cast<double>(ram_size) / (1 << 20);
    fmt::print("squib-pager demo: lazy restore through the page server\n");
    fmt::print("  {:<24} {} ({:.0f} MiB, {} pages)\n", "snapshot", a.mem, mib, pages);
    fmt::print("  {:<24} {} ({} connections, {} fault threads)\n", "page server", a.socket, a.connections, a.threads);
    fmt::print("  {:<24} {} in {:.2f} ms\n", "boot-critical prewarm", prewarm, prewarm_ms);
    fmt::print("  {:<24} {} pages in {:.1f} ms ({:.0f} MiB/s, {:.1f} us/page)\n", "faults served", s.counters.faults,
               fault_ms, mib * 1000.0 / (fault_ms + prewarm_ms),
               fault_ms * 1000.0 / static_cast<double>(std::max<std::uint64_t>(1, s.counters.faults)));
    fmt::print("  {:<24} p50 <= {} us, p99 <= {} us, max {} us\n", "fault latency", s.latency.p50_ns / 1000,
               s.latency.p99_ns / 1000, s.latency.max_ns / 1000);
    fmt::print("  {:<24} {}\n", "counters", s.counters);
    fmt::print("  {:<24} {} of {} pages match the snapshot byte for byte\n", "verified", pages - wrong, pages);
    return wrong == 0 && fault_errors.load() == 0 && prewarm.failed == 0 ? 0 : 1;
}
