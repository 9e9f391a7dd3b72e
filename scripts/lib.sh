# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this
# shellcheck source-path=SCRIPTDIR
# Shared helpers for the scripts in this folder. Sourced, not run:
#     source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# It sets VIREO_ROOT (the repository root), CALLER_PWD (the directory the script was started
# from, so that relative paths given on the command line keep meaning what the user meant)
# and changes to the repository root.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "lib.sh is sourced by the other scripts in $(dirname "$0"); it does nothing by itself" >&2
    exit 2
fi

CALLER_PWD="$PWD"
VIREO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$VIREO_ROOT" || exit 1

# Where rustup puts cargo when it is not on PATH yet (a fresh login shell on CI).
if ! command -v cargo >/dev/null 2>&1 && [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    export PATH
fi

# The name the running script reports under, e.g. "run-qemu".
PROG="$(basename "$0" .sh)"

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

note() {
    echo "$PROG: $*" >&2
}

# usage_error MESSAGE: a bad command line; prints the hint to --help and exits 2.
usage_error() {
    echo "$PROG: $*" >&2
    echo "Try '$0 --help'." >&2
    exit 2
}

# need_arg OPTION ARGC: fail unless OPTION has a value after it.
need_arg() {
    [[ "$2" -ge 2 ]] || usage_error "option $1 needs a value"
}

# abspath PATH: PATH made absolute against the caller's working directory (it need not exist).
abspath() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$CALLER_PWD/$1" ;;
    esac
}

# now: seconds since the epoch with fractions, for timing.
now() {
    date +%s.%N
}

# elapsed START [END]: seconds between two `now` readings, one decimal.
elapsed() {
    awk -v a="$1" -v b="${2:-$(now)}" 'BEGIN { printf "%.1f", b - a }'
}

# serial_clean FILE: the serial log as plain lines: carriage returns and terminal escape
# sequences (GRUB draws its menu with them) removed.
serial_clean() {
    sed -e 's/\r//g' -e 's/\x1b\[[0-9;=?]*[A-Za-z]//g' "$1"
}

# serial_stream PID FILE: in the background, copy FILE to stdout as it grows, cleaned like
# serial_clean, until process PID has ended; sets STREAM_PID (wait for it).
serial_stream() {
    tail -n +1 -s 0.1 --pid="$1" -f "$2" | sed -u -e 's/\r//g' -e 's/\x1b\[[0-9;=?]*[A-Za-z]//g' &
    STREAM_PID=$!
}

# serial_ok FILE: true if the serial log has the line "vireo: exit status=ok".
serial_ok() {
    [[ -f "$1" ]] && serial_clean "$1" | grep -aqx 'vireo: exit status=ok'
}

# serial_tail FILE: the last 40 lines of the serial log, to stderr.
serial_tail() {
    if [[ -s "$1" ]]; then
        echo "----- last 40 serial lines -----" >&2
        serial_clean "$1" | tail -n 40 >&2
        echo "--------------------------------" >&2
    else
        echo "(the serial log is empty)" >&2
    fi
}

# cmdline_has_exit CMDLINE: true if CMDLINE already has an exit= key.
cmdline_has_exit() {
    local w
    for w in $1; do
        [[ "$w" == exit=* ]] && return 0
    done
    return 1
}

# ---------------------------------------------------------------------------------------------
# The part that run-qemu.sh and run-bochs.sh share: options, build, ISO, result.

# Defaults; the run scripts set RUN_TIMEOUT_DEFAULT and RUN_EXIT_KEY before parsing.
RUN_HEADLESS=0
RUN_TIMEOUT=""
RUN_CMDLINE=""
RUN_MODULES=()
RUN_GUESTS=()
RUN_DEFAULT_GUEST=1
RUN_TEST_BUILD=0
RUN_ELF=""
RUN_ISO=""
RUN_MEM=512
RUN_SMP=2
RUN_LOG=""
RUN_EXTRA=()
RUN_CMDLINE_SET=0

RUN_COMMON_HELP='Common options:
  --headless            no terminal interaction: stdin from /dev/null, the serial log streamed
                        to stdout (carriage returns and terminal escapes removed), exit=EMU
                        appended to the hypervisor command line (unless it has an exit= key),
                        the emulator killed after --timeout seconds. Exit status: 0 only if the
                        serial log has the line "vireo: exit status=ok"; 124 on timeout;
                        1 otherwise (the last 40 serial lines go to stderr).
  --timeout SECONDS     kill the emulator after SECONDS (headless default: DEFAULT_TIMEOUT;
                        interactive default: none)
  --cmdline "ARGS"      the hypervisor command line (the rest of the GRUB multiboot2 line);
                        words are split on blanks and passed literally, except that GRUB
                        puts a backslash before each quote and backslash
  --module PATH[=ARGS]  add a multiboot2 module (copied to /boot/modules/ in the ISO) with
                        module command line ARGS; repeatable, order kept
  --guest NAME[=ARGS]   build the guest in guests/NAME (crate vireo-NAME) and add it as a
                        module with command line ARGS (default: NAME), i.e. a VM named by
                        the first word of ARGS; e.g. --guest selftest,
                        --guest "selftest=crasher mode=triple-fault"; repeatable
  --no-default-guest    boot Vireo with no VM when no --module/--guest is given (without
                        this, the default guest runs: the Debian cloud kernel with a busybox
                        initramfs from scripts/guest-linux.sh; a shell on the console, or
                        under --headless a short self-check that powers off)
  --test-build          build with --features test-hooks (into target/test-hooks)
  --elf PATH            do not build; boot this multiboot2 ELF
  --iso PATH            do not build or make an ISO; boot this one (its grub.cfg is used as it
                        is: --cmdline, --module and the headless exit= key do not apply)
  --mem MIB             guest memory in MiB (default 512)
  --smp N               host CPUs of the emulated machine, 1 to 16 (default 2); Vireo
                        starts and uses all of them unless its command line says cpus=N
  --log FILE            also keep the serial log in FILE (written when the run ends)
  -h, --help            this text
  -- ARGS...            pass ARGS to the emulator as they are
Environment: VIREO_KEEP_WORK=1 keeps the work directory of the run (ISO, logs, bochsrc).'

# run_parse_common ARGS...: parses one common option. Sets RUN_SHIFT to how many words it
# took; 0 if the option is not a common one.
run_parse_common() {
    RUN_SHIFT=1
    case "$1" in
        --headless) RUN_HEADLESS=1 ;;
        --timeout)
            need_arg "$1" "$#"
            [[ "$2" =~ ^[0-9]+$ && "$2" -gt 0 ]] || usage_error "--timeout wants a positive number of seconds, not '$2'"
            RUN_TIMEOUT="$2"; RUN_SHIFT=2 ;;
        --cmdline)
            need_arg "$1" "$#"
            RUN_CMDLINE="$2"; RUN_CMDLINE_SET=1; RUN_SHIFT=2 ;;
        --module)
            need_arg "$1" "$#"
            RUN_MODULES+=("$2"); RUN_SHIFT=2 ;;
        --guest)
            need_arg "$1" "$#"
            RUN_GUESTS+=("$2"); RUN_SHIFT=2 ;;
        --no-default-guest) RUN_DEFAULT_GUEST=0 ;;
        --test-build) RUN_TEST_BUILD=1 ;;
        --elf)
            need_arg "$1" "$#"
            RUN_ELF="$(abspath "$2")"; RUN_SHIFT=2 ;;
        --iso)
            need_arg "$1" "$#"
            RUN_ISO="$(abspath "$2")"; RUN_SHIFT=2 ;;
        --mem)
            need_arg "$1" "$#"
            [[ "$2" =~ ^[0-9]+$ && "$2" -ge 16 ]] || usage_error "--mem wants MiB (at least 16), not '$2'"
            RUN_MEM="$2"; RUN_SHIFT=2 ;;
        --smp)
            need_arg "$1" "$#"
            [[ "$2" =~ ^[0-9]+$ && "$2" -ge 1 && "$2" -le 16 ]] || usage_error "--smp wants 1 to 16 CPUs, not '$2'"
            RUN_SMP="$2"; RUN_SHIFT=2 ;;
        --log)
            need_arg "$1" "$#"
            RUN_LOG="$(abspath "$2")"; RUN_SHIFT=2 ;;
        *) RUN_SHIFT=0 ;;
    esac
}

# run_check_common: consistency of the common options, after parsing.
run_check_common() {
    if [[ -n "$RUN_ISO" ]]; then
        [[ -f "$RUN_ISO" ]] || die "--iso: no such file: $RUN_ISO"
        [[ -z "$RUN_ELF" ]] || usage_error "--iso and --elf exclude each other"
        [[ "$RUN_TEST_BUILD" == 0 ]] || usage_error "--iso and --test-build exclude each other"
        [[ "$RUN_CMDLINE_SET" == 0 && ${#RUN_MODULES[@]} -eq 0 && ${#RUN_GUESTS[@]} -eq 0 ]] ||
            usage_error "--cmdline and --module do not apply to a ready-made --iso"
        if [[ "$RUN_HEADLESS" == 1 ]]; then
            note "note: --iso is booted as it is; unless it ends the emulator itself (exit=$RUN_EXIT_KEY on Vireo's command line, a guest's ACPI power-off) the run ends only at the timeout"
        fi
    fi
    if [[ -n "$RUN_ELF" ]]; then
        [[ -f "$RUN_ELF" ]] || die "--elf: no such file: $RUN_ELF"
        [[ "$RUN_TEST_BUILD" == 0 ]] || usage_error "--elf and --test-build exclude each other"
    fi
    local m path g
    for g in ${RUN_GUESTS[@]+"${RUN_GUESTS[@]}"}; do
        [[ -f "$VIREO_ROOT/guests/${g%%=*}/Cargo.toml" ]] || die "--guest: no guest crate guests/${g%%=*}"
    done
    for m in ${RUN_MODULES[@]+"${RUN_MODULES[@]}"}; do
        path="${m%%=*}"
        [[ -f "$(abspath "$path")" ]] || die "--module: no such file: $path"
    done
    if [[ -z "$RUN_TIMEOUT" && "$RUN_HEADLESS" == 1 ]]; then
        RUN_TIMEOUT="$RUN_TIMEOUT_DEFAULT"
    fi
    if [[ -n "$RUN_LOG" ]]; then
        mkdir -p "$(dirname "$RUN_LOG")"
    fi
}

# run_make_workdir NAME: a private directory for this run (RUN_WORK), removed at exit unless
# VIREO_KEEP_WORK=1. Also installs the exit trap that keeps --log and prints the elapsed time.
run_make_workdir() {
    RUN_WORK="$(mktemp -d "${TMPDIR:-/tmp}/vireo-$1.XXXXXX")"
    RUN_SERIAL="$RUN_WORK/serial.log"
    : >"$RUN_SERIAL"
    RUN_START="$(now)"
    RUN_EMU_START=""
    RUN_EMU_END=""
    trap run_on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Background processes (emulator, tail) to stop if the script ends early.
RUN_PIDS=()

run_on_exit() {
    local rc=$? pid
    set +e
    for pid in ${RUN_PIDS[@]+"${RUN_PIDS[@]}"}; do
        kill -TERM "$pid" 2>/dev/null
    done
    if [[ -n "${RUN_LOG:-}" && -f "${RUN_SERIAL:-}" ]]; then
        cp -f "$RUN_SERIAL" "$RUN_LOG"
    fi
    if [[ -n "${RUN_WORK:-}" && -d "$RUN_WORK" ]]; then
        if [[ "${VIREO_KEEP_WORK:-0}" == 1 ]]; then
            note "work directory kept: $RUN_WORK"
        else
            rm -rf "$RUN_WORK"
        fi
    fi
    local emu=""
    if [[ -n "${RUN_EMU_START:-}" ]]; then
        emu=", emulator $(elapsed "$RUN_EMU_START" "${RUN_EMU_END:-$(now)}") s"
    fi
    note "elapsed $(elapsed "$RUN_START") s$emu (exit status $rc)"
    exit "$rc"
}

# run_prepare_iso DEPS...: installs what is missing (components for install-deps.sh), builds
# the ELF unless --elf/--iso, makes the ISO unless --iso. Sets RUN_ISO_PATH and RUN_FULL_CMDLINE.
run_prepare_iso() {
    local deps=("$@")
    if [[ -z "$RUN_ISO" ]]; then
        deps+=(iso)
        [[ -n "$RUN_ELF" ]] || deps+=(rust host)
    fi
    "$VIREO_ROOT/scripts/install-deps.sh" --quiet "${deps[@]}"

    if [[ -n "$RUN_ISO" ]]; then
        RUN_ISO_PATH="$RUN_ISO"
        RUN_FULL_CMDLINE=""
        return
    fi

    local elf="$RUN_ELF" t0
    if [[ -z "$elf" ]]; then
        local bargs=()
        if [[ "$RUN_TEST_BUILD" == 1 ]]; then
            bargs=(--features test-hooks --target-dir "$VIREO_ROOT/target/test-hooks")
        fi
        t0="$(now)"
        elf="$("$VIREO_ROOT/scripts/build.sh" ${bargs[@]+"${bargs[@]}"} | tail -n 1)"
        [[ -n "$elf" && -f "$elf" ]] || die "the build gave no ELF"
        note "built $elf in $(elapsed "$t0") s"
    fi

    RUN_FULL_CMDLINE="$RUN_CMDLINE"
    if [[ "$RUN_HEADLESS" == 1 ]] && ! cmdline_has_exit "$RUN_FULL_CMDLINE"; then
        RUN_FULL_CMDLINE="${RUN_FULL_CMDLINE:+$RUN_FULL_CMDLINE }exit=$RUN_EXIT_KEY"
    fi

    local margs=() m g name gargs gelf
    if [[ "$RUN_DEFAULT_GUEST" == 1 && ${#RUN_MODULES[@]} -eq 0 && ${#RUN_GUESTS[@]} -eq 0 ]]; then
        run_default_linux_modules
    fi
    for m in ${RUN_MODULES[@]+"${RUN_MODULES[@]}"}; do
        margs+=(--module "$(abspath "$m")")
    done
    for g in ${RUN_GUESTS[@]+"${RUN_GUESTS[@]}"}; do
        name="${g%%=*}"
        gargs="$name"
        [[ "$g" != *=* ]] || gargs="${g#*=}"
        gelf="$(run_build_guest "$name")"
        margs+=(--module "$gelf=$gargs")
    done
    RUN_ISO_PATH="$RUN_WORK/vireo.iso"
    t0="$(now)"
    "$VIREO_ROOT/scripts/mkiso.sh" --quiet --elf "$elf" --out "$RUN_ISO_PATH" \
        --cmdline "$RUN_FULL_CMDLINE" ${margs[@]+"${margs[@]}"}
    note "made ISO in $(elapsed "$t0") s; hypervisor cmdline: '$RUN_FULL_CMDLINE'"
}

# The default guest's kernel command line: serial console, and a light workload so the
# headless self-check also finishes quickly in Bochs.
RUN_LINUX_CMDLINE="console=ttyS0 panic=-1 linux_guest_compute=20000 linux_guest_forks=50"

# run_default_linux_modules: adds the default Linux guest (kernel + initramfs) to RUN_MODULES.
run_default_linux_modules() {
    local out kernel initrd
    out="$("$VIREO_ROOT/scripts/guest-linux.sh" --quiet)" || die "preparing the default Linux guest failed"
    kernel="$(sed -n 's/^kernel=//p' <<<"$out")"
    if [[ "$RUN_HEADLESS" == 1 ]]; then
        initrd="$(sed -n 's/^initrd_headless=//p' <<<"$out")"
    else
        initrd="$(sed -n 's/^initrd_shell=//p' <<<"$out")"
    fi
    [[ -f "$kernel" && -f "$initrd" ]] || die "guest-linux.sh gave no kernel/initramfs"
    RUN_MODULES+=("$kernel=linux mem=256M -- $RUN_LINUX_CMDLINE" "$initrd=linux:initrd")
    note "default guest: Debian Linux $(sed -n 's/^version=//p' <<<"$out") ($(basename "$initrd"))"
}

# run_build_guest NAME: builds guests/NAME for the bare-metal target; prints the ELF's path.
run_build_guest() {
    local name="$1" t0
    t0="$(now)"
    (cd "$VIREO_ROOT" && cargo build --release -q -p "vireo-$name" --target x86_64-unknown-none) >&2 ||
        die "building guest $name failed"
    note "built guest $name in $(elapsed "$t0") s"
    echo "$VIREO_ROOT/target/x86_64-unknown-none/release/vireo-$name"
}

# run_verdict EMULATOR_RC OK_RC: the headless exit status. EMULATOR_RC 124/137 is a timeout.
# OK_RC is the emulator status that goes with success ("" = any).
run_verdict() {
    local erc="$1" okrc="$2"
    if [[ "$erc" == 124 || "$erc" == 137 ]]; then
        note "timeout after $RUN_TIMEOUT s"
        serial_tail "$RUN_SERIAL"
        return 124
    fi
    if serial_ok "$RUN_SERIAL"; then
        if [[ -z "$okrc" || "$erc" == "$okrc" ]]; then
            note "ok: the serial log has 'vireo: exit status=ok'"
            return 0
        fi
        note "failed: the serial log says ok, but the emulator exited with status $erc (expected $okrc)"
    else
        local why
        why="$(serial_clean "$RUN_SERIAL" | grep -a '^vireo: exit status=' | tail -n 1 || true)"
        note "failed: emulator exit status $erc; ${why:-no 'vireo: exit status=ok' line in the serial log}"
    fi
    serial_tail "$RUN_SERIAL"
    return 1
}

# emu_lock / emu_unlock: with VIREO_EMU_LOCK=FILE set, hold `flock FILE` (on fd 9) around one
# emulator run, so benchmark scripts on a machine shared with others run one emulator at a time.
emu_lock() {
    if [[ -n "${VIREO_EMU_LOCK:-}" ]]; then
        exec 9>>"$VIREO_EMU_LOCK"
        flock 9
    fi
}

emu_unlock() {
    if [[ -n "${VIREO_EMU_LOCK:-}" ]]; then
        flock -u 9
        exec 9>&-
    fi
}

# add_dynamic BINARY STAGE NAME: a dynamically linked program as STAGE/bin/NAME, with the
# shared libraries ldd names for it (the dynamic loader included) at their own paths, the real
# files rather than links (a small resolver: no package metadata needed). For initramfs images
# (scripts/scoreboard.sh, scripts/guest-linux.sh).
add_dynamic() {
    local bin="$1" stage="$2" lib
    install -D -m 755 "$bin" "$stage/bin/$3"
    while read -r lib; do
        install -D -m 755 "$(readlink -f "$lib")" "$stage$lib"
    done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
}
