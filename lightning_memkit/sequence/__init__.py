"""Sequence-chunked backpropagation for long context: SeCO, SpaCO and StreamBP.

``MemKitStrategy(sequence={"method": "streambp", "chunk_size": 2048})`` makes
:func:`~lightning_memkit.loss.causal_lm_loss` (and Hugging Face causal LMs called with ``labels=``)
compute the loss with a chunked backward; :func:`sequence_loss` is the same as a function.
"""

from lightning_memkit.sequence.adapter import HFAdapter, ReferenceAdapter, SequenceAdapter, find_adapter, get_adapter
from lightning_memkit.sequence.loss import sequence_loss

__all__ = ["HFAdapter", "ReferenceAdapter", "SequenceAdapter", "find_adapter", "get_adapter", "sequence_loss"]
