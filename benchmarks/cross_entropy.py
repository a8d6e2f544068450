"""Memory and time of the LM head + cross-entropy: naive (materialized logits) vs chunked vs Triton.

Memory: one forward + backward of the head and the loss at a Gemma-2-2B-like shape (V=256000,
D=2304, N=8192, bf16), on fake tensors on the CPU (nothing is allocated; StepMemoryTracker counts bytes).
"extra" is the step's peak minus what every implementation must hold anyway: the head weight, its
gradient and the hidden states' gradient. The Triton path needs a GPU and is measured only where one
is lent (python benchmarks/cross_entropy.py --triton on a CUDA machine).

Time: forward + backward on the CPU at N=4096, D=1024, V=32000 (fp32), chunked against naive in the
same run, alternating, best of --repeats.

    python benchmarks/cross_entropy.py
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_memkit.loss import linear_cross_entropy
from lightning_memkit.memory import StepMemoryTracker, format_table
from lightning_memkit.units import GIB, MIB


def fake_memory(impl: str, n: int, d: int, v: int, dtype: torch.dtype) -> dict[str, float]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        head = torch.nn.Linear(d, v, bias=False, dtype=dtype)
        hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, v, (n,))
        with StepMemoryTracker(head) as tracker:
            loss = linear_cross_entropy(hidden, head.weight, targets, impl=impl)
            loss.backward()
        report = tracker.result()
    must_hold = 2 * head.weight.numel() * head.weight.element_size() + hidden.numel() * hidden.element_size()
    return {"peak": report.peak, "extra": report.peak - must_hold}


def cuda_memory(impl: str, n: int, d: int, v: int, dtype: torch.dtype) -> dict[str, float]:
    head = torch.nn.Linear(d, v, bias=False, dtype=dtype, device="cuda")
    hidden = torch.randn(n, d, dtype=dtype, device="cuda", requires_grad=True)
    targets = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(hidden, head.weight, targets, impl=impl).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    must_hold = head.weight.numel() * head.weight.element_size() + hidden.numel() * hidden.element_size()
    return {"peak": peak, "extra": peak - must_hold}


def cpu_times(impls: list[str], n: int, d: int, v: int, repeats: int) -> dict[str, float]:
    """Best time of forward + backward per implementation; the implementations alternate, so drift
    of the machine's speed affects them alike."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = (torch.randn(v, d, generator=g) / d**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    best = dict.fromkeys(impls, float("inf"))
    for _ in range(repeats):
        for impl in impls:
            hidden.grad = weight.grad = None
            start = time.perf_counter()
            linear_cross_entropy(hidden, weight, targets, impl=impl).backward()
            best[impl] = min(best[impl], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--triton", action="store_true", help="also measure the Triton path (needs CUDA)")
    args = parser.parse_args()

    n, d, v = 8192, 2304, 256000
    rows = []
    naive_extra = None
    for impl in ["torch", "chunked"] + (["triton"] if args.triton else []):
        measure = cuda_memory if impl == "triton" else fake_memory
        m = measure(impl, n, d, v, torch.bfloat16)
        naive_extra = naive_extra if naive_extra is not None else m["extra"]
        how = "CUDA allocator" if impl == "triton" else "fake tensors, StepMemoryTracker"
        rows.append((impl if impl != "torch" else "naive (torch)", f"{m['peak'] / GIB:.2f}", f"{m['extra'] / MIB:.1f}",
                     f"{100 * m['extra'] / naive_extra:.2f}%", how))
    print(f"Head + loss, forward + backward, V={v}, D={d}, N={n}, bf16")
    print(format_table(rows, ("implementation", "peak GiB", "extra MiB", "extra vs naive", "measured by")))

    n, d, v = 4096, 1024, 32000
    times = cpu_times(["torch", "chunked"], n, d, v, args.repeats)
    naive, chunked = times["torch"], times["chunked"]
    print(f"\nCPU time, forward + backward, N={n}, D={d}, V={v}, fp32, best of {args.repeats} "
          f"({torch.get_num_threads()} threads)")
    print(format_table(
        [("naive (torch)", f"{naive:.2f}", "1.00x"), ("chunked", f"{chunked:.2f}", f"{chunked / naive:.2f}x")],
        ("implementation", "seconds", "ratio"),
    ))


if __name__ == "__main__":
    main()
