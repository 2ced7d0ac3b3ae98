// squib-pager: an owning file descriptor.
#pragma once

#include <unistd.h>

#include <utility>

namespace squib::detail {

/// Closes its descriptor on destruction; move-only. -1 means empty.
class unique_fd {
public:
    unique_fd() = default;
    explicit unique_fd(int fd) noexcept : fd_(fd) {}
    unique_fd(unique_fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
    unique_fd& operator=(unique_fd&& other) noexcept
    {
        if (this != &other) reset(std::exchange(other.fd_, -1));
        return *this;
    }
    unique_fd(const unique_fd&) = delete;
    unique_fd& operator=(const unique_fd&) = delete;
    ~unique_fd() { reset(); }

    [[nodiscard]] int get() const noexcept { return fd_; }
    [[nodiscard]] bool valid() const noexcept { return fd_ >= 0; }
    explicit operator bool() const noexcept { return valid(); }

    /// Gives up ownership without closing.
    [[nodiscard]] int release() noexcept { return std::exchange(fd_, -1); }

    /// Closes the current descriptor (if any) and takes `fd`.
    void reset(int fd = -1) noexcept
    {
        if (fd_ >= 0) ::close(fd_); // close errors are not actionable here: the fd is gone either way
        fd_ = fd;
    }

private:
    int fd_ = -1;
};

} // namespace squib::detail
