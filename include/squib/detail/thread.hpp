// squib-pager: a joinable, named thread whose spawn failure is an error value.
#pragma once

#include <squib/core/result.hpp>

#include <pthread.h>

#include <cstddef>
#include <memory>
#include <new>
#include <string>
#include <system_error>
#include <utility>

namespace squib::detail {

/// A thread started with pthread_create so that a failure (EAGAIN when the
/// system is out of threads or memory for a stack) comes back as an error
/// code instead of std::system_error, and so it can carry a stack size and a
/// name that shows in `top -H`, `ps -L` and debuggers. Joins on destruction.
class named_thread {
public:
    named_thread() = default;
    named_thread(named_thread&& other) noexcept
        : handle_(other.handle_), joinable_(std::exchange(other.joinable_, false))
    {
    }
    named_thread& operator=(named_thread&& other) noexcept
    {
        if (this != &other) {
            join();
            handle_ = other.handle_;
            joinable_ = std::exchange(other.joinable_, false);
        }
        return *this;
    }
    named_thread(const named_thread&) = delete;
    named_thread& operator=(const named_thread&) = delete;
    ~named_thread() { join(); }

    /// Starts `body()` on a new thread named `name` (cut to the kernel's 15
    /// characters). `stack_size` 0 keeps the system default.
    /// Errors: pthread_create's error (EAGAIN, EINVAL, ...) as a system error;
    /// std::errc::not_enough_memory if the closure cannot be allocated.
    template <class F>
    [[nodiscard]] static result<named_thread> spawn(std::string name, std::size_t stack_size, F body) noexcept
    {
        struct closure {
            std::string name;
            F body;
        };
        std::unique_ptr<closure> c(new (std::nothrow) closure{std::move(name), std::move(body)});
        if (!c) return std::make_error_code(std::errc::not_enough_memory);

        pthread_attr_t attr;
        if (int rc = ::pthread_attr_init(&attr); rc != 0) return std::error_code{rc, std::system_category()};
        int rc = stack_size != 0 ? ::pthread_attr_setstacksize(&attr, stack_size) : 0;
        named_thread t;
        if (rc == 0) {
            rc = ::pthread_create(&t.handle_, &attr, &trampoline<closure>, c.get());
        }
        ::pthread_attr_destroy(&attr);
        if (rc != 0) return std::error_code{rc, std::system_category()};
        static_cast<void>(c.release()); // the thread owns the closure now
        t.joinable_ = true;
        return t;
    }

    [[nodiscard]] bool joinable() const noexcept { return joinable_; }

    void join() noexcept
    {
        if (joinable_) {
            ::pthread_join(handle_, nullptr);
            joinable_ = false;
        }
    }

private:
    template <class Closure>
    static void* trampoline(void* arg) noexcept
    {
        std::unique_ptr<Closure> c(static_cast<Closure*>(arg)); // arg is the closure spawn() handed over
        char shown[16] = {};                                    // the kernel keeps 15 characters
        c->name.copy(shown, sizeof shown - 1);
        ::pthread_setname_np(::pthread_self(), shown);
        c->body();
        return nullptr;
    }

    pthread_t handle_{};
    bool joinable_ = false;
};

} // namespace squib::detail
