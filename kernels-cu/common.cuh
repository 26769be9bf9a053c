// Shared by every kernel family. The Rust runtime splices this file in
// place of each `#include "common.cuh"` before handing the source to NVRTC,
// which has no system headers: no <stdint.h>, no <cuda_fp16.h>, no
// <math.h> (so no INFINITY). Everything here is plain CUDA C++ that NVRTC
// and, with AITL_EMULATED and tests/cuda_emu/shim.h, a host C++ compiler
// both accept.
#ifndef AITL_COMMON_CUH
#define AITL_COMMON_CUH

typedef unsigned int u32;
typedef int i32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef signed char i8;
typedef short i16;
typedef unsigned long long u64;
typedef long long i64;

#define AITL_HD __host__ __device__ __forceinline__
#define AITL_DEV __device__ __forceinline__

#define AITL_FULL_MASK 0xffffffffu
#define AITL_WARP 32

// Dynamic shared memory, sized by the launch: an unsized `extern __shared__`
// array on the device; the emulator, which has no such thing, hands out a
// per-block buffer instead.
#ifdef AITL_EMULATED
#define AITL_DYNAMIC_SHARED(T, name) T* name = (T*)aitl_emu_dynamic_shared()
#else
#define AITL_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif

AITL_HD float aitl_neg_inf() { return __uint_as_float(0xff800000u); }

AITL_HD bool aitl_is_nan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }

// ---- half and bfloat16, as bit patterns --------------------------------
// These must equal the Rust references bit for bit:
// `backend::half::{f16_to_f32, f32_to_f16, f32_to_bf16}`.

AITL_HD float aitl_f16_to_f32(u16 h) {
    u32 sign = ((u32)(h >> 15)) << 31;
    u32 exp = (h >> 10) & 0x1fu;
    u32 mant = h & 0x3ffu;
    u32 bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {
            // Subnormal: shift the leading one up to the implicit bit.
            u32 shift = (u32)__clz((i32)mant) - 21u;
            bits = sign | ((113u - shift) << 23) | (((mant << shift) & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    return __uint_as_float(bits);
}

// Round to nearest even; overflow to infinity; any NaN becomes the quiet
// NaN 0x7e00 with its sign, as the Rust reference does.
AITL_HD u16 aitl_f32_to_f16(float x) {
    u32 bits = __float_as_uint(x);
    u16 sign = (u16)((bits >> 16) & 0x8000u);
    i32 exp = (i32)((bits >> 23) & 0xffu);
    u32 mant = bits & 0x7fffffu;
    if (exp == 0xff) {
        return (u16)(sign | 0x7c00u | (mant != 0 ? 0x200u : 0u));
    }
    i32 e = exp - 112;
    if (e >= 0x1f) {
        return (u16)(sign | 0x7c00u);
    }
    if (e <= 0) {
        if (e < -10) {
            return sign;
        }
        u32 m = mant | 0x800000u;
        u32 shift = (u32)(14 - e);
        u32 rounded = (m + (1u << (shift - 1)) - 1u + ((m >> shift) & 1u)) >> shift;
        return (u16)(sign | rounded);
    }
    u32 base = ((u32)e << 23) | mant;
    // A carry out of the mantissa bumps the exponent, to infinity at the top.
    return (u16)(sign | ((base + 0xfffu + ((base >> 13) & 1u)) >> 13));
}

AITL_HD float aitl_bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest even; a NaN keeps its top bits and is made quiet so the
// truncation cannot turn it into an infinity.
AITL_HD u16 aitl_f32_to_bf16(float x) {
    u32 bits = __float_as_uint(x);
    if (aitl_is_nan(x)) {
        return (u16)((bits >> 16) | 0x40u);
    }
    return (u16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// ---- reductions ---------------------------------------------------------

AITL_DEV float aitl_warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(AITL_FULL_MASK, v, offset);
    }
    return v;
}

// Sum over a block of THREADS threads (all of them must call it); every
// thread gets the total. `scratch` holds one float per warp and may be
// reused as soon as the call returns (the trailing barrier protects it).
template <int THREADS>
AITL_DEV float aitl_block_sum(float v, float* scratch) {
    static_assert(THREADS % AITL_WARP == 0 && THREADS <= 1024, "block size");
    constexpr int WARPS = THREADS / AITL_WARP;
    v = aitl_warp_sum(v);
    const u32 lane = threadIdx.x % AITL_WARP;
    const u32 warp = threadIdx.x / AITL_WARP;
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    float total = lane < (u32)WARPS ? scratch[lane] : 0.0f;
    total = aitl_warp_sum(total);
    __syncthreads();
    return total;
}

template <class T>
AITL_HD T aitl_min(T a, T b) { return a < b ? a : b; }

template <class T>
AITL_HD T aitl_max(T a, T b) { return a < b ? b : a; }


// ---- LayerNorm of one row, as the CPU backend computes it ---------------
// Mean first, then the variance as the mean of squared deviations (two
// passes; E[x²]−E[x]² cancels badly when the mean is large), then
// `((v − mean) · inv) · gamma + beta`. `load(i)` gives element i of the
// un-normalised row; every thread only ever loads and stores the elements
// i ≡ threadIdx.x (mod THREADS), so `out` may be the row `load` reads.
//
// Rows up to THREADS · PER wide stay in registers between the passes;
// wider ones park the loaded values in `out` and read them back.
template <int THREADS, int PER, class Load>
AITL_DEV void aitl_layer_norm_row(Load load, u32 width, const float* gamma, const float* beta, float eps,
                                  float* out, float* scratch) {
    const u32 tid = threadIdx.x;
    const float n = (float)width;
    if (width <= (u32)(THREADS * PER)) {
        float v[PER];
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const u32 i = tid + (u32)(j * THREADS);
            v[j] = i < width ? load(i) : 0.0f;
            sum += v[j];
        }
        const float mean = aitl_block_sum<THREADS>(sum, scratch) / n;
        float squares = 0.0f;
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const float d = tid + (u32)(j * THREADS) < width ? v[j] - mean : 0.0f;
            squares = fmaf(d, d, squares);
        }
        const float inv = 1.0f / sqrtf(aitl_block_sum<THREADS>(squares, scratch) / n + eps);
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const u32 i = tid + (u32)(j * THREADS);
            if (i < width) {
                out[i] = fmaf((v[j] - mean) * inv, gamma[i], beta[i]);
            }
        }
    } else {
        float sum = 0.0f;
        for (u32 i = tid; i < width; i += THREADS) {
            const float x = load(i);
            out[i] = x;
            sum += x;
        }
        const float mean = aitl_block_sum<THREADS>(sum, scratch) / n;
        float squares = 0.0f;
        for (u32 i = tid; i < width; i += THREADS) {
            const float d = out[i] - mean;
            squares = fmaf(d, d, squares);
        }
        const float inv = 1.0f / sqrtf(aitl_block_sum<THREADS>(squares, scratch) / n + eps);
        for (u32 i = tid; i < width; i += THREADS) {
            out[i] = fmaf((out[i] - mean) * inv, gamma[i], beta[i]);
        }
    }
}

#endif  // AITL_COMMON_CUH
