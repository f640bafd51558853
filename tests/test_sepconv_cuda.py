"""sepconv's CUDA kernels: compiled with nvcc, emulated thread by thread on the CPU, and run on a GPU.

The emulator builds each generated module with g++ against a small CUDA stand-in: every block runs
its threads as coroutines that switch only at __syncthreads, once in ascending and once in
descending thread order (a missing barrier then changes the result), with shared memory poisoned
with NaN at block start, outputs poisoned with NaN, read-only inputs write-protected, and every
buffer fenced by inaccessible pages (an out-of-bounds access kills the run). It drives the kernels
through sepconv's own launch code, so grids, blocks, shared-memory sizes and arguments are checked too.
"""
import hashlib
import re
import shutil
import subprocess

import pytest
import torch

import sepconv

H100_SHARED = 232448  # shared_memory_per_block_optin of an H100
NVCC = shutil.which('nvcc')
GXX = shutil.which('g++')
HAS_CUDA = torch.cuda.is_available() and sepconv.cupy is not None
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason='needs a CUDA device and cupy')
STORAGE = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float16),
           (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)]


def make_frames(count, batch, channels, size, height, width, input_dtype=torch.float32, weight_dtype=torch.float32,
                device='cpu', seed=0):
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape, dtype: torch.rand(*shape, generator=generator, dtype=torch.float64).to(device, dtype)
    return [(rand(batch, channels, height + size - 1, width + size - 1, dtype=input_dtype),
             rand(batch, size, height, width, dtype=weight_dtype), rand(batch, size, height, width, dtype=weight_dtype))
            for _ in range(count)]


def reference(frames, grad):
    """Sum over frames and all gradients, by the PyTorch path in float64 on the CPU."""
    wide = [[t.detach().cpu().double() for t in frame] for frame in frames]
    output = sum(sepconv._forward_torch(*frame) for frame in wide)
    gradients = [g for frame in wide for g in sepconv._backward_torch(*frame, grad.cpu().double(), (True,) * 3)]
    return output, gradients


def assert_matches(actual, expected, rtol):
    """Elementwise within rtol of the reference, measured against the reference's largest magnitude."""
    assert actual is not None and actual.shape == expected.shape
    actual = actual.detach().cpu().double()
    assert torch.isfinite(actual).all(), 'non-finite values (unwritten output?)'
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def tolerance(input_dtype):
    # Storage rounding is the same on both sides (the reference reads the stored values), so only the
    # accumulation differs: float32 for every storage type but float64.
    return 1e-12 if input_dtype == torch.float64 else 1e-5


# ---------------------------------------------------------------------------------------------
# nvcc

@pytest.mark.skipif(NVCC is None, reason='nvcc not on PATH')
@pytest.mark.parametrize('size', [1, 3, 51])
@pytest.mark.parametrize('input_dtype, weight_dtype', STORAGE)
def test_generated_sources_compile_with_nvcc(tmp_path, size, input_dtype, weight_dtype):
    config = sepconv.kernel_config(size, 3, input_dtype, H100_SHARED)
    assert config['TILED_WARPS'] and config['GATHER_WARPS']
    path = tmp_path / 'sepconv.cu'
    path.write_text(sepconv.cuda_source(config, input_dtype, weight_dtype))
    run = subprocess.run([NVCC, '-std=c++14', '-gencode=arch=compute_90,code=sm_90', '-gencode=arch=compute_80,code=sm_80',
                          '-c', str(path), '-o', str(tmp_path / 'sepconv.o')], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert 'warning' not in run.stderr.lower(), run.stderr


# ---------------------------------------------------------------------------------------------
# CPU emulation

EMULATED_CUDA = r"""
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
using std::max;
using std::min;
struct dim3 { unsigned x, y, z; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
struct half_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };
inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(bf16_t x) { unsigned int bits = (unsigned int)x.bits << 16; float value; memcpy(&value, &bits, 4); return value; }
inline float widen(half_t x) { _Float16 value; memcpy(&value, &x.bits, 2); return (float)value; }
static unsigned char* emulated_shared;
static std::function<void()> kernel_body;
template <typename T> T* shared_buffer() { return reinterpret_cast<T*>(emulated_shared); }
void __syncthreads();
"""

EMULATOR_MAIN = r"""
static std::vector<ucontext_t> contexts;
static std::vector<char> finished;
static ucontext_t scheduler;
static int current;

void __syncthreads() { swapcontext(&contexts[current], &scheduler); }
static void thread_main() { kernel_body(); finished[current] = 1; }

// `bytes` between two inaccessible pages, against the upper one if flush_end, else the lower one.
static unsigned char* fenced(size_t bytes, bool flush_end, unsigned char** body, size_t* span) {
    const size_t page = sysconf(_SC_PAGESIZE);
    *span = std::max<size_t>(1, (bytes + page - 1) / page) * page;
    unsigned char* base = (unsigned char*)mmap(nullptr, *span + 2 * page, PROT_READ | PROT_WRITE,
                                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) { perror("mmap"); exit(3); }
    mprotect(base, page, PROT_NONE);
    mprotect(base + page + *span, page, PROT_NONE);
    *body = base + page;
    return flush_end ? *body + *span - bytes : *body;
}

// argv: kernel gx gy gz bx by bz shared reverse flush_end, then per argument i:<int>, r:<file> (read-only) or w:<file>
int main(int argc, char** argv) {
    const dim3 grid = {(unsigned)atoi(argv[2]), (unsigned)atoi(argv[3]), (unsigned)atoi(argv[4])};
    const dim3 block = {(unsigned)atoi(argv[5]), (unsigned)atoi(argv[6]), (unsigned)atoi(argv[7])};
    const size_t shared = strtoull(argv[8], nullptr, 10);
    const bool reverse = argv[9][0] == '1', flush_end = argv[10][0] == '1';
    std::vector<uintptr_t> args;
    std::vector<std::pair<std::string, std::pair<unsigned char*, size_t>>> outputs;
    for (int k = 11; k < argc; ++k) {
        const char kind = argv[k][0];
        const char* value = argv[k] + 2;
        if (kind == 'i') { args.push_back((uintptr_t)(long long)atoll(value)); continue; }
        FILE* file = fopen(value, "rb");
        fseek(file, 0, SEEK_END);
        const size_t bytes = ftell(file);
        fseek(file, 0, SEEK_SET);
        unsigned char* body; size_t span;
        unsigned char* data = fenced(bytes, flush_end, &body, &span);
        if (fread(data, 1, bytes, file) != bytes) { perror("fread"); exit(3); }
        fclose(file);
        if (kind == 'r') mprotect(body, span, PROT_READ);
        else { memset(data, 0xFF, bytes); outputs.push_back({value, {data, bytes}}); }
        args.push_back((uintptr_t)data);
    }
    if (!dispatch(argv[1], args)) { fprintf(stderr, "unknown kernel %s\n", argv[1]); return 3; }
    unsigned char* body; size_t span;
    emulated_shared = fenced(shared, flush_end, &body, &span);
    const int threads = block.x * block.y * block.z;
    std::vector<std::vector<char>> stacks(threads, std::vector<char>(1 << 17));
    contexts.resize(threads);
    finished.resize(threads);
    blockDim = block;
    gridDim = grid;
    for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y) for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        memset(emulated_shared, 0xFF, shared);
        for (int t = 0; t < threads; ++t) {
            getcontext(&contexts[t]);
            contexts[t].uc_stack.ss_sp = stacks[t].data();
            contexts[t].uc_stack.ss_size = stacks[t].size();
            contexts[t].uc_link = &scheduler;
            makecontext(&contexts[t], thread_main, 0);
            finished[t] = 0;
        }
        for (;;) {  // one phase: every thread runs to its next barrier or its end
            for (int k = 0; k < threads; ++k) {
                current = reverse ? threads - 1 - k : k;
                threadIdx = {current % block.x, current / block.x % block.y, current / (block.x * block.y)};
                swapcontext(&scheduler, &contexts[current]);
            }
            const int done = std::count(finished.begin(), finished.end(), 1);
            if (done == threads) break;
            if (done) { fprintf(stderr, "block %u %u %u: %d threads ended while others wait at a barrier\n", x, y, z, done); return 4; }
        }
    }
    for (auto& output : outputs) {
        FILE* file = fopen(output.first.c_str(), "wb");
        fwrite(output.second.first, 1, output.second.second, file);
        fclose(file);
    }
    return 0;
}
"""

KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(([^)]*)\)')


class Emulator:
    """Stands in for sepconv._launch: builds each module with g++ and runs launches on the CPU."""

    def __init__(self, folder):
        self.folder = folder
        self.built = {}

    def build(self, source):
        digest = hashlib.sha1(source.encode()).hexdigest()[:16]
        if digest not in self.built:
            kernels, cases = {}, []
            for name, parameters in KERNEL.findall(source):
                types = [p.replace('__restrict__', '').strip().rsplit(None, 1)[0] for p in parameters.split(',')]
                kernels[name] = ['i' if '*' not in t else 'r' if t.startswith('const') else 'w' for t in types]
                call = ', '.join(f'({t})a[{k}]' for k, t in enumerate(types))
                cases.append(f'    if (name == "{name}") {{ kernel_body = [a] {{ {name}({call}); }}; return true; }}\n')
            dispatch = ('static bool dispatch(const std::string& name, const std::vector<uintptr_t>& a) {\n'
                        + ''.join(cases) + '    return false;\n}\n')
            program = EMULATED_CUDA + source.replace(sepconv.CUDA_PRELUDE, '') + dispatch + EMULATOR_MAIN
            path = self.folder / f'{digest}.cpp'
            path.write_text(program)
            binary = self.folder / digest
            run = subprocess.run([GXX, '-std=c++17', '-O1', '-ffp-contract=off', '-Wno-unknown-pragmas',
                                  '-fsanitize=bounds', '-fno-sanitize-recover=all', str(path), '-o', str(binary)],
                                 capture_output=True, text=True)
            assert run.returncode == 0, run.stderr[-4000:]
            self.built[digest] = (binary, kernels)
        return self.built[digest]

    def launch(self, source, name, grid, block, shared, args):
        binary, kernels = self.build(source)
        kinds = kernels[name]
        assert len(kinds) == len(args), f'{name} takes {len(kinds)} arguments, got {len(args)}'
        dims = [*grid, *(1,) * (3 - len(grid)), *block, *(1,) * (3 - len(block))]
        results = []
        for reverse, flush_end in ((0, 1), (1, 0)):
            argv, written = [str(binary), name, *map(str, dims), str(shared), str(reverse), str(flush_end)], []
            for index, (arg, kind) in enumerate(zip(args, kinds)):
                if kind == 'i':
                    assert isinstance(arg, int) and -2 ** 31 <= arg < 2 ** 31, f'{name} argument {index}: {arg!r}'
                    argv.append(f'i:{arg}')
                    continue
                assert isinstance(arg, torch.Tensor) and arg.is_contiguous(), f'{name} argument {index}'
                path = self.folder / f'argument{index}.bin'
                path.write_bytes(arg.detach().view(torch.uint8).numpy().tobytes())
                argv.append(f'{kind}:{path}')
                if kind == 'w':
                    written.append((arg, path))
            run = subprocess.run(argv, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, f'{name} failed in emulation (status {run.returncode}): {run.stderr[-2000:]}'
            results.append([path.read_bytes() for _, path in written])
        assert results[0] == results[1], f'{name}: the result depends on the order threads run in (a race)'
        for (arg, _), data in zip(written, results[0]):
            arg.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8).view(arg.dtype).view(arg.shape))


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
    if GXX is None:
        pytest.skip('g++ not on PATH')
    return Emulator(tmp_path_factory.mktemp('emulator'))


EMULATED = [  # size, channels, batch, height, width, input dtype, weight dtype, shared-memory limit
    (51, 3, 1, 9, 13, torch.float32, torch.float32, H100_SHARED),
    (51, 3, 1, 5, 34, torch.float32, torch.bfloat16, 48 * 1024),  # one channel per tile; 2 column blocks
    (5, 4, 2, 37, 41, torch.float32, torch.bfloat16, H100_SHARED),  # 3 + 1 channels; 2 x 2 blocks
    (1, 1, 1, 6, 35, torch.float16, torch.float16, H100_SHARED),
    (18, 2, 1, 33, 7, torch.float64, torch.float64, H100_SHARED),  # 2 chunks of 9 taps
    (37, 3, 1, 4, 3, torch.bfloat16, torch.bfloat16, H100_SHARED),  # 3 chunks of 13 taps: 2 padded
    (3, 3, 1, 5, 6, torch.float32, torch.float32, 512),  # nothing tiled fits: naive kernels only
]


@pytest.mark.parametrize('case', EMULATED, ids=lambda case: '-'.join(map(str, case[:5])))
def test_emulated_kernels_match_pytorch(emulator, monkeypatch, case):
    size, channels, batch, height, width, input_dtype, weight_dtype, limit = case
    monkeypatch.setattr(sepconv, '_launch', emulator.launch)
    monkeypatch.setattr(sepconv, '_shared_limit', lambda device: limit)
    frames = make_frames(2, batch, channels, size, height, width, input_dtype, weight_dtype)
    grad = torch.rand(batch, channels, height, width, dtype=torch.float64) * 2 - 1
    rtol = tolerance(input_dtype)
    for count in (2, 1):
        expected, expected_gradients = reference(frames[:count], grad)
        for naive in (False, True):
            assert_matches(sepconv._forward_cuda(frames[:count], naive), expected, rtol)
            gradients = sepconv._backward_cuda(frames[:count], grad, (True,) * 3 * count, naive)
            for actual, wanted in zip(gradients, expected_gradients):
                assert_matches(actual, wanted, rtol)


def test_emulator_catches_a_missing_barrier(emulator, monkeypatch):
    """The race check must fail when the barrier between loading the tile and reading it is gone."""
    config = sepconv.kernel_config(3, 3, torch.float32, H100_SHARED)
    source = sepconv.cuda_source(config, torch.float32, torch.float32)
    broken = source.replace('load_tile(tile, input, C, IH, IW, c0, top, left);\n            __syncthreads();',
                            'load_tile(tile, input, C, IH, IW, c0, top, left);', 1)
    assert broken != source
    monkeypatch.setattr(sepconv, 'cuda_source', lambda *args: broken)
    monkeypatch.setattr(sepconv, '_launch', emulator.launch)
    monkeypatch.setattr(sepconv, '_shared_limit', lambda device: H100_SHARED)
    with pytest.raises(AssertionError, match='race|non-finite'):
        sepconv._forward_cuda(make_frames(2, 1, 3, 3, 8, 8))


# ---------------------------------------------------------------------------------------------
# On a GPU

@requires_cuda
@pytest.mark.parametrize('size', [1, 3, 51])
@pytest.mark.parametrize('input_dtype, weight_dtype', STORAGE)
@pytest.mark.parametrize('naive', [False, True])
def test_cuda_kernels_match_pytorch(size, input_dtype, weight_dtype, naive):
    frames = make_frames(2, 2, 3, size, 37, 70, input_dtype, weight_dtype, device='cuda', seed=size)
    grad = torch.rand(2, 3, 37, 70, dtype=torch.float64, device='cuda') * 2 - 1
    rtol = tolerance(input_dtype)
    for count in (2, 1):
        expected, expected_gradients = reference(frames[:count], grad)
        assert_matches(sepconv._forward_cuda(frames[:count], naive), expected, rtol)
        gradients = sepconv._backward_cuda(frames[:count], grad, (True,) * 3 * count, naive)
        for actual, wanted in zip(gradients, expected_gradients):
            assert_matches(actual, wanted, rtol)


@requires_cuda
def test_cuda_results_are_deterministic_and_fully_written():
    frames = make_frames(2, 1, 3, 51, 45, 77, device='cuda')
    first = sepconv._forward_cuda(frames)
    torch.cuda.synchronize()
    for _ in range(3):
        again = sepconv._forward_cuda(frames)
        assert torch.equal(first, again)
    assert torch.isfinite(first).all()


@requires_cuda
@pytest.mark.parametrize('storage', [torch.bfloat16, torch.float16])
def test_low_precision_storage_stays_close_to_float32(storage):
    """bf16 / fp16 storage of the kernels, fp32 frames: within 1e-2 (bf16) / 2e-3 (fp16) of all-fp32, relative to the peak."""
    (one, vertical1, horizontal1), (two, vertical2, horizontal2) = make_frames(2, 1, 3, 51, 64, 96, device='cuda')
    exact = sepconv.sepconv_pair(one, vertical1, horizontal1, two, vertical2, horizontal2)
    low = sepconv.sepconv_pair(one, vertical1.to(storage), horizontal1.to(storage), two, vertical2.to(storage), horizontal2.to(storage))
    assert low.dtype == torch.float32
    error = (low - exact).abs().max() / exact.abs().max()
    assert error < (1e-2 if storage == torch.bfloat16 else 2e-3)


@requires_cuda
@pytest.mark.parametrize('size', [1, 3])
def test_cuda_gradcheck_float64(size):
    frames = make_frames(2, 2, 2, size, 5, 6, torch.float64, torch.float64, device='cuda')
    tensors = [t.requires_grad_() for frame in frames for t in frame]
    assert torch.autograd.gradcheck(sepconv.sepconv_pair, tensors)
    assert torch.autograd.gradcheck(sepconv.sepconv, tensors[:3])


@requires_cuda
def test_public_functions_accept_non_contiguous_cuda_inputs():
    frames = make_frames(2, 2, 3, 51, 20, 24, device='cuda')
    strided = [(input.transpose(2, 3).contiguous().transpose(2, 3), vertical.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2),
                horizontal.contiguous(memory_format=torch.channels_last)) for input, vertical, horizontal in frames]
    assert not strided[0][0].is_contiguous() and not strided[0][1].is_contiguous()
    expected, _ = reference(frames, torch.zeros(2, 3, 20, 24))
    assert_matches(sepconv.sepconv_pair(*strided[0], *strided[1]), expected, 1e-5)
    single, _ = reference(frames[:1], torch.zeros(2, 3, 20, 24))
    assert_matches(sepconv.sepconv(*strided[0]), single, 1e-5)


@requires_cuda
def test_cuda_autograd_matches_cpu_autograd():
    frames = make_frames(2, 1, 3, 51, 16, 24, torch.float32, torch.bfloat16, device='cuda')
    tensors = [t.requires_grad_() for frame in frames for t in frame]
    grad = torch.rand(1, 3, 16, 24, device='cuda')
    gradients = torch.autograd.grad(sepconv.sepconv_pair(*tensors), tensors, grad)
    assert all(g.dtype == t.dtype for g, t in zip(gradients, tensors))
    _, expected = reference(frames, grad)
    for actual, wanted, tensor in zip(gradients, expected, tensors):
        rtol = 1e-5 if tensor.dtype == torch.float32 else 1e-2  # bf16 gradients are rounded to bf16
        assert_matches(actual, wanted, rtol)
