#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Installs what building and booting Vireo needs, only where it is missing. Idempotent, and
# fast when everything is there (it only looks for files). Safe to run several at once: the
# installing part is serialized with a lock.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/install-deps.sh [--check] [--quiet] [COMPONENT...]

Installs what is missing for the given components (default: all of them):
  rust    the Rust toolchain pinned by rust-toolchain.toml, with its targets (through rustup)
  host    a C toolchain for linking host test binaries (gcc, libc6-dev)
  iso     grub-mkrescue for BIOS and UEFI (grub-common, grub-pc-bin, grub-efi-amd64-bin,
          xorriso, mtools)
  qemu    qemu-system-x86 and OVMF (ovmf) for --uefi
  bochs   bochs, bochs-term (a small display plugin, to satisfy bochs's dependency on one),
          bochsbios, vgabios
  linux   what scripts/guest-linux.sh needs to make the Linux guest's initramfs images:
          busybox-static (it replaces the dynamically linked busybox package where that one
          is installed), cpio, gzip; and to build the guest's kernel module against Debian's
          kernel headers: gcc-12 (the compiler Debian built the bookworm kernel with), make,
          binutils, libelf1 (objtool from linux-kbuild links it)
  bench   third-party benchmarks for scripts/scoreboard.sh's guest: sysbench,
          linux-perf (perf bench), stress-ng and dbench (with its loadfile client.txt),
          copied with the shared libraries they link into that guest's initramfs
  all     all of the above

Debian packages are installed with apt-get (non-interactive, --no-install-recommends, after
an apt-get update), and only when one of their files is missing.

Options:
  --check   install nothing; list what is missing and exit 1 if anything is
  --quiet   say nothing when nothing is missing
  -h, --help
EOF
}

CHECK=0
QUIET=0
COMPONENTS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --check) CHECK=1 ;;
        --quiet) QUIET=1 ;;
        rust|host|iso|qemu|bochs|linux|bench) COMPONENTS+=("$1") ;;
        all) COMPONENTS+=(rust host iso qemu bochs linux bench) ;;
        -*) usage_error "unknown option: $1" ;;
        *) usage_error "unknown component: $1 (rust, host, iso, qemu, bochs, linux, bench, all)" ;;
    esac
    shift
done
[[ ${#COMPONENTS[@]} -gt 0 ]] || COMPONENTS=(rust host iso qemu bochs linux bench)

has() {
    local c
    for c in "${COMPONENTS[@]}"; do
        [[ "$c" == "$1" ]] && return 0
    done
    return 1
}

# Pairs "file-or-command package": the package is needed when the first is missing.
# A word with a slash is a file; otherwise a command on PATH.
apt_wanted() {
    if has host; then
        echo "cc gcc"
        echo "/usr/include/stdio.h libc6-dev"
    fi
    if has iso; then
        echo "grub-mkrescue grub-common"
        echo "/usr/lib/grub/i386-pc/cdboot.img grub-pc-bin"
        echo "/usr/lib/grub/x86_64-efi/kernel.img grub-efi-amd64-bin"
        echo "xorriso xorriso"
        echo "mformat mtools"
    fi
    if has qemu; then
        echo "qemu-system-x86_64 qemu-system-x86"
        echo "/usr/share/ovmf/OVMF.fd ovmf"
    fi
    if has bochs; then
        echo "bochs bochs"
        echo "bochs bochs-term"
        echo "/usr/share/bochs/BIOS-bochs-latest bochsbios"
        echo "/usr/share/vgabios/vgabios.bin vgabios"
    fi
    if has linux; then
        # The busybox package has /bin/busybox too, but dynamically linked: look for the
        # static package's own file list instead.
        echo "/var/lib/dpkg/info/busybox-static.list busybox-static"
        echo "cpio cpio"
        echo "gzip gzip"
        # vireo.ko: the headers name their compiler (gcc-12 for bookworm's 6.1 kernel).
        echo "gcc-12 gcc-12"
        echo "make make"
        echo "objcopy binutils"
        echo "/usr/lib/x86_64-linux-gnu/libelf.so.1 libelf1"
        # scripts/mkdisk.sh: the ext4 image for the virtio-blk tests.
        echo "/usr/sbin/mke2fs e2fsprogs"
        # The network image's iperf3 (scripts/guest-linux.sh initramfs-net, issue 12).
        echo "iperf3 iperf3"
    fi
    if has bench; then
        echo "sysbench sysbench"
        echo "perf linux-perf"
        echo "stress-ng stress-ng"
        echo "dbench dbench"
    fi
}

missing_packages() {
    local what pkg
    while read -r what pkg; do
        if [[ "$what" == */* ]]; then
            [[ -e "$what" ]] && continue
        else
            command -v "$what" >/dev/null 2>&1 && continue
        fi
        echo "$pkg"
    done < <(apt_wanted) | sort -u
}

# --- Rust ------------------------------------------------------------------------------------

toolchain_file="$VIREO_ROOT/rust-toolchain.toml"

# toml_list KEY: the quoted strings of KEY = [ ... ] in rust-toolchain.toml (one line).
toml_list() {
    { grep -E "^[[:space:]]*$1[[:space:]]*=" "$toolchain_file" || true; } | grep -o '"[^"]*"' | tr -d '"'
}

rust_channel() {
    toml_list channel | head -n 1
}

# rust_missing: prints what the pinned toolchain lacks ("toolchain" or "target:NAME").
rust_missing() {
    command -v rustup >/dev/null 2>&1 || { echo rustup; return; }
    local ch t installed
    ch="$(rust_channel)"
    [[ -n "$ch" ]] || die "no channel in $toolchain_file"
    if ! RUSTUP_AUTO_INSTALL=0 rustup run "$ch" rustc --version >/dev/null 2>&1; then
        echo toolchain
        return
    fi
    installed="$(rustup target list --installed --toolchain "$ch" 2>/dev/null || true)"
    for t in $(toml_list targets); do
        grep -qx "$t" <<<"$installed" || echo "target:$t"
    done
}

install_rust() {
    local ch t comps=() targets=() missing
    ch="$(rust_channel)"
    missing="$(rust_missing)"
    [[ -n "$missing" ]] || return 0
    if [[ "$missing" == rustup ]]; then
        die "rustup is not installed (see https://rustup.rs); it installs the toolchain pinned in rust-toolchain.toml"
    fi
    for t in $(toml_list targets); do targets+=(--target "$t"); done
    for t in $(toml_list components); do comps+=(--component "$t"); done
    if grep -qx toolchain <<<"$missing"; then
        note "installing Rust $ch (pinned by rust-toolchain.toml)"
        # `cargo --version` in the repository root would do it too, but not where
        # RUSTUP_AUTO_INSTALL=0 is set; this works everywhere.
        rustup toolchain install "$ch" --profile minimal \
            ${targets[@]+"${targets[@]}"} ${comps[@]+"${comps[@]}"} >&2
    fi
    for t in $(toml_list targets); do
        if ! rustup target list --installed --toolchain "$ch" | grep -qx "$t"; then
            note "adding Rust target $t to $ch"
            rustup target add --toolchain "$ch" "$t" >&2
        fi
    done
    cargo --version >&2
}

# --- main ------------------------------------------------------------------------------------

MISSING_PKGS="$(missing_packages)"
MISSING_RUST=""
if has rust; then
    MISSING_RUST="$(rust_missing)"
fi

if [[ -z "$MISSING_PKGS" && -z "$MISSING_RUST" ]]; then
    [[ "$QUIET" == 1 ]] || note "nothing missing for: ${COMPONENTS[*]}"
    exit 0
fi

if [[ "$CHECK" == 1 ]]; then
    [[ -z "$MISSING_PKGS" ]] || note "missing Debian packages: $(echo "$MISSING_PKGS" | tr '\n' ' ')"
    [[ -z "$MISSING_RUST" ]] || note "missing from Rust: $(echo "$MISSING_RUST" | tr '\n' ' ')"
    exit 1
fi

# One installer at a time (parallel test runs on a fresh machine would fight over apt's lock
# and rustup's directories); whoever waited looks again afterwards.
LOCK="${TMPDIR:-/tmp}/vireo-install-deps.lock"
exec 9>>"$LOCK"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

MISSING_PKGS="$(missing_packages)"
if [[ -n "$MISSING_PKGS" ]]; then
    SUDO=()
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null 2>&1 ||
            die "not root and no sudo: install these Debian packages: $(echo "$MISSING_PKGS" | tr '\n' ' ')"
        SUDO=(sudo)
    fi
    mapfile -t pkgs <<<"$MISSING_PKGS"
    note "installing Debian packages: ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-y -q -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)
    ${SUDO[@]+"${SUDO[@]}"} apt-get "${apt_opts[@]}" update >&2
    ${SUDO[@]+"${SUDO[@]}"} apt-get "${apt_opts[@]}" install --no-install-recommends "${pkgs[@]}" >&2
    still="$(missing_packages)"
    [[ -z "$still" ]] || die "still missing after apt-get install: $(echo "$still" | tr '\n' ' ')"
fi

if has rust; then
    install_rust
fi
[[ "$QUIET" == 1 ]] || note "done: ${COMPONENTS[*]}"
