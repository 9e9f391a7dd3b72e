/* timerbench: a timer-heavy program: THREADS threads each sleeping PERIOD_US microseconds
 * in a loop (nanosleep) for SECONDS seconds; every wake-up is a timer interrupt in the guest
 * (a TSC-deadline or APIC-timer write to arm it, an interrupt and its EOI, and with more than
 * one thread often a rescheduling IPI).
 *
 * Usage: timerbench [SECONDS [THREADS [PERIOD_US]]]   (default 5 2 200)
 * Prints one line:
 *   bench-pv: timer threads=T period_us=P seconds=S wakeups=W wakeups_per_s=R
 * SECONDS is measured with CLOCK_MONOTONIC from the threads' start to their end.
 * Built by scripts/bench-pv.sh: gcc -O2 -static -pthread. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double seconds;
static long period_us;
static struct timespec start;

static double since(const struct timespec *a)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - a->tv_sec) + (t.tv_nsec - a->tv_nsec) / 1e9;
}

static void *worker(void *arg)
{
    long *wakeups = arg;
    struct timespec p = { period_us / 1000000, (period_us % 1000000) * 1000 };
    while (since(&start) < seconds) {
        nanosleep(&p, NULL);
        (*wakeups)++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    seconds = argc > 1 ? atof(argv[1]) : 5;
    int threads = argc > 2 ? atoi(argv[2]) : 2;
    period_us = argc > 3 ? atol(argv[3]) : 200;
    if (threads < 1 || threads > 64 || period_us < 1 || seconds <= 0) {
        fprintf(stderr, "usage: timerbench [SECONDS [THREADS(1..64) [PERIOD_US]]]\n");
        return 2;
    }
    pthread_t tid[64];
    long wakeups[64] = { 0 };
    long total = 0;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 0; i < threads; i++)
        pthread_create(&tid[i], NULL, worker, &wakeups[i]);
    for (int i = 0; i < threads; i++) {
        pthread_join(tid[i], NULL);
        total += wakeups[i];
    }
    double s = since(&start);
    printf("bench-pv: timer threads=%d period_us=%ld seconds=%.3f wakeups=%ld wakeups_per_s=%.0f\n",
           threads, period_us, s, total, total / s);
    return 0;
}
