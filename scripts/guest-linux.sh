#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Prepares the default Linux guest: Debian's cloud kernel and its headers (fetched by package
# name with apt and cached), Vireo's statistics module built against them, and two initramfs
# images built from busybox-static, that module and the init scripts in guests/linux/. Prints
# what it made as key=path lines on stdout.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/guest-linux.sh [--out DIR] [--quiet]

Prepares the default Linux guest in DIR (default: build/linux in the repository root):
  vmlinuz                     Debian's cloud kernel (bzImage) from the package that
                              linux-image-cloud-amd64 depends on, fetched with apt-get download
  kernel.version              package, package version and kernel release of that vmlinuz
  kernel.config               the kernel's build configuration
  headers/RELEASE/            the kernel's headers: the .debs of linux-headers-RELEASE (at
                              the kernel's package version), the -common package it depends
                              on and linux-kbuild-6.1, fetched with apt-get download and
                              extracted (usr/src/linux-headers-RELEASE is the build tree)
  modules/                    the kernel's virtio modules (virtio_ring, virtio,
                              virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio_pci,
                              virtio_console, virtio_blk) from its package (apt-get download at the
                              kernel's version, once), carried in both images as
                              /lib/modules/virtio/
  vireo.ko                    guests/linux/vireo-mod built against those headers (debug info
                              stripped; built in vireo-mod-build/)
  initramfs-headless.cpio.gz  /init = guests/linux/init-headless.sh: loads vireo.ko and prints
                              "linux-guest: ..." lines (uname, cpus, mem_kb, flags,
                              clocksource, vireo_module, a small compute and fork workload
                              with its time; with linux_guest_perf=MS on the kernel command
                              line /bin/perfprobe's counter readings), then "linux-guest:
                              done", Vireo's exit counts (under Vireo) and powers off
  initramfs-shell.cpio.gz     /init = guests/linux/init-shell.sh: loads vireo.ko, gives a root
                              shell on the console; exiting it powers off
Both images hold /bin/perfprobe, guests/linux/perfprobe.c built with gcc -O2 -static (a
perf stat / perf record equivalent for the virtual PMU), and vireo.ko as /lib/modules/vireo.ko; it loads only under Vireo with hypercall
ABI 0.2 and then shows Vireo's statistics in /sys/hypervisor/vireo/ (guests/linux/README.md).

Then prints, one per line on stdout:
  kernel=DIR/vmlinuz
  initrd_headless=DIR/initramfs-headless.cpio.gz
  initrd_shell=DIR/initramfs-shell.cpio.gz
  module=DIR/vireo.ko
  version=KERNEL_RELEASE          (what uname -r says in the guest)

The kernel is downloaded only when DIR has no vmlinuz or kernel.version names another
package or version than apt's current candidate; once there, it works offline (without apt
package lists, or when the download fails, the cached kernel is used with a warning).
The headers are downloaded only when headers/RELEASE/headers.version does not name the
kernel's package version; the kernel's release is the only one kept. apt-get update is run (as
root, or through sudo) only when apt knows no linux-image-cloud-amd64 or a download fails.
vireo.ko is rebuilt when its sources change (make decides; about 2 s), the initramfs images
each time (under a second); all are reproducible: the same inputs give the same bytes (paths
of this checkout are mapped away), and a file is replaced only when its bytes change. Missing
tools (busybox-static, cpio, gzip, gcc-12, make, binutils, libelf1) are installed with
scripts/install-deps.sh linux.

Boot it, e.g. in QEMU without Vireo:
  qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot -nic none \\
      -kernel DIR/vmlinuz -initrd DIR/initramfs-headless.cpio.gz -append "console=ttyS0 panic=-1"

Options:
  --out DIR   where to put everything (created if missing)
  --quiet     no progress messages on stderr (errors and warnings still go there)
  -h, --help  this text
EOF
}

OUT="$VIREO_ROOT/build/linux"
QUIET=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out)
            need_arg "$1" "$#"
            [[ -n "$2" ]] || usage_error "--out wants a directory"
            OUT="$(abspath "$2")"; shift ;;
        --quiet) QUIET=1 ;;
        -*) usage_error "unknown option: $1" ;;
        *) usage_error "unexpected argument: $1" ;;
    esac
    shift
done

# The metapackage that follows Debian's current cloud kernel, and where the init scripts are.
META_PKG=linux-image-cloud-amd64
INIT_DIR="$VIREO_ROOT/guests/linux"
MOD_SRC="$INIT_DIR/vireo-mod"
MOD_FILES=(vireo.c Kbuild)
# The static programs every image gets in /bin (from guests/linux/NAME.c).
PROGRAMS=(perfprobe)
BUSYBOX=/bin/busybox
# The applets the headless /init uses (the shell image gets every applet).
HEADLESS_APPLETS=(sh mount uname nproc awk true poweroff sleep insmod dmesg readlink umount sync sha256sum cat dd mkdir ip ping)
# The kernel's virtio modules the images carry in /lib/modules/virtio/ (paths in the kernel
# package's lib/modules/RELEASE/kernel/), in an order that loads (each after what it needs).
VIRTIO_MODULES=(drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko drivers/virtio/virtio_pci_modern_dev.ko
    drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci.ko drivers/char/virtio_console.ko
    drivers/block/virtio_blk.ko
    net/core/failover.ko drivers/net/net_failover.ko drivers/net/virtio_net.ko)
# The fixed mtime of everything in the images (SOURCE_DATE_EPOCH if the caller sets one).
EPOCH="${SOURCE_DATE_EPOCH:-0}"
[[ "$EPOCH" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be a number of seconds, not '$EPOCH'"

say() {
    [[ "$QUIET" == 1 ]] || note "$@"
}

# quietly LOG COMMAND...: runs COMMAND with its output in LOG; shows LOG on stderr if it fails
# (or always, without --quiet).
quietly() {
    local log="$1" rc=0
    shift
    "$@" >"$log" 2>&1 || rc=$?
    if [[ "$rc" != 0 || "$QUIET" == 0 ]]; then
        sed 's/^/    /' "$log" >&2
    fi
    return "$rc"
}

T_START="$(now)"
"$VIREO_ROOT/scripts/install-deps.sh" --quiet linux >&2
for f in init-headless.sh init-shell.sh "${MOD_FILES[@]/#/vireo-mod/}" "${PROGRAMS[@]/%/.c}"; do
    [[ -f "$INIT_DIR/$f" ]] || die "missing $INIT_DIR/$f"
done
[[ -x "$BUSYBOX" ]] || die "no $BUSYBOX (scripts/install-deps.sh linux installs busybox-static)"

mkdir -p "$OUT"
# One run at a time per DIR (parallel tests may all ask for the guest at once).
exec 8>"$OUT/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 8
fi

umask 022
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vireo-guest-linux.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --- the kernel ------------------------------------------------------------------------------

# kernel_package: "PACKAGE VERSION" of the versioned kernel package that the metapackage's
# candidate depends on, per apt's lists (as `apt-cache depends` and `apt-cache policy` would
# say, in one apt-cache call: each takes about a second here); empty if apt does not know the
# metapackage.
kernel_package() {
    command -v apt-cache >/dev/null 2>&1 || return 0
    local pkg ver
    read -r pkg ver < <(apt-cache show --no-all-versions "$META_PKG" 2>/dev/null |
        awk '/^Depends:/ {
                 sub(/^Depends:[ \t]*/, "")
                 n = split($0, deps, /,[ \t]*/)
                 for (i = 1; i <= n; i++)
                     if (deps[i] ~ /^linux-image-/) {
                         split(deps[i], w, /[ ()=]+/)
                         print w[1], w[2]
                         exit
                     }
             }') || true
    [[ -n "${pkg:-}" ]] || return 0
    if [[ -z "${ver:-}" ]]; then
        ver="$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ { print $2; exit }')"
    fi
    echo "$pkg ${ver:-unknown}"
}

# version_field KEY: KEY's value in DIR/kernel.version (empty if none).
version_field() {
    [[ -f "$OUT/kernel.version" ]] || return 0
    awk -F= -v k="$1" '$1 == k { sub(/^[^=]*=/, ""); print; exit }' "$OUT/kernel.version"
}

have_cached_kernel() {
    [[ -s "$OUT/vmlinuz" && -n "$(version_field release)" ]]
}

# apt_update [FOR]: apt-get update, saying it is for FOR (default: the kernel's metapackage).
apt_update() {
    local sudo=() what="${1:-$META_PKG}"
    command -v apt-get >/dev/null 2>&1 || die "no apt-get: this script fetches the kernel from Debian's archive"
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "apt-get update needs root (or sudo)"
        sudo=(sudo)
    fi
    say "apt-get update (for $what)"
    quietly "$WORK/apt-update.log" ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive \
        apt-get -q -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0 update
}

# apt_download DIR PACKAGE[=VERSION]...: apt-get download into DIR (emptied first).
apt_download() {
    local dir="$1"
    shift
    rm -rf "$dir"
    mkdir -p "$dir"
    # apt drops root to its _apt user to download; let that user write here.
    if [[ "$(id -u)" == 0 ]] && id _apt >/dev/null 2>&1; then
        chmod 755 "$WORK"
        chown _apt "$dir"
    fi
    (cd "$dir" && quietly "$WORK/apt-download.log" apt-get -q -o Dpkg::Use-Pty=0 download "$@") >&2
}

# download_kernel PACKAGE: apt-get download into WORK/deb; prints the .deb's path.
download_kernel() {
    local pkg="$1" dir="$WORK/deb" deb
    apt_download "$dir" "$pkg" || return 1
    deb="$(find "$dir" -maxdepth 1 -name '*.deb' | head -n 1)"
    [[ -n "$deb" ]] || return 1
    echo "$deb"
}

# install_kernel DEB VERSION: takes vmlinuz and its config out of DEB into DIR and writes
# kernel.version (last, so that an interrupted run leaves no matching kernel.version) with
# VERSION, the version apt named, which the next run compares (the .deb's own if "unknown").
install_kernel() {
    local deb="$1" ver="$2" x="$WORK/x" img release pkg
    pkg="$(dpkg-deb -f "$deb" Package)"
    [[ "$ver" != unknown ]] || ver="$(dpkg-deb -f "$deb" Version)"
    mkdir -p "$x"
    # Only boot/ is needed; the modules (most of the package) are not written anywhere.
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$x" --wildcards './boot/*' ||
        die "cannot unpack boot/ from $deb"
    img="$(find "$x/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)"
    [[ -n "$img" ]] || die "$deb has no boot/vmlinuz-*"
    release="${img##*/vmlinuz-}"
    [[ "$(tail -c +515 "$img" | head -c 4)" == HdrS ]] || die "$img is not a bzImage (no HdrS at 0x202)"
    rm -f "$OUT/kernel.version"
    cp "$img" "$OUT/vmlinuz.tmp" && mv -f "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
    if [[ -f "$x/boot/config-$release" ]]; then
        cp "$x/boot/config-$release" "$OUT/kernel.config"
    fi
    printf 'package=%s\nversion=%s\nrelease=%s\n' "$pkg" "$ver" "$release" >"$OUT/kernel.version.tmp"
    mv -f "$OUT/kernel.version.tmp" "$OUT/kernel.version"
    rm -rf "$x"
}

prepare_kernel() {
    local pkg ver deb t0
    read -r pkg ver < <(kernel_package) || true
    if [[ -z "${pkg:-}" ]]; then
        if have_cached_kernel; then
            note "warning: apt knows no $META_PKG; using the cached kernel $(version_field release)"
            return
        fi
        apt_update
        read -r pkg ver < <(kernel_package) || true
        [[ -n "${pkg:-}" ]] || die "apt knows no $META_PKG even after apt-get update (is deb.debian.org bookworm main in the sources?)"
    fi
    if have_cached_kernel && [[ "$(version_field package)" == "$pkg" && "$(version_field version)" == "$ver" ]]; then
        say "kernel: cached $pkg $ver"
        return
    fi
    say "kernel: downloading $pkg $ver"
    t0="$(now)"
    if ! deb="$(download_kernel "$pkg")"; then
        # The lists may be stale (the mirror dropped that version): refresh them once.
        if apt_update && read -r pkg ver < <(kernel_package) && deb="$(download_kernel "$pkg")"; then
            :
        elif have_cached_kernel; then
            note "warning: cannot download $pkg; using the cached kernel $(version_field release)"
            return
        else
            die "cannot download $pkg (apt-get download failed; see above)"
        fi
    fi
    install_kernel "$deb" "$ver"
    install_modules "$deb"
    rm -f "$deb"
    say "kernel: $(version_field release) ($(stat -c %s "$OUT/vmlinuz") bytes) in $(elapsed "$t0") s"
}

# install_modules DEB: the virtio modules of DEB's kernel into DIR/modules/ (flat), with
# modules.version naming the kernel package and version they came from and the module list.
install_modules() {
    local deb="$1" x="$WORK/xm" release m
    release="$(version_field release)"
    rm -rf "$x" "$OUT/modules"
    mkdir -p "$x" "$OUT/modules"
    dpkg-deb --fsys-tarfile "$deb" |
        tar -x -C "$x" "${VIRTIO_MODULES[@]/#/./lib/modules/$release/kernel/}" ||
        die "cannot unpack the virtio modules from $deb"
    for m in "${VIRTIO_MODULES[@]}"; do
        cp "$x/lib/modules/$release/kernel/$m" "$OUT/modules/"
    done
    printf 'package=%s\nversion=%s\nmodules=%s\n' "$(version_field package)" "$(version_field version)" \
        "${VIRTIO_MODULES[*]}" >"$OUT/modules/modules.version"
    rm -rf "$x"
}

# prepare_modules: the virtio modules for the cached kernel, fetched (the kernel package at its
# exact version) only when DIR/modules/modules.version names another kernel or module list.
prepare_modules() {
    local want dir="$WORK/mdeb" deb
    want="$(printf 'package=%s\nversion=%s\nmodules=%s' "$(version_field package)" "$(version_field version)" \
        "${VIRTIO_MODULES[*]}")"
    if [[ -f "$OUT/modules/modules.version" && "$(cat "$OUT/modules/modules.version")" == "$want" ]]; then
        say "virtio modules: cached"
        return
    fi
    say "virtio modules: downloading $(version_field package) $(version_field version)"
    if apt_download "$dir" "$(version_field package)=$(version_field version)" &&
        deb="$(find "$dir" -maxdepth 1 -name '*.deb' | head -n 1)" && [[ -n "$deb" ]]; then
        install_modules "$deb"
        rm -rf "$dir"
    else
        note "warning: cannot download the kernel package for its virtio modules; the images carry none"
    fi
}

# --- the kernel headers and vireo.ko -----------------------------------------------------------

# The build tree of the headers (set by prepare_headers).
HEADERS_ROOT=""
HEADERS_BUILD=""

# dep_of DEB PATTERN: the first dependency of DEB whose name matches the extended regular
# expression PATTERN, as "NAME OP VERSION" (OP and VERSION empty when unversioned).
dep_of() {
    dpkg-deb -f "$1" Depends | tr ',' '\n' |
        awk -v pat="^$2\$" '{
                 gsub(/[()]/, " ")
                 if ($1 ~ pat) { print $1, $2, $3; exit }
             }'
}

# download_headers RELEASE VERSION DIR: the three header packages into DIR: linux-headers-RELEASE
# at VERSION (the kernel's own), the -common package at the version it names, and the kbuild
# package (apt's candidate, which must satisfy the headers' >= dependency).
download_headers() {
    local release="$1" ver="$2" dir="$3" deb common kbuild name op v
    apt_download "$dir" "linux-headers-$release=$ver" || return 1
    deb="$(find "$dir" -maxdepth 1 -name '*.deb' | head -n 1)"
    [[ -n "$deb" ]] || return 1
    read -r name op v < <(dep_of "$deb" 'linux-headers-.*-common') || true
    [[ -n "${name:-}" && "$op" == = ]] || die "$deb names no linux-headers-*-common (= VERSION) dependency"
    common="$name=$v"
    read -r name op v < <(dep_of "$deb" 'linux-kbuild-[0-9.]+') || true
    [[ -n "${name:-}" ]] || die "$deb names no linux-kbuild-* dependency"
    kbuild="$name"
    # Into a second directory: apt_download empties the one it gets.
    apt_download "$dir/deps" "$common" "$kbuild" || return 1
    mv "$dir"/deps/*.deb "$dir/"
    rmdir "$dir/deps"
    if [[ "$op" == ">=" ]]; then
        deb="$(find "$dir" -maxdepth 1 -name "${kbuild}_*.deb" | head -n 1)"
        dpkg --compare-versions "$(dpkg-deb -f "$deb" Version)" ge "$v" ||
            die "apt's $kbuild is older than the $v that linux-headers-$release needs"
    fi
}

# install_headers RELEASE VERSION DEBDIR: extracts the .debs of DEBDIR into DIR/headers/RELEASE
# (replacing every other release's headers) and makes the build tree work where it lies.
install_headers() {
    local release="$1" ver="$2" debs="$3" dest tmp deb build inc d
    dest="$OUT/headers/$release"
    tmp="$OUT/headers/.new-$release"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    for deb in "$debs"/*.deb; do
        dpkg-deb -x "$deb" "$tmp" || die "cannot unpack $deb"
    done
    # Kept: usr/src (the trees) and usr/lib/linux-kbuild-* (scripts, tools, the compiled
    # fixdep/modpost/objtool). lib/modules/RELEASE/{build,source} are absolute links into
    # /usr/src, documentation is not needed.
    rm -rf "${tmp:?}/lib" "${tmp:?}/usr/share"
    build="$tmp/usr/src/linux-headers-$release"
    [[ -f "$build/Makefile" && -f "$build/.config" && -f "$build/Module.symvers" ]] ||
        die "linux-headers-$release has no Makefile, .config or Module.symvers"
    # The build tree's Makefile includes the -common tree's by absolute path
    # (include /usr/src/linux-headers-BASE-common/Makefile); make -C runs in the build tree,
    # so a relative include finds the sibling tree wherever DIR is. Its scripts and tools
    # links are relative already (../../lib/linux-kbuild-6.1/...) and resolve inside DIR.
    inc="$(awk '$1 == "include" { print $2; exit }' "$build/Makefile")"
    [[ "$inc" == /usr/src/*/Makefile && -f "$tmp$inc" ]] ||
        die "unexpected Makefile in linux-headers-$release: include $inc"
    printf 'include ../%s\n' "${inc#/usr/src/}" >"$build/Makefile"
    for d in scripts/basic/fixdep scripts/mod/modpost tools/objtool/objtool; do
        [[ -x "$build/$d" ]] || die "the extracted headers lack $d (linux-kbuild not unpacked next to them?)"
    done
    (cd "$debs" && for deb in *.deb; do dpkg-deb -f "$deb" Package Version | paste -sd' '; done) |
        LC_ALL=C sort | sed 's/^Package: //; s/ Version: /=/' >"$tmp/headers.packages"
    # Last, so that an interrupted run leaves no matching headers.version.
    printf 'release=%s\nversion=%s\n' "$release" "$ver" >"$tmp/headers.version"
    if [[ -d "$OUT/headers" ]]; then
        find "$OUT/headers" -mindepth 1 -maxdepth 1 ! -name ".new-$release" -exec rm -rf {} +
    fi
    mv "$tmp" "$dest"
}

prepare_headers() {
    local release ver dir t0
    release="$(version_field release)"
    ver="$(version_field version)"
    [[ -n "$release" && -n "$ver" ]] || die "$OUT/kernel.version names no release or version"
    HEADERS_ROOT="$OUT/headers/$release"
    HEADERS_BUILD="$HEADERS_ROOT/usr/src/linux-headers-$release"
    if [[ -f "$HEADERS_ROOT/headers.version" ]] && grep -qx "version=$ver" "$HEADERS_ROOT/headers.version" &&
        [[ -f "$HEADERS_BUILD/Makefile" ]]; then
        say "headers: cached linux-headers-$release $ver"
        return
    fi
    say "headers: downloading linux-headers-$release $ver and what it depends on"
    t0="$(now)"
    dir="$WORK/headers-deb"
    if ! download_headers "$release" "$ver" "$dir"; then
        # As for the kernel: stale lists are refreshed once. Without the headers there is no
        # vireo.ko and no image (they are needed once per kernel release).
        if ! { apt_update "linux-headers-$release" && download_headers "$release" "$ver" "$dir"; }; then
            die "cannot download linux-headers-$release $ver and its dependencies (offline? see above)"
        fi
    fi
    install_headers "$release" "$ver" "$dir"
    rm -rf "$dir"
    say "headers: $(tr '\n' ' ' <"$HEADERS_ROOT/headers.packages")($(du -sm "$HEADERS_ROOT" | cut -f1) MiB) in $(elapsed "$t0") s"
}

# build_module: vireo.ko from guests/linux/vireo-mod, built in DIR/vireo-mod-build against the
# headers (kbuild rebuilds only what changed, so the sources are copied only when they did),
# then DIR/vireo.ko without debug info (12x smaller; nothing in the guest reads it).
build_module() {
    local b="$OUT/vireo-mod-build" f cc out="$OUT/vireo.ko" t0
    t0="$(now)"
    # The compiler the kernel was built with (Debian's headers name it: CC = ... gcc-12).
    cc="$(grep -o 'gcc-[0-9][0-9]*' "$HEADERS_BUILD/.kernelvariables" 2>/dev/null | head -n 1 || true)"
    cc="${cc:-gcc}"
    command -v "$cc" >/dev/null 2>&1 || die "no $cc, the compiler linux-headers-$(version_field release) wants (scripts/install-deps.sh linux)"
    mkdir -p "$b"
    for f in "${MOD_FILES[@]}"; do
        cmp -s "$MOD_SRC/$f" "$b/$f" || cp "$MOD_SRC/$f" "$b/$f"
    done
    # Reproducible wherever this checkout lies: the paths of the build directory and of the
    # headers (in the debug info, which goes, and in __FILE__ strings and the build ID, which
    # stay) are mapped to fixed names.
    quietly "$WORK/module-build.log" make -C "$HEADERS_BUILD" M="$b" \
        KCFLAGS="-ffile-prefix-map=$b/=vireo-mod/ -ffile-prefix-map=$HEADERS_ROOT/=/" modules ||
        die "building vireo.ko failed (see above)"
    objcopy --strip-debug "$b/vireo.ko" "$out.tmp"
    if cmp -s "$out.tmp" "$out"; then
        rm -f "$out.tmp"
        say "vireo.ko: unchanged ($(stat -c %s "$out") bytes) in $(elapsed "$t0") s"
    else
        mv -f "$out.tmp" "$out"
        say "vireo.ko: written ($(stat -c %s "$out") bytes) in $(elapsed "$t0") s"
    fi
}

# build_programs: each of PROGRAMS from guests/linux/NAME.c into WORK/NAME (static, stripped;
# the same source gives the same bytes).
build_programs() {
    local p
    for p in "${PROGRAMS[@]}"; do
        gcc -O2 -static -s -Wall -o "$WORK/$p" "$INIT_DIR/$p.c" || die "cannot build $INIT_DIR/$p.c"
    done
}

# --- the initramfs images --------------------------------------------------------------------

# make_initramfs NAME INIT_SCRIPT APPLET...: DIR/initramfs-NAME.cpio.gz with busybox, INIT_SCRIPT
# as /init, DIR/vireo.ko as /lib/modules/vireo.ko and a /bin link to busybox for each APPLET
# ("ALL": every applet busybox has, where busybox --list-full puts it).
make_initramfs() {
    local name="$1" init="$2" stage out a link
    stage="$WORK/stage-$name"
    out="$OUT/initramfs-$name.cpio.gz"
    shift 2
    mkdir -p "$stage"/{bin,dev,proc,sys,tmp,root,lib/modules}
    chmod 1777 "$stage/tmp"
    chmod 700 "$stage/root"
    cp "$BUSYBOX" "$stage/bin/busybox"
    cp "$init" "$stage/init"
    cp "$OUT/vireo.ko" "$stage/lib/modules/vireo.ko"
    for a in "${PROGRAMS[@]}"; do
        cp "$WORK/$a" "$stage/bin/$a"
        chmod 755 "$stage/bin/$a"
    done
    chmod 755 "$stage/bin/busybox" "$stage/init"
    chmod 644 "$stage/lib/modules/vireo.ko"
    if [[ -d "$OUT/modules" ]]; then
        mkdir -p "$stage/lib/modules/virtio"
        cp "$OUT"/modules/*.ko "$stage/lib/modules/virtio/"
        chmod 644 "$stage"/lib/modules/virtio/*.ko
    fi
    if [[ -n "${WITH_IPERF3:-}" ]]; then
        add_dynamic "$WITH_IPERF3" "$stage" iperf3
    fi
    if [[ "$1" == ALL ]]; then
        while read -r link; do
            # linuxrc is busybox's init under another name; this image has its own /init.
            [[ "$link" == */* ]] || continue
            mkdir -p "$stage/${link%/*}"
            [[ -e "$stage/$link" || -L "$stage/$link" ]] || ln -s /bin/busybox "$stage/$link"
        done < <("$BUSYBOX" --list-full)
    else
        for a in "$@"; do
            ln -s busybox "$stage/bin/$a"
        done
    fi
    # Reproducible: fixed mtimes, owner root, sorted names, no device or inode numbers from
    # this machine, no name or time in the gzip header.
    find "$stage" -exec touch -h -d "@$EPOCH" {} +
    (cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        cpio -o -H newc --reproducible -R 0:0 --quiet) | gzip -9 -n >"$out.tmp"
    if cmp -s "$out.tmp" "$out"; then
        rm -f "$out.tmp"
        say "initramfs-$name: unchanged ($(stat -c %s "$out") bytes)"
    else
        mv -f "$out.tmp" "$out"
        say "initramfs-$name: written ($(stat -c %s "$out") bytes)"
    fi
}

prepare_kernel
prepare_modules
prepare_headers
build_module
build_programs
make_initramfs headless "$INIT_DIR/init-headless.sh" "${HEADLESS_APPLETS[@]}"
make_initramfs shell "$INIT_DIR/init-shell.sh" ALL
# The network image (issue 12's tests and scripts/bench-net.sh): the headless one plus Debian's
# iperf3 with its libraries, kept out of the headless image (several MiB of libcrypto). Without
# iperf3 installed (scripts/install-deps.sh linux) it is the headless image under another name.
WITH_IPERF3="$(command -v iperf3 || true)" make_initramfs net "$INIT_DIR/init-headless.sh" "${HEADLESS_APPLETS[@]}"
say "ready in $(elapsed "$T_START") s: $OUT"

echo "kernel=$OUT/vmlinuz"
echo "initrd_headless=$OUT/initramfs-headless.cpio.gz"
echo "initrd_shell=$OUT/initramfs-shell.cpio.gz"
echo "initrd_net=$OUT/initramfs-net.cpio.gz"
echo "module=$OUT/vireo.ko"
echo "version=$(version_field release)"
