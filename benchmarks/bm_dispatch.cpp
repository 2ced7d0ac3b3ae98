// squib-pager: the cost of serving one fault through the pager, next to the
// seed's design (a virtual page source and a mutex-protected std::map scanned
// linearly) doing the same work in the same binary.
//
// Per fault both sides: find the region of a pseudo-random address, turn it
// into a source address, get the page from an in-memory snapshot (a view, or
// a 4 KiB copy in the *_copy cases) and "install" it by folding two of its
// bytes into a checksum. Every case checks that checksum against one computed
// straight from the snapshot's fill pattern, with no pager or index involved.
//
// After Google Benchmark's own report the program prints a ratio table and one
// `BM_DISPATCH_JSON {...}` line (to stderr under --benchmark_format=json, so
// stdout stays valid JSON). Targets (informational): >= 3x the seed at 64
// regions, <= 25 ns per fault at 1 region.
//
//     g++ -std=c++20 -O2 -Iinclude benchmarks/bm_dispatch.cpp
//         $(pkg-config --cflags --libs benchmark) -lfmt -pthread -o bm_dispatch
//     ./bm_dispatch --benchmark_min_time=0.2

#include <squib/backend/mock.hpp>
#include <squib/concepts.hpp>
#include <squib/core/page.hpp>
#include <squib/core/pager.hpp>
#include <squib/core/region.hpp>
#include <squib/core/result.hpp>
#include <squib/error.hpp>
#include <squib/index/flat.hpp>
#include <squib/index/single.hpp>
#include <squib/source/memory.hpp>
#include <squib/stats/atomic.hpp>
#include <squib/stats/histogram.hpp>
#include <squib/stats/null.hpp>

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <unistd.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace {

// ---- geometry and the snapshot ----------------------------------------------

constexpr std::uint64_t page_size = squib::page_4k;
constexpr std::uint64_t pages_per_region = 16;
constexpr std::uint64_t region_bytes = page_size * pages_per_region;  // 64 KiB
constexpr std::uint64_t region_stride = 2 * region_bytes;             // a 64 KiB gap after each region
constexpr std::uint64_t guest_base = 0x1'0000'0000;
constexpr std::uint64_t max_regions = 512;
constexpr std::size_t sequence_length = 4096;  // power of two: the loop wraps with a mask
static_assert((sequence_length & (sequence_length - 1)) == 0, "the fault loop wraps the sequence with a mask");

constexpr std::uint64_t splitmix64(std::uint64_t x) noexcept
{
    x += 0x9e37'79b9'7f4a'7c15;
    x = (x ^ (x >> 30)) * 0xbf58'476d'1ce4'e5b9;
    x = (x ^ (x >> 27)) * 0x94d0'49bb'1331'11eb;
    return x ^ (x >> 31);
}

/// The snapshot's fill pattern: every aligned 8-byte word is a hash of its
/// index, so each page's bytes differ from every other page's.
constexpr std::byte snapshot_byte(std::uint64_t offset) noexcept
{
    return static_cast<std::byte>(splitmix64(offset >> 3) >> ((offset & 7) * 8));
}

/// One snapshot, big enough for the largest case; built once, shared by all.
std::span<const std::byte> snapshot()
{
    static const std::vector<std::byte> bytes = [] {
        std::vector<std::byte> b(max_regions * region_bytes);
        for (std::uint64_t o = 0; o < b.size(); ++o) b[o] = snapshot_byte(o);
        return b;
    }();
    return bytes;
}

[[nodiscard]] constexpr squib::region region_number(std::uint64_t i) noexcept
{
    return {.base = guest_base + i * region_stride,
            .size = region_bytes,
            .source_offset = i * region_bytes,
            .page_size = page_size};
}

/// What installing one page adds to the checksum: its address and two of its bytes.
[[nodiscard]] constexpr std::uint64_t fold(std::uint64_t page, std::byte first, std::byte last) noexcept
{
    return page ^ (std::to_integer<std::uint64_t>(first) << 48) ^ (std::to_integer<std::uint64_t>(last) << 56);
}

/// The installer a backend would pass to pager::handle_fault; "installs" by
/// folding the page into a checksum. Shared by both sides.
struct checksum_installer {
    std::uint64_t sum = 0;

    [[nodiscard]] std::error_code install(std::uint64_t addr, std::span<const std::byte> bytes) noexcept
    {
        sum += fold(addr, bytes.front(), bytes.back());
        return {};
    }
    [[nodiscard]] std::error_code install_zero(std::uint64_t addr, std::uint64_t) noexcept
    {
        sum += fold(addr, std::byte{0}, std::byte{0}); // never taken: memory_source has no holes
        return {};
    }
};
static_assert(squib::PageInstaller<checksum_installer>);

/// Pseudo-random fault addresses spread over `regions` regions (any byte of
/// any page), and the checksum they must produce, derived from the fill
/// pattern alone. The same sequence drives both sides.
struct workload {
    std::vector<std::uint64_t> addrs;
    std::vector<std::uint64_t> prefix; // prefix[k]: checksum after the first k addresses

    explicit workload(std::uint64_t regions)
    {
        addrs.reserve(sequence_length);
        prefix.reserve(sequence_length + 1);
        prefix.push_back(0);
        std::uint64_t state = 0x5eed'0000 + regions;
        for (std::size_t k = 0; k < sequence_length; ++k) {
            state = splitmix64(state);
            const std::uint64_t i = state % regions;
            const std::uint64_t within = (state >> 32) % region_bytes;
            const std::uint64_t addr = guest_base + i * region_stride + within;
            addrs.push_back(addr);
            const std::uint64_t page = addr & ~(page_size - 1);
            const std::uint64_t src = i * region_bytes + (within & ~(page_size - 1));
            prefix.push_back(prefix.back() +
                             fold(page, snapshot_byte(src), snapshot_byte(src + page_size - 1)));
        }
    }

    /// The checksum after `n` faults cycling through the sequence (wrapping arithmetic).
    [[nodiscard]] std::uint64_t expected(std::uint64_t n) const noexcept
    {
        return (n / sequence_length) * prefix[sequence_length] + prefix[n % sequence_length];
    }
};

// ---- squib side ---------------------------------------------------------------

/// memory_source with view() hidden, so the pager takes its read-into-scratch path.
struct read_only_memory_source {
    squib::memory_source inner;

    [[nodiscard]] std::error_code read(std::uint64_t addr, std::span<std::byte> dst) const noexcept
    {
        return inner.read(addr, dst);
    }
};
static_assert(squib::PageSource<read_only_memory_source> && !squib::MappedPageSource<read_only_memory_source>,
              "the copy cases must exercise the pager's read path");

template <class Source, class Index, class Stats>
void run_squib(benchmark::State& state)
{
    using pager_type = squib::pager<Source, Index, squib::mock_backend, Stats>;
    const auto regions = static_cast<std::uint64_t>(state.range(0));
    pager_type pager{Source{squib::memory_source{snapshot()}}};
    for (std::uint64_t i = 0; i < regions; ++i) {
        if (auto ec = pager.register_region(region_number(i))) {
            state.SkipWithError(("register_region: " + ec.message()).c_str());
            return;
        }
    }
    const workload w{regions};
    alignas(64) std::array<std::byte, page_size> scratch{};
    checksum_installer installer;
    std::uint64_t n = 0;
    for (auto _ : state) {
        const std::error_code ec = pager.handle_fault(w.addrs[n & (sequence_length - 1)], scratch, installer);
        ++n;
        if (ec) [[unlikely]] {
            state.SkipWithError(("handle_fault: " + ec.message()).c_str());
            return;
        }
        benchmark::DoNotOptimize(installer.sum);
    }
    if (installer.sum != w.expected(n)) state.SkipWithError("checksum mismatch: the pager served the wrong bytes");
}

// ---- the seed's design --------------------------------------------------------

/// The seed's page source: an abstract class, every page fetched through a virtual call.
class seed_page_source {
public:
    seed_page_source() = default;
    seed_page_source(const seed_page_source&) = delete;
    seed_page_source& operator=(const seed_page_source&) = delete;
    virtual ~seed_page_source() = default;

    [[nodiscard]] virtual std::error_code read(std::uint64_t addr, std::span<std::byte> dst) noexcept = 0;
    [[nodiscard]] virtual squib::result<std::span<const std::byte>> view(std::uint64_t addr,
                                                                         std::size_t len) noexcept = 0;
};

class seed_memory_source final : public seed_page_source {
public:
    explicit seed_memory_source(std::span<const std::byte> bytes) noexcept : inner_(bytes) {}

    [[nodiscard]] std::error_code read(std::uint64_t addr, std::span<std::byte> dst) noexcept override
    {
        return inner_.read(addr, dst);
    }
    [[nodiscard]] squib::result<std::span<const std::byte>> view(std::uint64_t addr,
                                                                 std::size_t len) noexcept override
    {
        return inner_.view(addr, len);
    }

private:
    squib::memory_source inner_;
};

/// A second implementation, as the seed had (file, socket): with only one
/// derived class in sight the compiler could devirtualize the calls.
class seed_zero_source final : public seed_page_source {
public:
    [[nodiscard]] std::error_code read(std::uint64_t, std::span<std::byte> dst) noexcept override
    {
        std::memset(dst.data(), 0, dst.size());
        return {};
    }
    [[nodiscard]] squib::result<std::span<const std::byte>> view(std::uint64_t, std::size_t) noexcept override
    {
        return squib::errc::not_supported;
    }
};

/// Built out of line, as the seed's sources were (another translation unit),
/// so the fault loop cannot see the dynamic type.
[[gnu::noinline]] std::unique_ptr<seed_page_source> make_seed_source(bool zero)
{
    if (zero) return std::make_unique<seed_zero_source>();
    return std::make_unique<seed_memory_source>(snapshot());
}

/// The seed's pager: regions in an ordered map behind a mutex, scanned from
/// the front on every fault; the source behind a virtual interface.
class seed_pager {
public:
    explicit seed_pager(std::unique_ptr<seed_page_source> source) noexcept : source_(std::move(source)) {}

    [[nodiscard]] std::error_code register_region(const squib::region& r)
    {
        std::lock_guard lock(mutex_);
        regions_.emplace(r.base, r);
        return {};
    }

    enum class fetch { view, read };

    template <fetch How, squib::PageInstaller Installer>
    [[nodiscard]] std::error_code handle_fault(std::uint64_t addr, std::span<std::byte> scratch,
                                               Installer& installer) noexcept
    {
        squib::region r;
        {
            std::lock_guard lock(mutex_);
            auto it = regions_.begin();
            while (it != regions_.end() && !it->second.contains(addr)) ++it;
            if (it == regions_.end()) return squib::errc::out_of_region;
            r = it->second;
        }
        const std::uint64_t page = squib::align_down(addr, r.page_size);
        if constexpr (How == fetch::view) {
            auto v = source_->view(r.source_address(page), r.page_size);
            if (!v) return v.error();
            return installer.install(page, *v);
        } else {
            if (scratch.size() < r.page_size) return squib::errc::bad_length;
            auto dst = scratch.first(r.page_size);
            if (auto ec = source_->read(r.source_address(page), dst)) return ec;
            return installer.install(page, dst);
        }
    }

private:
    std::unique_ptr<seed_page_source> source_;
    std::mutex mutex_;
    std::map<std::uint64_t, squib::region> regions_;
};

template <seed_pager::fetch How>
void run_seed(benchmark::State& state)
{
    const auto regions = static_cast<std::uint64_t>(state.range(0));
    seed_pager pager{make_seed_source(false)};
    for (std::uint64_t i = 0; i < regions; ++i) static_cast<void>(pager.register_region(region_number(i)));
    const workload w{regions};
    alignas(64) std::array<std::byte, page_size> scratch{};
    checksum_installer installer;
    std::uint64_t n = 0;
    for (auto _ : state) {
        const std::error_code ec =
            pager.handle_fault<How>(w.addrs[n & (sequence_length - 1)], scratch, installer);
        ++n;
        if (ec) [[unlikely]] {
            state.SkipWithError(("handle_fault: " + ec.message()).c_str());
            return;
        }
        benchmark::DoNotOptimize(installer.sum);
    }
    if (installer.sum != w.expected(n)) state.SkipWithError("checksum mismatch: the seed served the wrong bytes");
}

// ---- the cases ------------------------------------------------------------------

using view_source = squib::memory_source;
using copy_source = read_only_memory_source;

void BM_seed_design_fault(benchmark::State& state) { run_seed<seed_pager::fetch::view>(state); }
void BM_squib_fault(benchmark::State& state)
{
    run_squib<view_source, squib::flat_index, squib::null_stats>(state);
}
void BM_squib_fault_single(benchmark::State& state)
{
    run_squib<view_source, squib::single_region_index, squib::null_stats>(state);
}
void BM_squib_fault_atomic_stats(benchmark::State& state)
{
    run_squib<view_source, squib::flat_index, squib::atomic_stats>(state);
}
void BM_squib_fault_histogram_stats(benchmark::State& state)
{
    run_squib<view_source, squib::flat_index, squib::histogram_stats>(state);
}
void BM_seed_design_fault_copy(benchmark::State& state) { run_seed<seed_pager::fetch::read>(state); }
void BM_squib_fault_copy(benchmark::State& state)
{
    run_squib<copy_source, squib::flat_index, squib::null_stats>(state);
}

BENCHMARK(BM_seed_design_fault)->Arg(1)->Arg(8)->Arg(64)->Arg(512);
BENCHMARK(BM_squib_fault)->Arg(1)->Arg(8)->Arg(64)->Arg(512);
BENCHMARK(BM_squib_fault_single)->Arg(1);
BENCHMARK(BM_squib_fault_atomic_stats)->Arg(64);
BENCHMARK(BM_squib_fault_histogram_stats)->Arg(64);
BENCHMARK(BM_seed_design_fault_copy)->Arg(64);
BENCHMARK(BM_squib_fault_copy)->Arg(64);

// ---- reporting ------------------------------------------------------------------

constexpr double target_ratio_at_64 = 3.0;
constexpr double target_ns_at_1 = 25.0;

[[nodiscard]] double to_ns(double t, benchmark::TimeUnit unit) noexcept
{
    switch (unit) {
    case benchmark::kNanosecond: return t;
    case benchmark::kMicrosecond: return t * 1e3;
    case benchmark::kMillisecond: return t * 1e6;
    case benchmark::kSecond: return t * 1e9;
    }
    return t;
}

/// Real time per fault of each case, in ns: the median aggregate when
/// repetitions were asked for, else the mean of the runs.
class collected_times {
public:
    void add(const benchmark::BenchmarkReporter::Run& run)
    {
        const std::string name = run.run_name.str();
        if (run.error_occurred) {
            failed_ = true;
            return;
        }
        entry& e = entries_[name];
        const double ns = to_ns(run.GetAdjustedRealTime(), run.time_unit);
        if (run.run_type == benchmark::BenchmarkReporter::Run::RT_Aggregate) {
            if (run.aggregate_name == "median") e.median = ns;
        } else {
            e.sum += ns;
            ++e.count;
        }
    }

    [[nodiscard]] std::optional<double> ns(const std::string& name) const
    {
        auto it = entries_.find(name);
        if (it == entries_.end()) return std::nullopt;
        if (it->second.median) return it->second.median;
        if (it->second.count == 0) return std::nullopt;
        return it->second.sum / static_cast<double>(it->second.count);
    }

    [[nodiscard]] bool any() const noexcept { return !entries_.empty(); }
    [[nodiscard]] bool failed() const noexcept { return failed_; }

private:
    struct entry {
        double sum = 0;
        std::uint64_t count = 0;
        std::optional<double> median;
    };
    std::map<std::string, entry> entries_;
    bool failed_ = false;
};

/// One of Google Benchmark's reporters that also collects every run.
template <class Base>
class collecting_reporter final : public Base {
public:
    template <class... Args>
    explicit collecting_reporter(collected_times& out, Args&&... args)
        : Base(std::forward<Args>(args)...), out_(out)
    {
    }

    void ReportRuns(const std::vector<benchmark::BenchmarkReporter::Run>& runs) override
    {
        for (const auto& run : runs) out_.add(run);
        Base::ReportRuns(runs);
    }

private:
    collected_times& out_;
};

std::string fmt_ns(std::optional<double> v) { return v ? fmt::format("{:.2f}", *v) : std::string{"n/a"}; }
std::string json_num(std::optional<double> v) { return v ? fmt::format("{:.3f}", *v) : std::string{"null"}; }

std::optional<double> ratio(std::optional<double> seed, std::optional<double> squib)
{
    if (!seed || !squib || *squib <= 0) return std::nullopt;
    return *seed / *squib;
}

std::string verdict(std::optional<bool> pass) { return pass ? (*pass ? "pass" : "MISS") : "n/a"; }

/// The ratio table and the BM_DISPATCH_JSON line.
void print_summary(const collected_times& t, std::ostream& out)
{
    constexpr std::array<int, 4> counts{1, 8, 64, 512};
    std::string table = "\nbm_dispatch: real time per fault (ns), seed design vs squib (view path, null_stats)\n";
    table += fmt::format("{:>8} {:>12} {:>12} {:>12}\n", "regions", "seed ns", "squib ns", "seed/squib");
    std::string cases;
    for (int r : counts) {
        const auto seed = t.ns(fmt::format("BM_seed_design_fault/{}", r));
        const auto squib = t.ns(fmt::format("BM_squib_fault/{}", r));
        const auto q = ratio(seed, squib);
        table += fmt::format("{:>8} {:>12} {:>12} {:>11}{}\n", r, fmt_ns(seed), fmt_ns(squib), fmt_ns(q),
                             q ? "x" : "");
        if (!cases.empty()) cases += ',';
        cases += fmt::format(R"({{"regions":{},"squib_ns":{},"seed_ns":{},"ratio":{}}})", r, json_num(squib),
                             json_num(seed), json_num(q));
    }

    const auto single = t.ns("BM_squib_fault_single/1");
    const auto seed1 = t.ns("BM_seed_design_fault/1");
    const auto seed_copy = t.ns("BM_seed_design_fault_copy/64");
    const auto squib_copy = t.ns("BM_squib_fault_copy/64");
    const auto squib64 = t.ns("BM_squib_fault/64");
    const auto atomic64 = t.ns("BM_squib_fault_atomic_stats/64");
    const auto hist64 = t.ns("BM_squib_fault_histogram_stats/64");
    table += fmt::format("{:>8} {:>12} {:>12} {:>11}{}   single_region_index\n", 1, fmt_ns(seed1), fmt_ns(single),
                         fmt_ns(ratio(seed1, single)), ratio(seed1, single) ? "x" : "");
    table += fmt::format("{:>8} {:>12} {:>12} {:>11}{}   copy path (4 KiB memcpy into scratch)\n", 64,
                         fmt_ns(seed_copy), fmt_ns(squib_copy), fmt_ns(ratio(seed_copy, squib_copy)),
                         ratio(seed_copy, squib_copy) ? "x" : "");
    auto delta = [&](std::optional<double> v) -> std::string {
        if (!v || !squib64) return "n/a";
        return fmt::format("{:.2f} ns ({:+.2f} ns vs null_stats)", *v, *v - *squib64);
    };
    table += fmt::format("stats at 64 regions: atomic_stats {}, histogram_stats {}\n", delta(atomic64), delta(hist64));

    const auto q64 = ratio(t.ns("BM_seed_design_fault/64"), squib64);
    const auto squib1 = t.ns("BM_squib_fault/1");
    const std::optional<bool> pass64 = q64 ? std::optional{*q64 >= target_ratio_at_64} : std::nullopt;
    const std::optional<bool> pass1 = squib1 ? std::optional{*squib1 <= target_ns_at_1} : std::nullopt;
    table += fmt::format("target: >= {:.0f}x faster than the seed design at 64 regions: {}{} -> {}\n",
                         target_ratio_at_64, fmt_ns(q64), q64 ? "x" : "", verdict(pass64));
    table += fmt::format("target: <= {:.0f} ns per fault at 1 region (flat_index): {} ns -> {}"
                         " (single_region_index: {} ns)\n",
                         target_ns_at_1, fmt_ns(squib1), verdict(pass1), fmt_ns(single));

    auto json_bool = [](std::optional<bool> b) -> std::string { return b ? (*b ? "true" : "false") : "null"; };
    const std::string json = fmt::format(
        R"({{"bench":"bm_dispatch","unit":"ns","cases":[{}],)"
        R"("single_region_index":{{"regions":1,"squib_ns":{},"seed_ns":{},"ratio":{}}},)"
        R"("copy":{{"regions":64,"squib_ns":{},"seed_ns":{},"ratio":{}}},)"
        R"("stats":{{"regions":64,"null_ns":{},"atomic_ns":{},"histogram_ns":{}}},)"
        R"("targets":{{"ratio_at_64":{{"want_min":{},"got":{},"pass":{}}},)"
        R"("ns_at_1":{{"want_max":{},"got":{},"pass":{}}}}}}})",
        cases, json_num(single), json_num(seed1), json_num(ratio(seed1, single)), json_num(squib_copy),
        json_num(seed_copy), json_num(ratio(seed_copy, squib_copy)), json_num(squib64), json_num(atomic64),
        json_num(hist64), target_ratio_at_64, json_num(q64), json_bool(pass64), target_ns_at_1, json_num(squib1),
        json_bool(pass1));

    out << table << "BM_DISPATCH_JSON " << json << '\n' << std::flush;
}

/// Value of a Google Benchmark flag as the library will see it: the last
/// `--name=value` on the command line, else the BENCHMARK_<NAME> environment
/// variable, else `fallback`. Read before benchmark::Initialize() strips argv.
std::string flag_value(int argc, char** argv, std::string_view name, std::string_view env,
                       std::string_view fallback)
{
    std::string value{fallback};
    if (const char* e = std::getenv(std::string{env}.c_str())) value = e;
    const std::string prefix = fmt::format("--{}=", name);
    for (int i = 1; i < argc; ++i) {
        const std::string_view arg{argv[i]};
        if (arg.starts_with(prefix)) value = arg.substr(prefix.size());
    }
    return value;
}

[[nodiscard]] bool truthy(std::string_view v)
{
    return v == "true" || v == "yes" || v == "1" || v == "on" || v == "t" || v == "y";
}

} // namespace

int main(int argc, char** argv)
{
    const std::string format = flag_value(argc, argv, "benchmark_format", "BENCHMARK_FORMAT", "console");
    const std::string color = flag_value(argc, argv, "benchmark_color", "BENCHMARK_COLOR", "auto");
    const std::string tabular =
        flag_value(argc, argv, "benchmark_counters_tabular", "BENCHMARK_COUNTERS_TABULAR", "false");

    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

    // A pager process always has backend threads. glibc (2.34+) lets a
    // process that never started one lock a mutex with plain stores (no
    // atomic instruction), which would flatter the seed's std::mutex. One
    // short-lived thread clears that flag for good.
    std::thread{[] {}}.join();

    collected_times times;
    const bool json = format == "json";
    if (json) {
        collecting_reporter<benchmark::JSONReporter> reporter{times};
        benchmark::RunSpecifiedBenchmarks(&reporter);
    } else {
        if (format != "console")
            std::cerr << "bm_dispatch: --benchmark_format=" << format << " is not supported, using console\n";
        const char* term = std::getenv("TERM");
        const bool use_color = color == "auto" ? ::isatty(STDOUT_FILENO) != 0 && term != nullptr &&
                                                     std::string_view{term} != "dumb"
                                               : truthy(color);
        int opts = benchmark::ConsoleReporter::OO_None;
        if (use_color) opts |= benchmark::ConsoleReporter::OO_Color;
        if (truthy(tabular)) opts |= benchmark::ConsoleReporter::OO_Tabular;
        collecting_reporter<benchmark::ConsoleReporter> reporter{
            times, static_cast<benchmark::ConsoleReporter::OutputOptions>(opts)};
        benchmark::RunSpecifiedBenchmarks(&reporter);
    }
    benchmark::Shutdown();

    if (times.any()) print_summary(times, json ? std::cerr : std::cout);
    if (times.failed()) {
        std::cerr << "bm_dispatch: a case failed (checksum mismatch or fault error); see the report above\n";
        return 1;
    }
    return 0;
}
