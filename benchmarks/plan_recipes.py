"""The plan of each consumer-GPU recipe, with the candidates compared, and its picture (docs/recipes.md).

    python benchmarks/plan_recipes.py [recipe ...]      # default: the four consumer recipes

Each recipe is planned at full size on fake tensors (`memkit plan --compare --plot`); the pictures go to
docs/plan/<recipe>.png. Takes 5-30 minutes per recipe on 2 CPU cores (the long-context one is the slowest:
StreamBP's chunks at 24K tokens are many operators).
"""

from __future__ import annotations

import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RECIPES = ["llama3_8b_full_24gb.yaml", "llama3_8b_long_context_24gb.yaml", "qwen2.5_1.5b_8gb.yaml",
           "llama2_13b_zero_offload_24gb.yaml"]


def main(names: list[str]) -> None:
    from lightning_memkit.planner.plans import plan, plot

    os.environ.pop("MEMKIT_NVME_PATH", None)
    for name in names or RECIPES:
        path = os.path.join(ROOT, "recipes", name)
        text = open(path).read()
        gpu = re.search(r"Budget: (\d+) GiB of GPU memory", text).group(1) + "GiB"
        host = re.search(r"(\d+) GiB of host memory", text)
        start = time.perf_counter()
        result = plan(path, ["--trainer.logger=false"], gpu_memory=gpu,
                      cpu_memory=host.group(1) + "GiB" if host else None, compare=True)
        png = os.path.join(ROOT, "docs", "plan", name.replace(".yaml", ".png"))
        os.makedirs(os.path.dirname(png), exist_ok=True)
        plot(result.rows, png, result.gpu_memory, title=f"{name}: {result.description}")
        print(f"## {name}  (budget {gpu}{' GPU, ' + host.group(1) + 'GiB host' if host else ''}; "
              f"{time.perf_counter() - start:.0f} s)")
        print(result.description)
        print(result.table())
        print()
        print(result.comparison())
        print(f"picture: docs/plan/{os.path.basename(png)}\n", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
