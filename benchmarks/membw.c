// Streaming memory read bandwidth: every thread sums its slice of a buffer far larger than the
// caches, several times; prints the best GB/s. Build: cc -O3 -march=native -fopenmp membw.c
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char ** argv) {
    const size_t bytes = (argc > 1 ? strtoull(argv[1], NULL, 10) : 2048ull) << 20;  // MiB
    const int reps = argc > 2 ? atoi(argv[2]) : 10;
    const size_t n = bytes / sizeof(uint64_t);
    uint64_t * buf = aligned_alloc(64, n * sizeof(uint64_t));
    if (!buf) {
        fprintf(stderr, "cannot allocate %zu bytes\n", bytes);
        return 1;
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) {
        buf[i] = i;  // touch every page from the thread that reads it
    }
    double best = 0.0;
    uint64_t total = 0;
    for (int r = 0; r < reps; ++r) {
        const double t0 = omp_get_wtime();
        uint64_t sum = 0;
#pragma omp parallel for schedule(static) reduction(+ : sum)
        for (size_t i = 0; i < n; ++i) {
            sum += buf[i];
        }
        const double dt = omp_get_wtime() - t0;
        total += sum;
        const double gbs = (double) bytes / dt / 1e9;
        if (gbs > best) {
            best = gbs;
        }
    }
    printf("threads %d buffer %zu MiB best %.2f GB/s (checksum %llu)\n", omp_get_max_threads(), bytes >> 20, best,
           (unsigned long long) (total & 0xff));
    free(buf);
    return 0;
}
