// squib-pager: fmt formatters for the public types, so each logs in one line.
//
//     fmt::print("{}: {}\n", region, ec);          // [0x80000000, 0xc0000000) page 4096 @ source 0x0: ...
//     fmt::print("{}\n", pager.stats().snapshot()); // faults=12 prewarmed=3 ...
#pragma once

#include <squib/core/pager.hpp>
#include <squib/core/region.hpp>
#include <squib/error.hpp>
#include <squib/stats/atomic.hpp>
#include <squib/stats/histogram.hpp>

#include <fmt/format.h>

#include <system_error>

#if FMT_VERSION >= 100000
#include <fmt/std.h> // fmt 10 and later format std::error_code themselves
#else
/// `category:value (message)`, e.g. `squib:7 (source ends before the requested page (short read))`.
template <>
struct fmt::formatter<std::error_code> : fmt::formatter<fmt::string_view> {
    template <class FormatContext>
    auto format(const std::error_code& ec, FormatContext& ctx) const -> decltype(ctx.out())
    {
        return fmt::format_to(ctx.out(), "{}:{} ({})", ec.category().name(), ec.value(), ec.message());
    }
};
#endif

/// The message of a squib::errc value.
template <>
struct fmt::formatter<squib::errc> : fmt::formatter<fmt::string_view> {
    template <class FormatContext>
    auto format(squib::errc e, FormatContext& ctx) const -> decltype(ctx.out())
    {
        const std::string msg = squib::make_error_code(e).message();
        return fmt::formatter<fmt::string_view>::format(msg, ctx);
    }
};

template <>
struct fmt::formatter<squib::region> : fmt::formatter<fmt::string_view> {
    template <class FormatContext>
    auto format(const squib::region& r, FormatContext& ctx) const -> decltype(ctx.out())
    {
        return fmt::format_to(ctx.out(), "[{:#x}, {:#x}) page {} @ source {:#x}", r.base, r.base + r.size,
                              r.page_size, r.source_offset);
    }
};

template <>
struct fmt::formatter<squib::resolved_fault> : fmt::formatter<fmt::string_view> {
    template <class FormatContext>
    auto format(const squib::resolved_fault& f, FormatContext& ctx) const -> decltype(ctx.out())
    {
        return fmt::format_to(ctx.out(), "page {:#x} ({} bytes) from source {:#x}", f.page, f.page_size,
                              f.source_address);
    }
};

template <>
struct fmt::formatter<squib::stats_snapshot> : fmt::formatter<fmt::string_view> {
    template <class FormatContext>
    auto format(const squib::stats_snapshot& s, FormatContext& ctx) const -> decltype(ctx.out())
    {
        return fmt::format_to(ctx.out(),
                              "faults={} prewarmed={} zero_pages={} bytes={} errors={} forwarded={} reinstalls={}",
                              s.faults, s.prewarmed, s.zero_pages, s.bytes_served, s.errors, s.forwarded,
                              s.port_reinstalls);
    }
};

template <>
struct fmt::formatter<squib::latency_summary> : fmt::formatter<fmt::string_view> {
    template <class FormatContext>
    auto format(const squib::latency_summary& s, FormatContext& ctx) const -> decltype(ctx.out())
    {
        return fmt::format_to(ctx.out(), "n={} p50<={}ns p99<={}ns max={}ns", s.count, s.p50_ns, s.p99_ns, s.max_ns);
    }
};

template <>
struct fmt::formatter<squib::histogram_stats::snapshot_type> : fmt::formatter<fmt::string_view> {
    template <class FormatContext>
    auto format(const squib::histogram_stats::snapshot_type& s, FormatContext& ctx) const -> decltype(ctx.out())
    {
        return fmt::format_to(ctx.out(), "{} latency: {}", s.counters, s.latency);
    }
};

template <>
struct fmt::formatter<squib::prewarm_report> : fmt::formatter<fmt::string_view> {
    template <class FormatContext>
    auto format(const squib::prewarm_report& r, FormatContext& ctx) const -> decltype(ctx.out())
    {
        if (!r.first_error) return fmt::format_to(ctx.out(), "prewarmed {} pages", r.installed);
        return fmt::format_to(ctx.out(), "prewarmed {} pages, {} failed (first: {})", r.installed, r.failed,
                              r.first_error);
    }
};
