# Shared by scripts/test, scripts/demo and scripts/bench. Sourced, not run.

# Debian packages the build needs.
SQUIB_PACKAGES=(g++ meson ninja-build pkg-config libboost-dev libfmt-dev doctest-dev libbenchmark-dev nlohmann-json3-dev)

# Installs missing packages when root; otherwise prints the apt line and fails.
squib_ensure_deps() {
    local missing=()
    local pkg
    for pkg in "${SQUIB_PACKAGES[@]}" "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "squib: missing packages; run as root: apt-get install -y ${missing[*]}" >&2
        return 1
    fi
    echo "squib: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Configures (once) and builds a build directory: squib_build DIR [meson options...]
squib_build() {
    local dir=$1
    shift
    if [ ! -f "$dir/build.ninja" ]; then
        meson setup "$dir" "$@" >/dev/null
    fi
    ninja -C "$dir" >/dev/null
}
