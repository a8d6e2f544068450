"""Triton quantize / dequantize kernels against the PyTorch packers (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from lightning_memkit.activations.compress import pack_fp8, pack_int8, unpack

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("lightning_memkit.kernels.quantize")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernels_equal_the_pytorch_packer(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 70, generator=g) * torch.linspace(0.1, 5, 70)).to(dtype).to(DEVICE)
    x[3, 5] = 2.5 * x[:, 5].abs().max() / 127 * 127  # a value on the channel's absmax
    ref = pack_int8(x)
    q, scale = kernels.int8_pack(x)
    torch.testing.assert_close(scale, ref.scale.reshape(-1), rtol=0, atol=0)
    assert torch.equal(q, ref.codes)  # same rounding (half to even) and clamping
    back = kernels.int8_unpack(q, scale, dtype)
    assert back.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(back, unpack(ref))
    else:  # Triton's interpreter truncates fp32 -> bf16 where GPUs (and torch) round: one bf16 ulp
        torch.testing.assert_close(back.float(), unpack(ref).float(), rtol=2**-7, atol=0)


def test_int8_kernel_rounds_ties_to_even():
    x = torch.tensor([[127.0] * 6, [0.5, 1.5, 2.5, -0.5, -1.5, -2.5]], device=DEVICE)  # scale 1.0 per column
    q, _ = kernels.int8_pack(x)
    assert q[1].tolist() == [0, 2, 2, 0, -2, -2]
    assert torch.equal(q, pack_int8(x).codes)


def test_packers_use_the_kernels_on_cuda_only(monkeypatch):
    import lightning_memkit.activations.compress as compress

    calls = []
    monkeypatch.setattr(compress, "_kernels", lambda: calls.append(1) or kernels)
    pack_int8(torch.randn(8, 16))
    assert calls == []  # CPU tensors: the PyTorch path


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Triton's interpreter converts to float8 wrongly (e.g. -126 -> -64); checked on a GPU")
def test_fp8_group_kernel_equals_the_pytorch_packer():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 256, generator=g) * 4).to(DEVICE)
    ref = pack_fp8(x, per_group=True)
    q, scale = kernels.fp8_pack_groups(x)
    torch.testing.assert_close(scale, ref.scale.reshape(5, 2), rtol=1e-6, atol=0)
    assert torch.equal(q.float(), ref.codes.reshape(5, 256).float())
    back = kernels.fp8_unpack_groups(q, scale, torch.float32)
    torch.testing.assert_close(back, unpack(ref), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 128"):
        kernels.fp8_pack_groups(torch.randn(2, 100, device=DEVICE))
