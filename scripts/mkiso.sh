#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Makes a GRUB ISO that boots Vireo (or, with --linux, a Linux kernel natively) with BIOS and
# with UEFI.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: scripts/mkiso.sh --elf ELF --out ISO [--cmdline "ARGS"] [--module PATH[=ARGS]]...
       scripts/mkiso.sh --linux KERNEL [--initrd FILE] --out ISO [--cmdline "ARGS"]

Makes a hybrid GRUB ISO (BIOS El Torito + UEFI x86_64) with grub-mkrescue. Its grub.cfg comes
from boot/grub.cfg.in: GRUB talks over COM1 at 115200 and boots at once with
    multiboot2 /boot/vireo.elf ARGS
    module2 --nounzip /boot/modules/FILE ARGS      (one line per --module, in order)
or, with --linux (a Linux kernel booted natively, e.g. to compare with the same kernel as a
VM under Vireo):
    linux /boot/vmlinuz ARGS
    initrd /boot/initrd                            (with --initrd)

Options:
  --elf ELF             the multiboot2 kernel (copied to /boot/vireo.elf)
  --linux KERNEL        instead of --elf: a Linux bzImage (copied to /boot/vmlinuz), loaded
                        with GRUB's linux command (GRUB puts BOOT_IMAGE=/boot/vmlinuz before
                        ARGS on the kernel's command line)
  --initrd FILE         with --linux: its initramfs (copied to /boot/initrd)
  --out ISO             where to write the ISO (replaced atomically)
  --cmdline "ARGS"      the command line of the kernel (Vireo's or, with --linux, Linux's);
                        split on blanks, each word passed literally (GRUB itself
                        backslash-escapes quotes and backslashes)
  --module PATH[=ARGS]  with --elf: a module file (copied to /boot/modules/ under its file
                        name) and its command line ARGS (empty without '='); repeatable
  --keep-debug          copy the ELF as it is; by default its DWARF debug sections are left
                        out of the ISO's copy (objcopy --strip-debug: symbols stay), which
                        makes a release build with debug info about 50 times smaller and
                        halves the time Bochs takes to load it
  --no-deps             do not check for (and install) grub-mkrescue and friends first
  --quiet               no progress messages
  -h, --help            this text
EOF
}

ELF=""
LINUX=""
INITRD=""
OUT=""
CMDLINE=""
MODULES=()
DEPS=1
QUIET=0
KEEP_DEBUG=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --elf) need_arg "$1" "$#"; ELF="$(abspath "$2")"; shift ;;
        --linux) need_arg "$1" "$#"; LINUX="$(abspath "$2")"; shift ;;
        --initrd) need_arg "$1" "$#"; INITRD="$(abspath "$2")"; shift ;;
        --out) need_arg "$1" "$#"; OUT="$(abspath "$2")"; shift ;;
        --cmdline) need_arg "$1" "$#"; CMDLINE="$2"; shift ;;
        --module) need_arg "$1" "$#"; MODULES+=("$2"); shift ;;
        --keep-debug) KEEP_DEBUG=1 ;;
        --no-deps) DEPS=0 ;;
        --quiet) QUIET=1 ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done
[[ -n "$ELF" || -n "$LINUX" ]] || usage_error "--elf (or --linux) is required"
[[ -z "$ELF" || -z "$LINUX" ]] || usage_error "--elf and --linux exclude each other"
[[ -n "$OUT" ]] || usage_error "--out is required"
if [[ -n "$LINUX" ]]; then
    [[ -f "$LINUX" ]] || die "no such kernel: $LINUX"
    [[ -z "$INITRD" || -f "$INITRD" ]] || die "no such initramfs: $INITRD"
    [[ ${#MODULES[@]} -eq 0 ]] || usage_error "--module goes with --elf, not --linux (--initrd is Linux's)"
else
    [[ -f "$ELF" ]] || die "no such ELF: $ELF"
    [[ -z "$INITRD" ]] || usage_error "--initrd goes with --linux"
fi

if [[ "$DEPS" == 1 ]]; then
    "$VIREO_ROOT/scripts/install-deps.sh" --quiet iso
fi

GRUB_LIB=/usr/lib/grub
for platform in i386-pc x86_64-efi; do
    [[ -d "$GRUB_LIB/$platform" ]] || die "$GRUB_LIB/$platform is missing (scripts/install-deps.sh iso)"
done

if [[ -n "$ELF" ]] && command -v grub-file >/dev/null 2>&1 && ! grub-file --is-x86-multiboot2 "$ELF"; then
    die "$ELF has no multiboot2 header in its first 32 KiB"
fi

T0="$(now)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/vireo-mkiso.XXXXXX")"
TMP_OUT=""
cleanup() {
    rm -rf "$WORK"
    [[ -z "$TMP_OUT" ]] || rm -f "$TMP_OUT"
}
trap cleanup EXIT

# grub_word WORD: WORD single-quoted for GRUB's script parser (no expansion, no splitting).
grub_word() {
    local s="$1" q="'\\''"
    printf "'%s'" "${s//\'/"$q"}"
}

# grub_words "ARGS": each blank-separated word of ARGS quoted, joined with spaces.
grub_words() {
    local ws=() out=() w
    read -r -a ws <<<"$1" || true
    for w in ${ws[@]+"${ws[@]}"}; do
        out+=("$(grub_word "$w")")
    done
    printf '%s' "${out[*]-}"
}

ISODIR="$WORK/iso"
mkdir -p "$ISODIR/boot/grub" "$ISODIR/boot/modules"
CMDLINE_WORDS="$(grub_words "$CMDLINE")"
# BOOT_LINES: the loader lines of the menu entry.
if [[ -n "$LINUX" ]]; then
    TITLE=Linux
    LOADER=linux
    cp "$LINUX" "$ISODIR/boot/vmlinuz"
    BOOT_LINES=("linux /boot/vmlinuz${CMDLINE_WORDS:+ $CMDLINE_WORDS}")
    if [[ -n "$INITRD" ]]; then
        cp "$INITRD" "$ISODIR/boot/initrd"
        BOOT_LINES+=("initrd /boot/initrd")
    fi
else
    TITLE=Vireo
    LOADER=multiboot2
    if [[ "$KEEP_DEBUG" == 1 ]] || ! command -v objcopy >/dev/null 2>&1 ||
       ! objcopy --strip-debug "$ELF" "$ISODIR/boot/vireo.elf" 2>"$WORK/objcopy.log"; then
        cp "$ELF" "$ISODIR/boot/vireo.elf"
    fi
    BOOT_LINES=("multiboot2 /boot/vireo.elf${CMDLINE_WORDS:+ $CMDLINE_WORDS}")
fi

for m in ${MODULES[@]+"${MODULES[@]}"}; do
    path="${m%%=*}"
    args=""
    [[ "$m" != *=* ]] || args="${m#*=}"
    path="$(abspath "$path")"
    [[ -f "$path" ]] || die "no such module file: $path"
    # A plain file name (GRUB and ISO 9660 are happier without odd characters), unique.
    name="$(basename "$path" | tr -c 'A-Za-z0-9._+\n-' '_')"
    base="$name"
    n=2
    while [[ -e "$ISODIR/boot/modules/$name" ]]; do
        name="$base.$n"
        n=$((n + 1))
    done
    cp "$path" "$ISODIR/boot/modules/$name"
    line="module2 --nounzip /boot/modules/$name"
    words="$(grub_words "$args")"
    [[ -z "$words" ]] || line+=" $words"
    BOOT_LINES+=("$line")
done

# grub.cfg from the template.
TEMPLATE="$VIREO_ROOT/boot/grub.cfg.in"
[[ -f "$TEMPLATE" ]] || die "missing template $TEMPLATE"
{
    while IFS= read -r line || [[ -n "$line" ]]; do
        if [[ "$line" =~ ^[[:space:]]*# ]]; then
            printf '%s\n' "$line"
        elif [[ "$line" =~ ^([[:space:]]*)@BOOT@[[:space:]]*$ ]]; then
            indent="${BASH_REMATCH[1]}"
            for ml in "${BOOT_LINES[@]}"; do
                printf '%s%s\n' "$indent" "$ml"
            done
        else
            printf '%s\n' "${line//@TITLE@/"$TITLE"}"
        fi
    done <"$TEMPLATE"
} >"$ISODIR/boot/grub/grub.cfg"

# Only what this grub.cfg needs, plus the partition-map modules that GRUB's EFI image tries to
# load by itself (it prints "file not found" errors for any that are missing).
GRUB_MODULES="$LOADER normal serial terminal configfile boot"
for platform in i386-pc x86_64-efi; do
    if [[ -f "$GRUB_LIB/$platform/partmap.lst" ]]; then
        GRUB_MODULES+=" $(tr '\n' ' ' <"$GRUB_LIB/$platform/partmap.lst")"
    fi
done
GRUB_MODULES="$(tr ' ' '\n' <<<"$GRUB_MODULES" | sed '/^$/d' | sort -u | tr '\n' ' ')"

mkdir -p "$(dirname "$OUT")"
TMP_OUT="$(mktemp "$(dirname "$OUT")/.$(basename "$OUT").XXXXXX")"
# Without -d, grub-mkrescue puts in every platform under /usr/lib/grub: i386-pc (BIOS) and
# x86_64-efi (UEFI) are the ones install-deps.sh installs.
if ! grub-mkrescue -o "$TMP_OUT" \
        --install-modules="${GRUB_MODULES% }" --fonts= --locales= --themes= --compress=no \
        "$ISODIR" >"$WORK/grub-mkrescue.log" 2>&1; then
    cat "$WORK/grub-mkrescue.log" >&2
    die "grub-mkrescue failed"
fi
chmod 0644 "$TMP_OUT"
mv -f "$TMP_OUT" "$OUT"
TMP_OUT=""

if [[ "$QUIET" == 0 ]]; then
    note "wrote $OUT ($(du -k "$OUT" | cut -f1) KiB) in $(elapsed "$T0") s; grub.cfg:"
    sed -n '/^menuentry/,/^}/p' "$ISODIR/boot/grub/grub.cfg" >&2
fi
