// The micro-benchmarks of scripts/scoreboard.sh (the VMI-style overhead scoreboard), one
// static program: `scorebench NAME ITERATIONS`. It runs benchmark NAME ITERATIONS times and
// prints
//     score: name=NAME iterations=N ns_per_op=F
// timed with clock_gettime(CLOCK_MONOTONIC) in the guest (under QEMU -icount that is
// instruction-derived time). Under Vireo with vireo.ko loaded it also writes
// /sys/hypervisor/vireo/mark just before the timed loop and reads exits_since_mark just after,
// printing
//     score: exits name=NAME elapsed_ns=T KIND=COUNT ...
// (elsewhere the files do not exist and that line is left out).
//
// Benchmarks (one operation each):
//   null      getppid() through syscall(2): the null system call
//   sigsegv   a load from address 0 and its SIGSEGV handler (which steps over the load)
//   sigfpe    an integer divide by zero and its SIGFPE handler (likewise)
//   fork      fork(); the child _exit(0)s; waitpid()
//   exec      fork(); the child execs /bin/nullprog (a tiny static program); waitpid()
//   pipe      a round trip of one byte through a pipe pair between two processes (two
//             context switches on one CPU)
//   mmap      mmap() of 1 MiB of anonymous memory and munmap(), untouched
//   pagefault the first write to a fresh anonymous page (256 pages per mmap; the mmap and
//             munmap are timed too, amortised over the pages)
//   compute   one step of an integer mixing loop (no system calls, no memory traffic)
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define VIREO "/sys/hypervisor/vireo/"

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

// The faulting instructions and where their handlers resume, in assembly so that the
// addresses are known: segv_fault loads from %rdi (0), fpe_fault divides by %rcx (0).
extern char segv_fault[], segv_resume[], fpe_fault[], fpe_resume[];
__asm__(".text\n"
        ".globl do_segv\n"
        "do_segv:\n"
        ".globl segv_fault\n"
        "segv_fault: movq (%rdi), %rax\n"
        ".globl segv_resume\n"
        "segv_resume: ret\n"
        ".globl do_fpe\n"
        "do_fpe:\n"
        "movq %rdi, %rcx\n"
        "movl $1, %eax\n"
        "xorl %edx, %edx\n"
        ".globl fpe_fault\n"
        "fpe_fault: divq %rcx\n"
        ".globl fpe_resume\n"
        "fpe_resume: ret\n");
void do_segv(void *p);
void do_fpe(unsigned long d);

static void on_signal(int sig, siginfo_t *si, void *uc_) {
    (void)si;
    ucontext_t *uc = uc_;
    uintptr_t rip = uc->uc_mcontext.gregs[REG_RIP];
    if (sig == SIGSEGV && rip == (uintptr_t)segv_fault)
        uc->uc_mcontext.gregs[REG_RIP] = (greg_t)(uintptr_t)segv_resume;
    else if (sig == SIGFPE && rip == (uintptr_t)fpe_fault)
        uc->uc_mcontext.gregs[REG_RIP] = (greg_t)(uintptr_t)fpe_resume;
    else
        _exit(3);
}

static void handle(int sig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(sig, &sa, NULL);
}

static void wait_child(pid_t pid) {
    int st;
    if (pid < 0) {
        perror("fork");
        exit(1);
    }
    while (waitpid(pid, &st, 0) < 0) {
    }
}

static volatile uint64_t sink;

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: scorebench null|sigsegv|sigfpe|fork|exec|pipe|mmap|pagefault|compute ITERATIONS\n");
        return 2;
    }
    const char *name = argv[1];
    long n = atol(argv[2]);
    if (n <= 0)
        return 2;
    int p1[2], p2[2];
    pid_t echo = -1;
    if (!strcmp(name, "sigsegv"))
        handle(SIGSEGV);
    else if (!strcmp(name, "sigfpe"))
        handle(SIGFPE);
    else if (!strcmp(name, "pipe")) {
        char c;
        if (pipe(p1) || pipe(p2)) {
            perror("pipe");
            return 1;
        }
        echo = fork();
        if (echo == 0) {
            close(p1[1]);
            close(p2[0]);
            while (read(p1[0], &c, 1) == 1)
                if (write(p2[1], &c, 1) != 1)
                    break;
            _exit(0);
        }
        close(p1[0]);
        close(p2[1]);
    }

    int markfd = open(VIREO "mark", O_WRONLY);
    int exitsfd = open(VIREO "exits_since_mark", O_RDONLY);
    if (markfd >= 0 && exitsfd >= 0 && write(markfd, "1", 1) != 1)
        markfd = -1;
    double t0 = now_ns();
    long i;
    if (!strcmp(name, "null")) {
        for (i = 0; i < n; i++)
            syscall(SYS_getppid);
    } else if (!strcmp(name, "sigsegv")) {
        for (i = 0; i < n; i++)
            do_segv(NULL);
    } else if (!strcmp(name, "sigfpe")) {
        for (i = 0; i < n; i++)
            do_fpe(0);
    } else if (!strcmp(name, "fork")) {
        for (i = 0; i < n; i++) {
            pid_t pid = fork();
            if (pid == 0)
                _exit(0);
            wait_child(pid);
        }
    } else if (!strcmp(name, "exec")) {
        for (i = 0; i < n; i++) {
            pid_t pid = fork();
            if (pid == 0) {
                char *args[] = {"nullprog", NULL}, *env[] = {NULL};
                execve("/bin/nullprog", args, env);
                _exit(127);
            }
            wait_child(pid);
        }
    } else if (!strcmp(name, "pipe")) {
        char c = 'x';
        for (i = 0; i < n; i++) {
            if (write(p1[1], &c, 1) != 1 || read(p2[0], &c, 1) != 1) {
                perror("pipe round trip");
                return 1;
            }
        }
    } else if (!strcmp(name, "mmap")) {
        for (i = 0; i < n; i++) {
            void *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) {
                perror("mmap");
                return 1;
            }
            munmap(p, 1 << 20);
        }
    } else if (!strcmp(name, "pagefault")) {
        const long pages = 256, ps = 4096;
        for (i = 0; i < n;) {
            char *p = mmap(NULL, pages * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) {
                perror("mmap");
                return 1;
            }
            for (long k = 0; k < pages && i < n; k++, i++)
                p[k * ps] = 1;
            munmap(p, pages * ps);
        }
    } else if (!strcmp(name, "compute")) {
        uint64_t x = 88172645463325252ull;
        for (i = 0; i < n; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x *= 0x9E3779B97F4A7C15ull;
        }
        sink = x;
    } else {
        fprintf(stderr, "scorebench: unknown benchmark %s\n", name);
        return 2;
    }
    double t1 = now_ns();
    char buf[2048];
    ssize_t len = -1;
    if (markfd >= 0 && exitsfd >= 0)
        len = read(exitsfd, buf, sizeof buf - 1);
    if (echo > 0) {
        close(p1[1]);
        wait_child(echo);
    }
    printf("score: name=%s iterations=%ld ns_per_op=%.2f\n", name, n, (t1 - t0) / n);
    if (len > 0) {
        // "kind count cycles" lines -> " kind=count"
        buf[len] = 0;
        printf("score: exits name=%s elapsed_ns=%.0f", name, t1 - t0);
        char *save = NULL;
        for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
            char kind[64];
            unsigned long long count;
            if (sscanf(line, "%63s %llu", kind, &count) == 2)
                printf(" %s=%llu", kind, count);
        }
        printf("\n");
    }
    fflush(stdout);
    return 0;
}
