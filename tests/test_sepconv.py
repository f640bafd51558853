import pytest
import torch

import sepconv as sepconv_module
from sepconv import sepconv

# float32 results are compared with a float64 reference. The op accumulates in float32; on these
# inputs (terms in [0, 1], up to 51 x 51 taps) its relative error is about 2e-7.
FLOAT32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
FLOAT64_TOLERANCE = dict(rtol=1e-12, atol=1e-12)


def reference(input, vertical, horizontal):
    """The definition, one (i, j) tap at a time, vectorised only over batch, channel and pixel."""
    size, height, width = vertical.shape[1:]
    output = torch.zeros(input.shape[0], input.shape[1], height, width, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            output = output + (vertical[:, i:i + 1].double() * horizontal[:, j:j + 1].double()
                               * input[:, :, i:i + height, j:j + width].double())
    return output


def random_inputs(batch=2, channels=3, size=3, height=5, width=6, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, channels, height + size - 1, width + size - 1), (batch, size, height, width),
              (batch, size, height, width)]
    return [torch.rand(shape, generator=generator, dtype=dtype) for shape in shapes]


def weights_like(output, seed=1):
    """Fixed random output weights, so that backward sees a non-uniform incoming gradient."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(output.shape, generator=generator, dtype=torch.float64).to(output)


def gradients(function, tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    output = function(*tensors)
    (output * weights_like(output)).sum().backward()
    return output.detach(), [t.grad for t in tensors]


def test_gradcheck_all_three_inputs():
    tensors = [t.requires_grad_() for t in random_inputs(batch=2, channels=2, size=3, height=4, width=5)]
    assert torch.autograd.gradcheck(sepconv, tensors, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize('size, height, width', [(1, 4, 5), (3, 5, 6), (4, 3, 7), (51, 3, 4)])
def test_matches_reference_in_float64(size, height, width):
    tensors = random_inputs(size=size, height=height, width=width)
    output = sepconv(*tensors)
    assert output.dtype == torch.float64
    torch.testing.assert_close(output, reference(*tensors), **FLOAT64_TOLERANCE)


@pytest.mark.parametrize('size', [1, 3, 51])
def test_matches_reference_in_float32(size):
    tensors = random_inputs(size=size, height=4, width=5, dtype=torch.float32)
    output = sepconv(*tensors)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output.double(), reference(*tensors), **FLOAT32_TOLERANCE)


def test_kernel_size_one_is_a_per_pixel_product():
    input, vertical, horizontal = random_inputs(size=1)
    torch.testing.assert_close(sepconv(input, vertical, horizontal), input * vertical * horizontal,
                               **FLOAT64_TOLERANCE)


def test_centre_taps_copy_the_input():
    input, vertical, horizontal = (torch.zeros_like(t) for t in random_inputs(size=5, height=4, width=4))
    input.copy_(torch.arange(input.numel(), dtype=torch.float64).view(input.shape))
    vertical[:, 2] = 1.0
    horizontal[:, 2] = 1.0
    assert torch.equal(sepconv(input, vertical, horizontal), input[:, :, 2:-2, 2:-2])


def test_batch_items_are_independent():
    tensors = random_inputs(batch=3, size=3)
    together = sepconv(*tensors)
    for n in range(3):
        assert torch.equal(together[n:n + 1], sepconv(*(t[n:n + 1] for t in tensors)))


def test_non_contiguous_inputs_match_contiguous():
    input, vertical, horizontal = random_inputs(size=3, height=5, width=6)
    expected, expected_grads = gradients(sepconv, (input, vertical, horizontal))
    transposed = input.transpose(-1, -2).contiguous().requires_grad_()
    strided = torch.zeros(vertical.shape[:-1] + (2 * vertical.shape[-1],), dtype=vertical.dtype)
    strided[..., ::2] = vertical
    strided.requires_grad_()
    channels_last = horizontal.contiguous(memory_format=torch.channels_last).requires_grad_()
    views = (transposed.transpose(-1, -2), strided[..., ::2], channels_last)
    assert not any(view.is_contiguous() for view in views)
    output = sepconv(*views)
    (output * weights_like(output)).sum().backward()
    assert torch.equal(output, expected)
    assert torch.equal(transposed.grad.transpose(-1, -2), expected_grads[0])
    assert torch.equal(strided.grad[..., ::2], expected_grads[1])
    assert torch.equal(strided.grad[..., 1::2], torch.zeros_like(vertical))
    assert torch.equal(channels_last.grad, expected_grads[2])


@pytest.mark.parametrize('dtype, tolerance', [(torch.float64, FLOAT64_TOLERANCE), (torch.float32, FLOAT32_TOLERANCE)])
def test_backward_matches_reference(dtype, tolerance):
    tensors = random_inputs(batch=2, channels=3, size=5, height=6, width=7, dtype=dtype)
    _, grads = gradients(sepconv, tensors)
    _, expected = gradients(reference, tensors)
    for grad, expected_grad in zip(grads, expected):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), expected_grad.double(), **tolerance)


@pytest.mark.parametrize('rows, columns', [(2, 3), (3, 8), (7, 1)])
def test_backward_blocks_match_reference(monkeypatch, rows, columns):
    # 7 x 8 output pixels in blocks of rows x columns, the last ones cut short; the input's gradient
    # gathers from the K rows each block row reads, across blocks
    monkeypatch.setattr(sepconv_module, 'BAND_ROWS', rows)
    monkeypatch.setattr(sepconv_module, 'BAND_COLUMNS', columns)
    tensors = random_inputs(batch=2, channels=3, size=5, height=7, width=8)
    _, grads = gradients(sepconv, tensors)
    _, expected_grads = gradients(reference, tensors)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **FLOAT64_TOLERANCE)


def test_backward_computes_only_the_gradients_asked_for():
    input, vertical, horizontal = random_inputs(batch=1, channels=2, size=3, height=4, width=5)
    grad = weights_like(reference(input, vertical, horizontal))
    full = sepconv_module._backward_torch(input, vertical, horizontal, grad, (True,) * 3)
    for needs in ((False, True, True), (True, False, False), (False, False, True), (False, True, False)):
        some = sepconv_module._backward_torch(input, vertical, horizontal, grad, needs)
        assert [g is not None for g in some] == list(needs)
        assert all(torch.equal(g, f) for g, f, need in zip(some, full, needs) if need)


@pytest.mark.parametrize('rows, columns', [(2, 3), (3, 8), (7, 1)])
def test_forward_blocks_match_reference(monkeypatch, rows, columns):
    # 7 x 8 output pixels in blocks of rows x columns, the last ones cut short
    monkeypatch.setattr(sepconv_module, 'BAND_ROWS', rows)
    monkeypatch.setattr(sepconv_module, 'BAND_COLUMNS', columns)
    for dtype, tolerance in ((torch.float64, FLOAT64_TOLERANCE), (torch.float32, FLOAT32_TOLERANCE)):
        tensors = random_inputs(batch=2, channels=3, size=5, height=7, width=8, dtype=dtype)
        torch.testing.assert_close(sepconv(*tensors).double(), reference(*tensors), **tolerance)


def test_channels_last_kernels_give_the_same_result():
    input, vertical, horizontal = random_inputs(size=5, height=6, width=7, dtype=torch.float32)
    expected, expected_grads = gradients(sepconv, (input, vertical, horizontal))
    last = [t.contiguous(memory_format=torch.channels_last) for t in (vertical, horizontal)]
    assert not last[0].is_contiguous()
    output, grads = gradients(sepconv, (input, *last))
    assert torch.equal(output, expected)
    assert all(torch.equal(grad, expected_grad) for grad, expected_grad in zip(grads, expected_grads))


def test_gradcheck_across_blocks(monkeypatch):
    monkeypatch.setattr(sepconv_module, 'BAND_ROWS', 2)
    monkeypatch.setattr(sepconv_module, 'BAND_COLUMNS', 4)
    tensors = [t.requires_grad_() for t in random_inputs(batch=1, channels=2, size=3, height=5, width=6)]
    assert torch.autograd.gradcheck(sepconv, tensors, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_autocast_bfloat16_accumulates_in_float32():
    tensors = [t.bfloat16().requires_grad_() for t in random_inputs(size=51, height=3, width=4, dtype=torch.float32)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        output = sepconv(*tensors)
    assert output.dtype == torch.float32
    rounded = [t.detach().float() for t in tensors]
    assert torch.equal(output, sepconv(*rounded))
    torch.testing.assert_close(output.double(), reference(*rounded), **FLOAT32_TOLERANCE)
    output.sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 and t.grad.shape == t.shape for t in tensors)


def test_mixed_precision_inputs_compute_in_float32():
    input, vertical, horizontal = random_inputs(size=3, dtype=torch.float32)
    output = sepconv(input, vertical.bfloat16(), horizontal.half())
    assert output.dtype == torch.float32
    assert torch.equal(output, sepconv(input, vertical.bfloat16().float(), horizontal.half().float()))


@pytest.mark.parametrize('change', ['kernel shapes differ', 'input too small', 'batch differs', 'input 3-D'])
def test_rejects_mismatched_shapes(change):
    input, vertical, horizontal = random_inputs(size=3)
    if change == 'kernel shapes differ':
        horizontal = horizontal[:, :2]
    elif change == 'input too small':
        input = input[..., 1:]
    elif change == 'batch differs':
        input = input[:1]
    else:
        input = input[0]
    with pytest.raises(ValueError):
        sepconv(input, vertical, horizontal)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    tensors = random_inputs(batch=2, channels=3, size=51, height=9, width=11, dtype=torch.float32)
    output, grads = gradients(sepconv, tensors)
    cuda_output, cuda_grads = gradients(sepconv, [t.cuda() for t in tensors])
    torch.testing.assert_close(cuda_output.cpu(), output, rtol=1e-5, atol=1e-5)
    for grad, cuda_grad in zip(grads, cuda_grads):
        torch.testing.assert_close(cuda_grad.cpu(), grad, rtol=1e-5, atol=1e-5)
