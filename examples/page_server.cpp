// Serves a snapshot file to squib::socket_source clients until SIGINT/SIGTERM.
//
//     page_server --mem vm.mem --socket /run/vm1/pages.sock [--page-size 4096] [--max-page-size 2097152]
//
// A VMM restoring the snapshot then reads its pages lazily:
//
//     auto src = squib::socket_source::connect("/run/vm1/pages.sock");
#include <squib/source/mapped_file.hpp>
#include <squib/source/page_server.hpp>

#include <fmt/format.h>

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>

#include <pthread.h>

namespace {

struct arguments {
    std::string mem;
    std::string socket;
    std::uint64_t page_size = squib::page_4k;
    std::uint64_t max_page_size = squib::page_2m;
};

int usage()
{
    fmt::print(stderr, "usage: page_server --mem FILE --socket PATH [--page-size BYTES] [--max-page-size BYTES]\n"
                       "  Serves FILE (source address 0 = file offset 0) on the Unix socket PATH\n"
                       "  until SIGINT or SIGTERM. BYTES are powers of two, decimal or 0x-prefixed.\n");
    return 2;
}

std::optional<std::uint64_t> parse_size(const std::string& text)
{
    try {
        std::size_t used = 0;
        const auto v = std::stoull(text, &used, 0); // base 0: accepts 4096 and 0x1000
        if (used != text.size() || text.front() == '-' || !squib::is_power_of_two(v)) return std::nullopt;
        return v;
    } catch (const std::exception&) {
        return std::nullopt;
    }
}

std::optional<arguments> parse(int argc, char** argv)
{
    arguments args;
    for (int i = 1; i < argc; ++i) {
        const std::string_view flag = argv[i];
        if (i + 1 >= argc) return std::nullopt; // every flag takes a value
        const std::string value = argv[++i];
        if (flag == "--mem") {
            args.mem = value;
        } else if (flag == "--socket") {
            args.socket = value;
        } else if (flag == "--page-size" || flag == "--max-page-size") {
            auto v = parse_size(value);
            if (!v) return std::nullopt;
            if (flag == "--page-size")
                args.page_size = *v;
            else
                args.max_page_size = *v;
        } else {
            return std::nullopt;
        }
    }
    if (args.mem.empty() || args.socket.empty()) return std::nullopt;
    return args;
}

} // namespace

int main(int argc, char** argv)
{
    const auto args = parse(argc, argv);
    if (!args) return usage();

    // Blocked before any thread starts, so every server thread inherits the
    // mask and the signals wait for sigwait() below.
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);

    squib::mapped_file_source::options source_opts;
    source_opts.page_size = args->page_size;
    auto src = squib::mapped_file_source::open(args->mem, source_opts);
    if (!src) {
        fmt::print(stderr, "page_server: cannot open {}: {}\n", args->mem, src.error().message());
        return 1;
    }

    squib::page_server_options server_opts;
    server_opts.max_page_size = args->max_page_size;
    auto server = squib::page_server<squib::mapped_file_source>::start(*src, args->socket, server_opts);
    if (!server) {
        fmt::print(stderr, "page_server: cannot serve on {}: {}\n", args->socket, server.error().message());
        return 1;
    }
    fmt::print(stderr, "page_server: serving {} ({} bytes) on {}\n", args->mem, src->size(), args->socket);

    int signal = 0;
    while (sigwait(&signals, &signal) != 0) {
    }
    fmt::print(stderr, "page_server: signal {}, stopping after {} requests\n", signal,
               (*server)->requests_served());
    (*server)->stop();
    return 0;
}
