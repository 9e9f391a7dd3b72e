#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Builds Vireo, puts it on a GRUB ISO and boots it in QEMU; on a fresh machine it installs
# what is missing first.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUN_TIMEOUT_DEFAULT=120
RUN_EXIT_KEY=qemu
OVMF=/usr/share/ovmf/OVMF.fd

usage() {
    cat <<EOF
Usage: scripts/run-qemu.sh [OPTIONS] [-- QEMU ARGS...]

Installs what is missing, builds Vireo (scripts/build.sh), makes a GRUB ISO
(scripts/mkiso.sh) and boots it in qemu-system-x86_64 with
  -accel tcg,thread=multi -cpu qemu64,+svm,+npt -m MEM -smp N -no-reboot -nic none
  -device isa-debug-exit,iobase=0xf4,iosize=0x04 -cdrom ISO (as -drive, for odd paths)
Interactive by default: the serial console (multiplexed with QEMU's monitor, Ctrl-A X quits,
Ctrl-A C switches) is on the terminal.

QEMU options:
  --uefi                boot with UEFI firmware (OVMF, $OVMF) instead of the BIOS
  --type-after PATTERN TEXT
                        headless only: once a serial line contains PATTERN, type TEXT on the
                        serial console (printf %b escapes: \\n is Enter), as a person at Vireo's
                        console would (the serial port then goes through a FIFO pair instead
                        of a file)
  --accel tcg|kvm|auto  tcg: software, -cpu qemu64,+svm,+npt (AMD SVM with nested paging);
                        kvm: -accel kvm -cpu host (needs nested virtualization);
                        auto (default): kvm only if /proc/cpuinfo has the vmx or svm flag,
                        /dev/kvm is usable and nested virtualization is not switched off;
                        tcg otherwise. /dev/kvm alone proves nothing (it can belong to a
                        module that runs no ordinary guest).

$(printf '%s\n' "$RUN_COMMON_HELP" | sed "s/DEFAULT_TIMEOUT/$RUN_TIMEOUT_DEFAULT/; s/exit=EMU/exit=qemu/")

Environment: VIREO_TCG_THREAD=single runs every emulated CPU on one host thread (default
multi: one thread per CPU).

In headless mode success also needs QEMU's own exit status to be 1 (Vireo wrote 0 to the
isa-debug-exit port).

Examples:
  scripts/run-qemu.sh                                   # build, boot, serial on the terminal
  scripts/run-qemu.sh --headless --cmdline "log=debug"  # CI-style run, exit status = verdict
  scripts/run-qemu.sh --headless --uefi --module vmlinuz="console=ttyS0" --module initrd.gz
EOF
}

UEFI=0
ACCEL=auto
TYPE_PATTERN=""
TYPE_TEXT=""
while [[ $# -gt 0 ]]; do
    run_parse_common "$@"
    if [[ "$RUN_SHIFT" -gt 0 ]]; then
        shift "$RUN_SHIFT"
        continue
    fi
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --uefi) UEFI=1 ;;
        --type-after)
            [[ $# -ge 3 ]] || usage_error "--type-after wants a PATTERN and a TEXT"
            [[ -n "$2" ]] || usage_error "--type-after wants a non-empty PATTERN"
            TYPE_PATTERN="$2"; TYPE_TEXT="$3"
            shift 2 ;;
        --accel)
            need_arg "$1" "$#"
            case "$2" in
                tcg|kvm|auto) ACCEL="$2" ;;
                *) usage_error "--accel wants tcg, kvm or auto, not '$2'" ;;
            esac
            shift ;;
        --) shift; RUN_EXTRA=("$@"); break ;;
        *) usage_error "unknown option: $1" ;;
    esac
    shift
done
run_check_common
[[ -z "$TYPE_PATTERN" || "$RUN_HEADLESS" == 1 ]] || usage_error "--type-after needs --headless"

# kvm_usable: hardware virtualization that can run Vireo as a guest (nested).
kvm_usable() {
    grep -qwE 'vmx|svm' /proc/cpuinfo 2>/dev/null || return 1
    [[ -c /dev/kvm && -r /dev/kvm && -w /dev/kvm ]] || return 1
    local p
    for p in /sys/module/kvm_intel/parameters/nested /sys/module/kvm_amd/parameters/nested; do
        if [[ -r "$p" ]]; then
            case "$(cat "$p")" in
                Y|y|1) return 0 ;;
                *) return 1 ;;
            esac
        fi
    done
    # Neither kvm_intel nor kvm_amd: whatever provides /dev/kvm is not the usual KVM.
    return 1
}

if [[ "$ACCEL" == auto ]]; then
    if kvm_usable; then ACCEL=kvm; else ACCEL=tcg; fi
fi
if [[ "$ACCEL" == kvm ]]; then
    ACCEL_ARGS=(-accel kvm -cpu host)
else
    # One host thread per emulated CPU (QEMU 7.2's default for x86 on x86, made explicit).
    # Measured on a 2-core machine with --smp 2: the same boot and hypercall times as
    # thread=single while the APs idle in HLT; once APs run guests they can use both cores.
    ACCEL_ARGS=(-accel "tcg,thread=${VIREO_TCG_THREAD:-multi}" -cpu "qemu64,+svm,+npt")
fi

run_make_workdir qemu
run_prepare_iso qemu

# QEMU's option syntax doubles commas inside values.
qemu_path() {
    printf '%s' "${1//,/,,}"
}

# -nic none: no network card, so no PXE option ROM to load (0.4 s less in BIOS and UEFI boots);
# add one after -- if a test needs it.
QEMU=(qemu-system-x86_64 "${ACCEL_ARGS[@]}" -m "$RUN_MEM" -smp "$RUN_SMP" -no-reboot -nic none
      -device "isa-debug-exit,iobase=0xf4,iosize=0x04"
      -drive "file=$(qemu_path "$RUN_ISO_PATH"),index=2,media=cdrom,if=ide")
if [[ "$UEFI" == 1 ]]; then
    [[ -f "$OVMF" ]] || die "missing $OVMF (scripts/install-deps.sh qemu)"
    # -bios maps the firmware read-only: nothing of it is written, no copy needed.
    QEMU+=(-bios "$OVMF")
fi

FW=BIOS
[[ "$UEFI" == 0 ]] || FW=UEFI
note "booting with QEMU ($FW, ${ACCEL_ARGS[*]}, ${RUN_SMP} CPUs, ${RUN_MEM} MiB)${RUN_TIMEOUT:+, timeout $RUN_TIMEOUT s}"

if [[ "$RUN_HEADLESS" == 1 ]]; then
    QEMU+=(-display none -monitor none -parallel none)
    TYPE_PIDS=()
    CAT_PID=""
    if [[ -n "$TYPE_PATTERN" ]]; then
        # QEMU's pipe backend opens PATH.in and PATH.out read-write, so neither open blocks;
        # what the guest side writes is appended to the serial log as with the file backend.
        mkfifo "$RUN_WORK/ser.in" "$RUN_WORK/ser.out"
        QEMU+=(-chardev "pipe,id=ser0,path=$(qemu_path "$RUN_WORK/ser")" -serial chardev:ser0)
    else
        QEMU+=(-chardev "file,id=ser0,path=$(qemu_path "$RUN_SERIAL")" -serial chardev:ser0)
    fi
    RUN_EMU_START="$(now)"
    set +e
    timeout -k 5 "$RUN_TIMEOUT" "${QEMU[@]}" ${RUN_EXTRA[@]+"${RUN_EXTRA[@]}"} \
        </dev/null >"$RUN_WORK/qemu.out" 2>&1 &
    QEMU_PID=$!
    if [[ -n "$TYPE_PATTERN" ]]; then
        cat "$RUN_WORK/ser.out" >>"$RUN_SERIAL" &
        CAT_PID=$!
        # The typist: waits for the pattern (or QEMU's end), then types.
        (
            until grep -aqF -- "$TYPE_PATTERN" "$RUN_SERIAL"; do
                kill -0 "$QEMU_PID" 2>/dev/null || exit 0
                sleep 0.2
            done
            printf '%b' "$TYPE_TEXT" >"$RUN_WORK/ser.in"
        ) &
        TYPE_PIDS+=($!)
    fi
    # Stream the serial log as QEMU writes it; tail ends by itself soon after QEMU does.
    # With the FIFO pair, follow the copy: it ends after the last byte QEMU wrote.
    serial_stream "${CAT_PID:-$QEMU_PID}" "$RUN_SERIAL"
    TAIL_PID="$STREAM_PID"
    RUN_PIDS=("$QEMU_PID" "$TAIL_PID" ${TYPE_PIDS[@]+"${TYPE_PIDS[@]}"} ${CAT_PID:+"$CAT_PID"})
    wait "$QEMU_PID"
    qrc=$?
    for p in ${TYPE_PIDS[@]+"${TYPE_PIDS[@]}"}; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    # The copy ends by itself once QEMU's end of the FIFO is closed (all output drained).
    [[ -z "$CAT_PID" ]] || wait "$CAT_PID" 2>/dev/null || true
    wait "$TAIL_PID"
    RUN_PIDS=()
    set -e
    RUN_EMU_END="$(now)"
    if [[ "$qrc" != 124 && "$qrc" != 137 && -s "$RUN_WORK/qemu.out" ]] &&
       ! serial_ok "$RUN_SERIAL"; then
        echo "----- QEMU's messages -----" >&2
        tail -n 20 "$RUN_WORK/qemu.out" >&2
    fi
    # QEMU's status is (value << 1) | 1 for a value written to isa-debug-exit: 1 = wrote 0.
    set +e
    run_verdict "$qrc" 1
    rc=$?
    set -e
    exit "$rc"
fi

# Interactive: serial + monitor on the terminal; QEMU also logs the serial output.
QEMU+=(-display none
       -chardev "stdio,id=con0,mux=on,signal=on,logfile=$(qemu_path "$RUN_SERIAL")"
       -serial chardev:con0 -mon "chardev=con0,mode=readline" -parallel none)
[[ -t 0 ]] || note "note: stdin is not a terminal; use --headless for unattended runs"
RUN_EMU_START="$(now)"
set +e
if [[ -n "$RUN_TIMEOUT" ]]; then
    timeout --foreground -k 5 "$RUN_TIMEOUT" "${QEMU[@]}" ${RUN_EXTRA[@]+"${RUN_EXTRA[@]}"}
else
    "${QEMU[@]}" ${RUN_EXTRA[@]+"${RUN_EXTRA[@]}"}
fi
qrc=$?
set -e
RUN_EMU_END="$(now)"
if [[ "$qrc" == 124 ]]; then
    note "timeout after $RUN_TIMEOUT s"
    exit 124
fi
# Interactive: 0 if Vireo said ok, otherwise QEMU's own status (0 after Ctrl-A X).
if serial_ok "$RUN_SERIAL"; then
    exit 0
fi
exit "$qrc"
