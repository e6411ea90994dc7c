// The compute roof for prefill: peak multiply-accumulate throughput of the matrix units on N
// threads (OMP_NUM_THREADS), measured like membw.c measures the bandwidth floor.
//
//   AMX int8  (TDPBSSD, 16x16x64 MACs per instruction)  what ggml's AMX kernels run Q4_0/Q4_K/Q8_0 ... on
//   AMX bf16  (TDPBF16PS, 16x16x32 MACs)                 ggml's AMX kernels for F16/BF16 (none today)
//   AVX-512 VNNI int8 (VPDPBUSD, 64 MACs per zmm)        the vec_dot / interleaved kernels' int8 path
//   AVX-512 FP32 FMA (VFMADD, 16 MACs per zmm)           F32 matmuls (tinyBLAS sgemm)
//
// Each loop keeps its operands in registers (tiles or zmm), independent accumulators to cover the
// latency: an upper bound no kernel that also loads its operands reaches. Prints one line per unit:
// "<unit> <G MAC/s>" (x2 for ops/s). Build: cc -O2 -march=native -fopenmp computeroof.c -o computeroof
// Usage: OMP_NUM_THREADS=2 ./computeroof [seconds per unit, default 1]
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

#if defined(__AMX_INT8__) && defined(__AMX_BF16__)
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static int amx_enable(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

static void amx_config(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    __asm__ __volatile__("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

// 4 accumulators (tmm0-3) from 2 A tiles x 2 B tiles, as ggml's 2x2 blocking; `dp` is the tile
// instruction, each a 16 x 16 x (64 int8 or 32 bf16) block of multiply-accumulates
#define AMX_LOOP(dp)                                                                           \
    while (now() < t_end) {                                                                    \
        for (int i = 0; i < 1024; ++i) {                                                       \
            dp(0, 4, 6);                                                                       \
            dp(1, 4, 7);                                                                       \
            dp(2, 5, 6);                                                                       \
            dp(3, 5, 7);                                                                       \
        }                                                                                      \
        n += 4 * 1024;                                                                         \
    }

static uint64_t amx_peak(double seconds, int bf16) {
    uint64_t iters = 0;
#pragma omp parallel reduction(+ : iters)
    {
        static __thread int8_t buf[16 * 64] __attribute__((aligned(64)));   // 16 rows of 64 bytes
        amx_config();
        _tile_loadd(4, buf, 64);
        _tile_loadd(5, buf, 64);
        _tile_loadd(6, buf, 64);
        _tile_loadd(7, buf, 64);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const double t_end = now() + seconds;
        uint64_t n = 0;
        if (bf16) {
            AMX_LOOP(_tile_dpbf16ps)
        } else {
            AMX_LOOP(_tile_dpbssd)
        }
        _tile_release();
        iters += n;
    }
    return iters * 16 * 16 * (bf16 ? 32 : 64);
}
#endif

#if defined(__AVX512VNNI__)
static uint64_t avx512_vnni(double seconds) {
    uint64_t iters = 0;
#pragma omp parallel reduction(+ : iters)
    {
        __m512i acc[10];
        for (int i = 0; i < 10; ++i) {
            acc[i] = _mm512_set1_epi32(i);
        }
        const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(5);
        const double t_end = now() + seconds;
        uint64_t n = 0;
        while (now() < t_end) {
            for (int i = 0; i < 1024; ++i) {
                for (int j = 0; j < 10; ++j) {
                    acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
                }
            }
            n += 10 * 1024;
        }
        __m512i s = acc[0];
        for (int i = 1; i < 10; ++i) {
            s = _mm512_add_epi32(s, acc[i]);
        }
        volatile int sink = _mm512_reduce_add_epi32(s);
        (void) sink;
        iters += n;
    }
    return iters * 64;
}
#endif

#if defined(__AVX512F__)
static uint64_t avx512_fma(double seconds) {
    uint64_t iters = 0;
#pragma omp parallel reduction(+ : iters)
    {
        __m512 acc[10];
        for (int i = 0; i < 10; ++i) {
            acc[i] = _mm512_set1_ps((float) i);
        }
        const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f);
        const double t_end = now() + seconds;
        uint64_t n = 0;
        while (now() < t_end) {
            for (int i = 0; i < 1024; ++i) {
                for (int j = 0; j < 10; ++j) {
                    acc[j] = _mm512_fmadd_ps(acc[j], a, b);
                }
            }
            n += 10 * 1024;
        }
        __m512 s = acc[0];
        for (int i = 1; i < 10; ++i) {
            s = _mm512_add_ps(s, acc[i]);
        }
        volatile float sink = _mm512_reduce_add_ps(s);
        (void) sink;
        iters += n;
    }
    return iters * 16;
}
#endif

int main(int argc, char ** argv) {
    const double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    printf("threads %d\n", omp_get_max_threads());
#if defined(__AMX_INT8__) && defined(__AMX_BF16__)
    if (amx_enable()) {
        double t = now();
        uint64_t macs = amx_peak(seconds, 0);
        printf("amx_int8 %.1f GMAC/s\n", (double) macs / (now() - t) / 1e9);
        t = now();
        macs = amx_peak(seconds, 1);
        printf("amx_bf16 %.1f GMAC/s\n", (double) macs / (now() - t) / 1e9);
    } else {
        printf("amx: the kernel refused the tile state (arch_prctl)\n");
    }
#endif
#if defined(__AVX512VNNI__)
    {
        double t = now();
        uint64_t macs = avx512_vnni(seconds);
        printf("avx512_vnni_int8 %.1f GMAC/s\n", (double) macs / (now() - t) / 1e9);
    }
#endif
#if defined(__AVX512F__)
    {
        double t = now();
        uint64_t macs = avx512_fma(seconds);
        printf("avx512_fp32 %.1f GMAC/s\n", (double) macs / (now() - t) / 1e9);
    }
#endif
    return 0;
}
