// Helpers for tests that need a working userfaultfd.
#pragma once

#include <squib/backend/uffd.hpp>

#include "support.hpp"

#include <sys/mman.h>

#include <cstdio>
#include <string>

namespace squib::test {

/// Why userfaultfd cannot be used here, or empty when it can.
inline std::string uffd_unavailable()
{
    auto b = uffd_backend::create();
    if (b) return {};
    return b.error().message();
}

/// Anonymous private memory, as a VMM maps guest RAM; unmapped on destruction.
class anon_memory {
public:
    explicit anon_memory(std::size_t size) : size_(size)
    {
        void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
        base_ = static_cast<std::byte*>(p);
    }
    anon_memory(const anon_memory&) = delete;
    anon_memory& operator=(const anon_memory&) = delete;
    ~anon_memory()
    {
        if (base_ != nullptr) ::munmap(base_, size_);
    }

    [[nodiscard]] std::byte* data() const noexcept { return base_; }
    [[nodiscard]] std::uint64_t addr() const noexcept { return reinterpret_cast<std::uint64_t>(base_); } // for regions
    [[nodiscard]] std::size_t size() const noexcept { return size_; }
    /// Forgets the mapping (the test unmapped it itself).
    void release() noexcept { base_ = nullptr; }

private:
    std::byte* base_ = nullptr;
    std::size_t size_;
};

} // namespace squib::test
