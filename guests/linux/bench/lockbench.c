/* lockbench: a kernel-lock-heavy workload for lock-holder preemption.
 *
 * Usage: lockbench [SECONDS [THREADS [MODE [PAGES [PIN]]]]]   (default 5 4 mmap 4 0)
 * MODE mmap: each thread loops mmap PAGES anonymous pages, writes one byte to each (a page
 *   fault each), munmap. All threads share one address space: mmap and munmap take
 *   mmap_lock for writing, the faults take it for reading (an rwsem whose waiters spin
 *   while its owner runs, which is where vcpu_is_preempted is consulted), page-table and
 *   LRU spinlocks, and munmap flushes the TLBs of the other CPUs running the process
 *   (IPIs, or with KVM's PV TLB flush a flag for preempted vCPUs).
 * MODE futex: each thread loops FUTEX_WAKE on one of two shared words and FUTEX_WAIT with
 *   an expected value that never matches (it returns at once), i.e. a pair of futex
 *   hash-bucket spinlock acquisitions per loop, all threads on the same two buckets.
 * PIN 1: thread i runs only on CPU i (sched_setaffinity), so with fewer threads than CPUs
 *   the other CPUs stay idle (the control run without overcommitment).
 * The threads run for SECONDS (the main thread sleeps, then raises a stop flag); one loop
 * is one op. Prints one line:
 *   bench-pv: lock mode=M threads=T pin=0|1 seconds=S ops=N ops_per_s=R
 * Built by scripts/bench-pv.sh: gcc -O2 -static -pthread. */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <sched.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile int stop;
static int mode_futex;
static long pages;
static int words[2] __attribute__((aligned(64)));

struct slot {
    long ops;
    int cpu;
    char pad[52];
};

static void *worker(void *arg)
{
    struct slot *s = arg;
    if (s->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(s->cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set))
            perror("sched_setaffinity");
    }
    long page = sysconf(_SC_PAGESIZE);
    long n = 0;
    while (!stop) {
        if (mode_futex) {
            int *w = &words[n & 1];
            syscall(SYS_futex, w, FUTEX_WAKE, 1, NULL, NULL, 0);
            syscall(SYS_futex, w, FUTEX_WAIT, 1, NULL, NULL, 0); /* *w is 0: EAGAIN */
        } else {
            char *p = mmap(NULL, pages * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) {
                perror("mmap");
                exit(1);
            }
            for (long i = 0; i < pages; i++)
                p[i * page] = (char)i;
            munmap(p, pages * page);
        }
        n++;
    }
    s->ops = n;
    return NULL;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 5;
    int threads = argc > 2 ? atoi(argv[2]) : 4;
    const char *mode = argc > 3 ? argv[3] : "mmap";
    pages = argc > 4 ? atol(argv[4]) : 4;
    int pin = argc > 5 ? atoi(argv[5]) : 0;
    if (threads < 1 || threads > 64 || seconds <= 0 || pages < 1 ||
        (strcmp(mode, "mmap") && strcmp(mode, "futex"))) {
        fprintf(stderr, "usage: lockbench [SECONDS [THREADS(1..64) [mmap|futex [PAGES [PIN]]]]]\n");
        return 2;
    }
    mode_futex = !strcmp(mode, "futex");
    pthread_t tid[64];
    static struct slot slots[64];
    struct timespec t0, t1, d = { (time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9) };
    long total = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < threads; i++) {
        slots[i].cpu = pin ? i : -1;
        pthread_create(&tid[i], NULL, worker, &slots[i]);
    }
    nanosleep(&d, NULL);
    stop = 1;
    for (int i = 0; i < threads; i++) {
        pthread_join(tid[i], NULL);
        total += slots[i].ops;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("bench-pv: lock mode=%s threads=%d pin=%d seconds=%.3f ops=%ld ops_per_s=%.0f\n",
           mode, threads, pin ? 1 : 0, s, total, total / s);
    return 0;
}
