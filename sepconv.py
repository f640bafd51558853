"""Adaptive separable convolution: the operation at the heart of SepConv.

    out[n, c, y, x] = sum_i sum_j vertical[n, i, y, x] * horizontal[n, j, y, x] * input[n, c, y + i, x + j]

input is N x C x (H + K - 1) x (W + K - 1), vertical and horizontal are N x K x H x W.
On CUDA tensors with CuPy installed the op runs as hand-written CUDA kernels; everywhere
else it runs as vectorised PyTorch. Both paths accumulate in float32 (float64 for float64
inputs) and return that dtype, so the op is safe under autocast.
"""
import warnings

import torch

try:
    import cupy
except ImportError:
    cupy = None

CHUNK_ELEMENTS = 1 << 20  # rows per PyTorch-path chunk are chosen so a chunk stays cache-sized


def _rows_per_chunk(batch, channels, width):
    return max(1, CHUNK_ELEMENTS // (batch * channels * width))


def _horizontal_pass(rows, horizontal, out):
    """out = sum_j horizontal[:, j] * rows[..., j:j + W] (rows: N x C x h x (W + K - 1))."""
    width = out.shape[-1]
    torch.mul(rows[..., :width], horizontal[:, 0:1], out=out)
    for j in range(1, horizontal.shape[1]):
        out.addcmul_(rows[..., j:j + width], horizontal[:, j:j + 1])
    return out


def _forward_torch(input, vertical, horizontal):
    batch, size, height, width = vertical.shape
    output = input.new_zeros(batch, input.shape[1], height, width)
    step = _rows_per_chunk(batch, input.shape[1], width)
    for y0 in range(0, height, step):
        y1 = min(height, y0 + step)
        out, ver, hor = output[:, :, y0:y1], vertical[:, :, y0:y1], horizontal[:, :, y0:y1]
        row_sum = torch.empty_like(out)
        for i in range(size):
            _horizontal_pass(input[:, :, y0 + i:y1 + i], hor, row_sum)
            out.addcmul_(row_sum, ver[:, i:i + 1])
    return output


def _backward_torch(input, vertical, horizontal, grad, needs):
    batch, size, height, width = vertical.shape
    grad_input = torch.zeros_like(input) if needs[0] else None
    grad_vertical = torch.empty_like(vertical) if needs[1] else None
    grad_horizontal = torch.empty_like(horizontal) if needs[2] else None
    step = _rows_per_chunk(batch, input.shape[1], width)
    for y0 in range(0, height, step):
        y1 = min(height, y0 + step)
        g, ver, hor = grad[:, :, y0:y1], vertical[:, :, y0:y1], horizontal[:, :, y0:y1]
        partial = torch.empty_like(g)
        for i in range(size):
            rows = input[:, :, y0 + i:y1 + i]
            if grad_vertical is not None:
                _horizontal_pass(rows, hor, partial)
                grad_vertical[:, i, y0:y1] = (partial * g).sum(1)
            if grad_input is not None:
                torch.mul(g, ver[:, i:i + 1], out=partial)
                target = grad_input[:, :, y0 + i:y1 + i]
                for j in range(size):
                    target[..., j:j + width].addcmul_(partial, hor[:, j:j + 1])
        if grad_horizontal is not None:
            for j in range(size):
                columns = input[:, :, y0:y1 + size - 1, j:j + width]
                torch.mul(columns[:, :, :y1 - y0], ver[:, 0:1], out=partial)
                for i in range(1, size):
                    partial.addcmul_(columns[:, :, i:i + y1 - y0], ver[:, i:i + 1])
                grad_horizontal[:, j, y0:y1] = (partial * g).sum(1)
    return grad_input, grad_vertical, grad_horizontal


# ---------------------------------------------------------------------------------------------
# CUDA kernels (CuPy). One thread per output element; {type} is float or double.

CUDA_SOURCE = r"""
extern "C" __global__ void sepconv_forward(const int total, const int C, const int H, const int W, const int K,
        const {type}* __restrict__ input, const {type}* __restrict__ vertical,
        const {type}* __restrict__ horizontal, {type}* __restrict__ output) {
    for (int index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += blockDim.x * gridDim.x) {
        const int x = index % W, y = (index / W) % H, c = (index / W / H) % C, n = index / W / H / C;
        const int IH = H + K - 1, IW = W + K - 1;
        const {type}* in = input + ((long long)(n * C + c) * IH + y) * IW + x;
        const {type}* ver = vertical + (long long)n * K * H * W + y * W + x;
        const {type}* hor = horizontal + (long long)n * K * H * W + y * W + x;
        {type} sum = 0;
        for (int i = 0; i < K; ++i) {
            {type} row = 0;
            for (int j = 0; j < K; ++j) row += hor[(long long)j * H * W] * in[(long long)i * IW + j];
            sum += ver[(long long)i * H * W] * row;
        }
        output[index] = sum;
    }
}

extern "C" __global__ void sepconv_grad_input(const int total, const int C, const int H, const int W, const int K,
        const {type}* __restrict__ grad, const {type}* __restrict__ vertical,
        const {type}* __restrict__ horizontal, {type}* __restrict__ grad_input) {
    for (int index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += blockDim.x * gridDim.x) {
        const int IH = H + K - 1, IW = W + K - 1;
        const int ix = index % IW, iy = (index / IW) % IH, c = (index / IW / IH) % C, n = index / IW / IH / C;
        {type} sum = 0;
        for (int i = max(0, iy - H + 1); i <= min(K - 1, iy); ++i) {
            const int y = iy - i;
            for (int j = max(0, ix - W + 1); j <= min(K - 1, ix); ++j) {
                const int x = ix - j;
                const long long pixel = (long long)n * K * H * W + y * W + x;
                sum += grad[((long long)(n * C + c) * H + y) * W + x]
                     * vertical[pixel + (long long)i * H * W] * horizontal[pixel + (long long)j * H * W];
            }
        }
        grad_input[index] = sum;
    }
}

extern "C" __global__ void sepconv_grad_vertical(const int total, const int C, const int H, const int W, const int K,
        const {type}* __restrict__ grad, const {type}* __restrict__ input,
        const {type}* __restrict__ horizontal, {type}* __restrict__ grad_vertical) {
    for (int index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += blockDim.x * gridDim.x) {
        const int x = index % W, y = (index / W) % H, i = (index / W / H) % K, n = index / W / H / K;
        const int IH = H + K - 1, IW = W + K - 1;
        {type} sum = 0;
        for (int c = 0; c < C; ++c) {
            const {type}* in = input + ((long long)(n * C + c) * IH + y + i) * IW + x;
            {type} row = 0;
            for (int j = 0; j < K; ++j) row += horizontal[(((long long)n * K + j) * H + y) * W + x] * in[j];
            sum += grad[((long long)(n * C + c) * H + y) * W + x] * row;
        }
        grad_vertical[index] = sum;
    }
}

extern "C" __global__ void sepconv_grad_horizontal(const int total, const int C, const int H, const int W, const int K,
        const {type}* __restrict__ grad, const {type}* __restrict__ input,
        const {type}* __restrict__ vertical, {type}* __restrict__ grad_horizontal) {
    for (int index = blockIdx.x * blockDim.x + threadIdx.x; index < total; index += blockDim.x * gridDim.x) {
        const int x = index % W, y = (index / W) % H, j = (index / W / H) % K, n = index / W / H / K;
        const int IH = H + K - 1, IW = W + K - 1;
        {type} sum = 0;
        for (int c = 0; c < C; ++c) {
            const {type}* in = input + ((long long)(n * C + c) * IH + y) * IW + x + j;
            {type} column = 0;
            for (int i = 0; i < K; ++i) column += vertical[(((long long)n * K + i) * H + y) * W + x] * in[(long long)i * IW];
            sum += grad[((long long)(n * C + c) * H + y) * W + x] * column;
        }
        grad_horizontal[index] = sum;
    }
}
"""

CUDA_TYPES = {torch.float32: 'float', torch.float64: 'double'}
_kernels = {}
_warned = False


def cuda_source(dtype):
    return CUDA_SOURCE.replace('{type}', CUDA_TYPES[dtype])


def _kernel(name, dtype):
    key = (name, dtype, torch.cuda.current_device())
    if key not in _kernels:
        _kernels[key] = cupy.RawKernel(cuda_source(dtype), name)
    return _kernels[key]


def _launch(name, total, shape, *tensors):
    """Run one kernel over `total` threads on torch's current stream; the last tensor is written."""
    batch, channels, height, width, size = shape
    kernel = _kernel(name, tensors[0].dtype)
    with cupy.cuda.Device(tensors[0].device.index), \
            cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        kernel(((total + 511) // 512,), (512,),
               (cupy.int32(total), cupy.int32(channels), cupy.int32(height), cupy.int32(width), cupy.int32(size),
                *[cupy.from_dlpack(t) for t in tensors]))
    return tensors[-1]


def use_cupy(tensor):
    global _warned
    if not tensor.is_cuda:
        return False
    if cupy is None and not _warned:
        warnings.warn('cupy is not installed: sepconv runs its slower PyTorch path on CUDA tensors')
        _warned = True
    return cupy is not None


def _forward_cupy(input, vertical, horizontal):
    batch, size, height, width = vertical.shape
    output = input.new_empty(batch, input.shape[1], height, width)
    shape = (batch, input.shape[1], height, width, size)
    return _launch('sepconv_forward', output.numel(), shape, input, vertical, horizontal, output)


def _backward_cupy(input, vertical, horizontal, grad, needs):
    batch, size, height, width = vertical.shape
    shape = (batch, input.shape[1], height, width, size)
    grad_input = grad_vertical = grad_horizontal = None
    if needs[0]:
        grad_input = _launch('sepconv_grad_input', input.numel(), shape,
                             grad, vertical, horizontal, torch.empty_like(input))
    if needs[1]:
        grad_vertical = _launch('sepconv_grad_vertical', vertical.numel(), shape,
                                grad, input, horizontal, torch.empty_like(vertical))
    if needs[2]:
        grad_horizontal = _launch('sepconv_grad_horizontal', horizontal.numel(), shape,
                                  grad, input, vertical, torch.empty_like(horizontal))
    return grad_input, grad_vertical, grad_horizontal


class SepconvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, vertical, horizontal):
        ctx.save_for_backward(input, vertical, horizontal)
        forward = _forward_cupy if use_cupy(input) else _forward_torch
        return forward(input, vertical, horizontal)

    @staticmethod
    def backward(ctx, grad):
        input, vertical, horizontal = ctx.saved_tensors
        backward = _backward_cupy if use_cupy(input) else _backward_torch
        return backward(input, vertical, horizontal, grad.contiguous(), ctx.needs_input_grad[:3])


def sepconv(input, vertical, horizontal):
    """Apply per-pixel separable kernels; see the module docstring for shapes."""
    if input.dim() != 4 or vertical.dim() != 4 or vertical.shape != horizontal.shape:
        raise ValueError('sepconv expects a 4-D input and two 4-D kernel tensors of equal shape')
    batch, size, height, width = vertical.shape
    expected = (batch, input.shape[1], height + size - 1, width + size - 1)
    if tuple(input.shape) != expected:
        raise ValueError(f'sepconv input must be {expected} for {size}-tap kernels, got {tuple(input.shape)}')
    dtype = torch.float64 if torch.float64 in (input.dtype, vertical.dtype, horizontal.dtype) else torch.float32
    with torch.autocast(input.device.type, enabled=False):
        return SepconvFunction.apply(*(t.to(dtype).contiguous() for t in (input, vertical, horizontal)))
