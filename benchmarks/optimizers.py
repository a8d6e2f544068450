"""Memory and speed of memkit's optimizers.

1. Optimizer-state bytes for the Llama-3-8B shape (8.03B parameters), per optimizer, against torch
   AdamW with fp32 states (fp32 master weights), from the parameter shapes
   (``lightning_memkit.optim.memory.predict_state_bytes``; the tests check the prediction equals the
   bytes of real optimizers exactly). Default low-rank weights: the linear layers of the blocks.
2. Peak memory of a full-parameter Llama-3-8B training step at sequence 4096 (bf16, batch 1),
   measured on fake tensors (``lightning_memkit.memory.fake_training_step``).
3. CPU time of ``optimizer.step()`` per optimizer, as a ratio to torch AdamW, in one run: the
   parameters of a 45M-parameter Llama shape with fixed gradients, the optimizers taking turns,
   best of --repeats. COSMOS runs here at this shape (512 x 512 .. 512 x 1536 matrices): at the
   Llama-3-8B shapes its Newton-Schulz iterations take about a minute per step on a small CPU. The
   zeroth-order optimizers are timed with a closure that returns a constant: what is measured is the
   optimizer's own work (regenerating the noise 4 times per parameter: +εz, -2εz, +εz, update); a real ZO
   step adds 2 forward passes per perturbation.

    python benchmarks/optimizers.py [--skip-peak] [--skip-cpu] [--repeats 5] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch

from lightning_memkit.config import OPTIMIZER_KEYS, OptimizerConfig
from lightning_memkit.memory import format_table
from lightning_memkit.units import GIB

NAMES = ["none", "adamw", "adamw8bit", "galore_adamw", "galore_adamw8bit", "apollo", "apollo_mini", "frugal", "spam",
         "sgd_sai", "cosmos", "natural_galore", "natural_galore8bit", "zo_sgd", "zo_adam"]
LABEL = {"none": "torch AdamW (fp32 states)"}
#: the low-rank optimizers' rank in the CPU timing (its shape is narrow: dim 512); APOLLO-Mini keeps its rank 1
CPU_RANK = 32
ZEROTH_ORDER = ("zo_sgd", "zo_adam")


def state_table() -> None:
    from lightning_memkit.models.llama import Transformer, get_config
    from lightning_memkit.optim.convert import select_lowrank
    from lightning_memkit.optim.memory import predict_state_bytes

    with torch.device("meta"):
        model = Transformer(get_config("llama-3-8b"))
    params = [(n, tuple(p.shape), torch.float32) for n, p in model.named_parameters()]
    lowrank = set(select_lowrank(model, None).values())
    total = sum(p.numel() for p in model.parameters())
    base = predict_state_bytes(params, OptimizerConfig())
    rows = []
    for name in NAMES:
        for cfg in _variants(name):
            b = predict_state_bytes(params, cfg, lowrank)
            settings = ", ".join(f"{k}={v}" for k, v in cfg.optimizer_kwargs().items())
            rows.append((LABEL.get(name, name), settings or "defaults", f"{b / GIB:.2f}", f"{100 * b / base:.1f}%"))
    print(f"Optimizer state, Llama-3-8B shape ({total / 1e9:.2f}B parameters, {len(lowrank)} low-rank weights: the "
          "linear layers of the blocks; embeddings, head and norms on AdamW)")
    print(format_table(rows, ("optimizer", "settings", "state GiB", "vs AdamW")))
    all_2d = {n for n, shape, _ in params if len(shape) == 2}
    mini_all = predict_state_bytes(params, OptimizerConfig(name="apollo_mini", target_modules=("*",)), all_2d)
    print(f"apollo_mini on every 2-D weight (embeddings and head too): {mini_all / GIB:.3f} GiB = "
          f"{100 * mini_all / base:.3f}% of AdamW's")


def _variants(name: str) -> list[OptimizerConfig]:
    if name == "galore_adamw8bit":
        return [OptimizerConfig(name=name, rank=128), OptimizerConfig(name=name, rank=512)]
    if name == "spam":  # dense (the paper's default) and the sparse-momentum variant
        return [OptimizerConfig(name=name), OptimizerConfig(name=name, density=0.25)]
    return [OptimizerConfig(name=name)]


PEAK_CASES = [
    ("torch AdamW, checkpointing, fused CE", None),
    ("apollo_mini, checkpointing, fused CE", {"name": "apollo_mini"}),
    ("apollo_mini + step in backward, checkpointing, fused CE", {"name": "apollo_mini", "in_backward": True}),
    ("  ... with apollo_mini on every 2-D weight (target_modules=['*'])",
     {"name": "apollo_mini", "in_backward": True, "target_modules": ["*"]}),
    ("galore_adamw8bit + step in backward, checkpointing, fused CE", {"name": "galore_adamw8bit", "in_backward": True}),
]


def peak_table() -> None:
    from lightning_memkit.memory import fake_training_step

    rows = []
    for label, setting in PEAK_CASES:
        r = fake_training_step("llama-3-8b", seq_len=4096, checkpoint_every=1, fused_cross_entropy=True,
                               optimizer=setting)
        c = r.by_category
        rows.append((label, f"{r.peak / GIB:.2f}", f"{c['parameters'] / GIB:.2f}", f"{c['gradients'] / GIB:.2f}",
                     f"{c['optimizer_state'] / GIB:.2f}", f"{(c['activations'] + c['temporaries']) / GIB:.2f}"))
    print("\nPeak of one full-parameter Llama-3-8B step, seq 4096, batch 1, bf16 weights "
          "(fake tensors, the planner's step)")
    print(format_table(rows, ("configuration", "peak GiB", "weights", "grads", "opt state", "activations+temp")))


def _cpu_shape():  # noqa: ANN202
    from lightning_memkit.models.llama import LlamaConfig

    return LlamaConfig(vocab_size=32000, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=1536)


def cpu_times(repeats: int, only: Optional[list[str]] = None) -> None:
    from lightning_memkit.models.llama import Transformer
    from lightning_memkit.optim.convert import convert_optimizer, select_lowrank

    torch.manual_seed(0)
    model = Transformer(_cpu_shape())
    grads = {p: torch.randn_like(p) * 1e-3 for p in model.parameters()}
    lowrank = select_lowrank(model, None)
    opts = {}
    for name in NAMES:
        if only and name not in only and name != "none":
            continue
        for cfg in _variants(name):
            if name == "galore_adamw8bit" and cfg.rank != 128:
                continue
            settings = cfg.optimizer_kwargs()
            if "rank" in OPTIMIZER_KEYS[name] and name != "apollo_mini":
                settings["rank"] = CPU_RANK
            label = LABEL.get(name, name) + "".join(f" {k}={v}" for k, v in settings.items() if k != "rank")
            base = torch.optim.AdamW(model.parameters(), lr=1e-5)
            opts[label] = (name, base if name == "none"
                           else convert_optimizer(base, OptimizerConfig(name=name, **settings), lowrank, {}))
    best: dict[str, list[float]] = {label: [] for label in opts}
    constant = torch.tensor(1.0)
    for _ in range(repeats + 1):  # the first round creates the states (and SVDs, SGD-SaI's scales): not counted
        for label, (name, opt) in opts.items():
            for p in model.parameters():
                p.grad = None if name in ZEROTH_ORDER else grads[p].clone()
            start = time.perf_counter()
            if name in ZEROTH_ORDER:  # the optimizer's own work; the forward passes are the model's
                opt.step(lambda: constant)
            else:
                opt.step()
            best[label].append(time.perf_counter() - start)
    base = min(best[LABEL["none"]][1:])
    rows = [(label, f"{1e3 * min(t[1:]):.1f}", f"{1e3 * statistics.median(t[1:]):.1f}",
             f"{min(t[1:]) / base:.2f}x") for label, t in best.items()]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\nCPU optimizer.step() time, a {n_params / 1e6:.1f}M-parameter Llama shape "
          "(dim 512, 4 layers, vocab 32000; "
          f"rank {CPU_RANK}, APOLLO-Mini 1), "
          f"best of {repeats} ({torch.get_num_threads()} threads); SVD refreshes (every 200 steps) not included; "
          "COSMOS refreshes its basis every step (included); zo_*: the optimizer's work only (a constant closure), "
          "a real step adds 2 forward passes per perturbation")
    print(format_table(rows, ("optimizer", "best ms", "median ms", "vs torch AdamW")))


def cuda_check(repeats: int) -> None:
    """One step of each memkit optimizer on CUDA equals the CPU step (fp32), and step times on the GPU
    (Llama-3.2-1B-shaped parameters, bf16), as ratios to torch AdamW. Called from cuda_check.py.

    The gradients have well-separated singular values (σ_i = 2^-i): with random Gaussian gradients the
    top singular subspaces are near-degenerate and CPU and CUDA SVDs legitimately pick different ones.
    FRUGAL is compared with ``state_free="sgd"``: signSGD's sign of a residual entry near 0 can differ
    between devices by rounding. Random bases (APOLLO) are drawn by each device's own generator, so the
    CPU run here is given the CUDA draws. And Adam's eps is 0.01 here: with 1e-8 the first steps' direction
    m/√v is sign-like, so an entry of the projected gradient near 0 turns a rounding difference
    between the devices' SVDs into a full ±lr difference."""
    from lightning_memkit.models.llama import Transformer, get_config
    from lightning_memkit.optim.convert import convert_optimizer, select_lowrank

    def spectral_grad(shape, g):  # noqa: ANN001, ANN202
        if len(shape) != 2:
            return torch.randn(shape, generator=g) * 1e-2
        k = min(shape)
        u = torch.linalg.qr(torch.randn(shape[0], k, generator=g)).Q
        v = torch.linalg.qr(torch.randn(shape[1], k, generator=g)).Q
        return (u * (2.0 ** -torch.arange(k, dtype=torch.float32))) @ v.t() * 1e-2

    cases = [("galore_adamw", {"rank": 16}), ("galore_adamw8bit", {"rank": 16}), ("apollo", {"rank": 16}),
             ("apollo_mini", {}), ("frugal", {"rank": 16, "state_free": "sgd"}), ("adamw", {})]
    torch.manual_seed(0)
    reference = Transformer(get_config("small")).state_dict()
    from lightning_memkit.optim.projectors import RandomProjector

    draw = RandomProjector.basis

    def cuda_draw(self, device):  # noqa: ANN001, ANN202
        return draw(self, torch.device("cuda")).to(device)  # the CPU run uses the CUDA generator's bases

    rows = []
    for name, settings in cases:
        try:
            results = []
            for device in ("cpu", "cuda"):
                RandomProjector.basis = cuda_draw if device == "cpu" else draw
                m = Transformer(get_config("small")).to(device)
                m.load_state_dict(reference)
                opt = convert_optimizer(torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-2),
                                        OptimizerConfig(name=name, **settings), select_lowrank(m, None), {})
                g = torch.Generator().manual_seed(1)
                for _ in range(3):
                    for p in m.parameters():
                        p.grad = spectral_grad(tuple(p.shape), g).to(device)
                    opt.step()
                results.append([p.detach().cpu() for p in m.parameters()])
            diff = max((a - b).abs().max().item() for a, b in zip(*results))
            rows.append((name, f"{diff:.2e}", "ok" if diff < 1e-5 else "MISMATCH"))
        except Exception as err:  # report and go on: this runs once on a lent GPU
            rows.append((name, "error", repr(err)[:80]))
        finally:
            RandomProjector.basis = draw
    print("\nmemkit optimizers on CUDA vs CPU, 'small' model, 3 steps, fp32: largest parameter difference")
    print(format_table(rows, ("optimizer", "max |diff|", "verdict")))

    with torch.device("cuda"):
        model = Transformer(get_config("llama-3.2-1b")).to(torch.bfloat16)
    lowrank = select_lowrank(model, None)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    times = {}
    for name in ["none", "galore_adamw", "galore_adamw8bit", "apollo", "apollo_mini", "frugal", "adamw"]:
        base = torch.optim.AdamW(model.parameters(), lr=1e-6)
        opt = base if name == "none" else convert_optimizer(base, OptimizerConfig(name=name), lowrank, {})
        opt.step()
        torch.cuda.synchronize()
        ts = []
        for _ in range(repeats):
            start = time.perf_counter()
            opt.step()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - start)
        times[name] = statistics.median(ts)
        del opt, base
        torch.cuda.empty_cache()
    rows = [(LABEL.get(n, n).replace(" (fp32 states)", " (foreach)"), f"{1e3 * t:.1f}", f"{t / times['none']:.2f}x")
            for n, t in times.items()]
    print(f"\nCUDA optimizer.step() time, Llama-3.2-1B shape, bf16, median of {repeats} "
          f"({torch.cuda.get_device_name()})")
    print(format_table(rows, ("optimizer", "ms", "vs torch AdamW")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-peak", action="store_true", help="skip the fake-tensor 8B steps (~25 s each)")
    parser.add_argument("--skip-cpu", action="store_true", help="skip the CPU step timing")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="time only these optimizers (and torch AdamW)")
    args = parser.parse_args()
    state_table()
    if not args.skip_peak:
        peak_table()
    if not args.skip_cpu:
        cpu_times(args.repeats, args.only)


if __name__ == "__main__":
    main()
