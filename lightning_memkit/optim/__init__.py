"""Memory-efficient optimizers: GaLore, APOLLO, FRUGAL, 8-bit states, and the step in backward.

Every optimizer is a ``torch.optim.Optimizer`` usable on its own; :mod:`.convert` rebuilds the
optimizer a LightningModule returns into one of them by name, which is what
``MemKitStrategy(optimizer=...)`` does.
"""

from lightning_memkit.optim.apollo import Apollo, ApolloMini
from lightning_memkit.optim.base import MemKitOptimizer
from lightning_memkit.optim.frugal import Frugal
from lightning_memkit.optim.galore import AdamW, GaLoreAdamW, GaLoreAdamW8bit
from lightning_memkit.optim.in_backward import StepInBackward

#: name -> memkit optimizer class ("adamw8bit" and "paged_adamw8bit" are bitsandbytes' own, see eight_bit)
OPTIMIZER_CLASSES = {
    "adamw": AdamW,
    "galore_adamw": GaLoreAdamW,
    "galore_adamw8bit": GaLoreAdamW8bit,
    "apollo": Apollo,
    "apollo_mini": ApolloMini,
    "frugal": Frugal,
}

__all__ = [
    "AdamW", "Apollo", "ApolloMini", "Frugal", "GaLoreAdamW", "GaLoreAdamW8bit", "MemKitOptimizer",
    "OPTIMIZER_CLASSES", "StepInBackward",
]
