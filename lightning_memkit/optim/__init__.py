"""Memory-efficient optimizers: GaLore, APOLLO, FRUGAL, SPAM, SGD-SaI, COSMOS, Natural GaLore, zeroth-order
(MeZO's ZO-SGD, ZO-Adam), 8-bit states, and the step in backward.

Every optimizer is a ``torch.optim.Optimizer`` usable on its own; :mod:`.convert` rebuilds the
optimizer a LightningModule returns into one of them by name, which is what
``MemKitStrategy(optimizer=...)`` does.
"""

from lightning_memkit.optim.apollo import Apollo, ApolloMini
from lightning_memkit.optim.base import MemKitOptimizer
from lightning_memkit.optim.cosmos import Cosmos
from lightning_memkit.optim.frugal import Frugal
from lightning_memkit.optim.galore import AdamW, GaLoreAdamW, GaLoreAdamW8bit
from lightning_memkit.optim.in_backward import StepInBackward
from lightning_memkit.optim.natural_galore import NaturalGaLore, NaturalGaLore8bit
from lightning_memkit.optim.sgd_sai import SGDSaI
from lightning_memkit.optim.spam import SPAM
from lightning_memkit.optim.zeroth_order import ZerothOrderAdam, ZerothOrderOptimizer

#: name -> memkit optimizer class ("adamw8bit" and "paged_adamw8bit" are bitsandbytes' own, see eight_bit)
OPTIMIZER_CLASSES = {
    "adamw": AdamW,
    "galore_adamw": GaLoreAdamW,
    "galore_adamw8bit": GaLoreAdamW8bit,
    "apollo": Apollo,
    "apollo_mini": ApolloMini,
    "frugal": Frugal,
    "cosmos": Cosmos,
    "natural_galore": NaturalGaLore,
    "natural_galore8bit": NaturalGaLore8bit,
    "spam": SPAM,
    "sgd_sai": SGDSaI,
    # forward-only: MemKitStrategy installs them through the zeroth-order technique (optim.zo_technique), which
    # also passes the transformer blocks for ``blockwise``; convert_optimizer builds them with one block per tensor
    "zo_sgd": ZerothOrderOptimizer,
    "zo_adam": ZerothOrderAdam,
}

__all__ = [
    "AdamW", "Apollo", "ApolloMini", "Cosmos", "Frugal", "GaLoreAdamW", "GaLoreAdamW8bit", "MemKitOptimizer",
    "NaturalGaLore", "NaturalGaLore8bit", "OPTIMIZER_CLASSES", "SGDSaI", "SPAM", "StepInBackward",
    "ZerothOrderAdam", "ZerothOrderOptimizer",
]
