// squib-pager: the umbrella header. Includes every public header that builds
// on any POSIX system; OS-specific backends (backend/uffd.hpp, backend/mach/...) are included on
// their own.
#pragma once

#include <squib/backend/drift_poll.hpp>
#include <squib/backend/mock.hpp>
#include <squib/concepts.hpp>
#include <squib/core/page.hpp>
#include <squib/core/pager.hpp>
#include <squib/core/prewarm.hpp>
#include <squib/core/region.hpp>
#include <squib/core/result.hpp>
#include <squib/error.hpp>
#include <squib/format.hpp>
#include <squib/index/flat.hpp>
#include <squib/index/single.hpp>
#include <squib/source/file.hpp>
#include <squib/source/mapped_file.hpp>
#include <squib/source/memory.hpp>
#include <squib/source/page_server.hpp>
#include <squib/source/ref.hpp>
#include <squib/source/socket.hpp>
#include <squib/source/wire.hpp>
#include <squib/stats/atomic.hpp>
#include <squib/stats/histogram.hpp>
#include <squib/stats/null.hpp>
