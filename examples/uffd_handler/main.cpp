// squib-uffd-handler: serves Firecracker's lazily restored guest memory from
// a snapshot memory file, for any number of VMs at once.
//
//     squib-uffd-handler --socket /run/fc/uffd.sock --mem-file /snap/vm.mem
//                        [--threads N] [--fault-around PAGES] [--stats-json PATH] ...
//
// Point Firecracker at it with PUT /snapshot/load and
//     "mem_backend": {"backend_type": "Uffd", "backend_path": "/run/fc/uffd.sock"}
//
// Signals: SIGINT/SIGTERM stop it cleanly (every VM's stats logged, the stats
// file written); SIGUSR1 logs every live VM's stats and writes the stats file.
#include "handler.hpp"

#include <fmt/format.h>

#include <pthread.h>
#include <signal.h>

#include <charconv>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>

namespace {

namespace uh = squib::uffd_handler;

int usage(std::string_view problem = {})
{
    if (!problem.empty()) fmt::print(stderr, "squib-uffd-handler: {}\n", problem);
    fmt::print(stderr, "usage: squib-uffd-handler --socket PATH --mem-file FILE [options]\n"
                       "\n"
                       "Listens on the Unix socket PATH for Firecracker's userfaultfd handshake and serves\n"
                       "each connecting VM's page faults from the snapshot memory FILE.\n"
                       "\n"
                       "  --threads N              handler threads per VM (1..64, default 1)\n"
                       "  --fault-around PAGES     install this aligned block of 4 KiB pages per fault\n"
                       "                           (a power of two, 1..512, default 1)\n"
                       "  --stats-json PATH        write per-VM stats as JSON here on SIGUSR1 and at exit\n"
                       "  --max-regions N          regions one VM may declare (default 256)\n"
                       "  --handshake-timeout MS   refuse a peer that sends nothing for MS milliseconds\n"
                       "                           (default 10000)\n"
                       "  --kill-on-unserved       SIGKILL a VM whose page fault cannot be served, instead\n"
                       "                           of leaving it blocked on that page\n"
                       "\n"
                       "SIGINT/SIGTERM: stop. SIGUSR1: log every VM's stats and write --stats-json.\n");
    return 2;
}

std::optional<std::uint64_t> parse_number(std::string_view text, std::uint64_t lo, std::uint64_t hi)
{
    std::uint64_t v = 0;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (ec != std::errc{} || end != text.data() + text.size() || v < lo || v > hi) return std::nullopt;
    return v;
}

/// Parses argv into server options; a message for usage() on error.
std::optional<uh::server_options> parse(int argc, char** argv, std::string& problem)
{
    uh::server_options o;
    for (int i = 1; i < argc; ++i) {
        std::string_view flag = argv[i];
        std::string value;
        if (flag == "--kill-on-unserved") {
            o.kill_on_unserved = true;
            continue;
        }
        if (flag == "--help" || flag == "-h") return std::nullopt;
        if (const auto eq = flag.find('='); eq != std::string_view::npos) {
            value = std::string(flag.substr(eq + 1));
            flag = flag.substr(0, eq);
        } else if (i + 1 < argc) {
            value = argv[++i];
        } else {
            problem = fmt::format("{} needs a value", flag);
            return std::nullopt;
        }
        const auto number = [&](std::uint64_t lo, std::uint64_t hi) {
            auto v = parse_number(value, lo, hi);
            if (!v) problem = fmt::format("{} wants a number in [{}, {}], not '{}'", flag, lo, hi, value);
            return v;
        };
        if (flag == "--socket") {
            o.socket_path = value;
        } else if (flag == "--mem-file") {
            o.mem_file = value;
        } else if (flag == "--stats-json") {
            o.stats_json_path = value;
        } else if (flag == "--threads") {
            auto v = number(1, 64);
            if (!v) return std::nullopt;
            o.session.threads = static_cast<unsigned>(*v);
        } else if (flag == "--fault-around") {
            auto v = number(1, 512);
            if (!v) return std::nullopt;
            if (!squib::is_power_of_two(*v)) {
                problem = fmt::format("--fault-around wants a power of two, not {}", *v);
                return std::nullopt;
            }
            o.session.fault_around_pages = *v;
        } else if (flag == "--max-regions") {
            auto v = number(1, 4096);
            if (!v) return std::nullopt;
            o.limits.max_regions = static_cast<std::size_t>(*v);
        } else if (flag == "--handshake-timeout") {
            auto v = number(1, 3'600'000);
            if (!v) return std::nullopt;
            o.handshake_timeout = std::chrono::milliseconds(*v);
        } else {
            problem = fmt::format("unknown option {}", flag);
            return std::nullopt;
        }
    }
    if (o.socket_path.empty() || o.mem_file.empty()) {
        problem = "--socket and --mem-file are required";
        return std::nullopt;
    }
    return o;
}

} // namespace

int main(int argc, char** argv)
{
    std::string problem;
    auto opts = parse(argc, argv, problem);
    if (!opts) return usage(problem);

    // Blocked before any thread starts, so every thread inherits the mask and
    // the signals wait for sigwait() on the signal thread below: no handler
    // runs in the middle of the server's work.
    sigset_t signals;
    sigemptyset(&signals);
    for (int sig : {SIGINT, SIGTERM, SIGUSR1}) sigaddset(&signals, sig);
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);
    ::signal(SIGPIPE, SIG_IGN); // a peer that vanished must be an error code, not the end of the daemon

    auto srv = uh::server::create(std::move(*opts));
    if (!srv) return 1; // create() logged why
    uh::server& server = **srv;

    std::thread signal_thread([&server, signals] {
        for (;;) {
            int sig = 0;
            if (sigwait(&signals, &sig) != 0) continue;
            if (sig == SIGUSR1) {
                server.request_stats();
                continue;
            }
            server.stop(); // SIGINT, SIGTERM, or the wake-up sent below when run() ends by itself
            return;
        }
    });

    const std::error_code ec = server.run();
    // End the signal thread if no signal did (run() failed): SIGTERM is
    // blocked everywhere, so it stays pending for that thread's sigwait().
    pthread_kill(signal_thread.native_handle(), SIGTERM);
    signal_thread.join();
    return ec ? 1 : 0;
}
