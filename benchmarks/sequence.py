"""Sequence-chunked backprop: the longest sequence that fits a memory budget, and CPU step time.

Part 1, ``--memory`` (fake tensors, nothing allocated): a full-parameter Llama-3-8B step in bf16 with
APOLLO-Mini on every weight and the step in backward (the 24 GiB recipe of the optimizer issue),
batch 1. For each method the step's peak is measured (``fake_training_step``: the planner's step) at
two lengths; the peak is affine in the length, so the line gives the longest length under the
budget, rounded down to a multiple of 1024, and that length is measured again to confirm it fits.

Part 2, ``--speed`` (real tensors, this CPU): forward + backward time of one step of a mid-size model
for each method, as a ratio to activation checkpointing with the fused loss, in one run.

    python benchmarks/sequence.py --memory --budget 24GiB
    python benchmarks/sequence.py --memory --rows 3 --short 65536 --long 131072 --upper 131072   # offload, long
    python benchmarks/sequence.py --speed
    python benchmarks/sequence.py --speed --speed-rows StreamBP   # StreamBP with and without host offload
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_memkit.config import parse_size
from lightning_memkit.memory import fake_training_step, format_table
from lightning_memkit.units import GIB

OPTIMIZER = {"name": "apollo_mini", "in_backward": True, "target_modules": ["*"]}

#: name -> fake_training_step keyword arguments
MEMORY_METHODS: dict[str, dict] = {
    "checkpointing, plain loss (fp32 logits)": {"checkpoint_every": 1},
    "checkpointing + fused cross-entropy": {"checkpoint_every": 1, "fused_cross_entropy": True},
    "StreamBP (chunk 2048) + fused cross-entropy": {
        "sequence": {"method": "streambp", "chunk_size": 2048}, "fused_cross_entropy": True},
    "StreamBP (chunk 2048) + offload + fused": {
        "sequence": {"method": "streambp", "chunk_size": 2048, "offload": True}, "fused_cross_entropy": True},
    "SeCO (chunk 2048) + checkpointing + fused": {
        "sequence": {"method": "seco", "chunk_size": 2048}, "checkpoint_every": 1, "fused_cross_entropy": True},
}


def step(model: str, seq_len: int, kwargs: dict):
    from lightning_memkit.models.llama import get_config

    cfg = get_config(model, max_seq_len=1 << 20)  # the shape, with RoPE allowed past its trained length
    return fake_training_step(cfg, seq_len=seq_len, optimizer=OPTIMIZER, **kwargs)


def memory(model: str, budget: int, short: int, long: int, only: str = "", upper: int = 0) -> list[tuple[str, ...]]:
    """Per method: the device peak at two lengths, its cost per token, the longest length the line says fits
    (at most ``upper`` when given; measured again, then stepped by 1024 to the last length that fits), the host
    memory there, and
    that length against the first row's and against checkpointing + fused cross-entropy's."""
    rows = []
    longest: dict[str, int] = {}
    for index, (name, kwargs) in enumerate(MEMORY_METHODS.items()):
        if only and str(index) not in only.split(","):
            continue
        start = time.perf_counter()
        first, second = step(model, short, kwargs), step(model, long, kwargs)
        a, b = first.peak, second.peak
        per_token = (b - a) / (long - short)
        host = "-"
        if a > budget:
            best, confirmed = 0, "-"
        else:
            best = int(short + (budget - a) / per_token) // 1024 * 1024 if per_token > 0 else long
            best = max(best, short)
            if upper:
                best = min(best, upper)
            got = second if best == long else step(model, best, kwargs)
            while best > short and got.peak > budget:  # the line was optimistic: step down until it fits
                best -= 1024
                got = step(model, best, kwargs)
            while not upper or best + 1024 <= upper:  # or pessimistic: step up while the next length fits
                bigger = step(model, best + 1024, kwargs)
                if bigger.peak > budget:
                    break
                best, got = best + 1024, bigger
            confirmed = f"{got.peak / GIB:.2f}"
            host = f"{got.host / GIB:.2f}" if got.host else "-"
        longest[name] = best
        ratios = [f"{best / longest[ref]:.1f}x" if longest.get(ref) else "-"
                  for ref in (next(iter(longest)), "checkpointing + fused cross-entropy")]
        rows.append((name, f"{a / GIB:.2f}", f"{b / GIB:.2f}", f"{per_token / 1024:.0f}", f"{best:,}" if best else
                     "does not fit", confirmed, host, *ratios, f"{time.perf_counter() - start:.0f}"))
        print(rows[-1], flush=True)
    return rows


def speed(seq_len: int, chunk: int, repeats: int, only: str = "") -> list[tuple[str, ...]]:
    from lightning_memkit.activations.checkpoint import apply_checkpointing, remove_checkpointing
    from lightning_memkit.config import CrossEntropyConfig
    from lightning_memkit.loss import linear_cross_entropy
    from lightning_memkit.models.llama import LlamaConfig, Transformer
    from lightning_memkit.sequence import sequence_loss
    from lightning_memkit.sequence.technique import wrapped_block_call

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=1408,
                      max_seq_len=seq_len)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    fused = CrossEntropyConfig(impl="chunked")

    def checkpointed(plain: bool) -> None:
        blocks = list(model.blocks)
        apply_checkpointing(blocks)
        try:
            if plain:
                loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
            else:
                loss = linear_cross_entropy(model.forward_hidden(x), model.lm_head.weight, y, impl="chunked")
            loss.backward()
        finally:
            remove_checkpointing(blocks)

    def chunked(method: str, checkpoint: bool = False, **extra) -> None:
        blocks = list(model.blocks)
        if checkpoint:
            apply_checkpointing(blocks)
        try:
            sequence_loss(model, x, y, method=method, chunk_size=chunk, cross_entropy=fused,
                          call=wrapped_block_call(method), **extra).backward()
        finally:
            if checkpoint:
                remove_checkpointing(blocks)

    runs = {
        "checkpointing + fused cross-entropy (reference)": lambda: checkpointed(False),
        "checkpointing, plain loss": lambda: checkpointed(True),
        f"StreamBP (chunk {chunk})": lambda: chunked("streambp"),
        f"StreamBP (chunk {chunk}), block inputs in host memory": lambda: chunked("streambp", offload=True),
        f"SeCO (chunk {chunk})": lambda: chunked("seco"),
        f"SeCO (chunk {chunk}) + checkpointing": lambda: chunked("seco", checkpoint=True),
        f"SpaCO (chunk {chunk}, keep 0.5)": lambda: chunked("spaco", keep=0.5, seed=0),
    }
    if only:  # the reference row, and the rows whose name contains one of the comma-separated words
        words = [w.strip() for w in only.split(",") if w.strip()]
        first = next(iter(runs))
        runs = {n: f for n, f in runs.items() if n == first or any(w in n for w in words)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, fn in runs.items():  # warm-up
        model.zero_grad(set_to_none=True)
        fn()
    for _ in range(repeats):  # interleaved, so drift on this machine hits every method alike
        for name, fn in runs.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ref = statistics.median(times[next(iter(runs))])
    rows = []
    for name in runs:
        t = statistics.median(times[name])
        rows.append((name, f"{t:.2f}", f"{t / ref:.2f}x"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--budget", default="24GiB")
    parser.add_argument("--short", type=int, default=4096)
    parser.add_argument("--long", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", default="", help="comma-separated row numbers of --memory to run (default: all)")
    parser.add_argument("--upper", type=int, default=0, help="--memory: the longest length to try (0: no bound)")
    parser.add_argument("--speed-rows", default="",
                        help="--speed: run the reference row and those whose name contains one of these "
                             "comma-separated words (e.g. 'StreamBP'; default: all)")
    args = parser.parse_args()
    if not (args.memory or args.speed):
        parser.error("choose --memory and/or --speed")
    torch.set_num_threads(torch.get_num_threads())
    if args.memory:
        budget = parse_size("--budget", args.budget)
        rows = memory(args.model, budget, args.short, args.long, args.rows, args.upper)
        print(f"\n{args.model}, bf16, batch 1, APOLLO-Mini on every weight + step in backward; budget "
              f"{budget / GIB:.0f} GiB (fake tensors)")
        print(format_table(rows, ("method", f"peak@{args.short} GiB", f"peak@{args.long} GiB", "KiB/token",
                                  "longest fitting", "its peak GiB", "host GiB", "vs first row",
                                  "vs ckpt+fused", "s")))
    if args.speed:
        rows = speed(args.seq_len, args.chunk, args.repeats, args.speed_rows)
        print(f"\nCPU ({torch.get_num_threads()} threads), 4 x 512-wide blocks, vocab 32000, fp32, "
              f"{args.seq_len} tokens, forward + backward, median of {args.repeats}")
        print(format_table(rows, ("method", "s", "vs reference")))


if __name__ == "__main__":
    main()
