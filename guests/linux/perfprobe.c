// perfprobe: what `perf stat` and `perf record` would show in a Linux guest, as one small
// static program (gcc -O2 -static; scripts/guest-linux.sh puts it in the headless image as
// /bin/perfprobe). `perfprobe MS CPUIDS`:
//
// 1. stat: one counter group of the current task, user and kernel mode: hardware cycles
//    (PERF_COUNT_HW_CPU_CYCLES, what `perf stat -e cycles` opens), raw event 0x56 (`-e r0056`:
//    Vireo's VM exits) and raw 0x156 (`r0156`: the exits of class 0, CPUID). Around the
//    enabled window it writes /sys/hypervisor/vireo/mark and reads exits_since_mark (vireo.ko,
//    when loaded), Vireo's own count of the VM's exits over the same window. The window is a
//    busy loop (no sleep, no system call) of MS milliseconds of CLOCK_MONOTONIC, executing
//    CPUIDS cpuid instructions spread over it; the TSC is read at both ends. Prints
//      linux-guest: perf stat cycles=C exits=E cpuid_exits=X cpuids=K tsc=T elapsed_ns=N
//                   enabled_ns=A running_ns=R vireo_exits=V vireo_cpuid=W
//    (vireo_exits/vireo_cpuid -1 without vireo.ko).
// 2. record: cycles with a sample period of one millisecond of TSC ticks (measured in step 1),
//    sample_type IP|TID, the ring buffer mmapped; the same busy loop, then the records in the
//    buffer are counted. Prints
//      linux-guest: perf record samples=S lost=L throttled=H period=P elapsed_ns=N
//
// 3. `perfprobe run CMD [ARG...]`: see run_cmd.
//
// When perf_event_open refuses cycles (no PMU: "PMU not available due to virtualization"
// makes the kernel offer software events only), prints
//      linux-guest: perf unavailable errno=E
// Never fails otherwise: each line is printed with what could be measured; the exit status
// is 0 unless the arguments are wrong.
#define _GNU_SOURCE
#include <cpuid.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#define VIREO "/sys/hypervisor/vireo/"

static long perf_open(struct perf_event_attr *a, int group)
{
    return syscall(SYS_perf_event_open, a, 0 /* this task */, -1 /* any CPU */, group, 0);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// busy MS milliseconds of CLOCK_MONOTONIC (the vDSO: no exit with kvm-clock), with CPUIDS
// cpuid instructions spread over it (one each time another share of the time has passed,
// the rest at the end). Returns the nanoseconds that passed.
static uint64_t busy(uint64_t ms, unsigned long cpuids)
{
    uint64_t t0 = now_ns(), len = ms * 1000000ull, t;
    unsigned long done = 0;
    unsigned a, b, c, d;
    while ((t = now_ns()) - t0 < len) {
        // Due by now: done/cpuids of the time.
        while (done < cpuids && (t - t0) * cpuids >= done * len) {
            __cpuid(0, a, b, c, d);
            done++;
        }
    }
    for (; done < cpuids; done++)
        __cpuid(0, a, b, c, d);
    (void)a, (void)b, (void)c, (void)d;
    return now_ns() - t0;
}

// Vireo's exit counts since the mark: the total and the cpuid line (-1 each when unreadable).
static void vireo_since_mark(int fd, long long *total, long long *cpuid)
{
    char buf[4096];
    *total = -1;
    *cpuid = -1;
    if (fd < 0)
        return;
    ssize_t len = pread(fd, buf, sizeof buf - 1, 0);
    if (len <= 0)
        return;
    buf[len] = 0;
    *total = 0;
    *cpuid = 0;
    char *save = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char kind[64];
        unsigned long long count;
        if (sscanf(line, "%63s %llu", kind, &count) == 2) {
            *total += (long long)count;
            if (!strcmp(kind, "cpuid"))
                *cpuid = (long long)count;
        }
    }
}

static void attr_init(struct perf_event_attr *a, uint32_t type, uint64_t config)
{
    memset(a, 0, sizeof *a);
    a->size = sizeof *a;
    a->type = type;
    a->config = config;
    a->disabled = 1;
}

// `perfprobe run CMD [ARG...]`, what `perf stat -e cycles,r0056 CMD` does: counts cycles and
// Vireo's exits of CMD and every process it starts (inherited counters, enabled at its exec),
// user and kernel mode. Returns CMD's exit status.
static int run_cmd(char **cmd)
{
    int go[2];
    if (pipe(go)) {
        perror("perfprobe: pipe");
        return 2;
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("perfprobe: fork");
        return 2;
    }
    if (pid == 0) {
        char c;
        close(go[1]);
        if (read(go[0], &c, 1) != 1)
            _exit(126);
        execv(cmd[0], cmd);
        _exit(127);
    }
    close(go[0]);
    struct perf_event_attr a;
    const uint64_t configs[2][2] = {{PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES}, {PERF_TYPE_RAW, 0x56}};
    int fd[2], err = 0;
    for (int i = 0; i < 2; i++) {
        attr_init(&a, (uint32_t)configs[i][0], configs[i][1]);
        a.inherit = 1;
        a.enable_on_exec = 1;
        a.read_format = PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING;
        fd[i] = (int)syscall(SYS_perf_event_open, &a, pid, -1, -1, 0);
        if (fd[i] < 0 && !err)
            err = errno;
    }
    uint64_t t0 = now_ns(), tsc0 = __rdtsc();
    int status = 0;
    if (write(go[1], "g", 1) != 1 || waitpid(pid, &status, 0) != pid)
        status = -1;
    uint64_t el = now_ns() - t0, tsc = __rdtsc() - tsc0;
    close(go[1]);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
    if (err) {
        printf("linux-guest: perf run unavailable errno=%d status=%d elapsed_ns=%llu\n", err, code,
               (unsigned long long)el);
        return code;
    }
    uint64_t v[2][3] = {{0}};
    for (int i = 0; i < 2; i++)
        if (read(fd[i], v[i], sizeof v[i]) != (ssize_t)sizeof v[i])
            v[i][0] = 0;
    printf("linux-guest: perf run cycles=%llu exits=%llu tsc=%llu elapsed_ns=%llu running_ns=%llu status=%d\n",
           (unsigned long long)v[0][0], (unsigned long long)v[1][0], (unsigned long long)tsc,
           (unsigned long long)el, (unsigned long long)v[0][2], code);
    return code;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && !strcmp(argv[1], "run"))
        return run_cmd(argv + 2);
    if (argc == 2 && !strcmp(argv[1], "tsc")) {
        /* The TSC now: scripts/bench-linux-boot.sh times the boot in guest time with it
         * (under QEMU -icount the TSC counts executed instructions). */
        printf("%llu\n", (unsigned long long)__rdtsc());
        return 0;
    }
    if (argc != 3) {
        fprintf(stderr, "usage: perfprobe MS CPUIDS | perfprobe run CMD [ARG...] | perfprobe tsc\n");
        return 2;
    }
    uint64_t ms = strtoull(argv[1], NULL, 10);
    unsigned long cpuids = strtoul(argv[2], NULL, 10);
    if (ms == 0) {
        fprintf(stderr, "perfprobe: MS must be at least 1\n");
        return 2;
    }

    // --- stat ---
    struct perf_event_attr a;
    attr_init(&a, PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES);
    a.read_format = PERF_FORMAT_GROUP | PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING;
    int cyc = (int)perf_open(&a, -1);
    if (cyc < 0) {
        printf("linux-guest: perf unavailable errno=%d\n", errno);
        return 0;
    }
    a.disabled = 0; // group members follow the leader
    a.read_format = 0;
    a.type = PERF_TYPE_RAW;
    a.config = 0x56;
    int ex = (int)perf_open(&a, cyc);
    a.config = 0x156;
    int cp = (int)perf_open(&a, cyc);
    if (ex < 0 || cp < 0) {
        printf("linux-guest: perf stat raw-event-refused errno=%d\n", errno);
        return 0;
    }
    int markfd = open(VIREO "mark", O_WRONLY);
    int sincefd = open(VIREO "exits_since_mark", O_RDONLY);
    if (markfd < 0 || sincefd < 0 || write(markfd, "1", 1) != 1) {
        close(sincefd);
        sincefd = -1;
    }
    uint64_t tsc0 = __rdtsc();
    ioctl(cyc, PERF_EVENT_IOC_ENABLE, PERF_IOC_FLAG_GROUP);
    uint64_t el = busy(ms, cpuids);
    ioctl(cyc, PERF_EVENT_IOC_DISABLE, PERF_IOC_FLAG_GROUP);
    uint64_t tsc = __rdtsc() - tsc0;
    long long vireo_total, vireo_cpuid;
    vireo_since_mark(sincefd, &vireo_total, &vireo_cpuid);
    // nr, time_enabled, time_running, then one value per member.
    uint64_t v[3 + 3] = {0};
    if (read(cyc, v, sizeof v) != (ssize_t)sizeof v || v[0] != 3) {
        printf("linux-guest: perf stat read-failed errno=%d\n", errno);
        return 0;
    }
    printf("linux-guest: perf stat cycles=%llu exits=%llu cpuid_exits=%llu cpuids=%lu tsc=%llu elapsed_ns=%llu "
           "enabled_ns=%llu running_ns=%llu vireo_exits=%lld vireo_cpuid=%lld\n",
           (unsigned long long)v[3], (unsigned long long)v[4], (unsigned long long)v[5], cpuids,
           (unsigned long long)tsc, (unsigned long long)el, (unsigned long long)v[1], (unsigned long long)v[2],
           vireo_total, vireo_cpuid);
    close(cp);
    close(ex);
    close(cyc);

    // --- record ---
    uint64_t period = el ? tsc * 1000000ull / el : 0; // TSC ticks per millisecond
    if (period == 0)
        period = 1000000;
    attr_init(&a, PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES);
    a.sample_period = period;
    a.sample_type = PERF_SAMPLE_IP | PERF_SAMPLE_TID;
    a.wakeup_events = 1;
    int rec = (int)perf_open(&a, -1);
    if (rec < 0) {
        printf("linux-guest: perf record open-failed errno=%d\n", errno);
        return 0;
    }
    long page = sysconf(_SC_PAGESIZE);
    size_t data_pages = 64;
    size_t len = (1 + data_pages) * (size_t)page;
    void *ring = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, rec, 0);
    if (ring == MAP_FAILED) {
        printf("linux-guest: perf record mmap-failed errno=%d\n", errno);
        return 0;
    }
    ioctl(rec, PERF_EVENT_IOC_ENABLE, 0);
    el = busy(ms, 0);
    ioctl(rec, PERF_EVENT_IOC_DISABLE, 0);
    struct perf_event_mmap_page *meta = ring;
    uint64_t head = __atomic_load_n(&meta->data_head, __ATOMIC_ACQUIRE);
    const unsigned char *data = (const unsigned char *)ring + page;
    uint64_t size = data_pages * (uint64_t)page, off = 0, samples = 0, lost = 0, throttled = 0;
    // The buffer holds everything when the head never wrapped; older records are gone otherwise.
    if (head > size)
        off = head - size;
    while (off + sizeof(struct perf_event_header) <= head) {
        struct perf_event_header h;
        uint64_t at = off % size;
        if (at + sizeof h > size)
            break; // a header split at the end: stop counting there
        memcpy(&h, data + at, sizeof h);
        if (h.size < sizeof h)
            break;
        if (h.type == PERF_RECORD_SAMPLE)
            samples++;
        else if (h.type == PERF_RECORD_LOST && at + sizeof h + 16 <= size) {
            uint64_t n;
            memcpy(&n, data + at + sizeof h + 8, sizeof n); // id, lost
            lost += n;
        } else if (h.type == PERF_RECORD_THROTTLE)
            throttled++;
        off += h.size;
    }
    printf("linux-guest: perf record samples=%llu lost=%llu throttled=%llu period=%llu elapsed_ns=%llu\n",
           (unsigned long long)samples, (unsigned long long)lost, (unsigned long long)throttled,
           (unsigned long long)period, (unsigned long long)el);
    return 0;
}
