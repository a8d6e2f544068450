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
    ref = pack_int8(x.cpu())  # the PyTorch path (on CUDA, pack_int8 itself would run the kernels)
    q, scale = kernels.int8_pack(x)
    if DEVICE == "cpu":  # the interpreter computes exactly what torch computes on the CPU
        torch.testing.assert_close(scale.cpu(), ref.scale.reshape(-1), rtol=0, atol=0)
        assert torch.equal(q.cpu(), ref.codes)  # same rounding (half to even) and clamping
    else:  # CUDA's fp32 division may differ from the CPU's by an ulp, which can move a code at a tie by one
        torch.testing.assert_close(scale.cpu(), ref.scale.reshape(-1), rtol=3e-7, atol=0)
        diff = (q.cpu().int() - ref.codes.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    back = kernels.int8_unpack(q, scale, dtype).cpu()
    assert back.dtype == dtype
    if DEVICE != "cpu":
        assert ((back.float() - unpack(ref).float()).abs() <= ref.scale.reshape(-1) * 1.01).all()
    elif dtype == torch.float32:
        assert torch.equal(back, unpack(ref))
    else:  # Triton's interpreter truncates fp32 -> bf16 where GPUs (and torch) round: one bf16 ulp
        torch.testing.assert_close(back.float(), unpack(ref).float(), rtol=2**-7, atol=0)


def test_int8_kernel_rounds_ties_to_even():
    x = torch.tensor([[127.0] * 6, [0.5, 1.5, 2.5, -0.5, -1.5, -2.5]], device=DEVICE)  # scale 1.0 per column
    q, _ = kernels.int8_pack(x)
    assert q[1].tolist() == [0, 2, 2, 0, -2, -2]
    assert torch.equal(q.cpu(), pack_int8(x.cpu()).codes)
    near = torch.tensor([[127.0], [0.49999997]], device=DEVICE)  # floor(x + 0.5) would give 1 in fp32
    assert kernels.int8_pack(near)[0][1].item() == 0


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
    ref = pack_fp8(x.cpu(), per_group=True)  # the PyTorch path
    q, scale = kernels.fp8_pack_groups(x)
    torch.testing.assert_close(scale.cpu(), ref.scale.reshape(5, 2), rtol=1e-6, atol=0)
    assert torch.equal(q.cpu().float(), ref.codes.reshape(5, 256).float())
    back = kernels.fp8_unpack_groups(q, scale, torch.float32).cpu()
    torch.testing.assert_close(back, unpack(ref), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 128"):
        kernels.fp8_pack_groups(torch.randn(2, 100, device=DEVICE))
