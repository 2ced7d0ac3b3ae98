// Composing a pager with a page source of your own.
//
// A source is any type with a noexcept `read(addr, dst) -> std::error_code`
// (see squib::PageSource in concepts.hpp). This one decrypts pages of an
// encrypted snapshot held in memory with a toy XOR key, and the pager serves
// faults from it. The mock backend stands in for userfaultfd so the example
// runs anywhere; swap in a real backend and nothing else changes.
#include <squib/pager.hpp>

#include <fmt/format.h>

#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace {

/// Reads from an inner source, then undoes a XOR with `key`.
template <squib::PageSource Inner>
class xor_source {
public:
    xor_source(Inner inner, std::byte key) noexcept : inner_(std::move(inner)), key_(key) {}

    std::error_code read(std::uint64_t addr, std::span<std::byte> dst) const noexcept
    {
        if (auto ec = inner_.read(addr, dst)) return ec;
        for (std::byte& b : dst) b ^= key_;
        return {};
    }

private:
    Inner inner_;
    std::byte key_;
};

static_assert(squib::PageSource<xor_source<squib::memory_source>>);

} // namespace

int main()
{
    constexpr std::uint64_t guest_ram = 0x8000'0000;
    constexpr std::uint64_t ram_size = 16 * squib::page_4k;
    constexpr std::byte key{0x5a};

    // The "snapshot": page n holds the byte n, stored encrypted.
    std::vector<std::byte> encrypted(ram_size);
    for (std::uint64_t i = 0; i < ram_size; ++i)
        encrypted[i] = static_cast<std::byte>(i / squib::page_4k) ^ key;

    using pager_type =
        squib::pager<xor_source<squib::memory_source>, squib::flat_index, squib::mock_backend, squib::atomic_stats>;
    pager_type pager{xor_source{squib::memory_source{encrypted}, key}};

    if (auto ec = pager.register_region({.base = guest_ram, .size = ram_size})) {
        fmt::print(stderr, "register_region: {}\n", ec);
        return 1;
    }
    if (auto ec = pager.start()) {
        fmt::print(stderr, "start: {}\n", ec);
        return 1;
    }

    // The guest touches pages 3 and 7; the mock backend delivers the faults.
    for (std::uint64_t page : {3, 7}) {
        if (auto ec = pager.backend().inject_fault(guest_ram + page * squib::page_4k + 100)) {
            fmt::print(stderr, "fault: {}\n", ec);
            return 1;
        }
        const auto bytes = pager.backend().page_at(guest_ram + page * squib::page_4k);
        fmt::print("page {} installed, first byte {}\n", page, std::to_integer<int>(bytes->front()));
    }
    // And one address outside guest RAM: an error value, nothing installed.
    fmt::print("fault outside RAM: {}\n", pager.backend().inject_fault(0x1000));
    fmt::print("{}\n", pager.stats().snapshot());
    return 0;
}
