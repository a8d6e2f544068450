"""Checks and timings that need a CUDA GPU (run where one is lent; CI has none).

1. Fused linear cross-entropy on CUDA: the Triton kernels (compiled, not interpreted) and the chunked
   PyTorch path against the fp32 reference at real LM-head shapes: loss and gradient errors, the
   extra memory over what every implementation must hold (CUDA allocator), and forward + backward
   time (CUDA events, median of --repeats after warm-up).
2. Optimizers on CUDA (``--optimizers``): one step of each memkit optimizer on a CUDA model, checked
   equal to the same step on the CPU (to fp32 tolerance), and step time as a ratio to torch AdamW.

    python benchmarks/cuda_check.py [--optimizers] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from lightning_memkit.loss import linear_cross_entropy, reference_linear_cross_entropy
from lightning_memkit.memory import format_table
from lightning_memkit.units import MIB

CE_SHAPES = [  # (name, N tokens, D, V)
    ("gemma-2-2b head", 8192, 2304, 256000),
    ("llama-3-8b head", 8192, 4096, 128256),
    ("odd shape", 1000, 1000, 32003),
]


def _timed(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cross_entropy(repeats: int) -> None:
    rows = []
    for name, n, d, v in CE_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        h32 = torch.randn(n, d, device="cuda", generator=g)
        w32 = torch.randn(v, d, device="cuda", generator=g) / d**0.5
        t = torch.randint(0, v, (n,), device="cuda", generator=g)
        t[::7] = -100
        h_ref, w_ref = h32.clone().requires_grad_(), w32.clone().requires_grad_()
        loss_ref = reference_linear_cross_entropy(h_ref, w_ref, t)
        loss_ref.backward()
        exact = (loss_ref.detach(), h_ref.grad, w_ref.grad)
        del h_ref, w_ref, loss_ref
        torch.cuda.empty_cache()
        for impl in ("torch", "chunked", "triton"):
            h = h32.to(torch.bfloat16).requires_grad_()
            w = w32.to(torch.bfloat16).requires_grad_()

            def step():
                h.grad = w.grad = None
                linear_cross_entropy(h, w, t, impl=impl).backward()

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            h.grad = w.grad = None
            loss = linear_cross_entropy(h, w, t, impl=impl)
            loss.backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            must_hold = w.numel() * w.element_size() + h.numel() * h.element_size()  # the two gradients
            errs = [(loss.detach().float() - exact[0]).abs().item(),
                    ((h.grad.float() - exact[1]).abs().max() / exact[1].abs().max()).item(),
                    ((w.grad.float() - exact[2]).abs().max() / exact[2].abs().max()).item()]
            ms = _timed(step, repeats)
            rows.append((name, impl, f"{errs[0]:.2e}", f"{errs[1]:.2e}", f"{errs[2]:.2e}",
                         f"{(peak - must_hold) / MIB:.1f}", f"{ms:.2f}"))
            h = w = loss = None  # free the memory before the next impl (not `del`: step() closes over h, w)
    print(f"Linear cross-entropy on {torch.cuda.get_device_name()}, bf16 inputs vs the fp32 reference "
          f"(7th target ignored); time = median of {repeats}, forward + backward")
    print(format_table(rows, ("shape", "impl", "|loss err|", "d_hidden rel err", "d_weight rel err",
                              "extra MiB", "ms")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--optimizers", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/cuda_check.py needs a CUDA GPU.")
    cross_entropy(args.repeats)
    if args.optimizers:
        from benchmarks.optimizers import cuda_check as optimizers_cuda_check

        optimizers_cuda_check(args.repeats)


if __name__ == "__main__":
    main()
