// Mask pooling for Osprey's mask extractor (docs/MODEL.md#mask-pooling).
//
// CPU twin: vision-worker/src/pooling.rs. Both resize and binarise every mask the same way and
// compute the same masked averages; the CPU reaches the sums by other routes (each mask's active
// cells as runs, summed straight off the features or off f64 column prefix sums, whichever costs
// less, all levels per mask read), so the two agree to float rounding, not bit for bit. Layouts
// and semantics are the same on both sides: masks [n, in_h, in_w], features [channels, h, w]. Compiled at run time with NVRTC
// (`--fmad=false`, so that `a * b + c` is not fused and the float arithmetic follows the CPU's),
// using built-ins only: no CUDA headers are needed.
//
// Resizing is PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` without antialias:
//   scale = in / out (float), src = max(scale * (dst + 0.5) - 0.5, 0), i0 = floor(src),
//   i1 = min(i0 + 1, in - 1), w1 = src - i0, w0 = 1 - w1,
//   value = (a * w0x + b * w1x) * w0y + (c * w0x + d * w1x) * w1y.

struct Tap {
    int i0;
    int i1;
    float w0;
    float w1;
};

__device__ __forceinline__ Tap linear_tap(int dst, int in_size, int out_size) {
    const float scale = (float)in_size / (float)out_size;
    float src = scale * ((float)dst + 0.5f) - 0.5f;
    if (src < 0.0f) src = 0.0f;
    int i0 = (int)floorf(src);
    if (i0 > in_size - 1) i0 = in_size - 1;
    const float w1 = fminf(fmaxf(src - (float)i0, 0.0f), 1.0f);
    Tap t;
    t.i0 = i0;
    t.i1 = i0 < in_size - 1 ? i0 + 1 : i0;
    t.w0 = 1.0f - w1;
    t.w1 = w1;
    return t;
}

__device__ __forceinline__ float to_float(unsigned char v) { return (float)v; }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__device__ __forceinline__ float bilinear(const T* plane, int in_w, Tap ty, Tap tx) {
    const T* r0 = plane + (size_t)ty.i0 * in_w;
    const T* r1 = plane + (size_t)ty.i1 * in_w;
    const float a = to_float(r0[tx.i0]), b = to_float(r0[tx.i1]);
    const float c = to_float(r1[tx.i0]), d = to_float(r1[tx.i1]);
    return (a * tx.w0 + b * tx.w1) * ty.w0 + (c * tx.w0 + d * tx.w1) * ty.w1;
}

// One feature level, all masks, one launch.
//
// masks [n, in_h, in_w] (0/1), feats [channels, h, w] f32, out [n, channels] f32.
// Grid: x = mask, y = channel groups. Block: a multiple of 32 threads; each warp reduces one
// channel at a time. Dynamic shared memory: ceil(h*w/32) + blockDim.x/32 unsigned ints.
//
// Each block resizes its mask to (h, w), binarises it (> 0) into a shared bitmap and counts it;
// then out[m, c] = sum_p feats[c, p] * (bit_p / (count + 1e-8)), as upstream's
// einsum(F, m / den).
template <typename T>
__device__ void mask_pool(const T* masks, const float* feats, float* out, int in_h, int in_w, int channels,
                          int h, int w) {
    extern __shared__ unsigned int shared[];
    const int hw = h * w;
    const int words = (hw + 31) / 32;
    unsigned int* bits = shared;
    unsigned int* warp_counts = shared + words;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const int m = blockIdx.x;
    const T* plane = masks + (size_t)m * in_h * in_w;

    for (int i = threadIdx.x; i < words; i += blockDim.x) bits[i] = 0u;
    __syncthreads();

    unsigned int count = 0;
    for (int p = threadIdx.x; p < hw; p += blockDim.x) {
        const int oy = p / w, ox = p - (p / w) * w;
        const float v = bilinear(plane, in_w, linear_tap(oy, in_h, h), linear_tap(ox, in_w, w));
        if (v > 0.0f) {
            atomicOr(&bits[p >> 5], 1u << (p & 31));
            count += 1;
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) count += __shfl_down_sync(0xffffffffu, count, offset);
    if (lane == 0) warp_counts[warp] = count;
    __syncthreads();
    unsigned int total = 0;
    for (int i = 0; i < warps; ++i) total += warp_counts[i];
    const float weight = 1.0f / ((float)total + 1e-8f);

    for (int c = blockIdx.y * warps + warp; c < channels; c += gridDim.y * warps) {
        const float* f = feats + (size_t)c * hw;
        float acc = 0.0f;
        for (int p = lane; p < hw; p += 32) {
            if (bits[p >> 5] & (1u << (p & 31))) acc += f[p] * weight;
        }
        for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
        if (lane == 0) out[(size_t)m * channels + c] = acc;
    }
}

extern "C" __global__ void mask_pool_u8(const unsigned char* masks, const float* feats, float* out, int in_h,
                                        int in_w, int channels, int h, int w) {
    mask_pool(masks, feats, out, in_h, in_w, channels, h, w);
}

extern "C" __global__ void mask_pool_f32(const float* masks, const float* feats, float* out, int in_h, int in_w,
                                         int channels, int h, int w) {
    mask_pool(masks, feats, out, in_h, in_w, channels, h, w);
}

// The `<pos>` input: every mask resized to (out_h, out_w), not binarised.
// masks [n, in_h, in_w], out [n, out_h, out_w] f32; one thread per output value (grid-stride).
template <typename T>
__device__ void mask_resize(const T* masks, float* out, int n, int in_h, int in_w, int out_h, int out_w) {
    const size_t total = (size_t)n * out_h * out_w;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int ox = (int)(i % out_w);
        const int oy = (int)((i / out_w) % out_h);
        const size_t m = i / ((size_t)out_w * out_h);
        const T* plane = masks + m * in_h * in_w;
        out[i] = bilinear(plane, in_w, linear_tap(oy, in_h, out_h), linear_tap(ox, in_w, out_w));
    }
}

extern "C" __global__ void mask_resize_u8(const unsigned char* masks, float* out, int n, int in_h, int in_w,
                                          int out_h, int out_w) {
    mask_resize(masks, out, n, in_h, in_w, out_h, out_w);
}

extern "C" __global__ void mask_resize_f32(const float* masks, float* out, int n, int in_h, int in_w, int out_h,
                                           int out_w) {
    mask_resize(masks, out, n, in_h, in_w, out_h, out_w);
}
