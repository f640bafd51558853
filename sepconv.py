"""Adaptive separable convolution: the operation at the heart of SepConv.

    out[n, c, y, x] = sum_i sum_j vertical[n, i, y, x] * horizontal[n, j, y, x] * input[n, c, y + i, x + j]

input is N x C x (H + K - 1) x (W + K - 1), vertical and horizontal are N x K x H x W.
`sepconv_pair` sums the op over two frames (the network's output) in one pass.
On CUDA tensors with CuPy installed the op runs as hand-written CUDA kernels; everywhere
else it runs in PyTorch as batched matmuls (_operands). Both paths accumulate in
float32 (float64 for float64 inputs) and return that dtype, so the op is safe under autocast;
the CUDA kernels read float16 / bfloat16 tensors as they are, which gives the same result as
upcasting them first.
"""
import warnings

import torch

try:
    import cupy
except ImportError:
    cupy = None

BAND_ROWS, BAND_COLUMNS = 64, 32  # the forward's blocks of output pixels


def _blocks(input, vertical):
    """(n, rows, block, its y0 and x0) for every block of BAND_ROWS x BAND_COLUMNS output pixels of each
    sample; rows is input[n] as (H + K - 1) x C x (W + K - 1), rows (y, c) equally spaced."""
    batch, size, height, width = vertical.shape
    for n in range(batch):
        rows = input[n].transpose(0, 1).contiguous()
        for y0 in range(0, height, BAND_ROWS):
            for x0 in range(0, width, BAND_COLUMNS):
                yield n, rows, (slice(y0, y0 + BAND_ROWS), slice(x0, x0 + BAND_COLUMNS)), y0, x0


def _forward_torch(input, vertical, horizontal):
    """The op as one batched matmul per block of BAND_ROWS x BAND_COLUMNS output pixels (see _operands).
    Reads any strides: channels_last kernels, as the network gives them on the CPU, are read in place."""
    batch, size, height, width = vertical.shape
    output = input.new_empty(batch, height, input.shape[1], width)
    bands = {}  # zeroed band matrices by block shape: every block writes the same diagonals
    for n, rows, block, y0, x0 in _blocks(input, vertical):
        under, band = _operands(rows, y0, x0, horizontal[n, :, block[0], block[1]], bands)
        ver = vertical[n, :, block[0], block[1]].transpose(0, 1).contiguous()
        output[n, block[0], :, block[1]] = _horizontal_sums(under, band, ver.shape[1]).mul_(ver[:, :, None]).sum(1)
    return output.transpose(1, 2)


def _operands(rows, y0, x0, horizontal, bands):
    """The two factors of the op on the h x w output pixels from (y0, x0), whose horizontal taps are K x h x w.

    For each output row the horizontal taps form a band matrix, band[x, x + j] = horizontal[j, y, x], of
    w x (w + K - 1); under[y] are the K x C input rows under output row y. under[y] @ band[y]^T holds the
    horizontal sums of every tap row, at matmul speed, K / (w + K - 1) of the multiply-adds being useful;
    the vertical taps then weight them. The backward multiplies the same two factors with the gradient.
    """
    size, height, width = horizontal.shape
    channels, stride = rows.shape[1:]
    if (height, width) not in bands:
        bands[height, width] = rows.new_zeros(height, width, width + size - 1)
    band = bands[height, width]
    band.as_strided((height, width, size), (band.stride(0), width + size, 1)).copy_(horizontal.permute(1, 2, 0))
    under = rows.as_strided((height, size * channels, width + size - 1), (channels * stride, stride, 1),
                            y0 * channels * stride + x0)
    return under, band


def _horizontal_sums(under, band, size):
    """h x K x C x w: the horizontal taps applied to each of the K x C input rows under each output row."""
    height, width = band.shape[:2]
    return torch.bmm(under, band.transpose(1, 2)).view(height, size, -1, width)


def _backward_torch(input, vertical, horizontal, grad, needs):
    """The gradients of the op (those that `needs` asks for), block by block as the forward, with the
    same two matmul factors: the kernels' gradients from the horizontal sums and the input rows, the
    input's from the band matrices, scattered back onto the K input rows each output row reads."""
    size, channels = vertical.shape[1], input.shape[1]
    grad_rows = input.new_zeros(input.transpose(1, 2).shape) if needs[0] else None  # N x rows as in _blocks
    grad_vertical = torch.empty_like(vertical) if needs[1] else None
    grad_horizontal = torch.empty_like(horizontal) if needs[2] else None
    bands = {}
    for n, rows, block, y0, x0 in _blocks(input, vertical):
        under, band = _operands(rows, y0, x0, horizontal[n, :, block[0], block[1]], bands)
        h, w = band.shape[:2]
        g = grad[n, :, block[0], block[1]].transpose(0, 1)  # h x C x w
        if grad_vertical is not None:
            sums = _horizontal_sums(under, band, size)
            grad_vertical[n, :, block[0], block[1]] = (sums * g[:, None]).sum(2).transpose(0, 1)
        if grad_horizontal is None and grad_rows is None:
            continue
        ver = vertical[n, :, block[0], block[1]].transpose(0, 1)  # h x K x w
        grad_sums = (ver[:, :, None] * g[:, None]).view(h, size * channels, w)
        if grad_horizontal is not None:
            grad_band = torch.bmm(grad_sums.transpose(1, 2), under)  # h x w x (w + K - 1)
            diagonals = grad_band.as_strided((h, w, size), (grad_band.stride(0), w + size, 1))
            grad_horizontal[n, :, block[0], block[1]] = diagonals.permute(2, 0, 1)
        if grad_rows is not None:
            grad_under = torch.bmm(grad_sums, band).view(h * size, channels, w + size - 1)
            targets = (torch.arange(h, device=input.device)[:, None] + torch.arange(size, device=input.device) + y0)
            grad_rows[n, :, :, x0:x0 + w + size - 1].index_add_(0, targets.flatten(), grad_under)
    return None if grad_rows is None else grad_rows.transpose(1, 2), grad_vertical, grad_horizontal


# ---------------------------------------------------------------------------------------------
# CUDA kernels (CuPy), generated per kernel size, channel count and storage types.
#
# Storage may be float, double, half or bfloat16 (input and kernels separately); arithmetic and
# outputs are acc_t: double for double inputs, float otherwise. The naive kernels (one thread per
# output element, the original's algorithm) are the baseline and test oracle; the tiled kernels
# are used otherwise:
#  - forward and the kernel gradients: a block owns 32 columns x TILED_WARPS * R rows of output,
#    stages the (rows + K - 1) x (32 + K - 1) input texels of TILED_GROUP channels in shared
#    memory, and each thread owns R pixels of one column, holding J horizontal taps per pixel in
#    registers, so every texel read from shared memory feeds R * J fused multiply-adds.
#  - grad input: a gather, block over input texels, staging one row of pixels (gradient,
#    vertical and horizontal taps) at a time; each thread owns GATHER_R x GATHER_C texels.

CUDA_PRELUDE = r"""
struct half_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(bf16_t x) { return __uint_as_float((unsigned int)x.bits << 16); }
__device__ __forceinline__ float widen(half_t x) {
    float value;
    asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(x.bits));
    return value;
}
template <typename T> __device__ __forceinline__ T* shared_buffer() {
    extern __shared__ __align__(16) unsigned char buffer[];
    return reinterpret_cast<T*>(buffer);
}
"""

CUDA_NAIVE = r"""
extern "C" __global__ void sepconv_forward(const int total, const int C, const int H, const int W, const int K,
        const input_t* __restrict__ input, const weight_t* __restrict__ vertical,
        const weight_t* __restrict__ horizontal, acc_t* __restrict__ output) {
    for (int index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += blockDim.x * gridDim.x) {
        const int x = index % W, y = (index / W) % H, c = (index / W / H) % C, n = index / W / H / C;
        const int IH = H + K - 1, IW = W + K - 1;
        const input_t* in = input + ((long long)(n * C + c) * IH + y) * IW + x;
        const weight_t* ver = vertical + (long long)n * K * H * W + y * W + x;
        const weight_t* hor = horizontal + (long long)n * K * H * W + y * W + x;
        acc_t sum = 0;
        for (int i = 0; i < K; ++i) {
            acc_t row = 0;
            for (int j = 0; j < K; ++j) row += widen(hor[(long long)j * H * W]) * widen(in[(long long)i * IW + j]);
            sum += widen(ver[(long long)i * H * W]) * row;
        }
        output[index] = sum;
    }
}

extern "C" __global__ void sepconv_grad_input(const int total, const int C, const int H, const int W, const int K,
        const acc_t* __restrict__ grad, const weight_t* __restrict__ vertical,
        const weight_t* __restrict__ horizontal, acc_t* __restrict__ grad_input) {
    for (int index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += blockDim.x * gridDim.x) {
        const int IH = H + K - 1, IW = W + K - 1;
        const int ix = index % IW, iy = (index / IW) % IH, c = (index / IW / IH) % C, n = index / IW / IH / C;
        acc_t sum = 0;
        for (int i = max(0, iy - H + 1); i <= min(K - 1, iy); ++i) {
            const int y = iy - i;
            for (int j = max(0, ix - W + 1); j <= min(K - 1, ix); ++j) {
                const int x = ix - j;
                const long long pixel = (long long)n * K * H * W + y * W + x;
                sum += grad[((long long)(n * C + c) * H + y) * W + x]
                     * widen(vertical[pixel + (long long)i * H * W]) * widen(horizontal[pixel + (long long)j * H * W]);
            }
        }
        grad_input[index] = sum;
    }
}

extern "C" __global__ void sepconv_grad_vertical(const int total, const int C, const int H, const int W, const int K,
        const acc_t* __restrict__ grad, const input_t* __restrict__ input,
        const weight_t* __restrict__ horizontal, acc_t* __restrict__ grad_vertical) {
    for (int index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += blockDim.x * gridDim.x) {
        const int x = index % W, y = (index / W) % H, i = (index / W / H) % K, n = index / W / H / K;
        const int IH = H + K - 1, IW = W + K - 1;
        acc_t sum = 0;
        for (int c = 0; c < C; ++c) {
            const input_t* in = input + ((long long)(n * C + c) * IH + y + i) * IW + x;
            acc_t row = 0;
            for (int j = 0; j < K; ++j) row += widen(horizontal[(((long long)n * K + j) * H + y) * W + x]) * widen(in[j]);
            sum += grad[((long long)(n * C + c) * H + y) * W + x] * row;
        }
        grad_vertical[index] = sum;
    }
}

extern "C" __global__ void sepconv_grad_horizontal(const int total, const int C, const int H, const int W, const int K,
        const acc_t* __restrict__ grad, const input_t* __restrict__ input,
        const weight_t* __restrict__ vertical, acc_t* __restrict__ grad_horizontal) {
    for (int index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += blockDim.x * gridDim.x) {
        const int x = index % W, y = (index / W) % H, j = (index / W / H) % K, n = index / W / H / K;
        const int IH = H + K - 1, IW = W + K - 1;
        acc_t sum = 0;
        for (int c = 0; c < C; ++c) {
            const input_t* in = input + ((long long)(n * C + c) * IH + y) * IW + x + j;
            acc_t column = 0;
            for (int i = 0; i < K; ++i) column += widen(vertical[(((long long)n * K + i) * H + y) * W + x]) * widen(in[(long long)i * IW]);
            sum += grad[((long long)(n * C + c) * H + y) * W + x] * column;
        }
        grad_horizontal[index] = sum;
    }
}
"""

CUDA_TILED = r"""
constexpr int TILE_H = TILED_WARPS * R, TILE_W = 32, TILED_THREADS = 32 * TILED_WARPS;
constexpr int SH = TILE_H + K - 1, SW = TILE_W + K - 1;  // shared tile: SH x SW texels per channel
constexpr bool PADDED = CHUNKS * J != K;                 // the last chunk has taps past K

// tile[c][a][b] = input[c0 + c][top + a][left + b], zero outside the input.
__device__ __forceinline__ void load_tile(acc_t* tile, const input_t* __restrict__ input, const int C,
        const int IH, const int IW, const int c0, const int top, const int left) {
    for (int e = threadIdx.y * 32 + threadIdx.x; e < TILED_GROUP * SH * SW; e += TILED_THREADS) {
        const int c = c0 + e / (SH * SW), iy = top + e / SW % SH, ix = left + e % SW;
        tile[e] = c < C && iy < IH && ix < IW ? widen(input[((long long)c * IH + iy) * IW + ix]) : acc_t(0);
    }
}

// Horizontal taps chunk * J .. chunk * J + J - 1 of this thread's R pixels (zero past K or the image).
__device__ __forceinline__ void load_taps(acc_t (&taps)[J][R], const weight_t* __restrict__ horizontal,
        const int chunk, const bool inside, const int H, const int W, const int x, const int y) {
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
        for (int r = 0; r < R; ++r)
            taps[j][r] = inside && y + r < H && chunk * J + j < K
                ? widen(horizontal[(long long)(chunk * J + j) * H * W + (long long)(y + r) * W + x]) : acc_t(0);
}

// partial[r][c] = sum over the chunk's taps j of taps[j][r] * row[c][j] (row: texel row, at this thread's column).
__device__ __forceinline__ void row_sums(acc_t (&partial)[R][TILED_GROUP], const acc_t (&taps)[J][R],
        const acc_t* row, const int chunk) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < TILED_GROUP; ++c) partial[r][c] = 0;
#pragma unroll
    for (int j = 0; j < J; ++j) {
        if (PADDED && chunk * J + j >= K) break;
#pragma unroll
        for (int c = 0; c < TILED_GROUP; ++c) {
            const acc_t texel = row[c * SH * SW + j];
#pragma unroll
            for (int r = 0; r < R; ++r) partial[r][c] += taps[j][r] * texel;
        }
    }
}

// output[n] = sum over frames f < frames of sepconv(input_f, vertical_f, horizontal_f)[n]
extern "C" __global__ void __launch_bounds__(TILED_THREADS, MIN_BLOCKS) sepconv_forward_tiled(
        const int frames, const int C, const int H, const int W,
        const input_t* __restrict__ input0, const weight_t* __restrict__ vertical0, const weight_t* __restrict__ horizontal0,
        const input_t* __restrict__ input1, const weight_t* __restrict__ vertical1, const weight_t* __restrict__ horizontal1,
        acc_t* __restrict__ output) {
    acc_t* tile = shared_buffer<acc_t>();
    const int IH = H + K - 1, IW = W + K - 1, n = blockIdx.z;
    const int left = blockIdx.x * TILE_W, top = blockIdx.y * TILE_H;
    const int x = left + threadIdx.x, y = top + threadIdx.y * R;  // this thread's pixels: (y + r, x)
    const bool inside = x < W;
    const long long plane = (long long)H * W;
    for (int c0 = 0; c0 < C; c0 += TILED_GROUP) {
        acc_t sum[R][TILED_GROUP] = {};
        for (int frame = 0; frame < frames; ++frame) {
            const input_t* input = (frame ? input1 : input0) + (long long)n * C * IH * IW;
            const weight_t* vertical = (frame ? vertical1 : vertical0) + n * K * plane;
            const weight_t* horizontal = (frame ? horizontal1 : horizontal0) + n * K * plane;
            __syncthreads();
            load_tile(tile, input, C, IH, IW, c0, top, left);
            __syncthreads();
#pragma unroll 1  // unrolled, the compiler would hoist every chunk's taps into registers at once
            for (int chunk = 0; chunk < CHUNKS; ++chunk) {
                acc_t taps[J][R];
                load_taps(taps, horizontal, chunk, inside, H, W, x, y);
#pragma unroll 1
                for (int a = 0; a < R + K - 1; ++a) {  // texel row y + a; pixel r uses it with vertical tap a - r
                    acc_t scale[R];
#pragma unroll
                    for (int r = 0; r < R; ++r)
                        scale[r] = inside && y + r < H && a >= r && a - r < K
                            ? widen(vertical[(a - r) * plane + (long long)(y + r) * W + x]) : acc_t(0);
                    acc_t partial[R][TILED_GROUP];
                    row_sums(partial, taps, tile + (threadIdx.y * R + a) * SW + threadIdx.x + chunk * J, chunk);
#pragma unroll
                    for (int r = 0; r < R; ++r)
                        if (a >= r && a - r < K)
#pragma unroll
                            for (int c = 0; c < TILED_GROUP; ++c) sum[r][c] += scale[r] * partial[r][c];
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int c = 0; c < TILED_GROUP; ++c)
                if (inside && y + r < H && c0 + c < C) output[((long long)n * C + c0 + c) * plane + (long long)(y + r) * W + x] = sum[r][c];
    }
}

// This thread's output gradient, zero outside the image.
__device__ __forceinline__ void load_grad(acc_t (&g)[R][TILED_GROUP], const acc_t* __restrict__ grad,
        const int C, const int c0, const bool inside, const int H, const int W, const int x, const int y) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < TILED_GROUP; ++c)
            g[r][c] = inside && y + r < H && c0 + c < C ? grad[((long long)(c0 + c) * H + y + r) * W + x] : acc_t(0);
}

// grad_vertical[n][i][y][x] = sum_c grad[n][c][y][x] * sum_j horizontal[n][j][y][x] * input[n][c][y + i][x + j]
extern "C" __global__ void __launch_bounds__(TILED_THREADS, MIN_BLOCKS) sepconv_grad_vertical_tiled(
        const int C, const int H, const int W, const acc_t* __restrict__ grad, const input_t* __restrict__ input,
        const weight_t* __restrict__ horizontal, acc_t* __restrict__ grad_vertical) {
    acc_t* tile = shared_buffer<acc_t>();
    const int IH = H + K - 1, IW = W + K - 1, n = blockIdx.z;
    const int left = blockIdx.x * TILE_W, top = blockIdx.y * TILE_H;
    const int x = left + threadIdx.x, y = top + threadIdx.y * R;
    const bool inside = x < W;
    const long long plane = (long long)H * W;
    input += (long long)n * C * IH * IW;
    horizontal += n * K * plane;
    grad += n * C * plane;
    grad_vertical += n * K * plane;
    for (int c0 = 0; c0 < C; c0 += TILED_GROUP) {
        acc_t g[R][TILED_GROUP];
        load_grad(g, grad, C, c0, inside, H, W, x, y);
        __syncthreads();
        load_tile(tile, input, C, IH, IW, c0, top, left);
        __syncthreads();
#pragma unroll 1
        for (int chunk = 0; chunk < CHUNKS; ++chunk) {
            acc_t taps[J][R];
            load_taps(taps, horizontal, chunk, inside, H, W, x, y);
#pragma unroll 1
            for (int a = 0; a < R + K - 1; ++a) {
                acc_t partial[R][TILED_GROUP];
                row_sums(partial, taps, tile + (threadIdx.y * R + a) * SW + threadIdx.x + chunk * J, chunk);
#pragma unroll
                for (int r = 0; r < R; ++r)
                    if (a >= r && a - r < K && inside && y + r < H) {
                        acc_t value = 0;
#pragma unroll
                        for (int c = 0; c < TILED_GROUP; ++c) value += g[r][c] * partial[r][c];
                        acc_t* target = grad_vertical + (a - r) * plane + (long long)(y + r) * W + x;
                        *target = c0 == 0 && chunk == 0 ? value : *target + value;
                    }
            }
        }
    }
}

// grad_horizontal[n][j][y][x] = sum_c grad[n][c][y][x] * sum_i vertical[n][i][y][x] * input[n][c][y + i][x + j]
extern "C" __global__ void __launch_bounds__(TILED_THREADS, MIN_BLOCKS) sepconv_grad_horizontal_tiled(
        const int C, const int H, const int W, const acc_t* __restrict__ grad, const input_t* __restrict__ input,
        const weight_t* __restrict__ vertical, acc_t* __restrict__ grad_horizontal) {
    acc_t* tile = shared_buffer<acc_t>();
    const int IH = H + K - 1, IW = W + K - 1, n = blockIdx.z;
    const int left = blockIdx.x * TILE_W, top = blockIdx.y * TILE_H;
    const int x = left + threadIdx.x, y = top + threadIdx.y * R;
    const bool inside = x < W;
    const long long plane = (long long)H * W;
    input += (long long)n * C * IH * IW;
    vertical += n * K * plane;
    grad += n * C * plane;
    grad_horizontal += n * K * plane;
    for (int c0 = 0; c0 < C; c0 += TILED_GROUP) {
        acc_t g[R][TILED_GROUP];
        load_grad(g, grad, C, c0, inside, H, W, x, y);
        __syncthreads();
        load_tile(tile, input, C, IH, IW, c0, top, left);
        __syncthreads();
#pragma unroll 1
        for (int chunk = 0; chunk < CHUNKS; ++chunk) {
            acc_t total[J][R] = {};
#pragma unroll 1
            for (int a = 0; a < R + K - 1; ++a) {
                acc_t weight[R][TILED_GROUP];  // grad times the vertical tap pixel r gives texel row y + a
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const acc_t scale = inside && y + r < H && a >= r && a - r < K
                        ? widen(vertical[(a - r) * plane + (long long)(y + r) * W + x]) : acc_t(0);
#pragma unroll
                    for (int c = 0; c < TILED_GROUP; ++c) weight[r][c] = scale * g[r][c];
                }
                const acc_t* row = tile + (threadIdx.y * R + a) * SW + threadIdx.x + chunk * J;
#pragma unroll
                for (int j = 0; j < J; ++j) {
                    if (PADDED && chunk * J + j >= K) break;
#pragma unroll
                    for (int c = 0; c < TILED_GROUP; ++c) {
                        const acc_t texel = row[c * SH * SW + j];
#pragma unroll
                        for (int r = 0; r < R; ++r) total[j][r] += weight[r][c] * texel;
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < J; ++j)
#pragma unroll
                for (int r = 0; r < R; ++r)
                    if (chunk * J + j < K && inside && y + r < H) {
                        acc_t* target = grad_horizontal + (chunk * J + j) * plane + (long long)(y + r) * W + x;
                        *target = c0 == 0 ? total[j][r] : *target + total[j][r];
                    }
        }
    }
}
"""

CUDA_GATHER = r"""
constexpr int TILE_A = GATHER_WARPS * GATHER_R, TILE_B = 32 * GATHER_C, GATHER_THREADS = 32 * GATHER_WARPS;
constexpr int PIXELS = TILE_B + K - 1;             // pixel columns that reach the block's texels
constexpr int QUARTER = (PIXELS + GATHER_C - 1) / GATHER_C;
constexpr int SPAN = GATHER_C * QUARTER;            // staged row length; pixel p sits at (p % GATHER_C) * QUARTER + p / GATHER_C
constexpr int TAP_ROWS = K + 2 * (GATHER_C - 1);    // horizontal taps -(GATHER_C - 1) .. K + GATHER_C - 2, zero outside 0 .. K - 1
constexpr int STAGED_ROWS = GATHER_GROUP + TILE_A + TAP_ROWS;

// grad_input[n][c][ty][tx] = sum_{i,j} grad[n][c][ty - i][tx - j] * vertical[n][i][ty - i][tx - j] * horizontal[n][j][ty - i][tx - j]
extern "C" __global__ void __launch_bounds__(GATHER_THREADS, MIN_BLOCKS) sepconv_grad_input_gather(
        const int C, const int H, const int W, const acc_t* __restrict__ grad, const weight_t* __restrict__ vertical,
        const weight_t* __restrict__ horizontal, acc_t* __restrict__ grad_input) {
    acc_t* stage = shared_buffer<acc_t>();
    acc_t* grads = stage;                                   // [GATHER_GROUP][SPAN]: grad of channel c0 + c
    acc_t* verticals = stage + GATHER_GROUP * SPAN;         // [TILE_A][SPAN]: vertical tap linking texel row top + a to the pixel row
    acc_t* horizontals = verticals + TILE_A * SPAN;         // [TAP_ROWS][SPAN]: horizontal tap k - (GATHER_C - 1)
    const int IH = H + K - 1, IW = W + K - 1, n = blockIdx.z;
    const int left = blockIdx.x * TILE_B, top = blockIdx.y * TILE_A;
    const int lane = threadIdx.x, rows = threadIdx.y * GATHER_R;  // this thread's texels: (top + rows + r, left + lane * GATHER_C + s)
    const long long plane = (long long)H * W;
    grad += n * C * plane;
    vertical += n * K * plane;
    horizontal += n * K * plane;
    grad_input += (long long)n * C * IH * IW;
    for (int c0 = 0; c0 < C; c0 += GATHER_GROUP) {
        acc_t sum[GATHER_R][GATHER_C][GATHER_GROUP] = {};
        for (int y = top - K + 1; y < top + TILE_A; ++y) {
            __syncthreads();
            for (int e = threadIdx.y * 32 + lane; e < STAGED_ROWS * PIXELS; e += GATHER_THREADS) {
                const int row = e / PIXELS, p = e % PIXELS, x = left - K + 1 + p;
                const long long pixel = (long long)y * W + x;
                acc_t value = 0;
                if (y >= 0 && y < H && x >= 0 && x < W) {
                    if (row < GATHER_GROUP) {
                        if (c0 + row < C) value = grad[(c0 + row) * plane + pixel];
                    } else if (row < GATHER_GROUP + TILE_A) {
                        const int i = top + row - GATHER_GROUP - y;
                        if (i >= 0 && i < K) value = widen(vertical[i * plane + pixel]);
                    } else {
                        const int j = row - GATHER_GROUP - TILE_A - (GATHER_C - 1);
                        if (j >= 0 && j < K) value = widen(horizontal[j * plane + pixel]);
                    }
                }
                stage[row * SPAN + (p % GATHER_C) * QUARTER + p / GATHER_C] = value;
            }
            __syncthreads();
            if (y < top + rows - K + 1 || y > top + rows + GATHER_R - 1) continue;  // no texel of this warp is reached
            for (int m = 0; m < K + GATHER_C - 1; ++m) {  // pixel column p = lane * GATHER_C + m; texel s uses tap s + K - 1 - m
                const int at = (m % GATHER_C) * QUARTER + lane + m / GATHER_C;
                acc_t weight[GATHER_R][GATHER_GROUP];
#pragma unroll
                for (int r = 0; r < GATHER_R; ++r) {
                    const acc_t scale = verticals[(rows + r) * SPAN + at];
#pragma unroll
                    for (int c = 0; c < GATHER_GROUP; ++c) weight[r][c] = scale * grads[c * SPAN + at];
                }
#pragma unroll
                for (int s = 0; s < GATHER_C; ++s) {
                    const acc_t tap = horizontals[(s + K + GATHER_C - 2 - m) * SPAN + at];
#pragma unroll
                    for (int r = 0; r < GATHER_R; ++r)
#pragma unroll
                        for (int c = 0; c < GATHER_GROUP; ++c) sum[r][s][c] += weight[r][c] * tap;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < GATHER_R; ++r)
#pragma unroll
            for (int s = 0; s < GATHER_C; ++s)
#pragma unroll
                for (int c = 0; c < GATHER_GROUP; ++c) {
                    const int ty = top + rows + r, tx = left + lane * GATHER_C + s;
                    if (ty < IH && tx < IW && c0 + c < C) grad_input[((long long)(c0 + c) * IH + ty) * IW + tx] = sum[r][s][c];
                }
    }
}
"""

CUDA_TYPES = {torch.float32: 'float', torch.float64: 'double', torch.float16: 'half_t', torch.bfloat16: 'bf16_t'}
ROWS_PER_THREAD = 4   # R: output rows per thread in the tiled kernels
MAX_TAPS = 17         # J <= MAX_TAPS horizontal taps per pixel are held in registers
GATHER_ROWS = GATHER_COLUMNS = 4
MASS_FLOOR = 0.01     # kernel normalization divides by 1 where the kernels' mass is under this in magnitude
_kernels = {}
_warned = False


def _accumulator(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_config(size, channels, input_dtype, shared_limit):
    """Compile-time constants of the CUDA module; TILED_WARPS / GATHER_WARPS are 0 where those kernels do not fit."""
    chunks = -(-size // MAX_TAPS)
    wide = input_dtype == torch.float64
    config = {'K': size, 'R': ROWS_PER_THREAD, 'J': -(-size // chunks), 'CHUNKS': chunks,
              'GATHER_R': GATHER_ROWS, 'GATHER_C': GATHER_COLUMNS, 'MIN_BLOCKS': 1 if wide else 2,
              'TILED_WARPS': 0, 'TILED_GROUP': 1, 'GATHER_WARPS': 0, 'GATHER_GROUP': 1}
    for group in sorted({min(channels, 3), 1}, reverse=True):
        for warps in (8, 4, 2, 1):
            if not config['TILED_WARPS'] and _tiled_shared(config, warps, group) * (8 if wide else 4) <= shared_limit:
                config.update(TILED_WARPS=warps, TILED_GROUP=group)
            if not config['GATHER_WARPS'] and _gather_shared(config, warps, group) * (8 if wide else 4) <= shared_limit:
                config.update(GATHER_WARPS=warps, GATHER_GROUP=group)
    return config


def _tiled_shared(config, warps=None, group=None):
    """Shared-memory elements of a tiled block: group channels of (rows + K - 1) x (32 + K - 1) texels."""
    warps, group = warps or config['TILED_WARPS'], group or config['TILED_GROUP']
    return group * (warps * config['R'] + config['K'] - 1) * (32 + config['K'] - 1)


def _gather_shared(config, warps=None, group=None):
    """Shared-memory elements of a gather block: one staged row of grads, vertical and horizontal taps."""
    warps, group, columns = warps or config['GATHER_WARPS'], group or config['GATHER_GROUP'], config['GATHER_C']
    span = -(-(32 * columns + config['K'] - 1) // columns) * columns
    return (group + warps * config['GATHER_R'] + config['K'] + 2 * (columns - 1)) * span


def cuda_source(config, input_dtype, weight_dtype):
    """The CUDA module for one configuration and storage types: the naive kernels, plus the optimized ones that fit."""
    header = (f'typedef {CUDA_TYPES[input_dtype]} input_t;\ntypedef {CUDA_TYPES[weight_dtype]} weight_t;\n'
              f'typedef {CUDA_TYPES[_accumulator(input_dtype)]} acc_t;\n'
              + ''.join(f'constexpr int {name} = {value};\n' for name, value in config.items()))
    return (CUDA_PRELUDE + header + CUDA_NAIVE + (CUDA_TILED if config['TILED_WARPS'] else '')
            + (CUDA_GATHER if config['GATHER_WARPS'] else ''))


def _shared_limit(device):
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _launch(source, name, grid, block, shared, args):
    """Run kernel `name` of `source` on torch's current stream; args are ints and CUDA tensors."""
    device = next(arg for arg in args if isinstance(arg, torch.Tensor)).device
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
        if (source, name) not in _kernels:  # cupy compiles each source once and loads it per device
            _kernels[source, name] = cupy.RawModule(code=source).get_function(name)
        kernel = _kernels[source, name]
        if shared > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = shared
        values = [cupy.int32(arg) if isinstance(arg, int) else  # cupy has no bfloat16: 2-byte storage goes as int16
                  cupy.from_dlpack(arg.view(torch.int16) if arg.element_size() == 2 else arg) for arg in args]
        kernel(grid, block, tuple(values), shared_mem=shared)


def _plan(frames):
    input, vertical, _ = frames[0]
    batch, size, height, width = vertical.shape
    config = kernel_config(size, input.shape[1], input.dtype, _shared_limit(input.device))
    return config, cuda_source(config, input.dtype, vertical.dtype), (batch, input.shape[1], height, width, size)


def _launch_naive(source, name, shape, *tensors):
    """One thread per element of the output (the last tensor)."""
    total = tensors[-1].numel()
    _launch(source, name, ((total + 511) // 512,), (512,), 0, (total, *shape[1:], *tensors))
    return tensors[-1]


def _launch_tiled(config, source, name, shape, *args):
    batch, channels, height, width, _ = shape
    warps = config['TILED_WARPS']
    grid = (-(-width // 32), -(-height // (warps * config['R'])), batch)
    _launch(source, name, grid, (32, warps), _tiled_shared(config) * args[-1].element_size(), args)


def _forward_cuda(frames, naive=False):
    """Sum of sepconv over one or two (input, vertical, horizontal) frames, as one tiled launch unless naive."""
    config, source, shape = _plan(frames)
    batch, channels, height, width, _ = shape
    empty = lambda: frames[0][0].new_empty(batch, channels, height, width, dtype=_accumulator(frames[0][0].dtype))
    if naive or not config['TILED_WARPS']:
        outputs = [_launch_naive(source, 'sepconv_forward', shape, *frame, empty()) for frame in frames]
        return outputs[0] if len(outputs) == 1 else outputs[0].add_(outputs[1])
    output = empty()
    _launch_tiled(config, source, 'sepconv_forward_tiled', shape,
                  len(frames), channels, height, width, *frames[0], *frames[-1], output)
    return output


def _backward_cuda(frames, grad, needs, naive=False):
    """Gradients with respect to every frame's input, vertical and horizontal (None where needs is False)."""
    config, source, shape = _plan(frames)
    batch, channels, height, width, _ = shape
    grad = grad.to(_accumulator(frames[0][0].dtype)).contiguous()
    tiled, gather = not naive and config['TILED_WARPS'], not naive and config['GATHER_WARPS']
    gradients = []
    for index, (input, vertical, horizontal) in enumerate(frames):
        grad_input, grad_vertical, grad_horizontal = (
            torch.empty_like(t, dtype=grad.dtype) if need else None
            for t, need in zip((input, vertical, horizontal), needs[3 * index:3 * index + 3]))
        if grad_input is not None and gather:
            columns, warps = 32 * config['GATHER_C'], config['GATHER_WARPS']
            grid = (-(-input.shape[3] // columns), -(-input.shape[2] // (warps * config['GATHER_R'])), batch)
            _launch(source, 'sepconv_grad_input_gather', grid, (32, warps), _gather_shared(config) * grad.element_size(),
                    (channels, height, width, grad, vertical, horizontal, grad_input))
        elif grad_input is not None:
            _launch_naive(source, 'sepconv_grad_input', shape, grad, vertical, horizontal, grad_input)
        for name, operands, target in (('sepconv_grad_vertical', (grad, input, horizontal), grad_vertical),
                                       ('sepconv_grad_horizontal', (grad, input, vertical), grad_horizontal)):
            if target is not None and tiled:
                _launch_tiled(config, source, name + '_tiled', shape, channels, height, width, *operands, target)
            elif target is not None:
                _launch_naive(source, name, shape, *operands, target)
        gradients += [grad_input, grad_vertical, grad_horizontal]
    return gradients


def use_cupy(tensor):
    global _warned
    if not tensor.is_cuda:
        return False
    if cupy is None and not _warned:
        warnings.warn('cupy is not installed: sepconv runs its slower PyTorch path on CUDA tensors')
        _warned = True
    return cupy is not None


def _prepare(tensors):
    """Tensors as the op computes with them: float64 if any is, else float32 on the PyTorch path, which reads
    any strides; the CUDA kernels read contiguous float16 / bfloat16 storage directly (widening it exactly,
    as an upcast would)."""
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    dtypes = [wide, wide]
    kernels = tensors[0].is_cuda and cupy is not None
    if wide == torch.float32 and kernels:
        for kind, group in enumerate((tensors[0::3], [t for k, t in enumerate(tensors) if k % 3])):
            if group[0].dtype in CUDA_TYPES and all(t.dtype == group[0].dtype for t in group):
                dtypes[kind] = group[0].dtype
    prepared = [t.to(dtypes[k % 3 != 0]) for k, t in enumerate(tensors)]
    return [t.contiguous() for t in prepared] if kernels else prepared


class SepconvFunction(torch.autograd.Function):
    """sum over frames of sepconv(input, vertical, horizontal); tensors come as one or two frames of three."""

    @staticmethod
    def forward(ctx, *tensors):
        ctx.save_for_backward(*tensors)
        frames = [tensors[k:k + 3] for k in range(0, len(tensors), 3)]
        if use_cupy(tensors[0]):
            return _forward_cuda(frames)
        output = _forward_torch(*frames[0])
        for frame in frames[1:]:
            output += _forward_torch(*frame)
        return output

    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.saved_tensors
        frames = [tensors[k:k + 3] for k in range(0, len(tensors), 3)]
        needs = ctx.needs_input_grad
        if use_cupy(tensors[0]):
            gradients = _backward_cuda(frames, grad, needs)
        else:
            gradients = [g for k, frame in enumerate(frames)
                         for g in _backward_torch(*(t.contiguous() for t in frame), grad.contiguous(),
                                                  needs[3 * k:3 * k + 3])]
        return tuple(None if g is None else g.to(t.dtype) for g, t in zip(gradients, tensors))


def _check(input, vertical, horizontal):
    if input.dim() != 4 or vertical.dim() != 4 or vertical.shape != horizontal.shape:
        raise ValueError('sepconv expects a 4-D input and two 4-D kernel tensors of equal shape')
    batch, size, height, width = vertical.shape
    expected = (batch, input.shape[1], height + size - 1, width + size - 1)
    if tuple(input.shape) != expected:
        raise ValueError(f'sepconv input must be {expected} for {size}-tap kernels, got {tuple(input.shape)}')


def _apply(*tensors):
    with torch.autocast(tensors[0].device.type, enabled=False):
        return SepconvFunction.apply(*_prepare(tensors))


def sepconv(input, vertical, horizontal):
    """Apply per-pixel separable kernels; see the module docstring for shapes."""
    _check(input, vertical, horizontal)
    return _apply(input, vertical, horizontal)


def sepconv_pair(one, vertical1, horizontal1, two, vertical2, horizontal2, normalize=False):
    """sepconv(one, vertical1, horizontal1) + sepconv(two, vertical2, horizontal2); one CUDA launch for both.
    normalize: divided by the same sum for an image of ones, sum(vertical) * sum(horizontal) per frame
    (kernel normalization, Niklaus et al. 2021), or by 1 where that is under MASS_FLOOR in magnitude."""
    _check(one, vertical1, horizontal1)
    _check(two, vertical2, horizontal2)
    if one.shape != two.shape or vertical1.shape != vertical2.shape:
        raise ValueError('sepconv_pair expects both frames and both kernel sets to have equal shapes')
    output = _apply(one, vertical1, horizontal1, two, vertical2, horizontal2)
    if not normalize:
        return output
    with torch.autocast(output.device.type, enabled=False):  # the mass in the op's precision
        mass = sum(v.to(output.dtype).sum(1, keepdim=True) * h.to(output.dtype).sum(1, keepdim=True)
                   for v, h in ((vertical1, horizontal1), (vertical2, horizontal2)))
        return output / torch.where(mass.abs() < MASS_FLOOR, torch.ones_like(mass), mass)
