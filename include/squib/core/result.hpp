// squib-pager: a value or an error, for C++20 (std::expected is C++23).
#pragma once

#include <squib/error.hpp>

#include <type_traits>
#include <utility>

namespace squib {

/// Holds either a T or a non-zero std::error_code. Used where a fault-path
/// call must hand back a value and may fail (a page view, a resolved fault).
///
/// **Example**
///
///     squib::result<int> parse(std::string_view s);
///     if (auto r = parse("42")) use(*r); else log(r.error());
template <class T>
class [[nodiscard]] result {
    static_assert(std::is_nothrow_move_constructible_v<T>,
                  "result<T> is used on noexcept paths: T must be nothrow movable");

public:
    result(T value) noexcept(std::is_nothrow_move_constructible_v<T>) // NOLINT: implicit by design
        : value_(std::move(value))
    {
    }
    result(std::error_code ec) noexcept : error_(ec) {} // NOLINT: implicit by design
    /// Any error-code enum (squib::errc, std::errc, a backend's own).
    template <class E>
        requires std::is_error_code_enum_v<E> || std::is_error_condition_enum_v<E>
    result(E e) noexcept : error_(make_error_code(e)) // NOLINT: implicit by design
    {
    }

    [[nodiscard]] bool has_value() const noexcept { return !error_; }
    explicit operator bool() const noexcept { return has_value(); }

    [[nodiscard]] std::error_code error() const noexcept { return error_; }

    [[nodiscard]] T& value() & noexcept { return value_; }
    [[nodiscard]] const T& value() const& noexcept { return value_; }
    [[nodiscard]] T&& value() && noexcept { return std::move(value_); }
    [[nodiscard]] T& operator*() & noexcept { return value_; }
    [[nodiscard]] const T& operator*() const& noexcept { return value_; }
    [[nodiscard]] T&& operator*() && noexcept { return std::move(value_); }
    [[nodiscard]] T* operator->() noexcept { return &value_; }
    [[nodiscard]] const T* operator->() const noexcept { return &value_; }

private:
    T value_{}; // default state when holding an error; T must be default constructible
    std::error_code error_;
};

} // namespace squib
