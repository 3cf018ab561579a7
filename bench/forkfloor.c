/* bench/forkfloor.c: what a bare fork + _exit + waitpid costs on this
 * machine, the floor under any recycle (bench/spawn measures monodon's).
 *
 *   cc -O2 bench/forkfloor.c -o /tmp/forkfloor && /tmp/forkfloor [HEAP_MB]
 *
 * HEAP_MB (default 0): touch this much heap first, as a loaded app would;
 * each child then writes one page of it. Prints wall time per iteration and
 * CPU time (parent and children) per iteration. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double secs(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

int main(int argc, char **argv) {
    size_t bytes = (size_t)(argc > 1 ? atoi(argv[1]) : 0) << 20;
    char *heap = bytes ? malloc(bytes) : NULL;
    if (heap) memset(heap, 1, bytes);
    const int n = 2000;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        if (p < 0) { perror("fork"); return 1; }
        if (p == 0) {
            if (heap) heap[((size_t)i * 4096) % bytes] = 2;
            _exit(0);
        }
        waitpid(p, NULL, 0);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    struct rusage self, kids;
    getrusage(RUSAGE_SELF, &self);
    getrusage(RUSAGE_CHILDREN, &kids);
    double cpu = secs(self.ru_utime) + secs(self.ru_stime) + secs(kids.ru_utime) + secs(kids.ru_stime);
    double wall = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%zu MiB heap: %.0f us wall, %.0f us CPU per fork + _exit + waitpid\n", bytes >> 20,
           wall / n * 1e6, cpu / n * 1e6);
    return 0;
}
