#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Builds Vireo, puts it on a GRUB ISO and boots it in Bochs, with Intel VMX or AMD SVM; on a
# fresh machine it installs what is missing first.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUN_TIMEOUT_DEFAULT=600
RUN_EXIT_KEY=bochs

usage() {
    cat <<EOF
Usage: scripts/run-bochs.sh [--cpu vmx|svm] [OPTIONS] [-- BOCHSRC LINES...]

Installs what is missing, builds Vireo (scripts/build.sh), makes a GRUB ISO
(scripts/mkiso.sh) and boots it (BIOS) in Bochs with a bochsrc made from boot/bochsrc.in.
COM1 goes to a file that is streamed to stdout as it grows. Bochs's own log is kept in the
work directory (VIREO_KEEP_WORK=1 keeps that) and its tail is shown when a run fails.

Bochs options:
  --cpu vmx|svm         vmx (default): cpu model corei7_skylake_x (VMX with EPT, VPID,
                        unrestricted guest); svm: cpu model ryzen (SVM with nested paging,
                        nRIP save, flush-by-ASID)

$(printf '%s\n' "$RUN_COMMON_HELP" | sed "s/DEFAULT_TIMEOUT/$RUN_TIMEOUT_DEFAULT/; s/exit=EMU/exit=bochs/; s/pass ARGS to the emulator as they are/more bochsrc lines for Bochs's command line, e.g. 'cpuid: x2apic=0'/")

Bochs always exits with status 1, so in headless mode the verdict is the serial log's alone.
Interactive mode: the display is sdl2 where \$DISPLAY is set and the plugin is installed,
rfb (a VNC-like server on port 5900 or the next free one) otherwise; Ctrl-C stops Bochs in its
internal debugger, where 'c' continues and 'q' quits.

Examples:
  scripts/run-bochs.sh --cpu svm
  scripts/run-bochs.sh --headless --cpu vmx --timeout 300 --log vmx.log
EOF
}

CPU=vmx
while [[ $# -gt 0 ]]; do
    run_parse_common "$@"
    if [[ "$RUN_SHIFT" -gt 0 ]]; then
        shift "$RUN_SHIFT"
        continue
    fi
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --cpu)
            need_arg "$1" "$#"
            case "$2" in
                vmx|svm) CPU="$2" ;;
                *) usage_error "--cpu wants vmx or svm, not '$2'" ;;
            esac
            shift ;;
        --) shift; RUN_EXTRA=("$@"); break ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done
run_check_common

case "$CPU" in
    vmx) CPU_MODEL=corei7_skylake_x ;;
    svm) CPU_MODEL=ryzen ;;
esac

run_make_workdir bochs
run_prepare_iso bochs

BOCHS_PLUGINS=/usr/lib/x86_64-linux-gnu/bochs/plugins
DISPLAY_LIB='rfb, options="timeout=0"'
if [[ "$RUN_HEADLESS" == 0 && -n "${DISPLAY:-}" && -e "$BOCHS_PLUGINS/libbx_sdl2_gui.so" ]]; then
    DISPLAY_LIB=sdl2
fi

# bochsrc from the template. Paths are double-quoted in the template; a path with a double
# quote in it cannot be written there.
for p in "$RUN_ISO_PATH" "$RUN_WORK"; do
    [[ "$p" != *'"'* ]] || die "Bochs cannot take a path with a double quote: $p"
done
BOCHSRC="$RUN_WORK/bochsrc"
TEMPLATE="$VIREO_ROOT/boot/bochsrc.in"
[[ -f "$TEMPLATE" ]] || die "missing template $TEMPLATE"
{
    while IFS= read -r line || [[ -n "$line" ]]; do
        if [[ ! "$line" =~ ^[[:space:]]*# ]]; then
            line="${line//@MEGS@/"$RUN_MEM"}"
            line="${line//@CPU_MODEL@/"$CPU_MODEL"}"
            line="${line//@CPUS@/"$RUN_SMP"}"
            line="${line//@DISPLAY@/"$DISPLAY_LIB"}"
            line="${line//@ISO@/"$RUN_ISO_PATH"}"
            line="${line//@COM1@/"$RUN_SERIAL"}"
            line="${line//@LOG@/"$RUN_WORK/bochs.log"}"
        fi
        printf '%s\n' "$line"
    done <"$TEMPLATE"
} >"$BOCHSRC"
# The internal debugger (built into Debian's Bochs) stops before the first instruction:
# tell it to continue.
echo c >"$RUN_WORK/debugger.rc"

BOCHS=(bochs -q -f "$BOCHSRC" -rc "$RUN_WORK/debugger.rc")
note "booting with Bochs (cpu $CPU_MODEL x $RUN_SMP, ${RUN_MEM} MiB, display ${DISPLAY_LIB%%,*})${RUN_TIMEOUT:+, timeout $RUN_TIMEOUT s}"

# bochs_diagnostics: the end of Bochs's log and output, after a failure.
bochs_diagnostics() {
    local f
    for f in "$RUN_WORK/bochs.out" "$RUN_WORK/bochs.log"; do
        if [[ -s "$f" ]]; then
            echo "----- last 15 lines of $(basename "$f") -----" >&2
            tail -n 15 "$f" >&2
        fi
    done
}

RUN_EMU_START="$(now)"
set +e
if [[ "$RUN_HEADLESS" == 1 ]]; then
    timeout -k 5 "$RUN_TIMEOUT" "${BOCHS[@]}" ${RUN_EXTRA[@]+"${RUN_EXTRA[@]}"} \
        </dev/null >"$RUN_WORK/bochs.out" 2>&1 &
    BOCHS_PID=$!
    # Stream COM1 as Bochs writes it; tail ends by itself soon after Bochs does.
    serial_stream "$BOCHS_PID" "$RUN_SERIAL"
    TAIL_PID="$STREAM_PID"
    RUN_PIDS=("$BOCHS_PID" "$TAIL_PID")
    wait "$BOCHS_PID"
    brc=$?
    wait "$TAIL_PID"
    RUN_PIDS=()
else
    # Bochs runs in the foreground, with the terminal (its debugger reads it after Ctrl-C);
    # its start-up chatter (stderr) goes to a file, shown if it fails.
    # COM1 is streamed by a tail in the background (which ignores Ctrl-C, being a background
    # job of a script). The script itself only notes a Ctrl-C.
    trap : INT
    tail -n +1 -s 0.2 -f "$RUN_SERIAL" &
    TAIL_PID=$!
    RUN_PIDS=("$TAIL_PID")
    if [[ -n "$RUN_TIMEOUT" ]]; then
        timeout --foreground -k 5 "$RUN_TIMEOUT" "${BOCHS[@]}" ${RUN_EXTRA[@]+"${RUN_EXTRA[@]}"} \
            2>"$RUN_WORK/bochs.out"
    else
        "${BOCHS[@]}" ${RUN_EXTRA[@]+"${RUN_EXTRA[@]}"} 2>"$RUN_WORK/bochs.out"
    fi
    brc=$?
    sleep 0.5
    kill "$TAIL_PID" 2>/dev/null
    wait "$TAIL_PID" 2>/dev/null
    RUN_PIDS=()
    trap 'exit 130' INT
fi
set -e
RUN_EMU_END="$(now)"

if [[ "$RUN_HEADLESS" == 1 ]]; then
    set +e
    run_verdict "$brc" ""
    rc=$?
    set -e
    [[ "$rc" == 0 ]] || bochs_diagnostics
    exit "$rc"
fi
if [[ "$brc" == 124 ]]; then
    note "timeout after $RUN_TIMEOUT s"
    exit 124
fi
# Interactive: 0 if Vireo said ok, otherwise Bochs's own status.
if serial_ok "$RUN_SERIAL"; then
    exit 0
fi
[[ "$brc" == 0 ]] || bochs_diagnostics
exit "$brc"
