"""lightning_memkit: memory-saving training techniques for PyTorch Lightning.

Importing the package registers the ``memkit*`` strategy names with Lightning, so
``Trainer(strategy="memkit")`` works. Heavy optional backends (transformers, deepspeed,
bitsandbytes, triton) are imported only when a feature needs them.
"""

from lightning_memkit.checkpoint_io import AtomicCheckpointIO
from lightning_memkit.config import (
    ActivationsConfig,
    CrossEntropyConfig,
    MemKitConfigError,
    OptimizerConfig,
    SequenceConfig,
)
from lightning_memkit.strategy import PRESETS, MemKitStrategy, register
from lightning_memkit.zero.strategy import MemKitDeepSpeedStrategy  # registers the ZeRO backend (zero_stage=1-3)

register()

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: these pull in torchmetrics / data code only when asked for
    if name == "CausalLMModule":
        from lightning_memkit.module import CausalLMModule

        return CausalLMModule
    if name == "TextDataModule":
        from lightning_memkit.data import TextDataModule

        return TextDataModule
    if name == "MemoryReport":
        from lightning_memkit.callbacks import MemoryReport

        return MemoryReport
    raise AttributeError(f"module 'lightning_memkit' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "ActivationsConfig",
    "AtomicCheckpointIO",
    "CrossEntropyConfig",
    "CausalLMModule",
    "MemKitConfigError",
    "MemKitDeepSpeedStrategy",
    "MemKitStrategy",
    "MemoryReport",
    "OptimizerConfig",
    "SequenceConfig",
    "TextDataModule",
    "__version__",
]
