/*
 * Iterated SHA-512 over 64-byte digests, for several independent chains ("lanes") at once.
 *
 * A job hashes its payload once (hashlib, in Python); every later step hashes the 64-byte
 * digest of the step before. That message is always one block of the same shape: the
 * digest's eight 64-bit words, then constant padding (a 1 bit, zeros, the length 512). So
 * each step is one compression from the fixed initial value, with half of the message
 * schedule known in advance. This library runs those steps for many chains, one chain per
 * 64-bit lane of a vector register: AVX-512F (8 lanes), AVX2 (4 lanes) or plain C (1 lane).
 * The caller picks a kernel by name among those the CPU supports (worker/native.py).
 *
 * The interface (all exported functions are listed here; worker/native.py is the caller):
 *
 *   int dw_abi_version(void)            DW_ABI_VERSION: a library of another version is refused
 *   int dw_kernel_count(void)           kernels in this build, numbered 0 .. count-1
 *   const char *dw_kernel_name(int k)   "scalar", "avx2", "avx512"; NULL if k is out of range
 *   int dw_kernel_lanes(int k)          lanes per group: a call takes a multiple of this
 *   int dw_kernel_supported(int k)      1 if this CPU (and operating system) can run it
 *   long long dw_iterate(int k, unsigned char *digests, uint64_t *remaining,
 *                        size_t lanes, uint64_t max_steps, int flags)
 *
 * dw_iterate: digests holds `lanes` digests of 64 bytes each, as hashlib's digest() gives
 * them; remaining[i] is how many more steps lane i needs (0: idle). Every lane with steps
 * left advances by min(remaining, max_steps) steps; its digest and remaining are updated in
 * place; idle lanes are not touched. The lanes go in groups of dw_kernel_lanes(k): a group
 * runs until its busiest lane is done or max_steps are reached. With DW_STOP_ON_FINISH in
 * flags, a group also stops right after the step in which one of its lanes finished, so the
 * caller can refill that lane at once. Returns the number of lanes with steps left, or -1
 * if k is unknown or unsupported or lanes is not a multiple of the group size.
 *
 * Build: worker/build_kernel.sh (cc -O2 -shared -fPIC). On other architectures than x86-64
 * the file builds with the scalar kernel only.
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* DW_PORTABLE_ONLY builds what other architectures get: the scalar kernel alone. */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(DW_PORTABLE_ONLY)
#include <immintrin.h>
#define DW_X86 1
#else
#define DW_X86 0
#endif

#define DW_ABI_VERSION 1
#define DW_STOP_ON_FINISH 1
#define MAX_WIDTH 8
#define EXPORT __attribute__((visibility("default")))

static const uint64_t K[80] = {
    0x428a2f98d728ae22ULL, 0x7137449123ef65cdULL, 0xb5c0fbcfec4d3b2fULL, 0xe9b5dba58189dbbcULL,
    0x3956c25bf348b538ULL, 0x59f111f1b605d019ULL, 0x923f82a4af194f9bULL, 0xab1c5ed5da6d8118ULL,
    0xd807aa98a3030242ULL, 0x12835b0145706fbeULL, 0x243185be4ee4b28cULL, 0x550c7dc3d5ffb4e2ULL,
    0x72be5d74f27b896fULL, 0x80deb1fe3b1696b1ULL, 0x9bdc06a725c71235ULL, 0xc19bf174cf692694ULL,
    0xe49b69c19ef14ad2ULL, 0xefbe4786384f25e3ULL, 0x0fc19dc68b8cd5b5ULL, 0x240ca1cc77ac9c65ULL,
    0x2de92c6f592b0275ULL, 0x4a7484aa6ea6e483ULL, 0x5cb0a9dcbd41fbd4ULL, 0x76f988da831153b5ULL,
    0x983e5152ee66dfabULL, 0xa831c66d2db43210ULL, 0xb00327c898fb213fULL, 0xbf597fc7beef0ee4ULL,
    0xc6e00bf33da88fc2ULL, 0xd5a79147930aa725ULL, 0x06ca6351e003826fULL, 0x142929670a0e6e70ULL,
    0x27b70a8546d22ffcULL, 0x2e1b21385c26c926ULL, 0x4d2c6dfc5ac42aedULL, 0x53380d139d95b3dfULL,
    0x650a73548baf63deULL, 0x766a0abb3c77b2a8ULL, 0x81c2c92e47edaee6ULL, 0x92722c851482353bULL,
    0xa2bfe8a14cf10364ULL, 0xa81a664bbc423001ULL, 0xc24b8b70d0f89791ULL, 0xc76c51a30654be30ULL,
    0xd192e819d6ef5218ULL, 0xd69906245565a910ULL, 0xf40e35855771202aULL, 0x106aa07032bbd1b8ULL,
    0x19a4c116b8d2d0c8ULL, 0x1e376c085141ab53ULL, 0x2748774cdf8eeb99ULL, 0x34b0bcb5e19b48a8ULL,
    0x391c0cb3c5c95a63ULL, 0x4ed8aa4ae3418acbULL, 0x5b9cca4f7763e373ULL, 0x682e6ff3d6b2b8a3ULL,
    0x748f82ee5defb2fcULL, 0x78a5636f43172f60ULL, 0x84c87814a1f0ab72ULL, 0x8cc702081a6439ecULL,
    0x90befffa23631e28ULL, 0xa4506cebde82bde9ULL, 0xbef9a3f7b2c67915ULL, 0xc67178f2e372532bULL,
    0xca273eceea26619cULL, 0xd186b8c721c0c207ULL, 0xeada7dd6cde0eb1eULL, 0xf57d4f7fee6ed178ULL,
    0x06f067aa72176fbaULL, 0x0a637dc5a2c898a6ULL, 0x113f9804bef90daeULL, 0x1b710b35131c471bULL,
    0x28db77f523047d84ULL, 0x32caab7b40c72493ULL, 0x3c9ebe0a15c9bebcULL, 0x431d67c49c100d4cULL,
    0x4cc5d4becb3e42b6ULL, 0x597f299cfc657e2aULL, 0x5fcb6fab3ad6faecULL, 0x6c44198c4a475817ULL,
};

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

/* Message words 8..15 are the padding of a 64-byte message: a 1 bit, zeros, the length in bits. */
#define IS_PAD(j) ((j) >= 8 && (j) <= 15)
#define PAD(j) ((j) == 8 ? 0x8000000000000000ULL : (j) == 15 ? 512ULL : 0ULL)

/* The functions on single words, for the constants the compiler folds. */
static inline uint64_t ror64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }
static inline uint64_t bsig0_1(uint64_t x) { return ror64(x, 28) ^ ror64(x, 34) ^ ror64(x, 39); }
static inline uint64_t bsig1_1(uint64_t x) { return ror64(x, 14) ^ ror64(x, 18) ^ ror64(x, 41); }
static inline uint64_t ssig0_1(uint64_t x) { return ror64(x, 1) ^ ror64(x, 8) ^ (x >> 7); }
static inline uint64_t ssig1_1(uint64_t x) { return ror64(x, 19) ^ ror64(x, 61) ^ (x >> 6); }
static inline uint64_t ch_1(uint64_t e, uint64_t f, uint64_t g) { return g ^ (e & (f ^ g)); }
static inline uint64_t maj_1(uint64_t a, uint64_t b, uint64_t c) { return (a & b) ^ (a & c) ^ (b & c); }

/*
 * The rounds, written once for every instruction set: each kernel below defines V (one word
 * of all its lanes) and the operations on it, then expands DEFINE_ITERATE. Every index is a
 * constant after expansion, so the state and schedule arrays live in registers, and the
 * branches on IS_PAD and on the round number fold away: the padding words cost nothing, and
 * neither does the first round, whose input is the constant initial value except for w[0].
 */
#define EACH8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

/* State word i in round t: the names a..h rotate through s[] instead of moving. */
#define S(i, t) s[((i) - (t)) & 7]

#define KW(t) (IS_PAD(t) ? CONST(C_K + (t)) : ADD(w[(t) & 15], CONST(C_K + (t))))

#define ROUND(t)                                                                            \
    do {                                                                                    \
        V t1_ = ADD(ADD(ADD(S(7, t), KW(t)), CH(S(4, t), S(5, t), S(6, t))), BSIG1(S(4, t))); \
        V t2_ = ADD(BSIG0(S(0, t)), MAJ(S(0, t), S(1, t), S(2, t)));                        \
        S(3, t) = ADD(S(3, t), t1_);                                                        \
        S(7, t) = ADD(t1_, t2_);                                                            \
    } while (0)

/* Maj(a, b, c) = b ^ ((a ^ b) & (b ^ c)), where b ^ c is the a ^ b of the round before:
 * three operations instead of four, for kernels without a three-input logic instruction. */
#define MAJ_FROM_XORS(a, b, c) ({ V ab_ = XOR(a, b); V maj_ = XOR(b, AND(ab_, bc_)); bc_ = ab_; maj_; })

/* w[t] = ssig1(w[t-2]) + w[t-7] + ssig0(w[t-15]) + w[t-16]: the padding words' terms are summed
 * in advance (sched_constant), the others computed. */
#define SCHED_TERM(j, VEC_FN)                                                               \
    if (!IS_PAD(j)) sum_ = ADD(sum_, VEC_FN(w[(j) & 15]));
#define SAME(x) (x)
#define SCHED(t)                                                                            \
    do {                                                                                    \
        V sum_ = SET1(0);                                                                   \
        SCHED_TERM((t) - 2, SSIG1)                                                          \
        SCHED_TERM((t) - 7, SAME)                                                           \
        SCHED_TERM((t) - 15, SSIG0)                                                         \
        SCHED_TERM((t) - 16, SAME)                                                          \
        if (sched_constant(t)) sum_ = ADD(sum_, CONST(C_SCHED + (t) - 16));                 \
        w[(t) & 15] = sum_;                                                                 \
    } while (0)

/* Round t also computes the schedule word of round t + 4: issued a few rounds ahead, its
 * instructions fill the gaps of the rounds' dependency chain (measured: 2-4 % faster than
 * computing it in its own round; more rounds ahead gain nothing more). */
#define SCHED_LEAD 4
#define STEP(t)                                                                             \
    if ((t) + SCHED_LEAD >= 16 && (t) + SCHED_LEAD < 80) SCHED((t) + SCHED_LEAD);           \
    ROUND(t);
#define STEP8(t) STEP(t) STEP((t) + 1) STEP((t) + 2) STEP((t) + 3) STEP((t) + 4) STEP((t) + 5) \
    STEP((t) + 6) STEP((t) + 7)
#define ROUNDS_1_TO_79 STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7) STEP8(8) STEP8(16) \
    STEP8(24) STEP8(32) STEP8(40) STEP8(48) STEP8(56) STEP8(64) STEP8(72)

/* The constants of a step, each repeated for every lane of the widest kernel, so that a
 * kernel reads a vector of them from memory, which costs no instruction. Built from
 * immediates, each would cost one or two instructions per step. */
enum { C_K = 0, C_IV = 80, C_ROUND0_E = 88, C_ROUND0_A = 89, C_SCHED = 90, C_COUNT = 106 };
static uint64_t CONSTANTS[C_COUNT][MAX_WIDTH] __attribute__((aligned(64)));

static inline uint64_t sched_constant(int t)
{
    uint64_t sum = 0;
    if (IS_PAD(t - 2)) sum += ssig1_1(PAD(t - 2));
    if (IS_PAD(t - 7)) sum += PAD(t - 7);
    if (IS_PAD(t - 15)) sum += ssig0_1(PAD(t - 15));
    if (IS_PAD(t - 16)) sum += PAD(t - 16);
    return sum;
}

static void set_constant(int index, uint64_t value)
{
    for (int lane = 0; lane < MAX_WIDTH; lane++) CONSTANTS[index][lane] = value;
}

/* Run when the library is loaded, before any call. */
__attribute__((constructor)) static void fill_constants(void)
{
    for (int t = 0; t < 80; t++) set_constant(C_K + t, K[t] + (IS_PAD(t) ? PAD(t) : 0));
    for (int i = 0; i < 8; i++) set_constant(C_IV + i, IV[i]);
    /* Round 0 starts from the constant initial value: only w[0] varies. */
    uint64_t t1 = IV[7] + K[0] + ch_1(IV[4], IV[5], IV[6]) + bsig1_1(IV[4]);
    uint64_t t2 = bsig0_1(IV[0]) + maj_1(IV[0], IV[1], IV[2]);
    set_constant(C_ROUND0_E, IV[3] + t1);
    set_constant(C_ROUND0_A, t1 + t2);
    for (int t = 16; t < 32; t++) set_constant(C_SCHED + t - 16, sched_constant(t));
}

#define INIT_STATE(i) s[i] = CONST(C_IV + (i));
#define COPY_IN(i) w[i] = h[i];
#define ADD_IV(i) h[i] = ADD(s[i], CONST(C_IV + (i)));
#define LOAD_WORD(i) h[i] = LOAD(words + (i) * WIDTH);
#define STORE_WORD(i) STORE(words + (i) * WIDTH, h[i]);

/* ITERATE(words, n): n steps on WIDTH chains; words[i * WIDTH + lane] is word i of a lane. */
#define DEFINE_ITERATE(NAME)                                                                \
    TARGET static void NAME(uint64_t *words, uint64_t n)                                    \
    {                                                                                       \
        V h[8];                                                                             \
        EACH8(LOAD_WORD)                                                                    \
        while (n--) {                                                                       \
            V w[16], s[8];                                                                  \
            /* Read at each use: loads hoisted out of the loop would crowd the registers. */ \
            __asm__ volatile("" : : : "memory");                                            \
            EACH8(COPY_IN)                                                                  \
            EACH8(INIT_STATE)                                                               \
            s[3] = ADD(w[0], CONST(C_ROUND0_E));                                            \
            s[7] = ADD(w[0], CONST(C_ROUND0_A));                                            \
            V bc_ = XOR(s[0], s[1]); /* for MAJ_FROM_XORS in round 1: b ^ c */              \
            (void)bc_;                                                                      \
            ROUNDS_1_TO_79                                                                  \
            EACH8(ADD_IV)                                                                   \
        }                                                                                   \
        EACH8(STORE_WORD)                                                                   \
    }

/* ---- portable C: one lane ---- */
#define TARGET
#define V uint64_t
#define WIDTH 1
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
#define SET1(c) ((uint64_t)(c))
#define CONST(i) CONSTANTS[i][0]
#define ADD(a, b) ((a) + (b))
#define BSIG0 bsig0_1
#define BSIG1 bsig1_1
#define SSIG0 ssig0_1
#define SSIG1 ssig1_1
#define CH ch_1
#define XOR(a, b) ((a) ^ (b))
#define AND(a, b) ((a) & (b))
#define MAJ MAJ_FROM_XORS
DEFINE_ITERATE(iterate_scalar)
#if DW_X86
/* The same for x86-64 CPUs with BMI2, whose rorx rotates without a copy first: 5-7 % faster. */
#undef TARGET
#define TARGET __attribute__((target("bmi2")))
DEFINE_ITERATE(iterate_scalar_bmi2)
#endif
#include "sha512_lanes_undef.h"

#if DW_X86
/* ---- AVX2: four lanes; no rotate instruction, so a rotation is two shifts ---- */
#define TARGET __attribute__((target("avx2")))
#define V __m256i
#define WIDTH 4
#define LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define STORE(p, v) _mm256_storeu_si256((__m256i *)(p), v)
#define SET1(c) _mm256_set1_epi64x((long long)(c))
#define CONST(i) _mm256_load_si256((const __m256i *)CONSTANTS[i])
#define ADD _mm256_add_epi64
#define XOR _mm256_xor_si256
#define SHR _mm256_srli_epi64
#define SHL _mm256_slli_epi64
/* x rotated right by r, s and t, xored: the six shifts xored in any order. */
#define ROR3(x, r, s, t) XOR(XOR(XOR(SHR(x, r), SHL(x, 64 - (r))), XOR(SHR(x, s), SHL(x, 64 - (s)))), \
                             XOR(SHR(x, t), SHL(x, 64 - (t))))
#define BSIG0(x) ROR3(x, 28, 34, 39)
#define BSIG1(x) ROR3(x, 14, 18, 41)
/* A rotation by 8 is a byte shuffle, which runs on other ports than the shifts. */
#define ROR8(x) _mm256_shuffle_epi8(x, _mm256_setr_epi8(1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15, 8, \
                                                        1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15, 8))
#define SSIG0(x) XOR(XOR(XOR(SHR(x, 1), SHL(x, 63)), ROR8(x)), SHR(x, 7))
#define SSIG1(x) XOR(XOR(XOR(SHR(x, 19), SHL(x, 45)), XOR(SHR(x, 61), SHL(x, 3))), SHR(x, 6))
#define CH(e, f, g) XOR(g, _mm256_and_si256(e, XOR(f, g)))
/* (MAJ_FROM_XORS measured 2 % slower here: one more register live, of sixteen) */
#define MAJ(a, b, c) _mm256_or_si256(_mm256_and_si256(a, b), _mm256_and_si256(c, _mm256_or_si256(a, b)))
DEFINE_ITERATE(iterate_avx2)
#include "sha512_lanes_undef.h"

/* ---- AVX-512F: eight lanes; rotations and three-input logic are single instructions ---- */
#define TARGET __attribute__((target("avx512f")))
#define V __m512i
#define WIDTH 8
#define LOAD(p) _mm512_loadu_si512((const void *)(p))
#define STORE(p, v) _mm512_storeu_si512((void *)(p), v)
#define SET1(c) _mm512_set1_epi64((long long)(c))
#define CONST(i) _mm512_load_si512((const void *)CONSTANTS[i])
#define ADD _mm512_add_epi64
#define ROR _mm512_ror_epi64
#define XOR _mm512_xor_si512
/* vpternlogq truth tables: a xor b xor c, a ? b : c, majority */
#define XOR3(a, b, c) _mm512_ternarylogic_epi64(a, b, c, 0x96)
#define CH(e, f, g) _mm512_ternarylogic_epi64(e, f, g, 0xca)
#define MAJ(a, b, c) _mm512_ternarylogic_epi64(a, b, c, 0xe8)
#define BSIG0(x) XOR3(ROR(x, 28), ROR(x, 34), ROR(x, 39))
#define BSIG1(x) XOR3(ROR(x, 14), ROR(x, 18), ROR(x, 41))
#define SSIG0(x) XOR3(ROR(x, 1), ROR(x, 8), _mm512_srli_epi64(x, 7))
#define SSIG1(x) XOR3(ROR(x, 19), ROR(x, 61), _mm512_srli_epi64(x, 6))
DEFINE_ITERATE(iterate_avx512)
#include "sha512_lanes_undef.h"
#endif

/* ---- the kernels and the lane bookkeeping, shared by all of them ---- */

typedef void (*iterate_fn)(uint64_t *words, uint64_t n);

struct kernel {
    const char *name;
    int lanes;
    int (*supported)(void);
    iterate_fn iterate;
};

static int always(void) { return 1; }

#if DW_X86
/* __builtin_cpu_supports also checks that the operating system saves the wide registers. */
static int has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}

static int has_avx512(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

static void iterate_scalar_x86(uint64_t *words, uint64_t n)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("bmi2")) iterate_scalar_bmi2(words, n);
    else iterate_scalar(words, n);
}
#define ITERATE_SCALAR iterate_scalar_x86
#else
#define ITERATE_SCALAR iterate_scalar
#endif

static const struct kernel KERNELS[] = {
    {"scalar", 1, always, ITERATE_SCALAR},
#if DW_X86
    {"avx2", 4, has_avx2, iterate_avx2},
    {"avx512", 8, has_avx512, iterate_avx512},
#endif
};
#define KERNEL_COUNT ((int)(sizeof KERNELS / sizeof KERNELS[0]))

static uint64_t load_be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | p[i];
    return v;
}

static void store_be64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)v;
        v >>= 8;
    }
}

/*
 * One group of `width` lanes. The vector code runs every lane, busy or not, so it runs in
 * segments as long as the shortest busy lane's remaining steps; after each segment only the
 * busy lanes take its results, and a lane that finished drops out of the next segment. This
 * keeps masks out of the inner loop: there are at most `width` + 1 segments per call.
 */
static void run_group(const struct kernel *kernel, unsigned char *digests, uint64_t *remaining,
                      uint64_t max_steps, int flags)
{
    const int width = kernel->lanes;
    uint64_t words[8 * MAX_WIDTH], out[8 * MAX_WIDTH];
    int started_busy[MAX_WIDTH];

    for (int lane = 0; lane < width; lane++) {
        started_busy[lane] = remaining[lane] != 0;
        for (int i = 0; i < 8; i++) words[i * width + lane] = load_be64(digests + lane * 64 + i * 8);
    }
    while (max_steps > 0) {
        uint64_t segment = max_steps;
        int busy = 0;
        for (int lane = 0; lane < width; lane++) {
            if (remaining[lane] == 0) continue;
            busy = 1;
            if (remaining[lane] < segment) segment = remaining[lane];
        }
        if (!busy) break;
        memcpy(out, words, sizeof(uint64_t) * 8 * (size_t)width);
        kernel->iterate(out, segment);
        int finished = 0;
        for (int lane = 0; lane < width; lane++) {
            if (remaining[lane] == 0) continue;
            for (int i = 0; i < 8; i++) words[i * width + lane] = out[i * width + lane];
            remaining[lane] -= segment;
            finished |= remaining[lane] == 0;
        }
        max_steps -= segment;
        if (finished && (flags & DW_STOP_ON_FINISH)) break;
    }
    for (int lane = 0; lane < width; lane++) {
        if (!started_busy[lane]) continue;
        for (int i = 0; i < 8; i++) store_be64(digests + lane * 64 + i * 8, words[i * width + lane]);
    }
}

EXPORT int dw_abi_version(void) { return DW_ABI_VERSION; }

EXPORT int dw_kernel_count(void) { return KERNEL_COUNT; }

EXPORT const char *dw_kernel_name(int kernel)
{
    return kernel >= 0 && kernel < KERNEL_COUNT ? KERNELS[kernel].name : NULL;
}

EXPORT int dw_kernel_lanes(int kernel)
{
    return kernel >= 0 && kernel < KERNEL_COUNT ? KERNELS[kernel].lanes : 0;
}

EXPORT int dw_kernel_supported(int kernel)
{
    return kernel >= 0 && kernel < KERNEL_COUNT && KERNELS[kernel].supported();
}

EXPORT long long dw_iterate(int kernel, unsigned char *digests, uint64_t *remaining, size_t lanes,
                            uint64_t max_steps, int flags)
{
    if (!dw_kernel_supported(kernel)) return -1;
    const struct kernel *chosen = &KERNELS[kernel];
    if (lanes % (size_t)chosen->lanes != 0) return -1;
    long long busy = 0;
    for (size_t first = 0; first < lanes; first += (size_t)chosen->lanes) {
        run_group(chosen, digests + first * 64, remaining + first, max_steps, flags);
        for (int lane = 0; lane < chosen->lanes; lane++) busy += remaining[first + lane] != 0;
    }
    return busy;
}
