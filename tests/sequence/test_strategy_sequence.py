"""sequence= on MemKitStrategy: the same training as plain backprop, with every other technique on top."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_memkit import MemKitConfigError, MemKitStrategy
from lightning_memkit.data import TextDataModule
from lightning_memkit.loss import causal_lm_loss
from lightning_memkit.models.llama import Transformer, get_config
from lightning_memkit.module import CausalLMModule
from tests.models.test_llama import tiny_hf


def _fit(corpus, steps=4, seed=0, module=None, data=None, **strategy):
    pl.seed_everything(seed, verbose=False)
    data = data or TextDataModule(paths=[corpus], seq_len=48, batch_size=2)
    module = module or CausalLMModule(model="tiny", vocab_size=258, learning_rate=3e-3, warmup_steps=1)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer_kwargs = strategy.pop("trainer_kwargs", {})
    trainer = pl.Trainer(
        strategy=MemKitStrategy(**strategy), accelerator="cpu", devices=1, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
        val_check_interval=steps, num_sanity_val_steps=0, callbacks=[Record()], **trainer_kwargs,
    )
    trainer.fit(module, data)
    return trainer, module, losses


def _assert_same_training(a, b, rtol=2e-4, atol=1e-5):
    # atol: AdamW divides by sqrt(v), so rounding-level gradient noise (a k_proj bias, whose exact gradient is 0)
    # moves a weight by up to ~3e-6 in 3 steps; a wrong gradient moves it by the learning rate (3e-3)
    (_, ma, la), (_, mb, lb) = a, b
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def corpus():
    import os

    from lightning_memkit.data import stdlib_dir

    return os.path.join(stdlib_dir(), "email")


@pytest.mark.parametrize("method", ["streambp", "seco"])
@pytest.mark.parametrize("cross_entropy", ["fused", "plain"])
def test_training_equals_plain_backprop(method, cross_entropy, corpus):
    plain = _fit(corpus, cross_entropy=cross_entropy)
    chunked = _fit(corpus, cross_entropy=cross_entropy, sequence={"method": method, "chunk_size": 20})
    assert "sequence-chunked backprop" in chunked[0].strategy.techniques[-1].describe()
    _assert_same_training(plain, chunked)


@pytest.mark.parametrize("method", ["streambp", "seco"])
def test_with_accumulation_checkpointing_and_step_in_backward(method, corpus):
    kwargs = dict(activations="checkpoint", optimizer={"name": "apollo_mini", "in_backward": True},
                  trainer_kwargs={"accumulate_grad_batches": 1})
    plain = _fit(corpus, **kwargs)
    chunked = _fit(corpus, sequence={"method": method, "chunk_size": 16}, **kwargs)
    _assert_same_training(plain, chunked)
    accumulated = dict(optimizer={"name": "galore_adamw", "rank": 8, "in_backward": True},
                       trainer_kwargs={"accumulate_grad_batches": 2})
    _assert_same_training(_fit(corpus, **accumulated),
                          _fit(corpus, sequence={"method": method, "chunk_size": 16}, **accumulated))


def test_compressed_activations_apply_inside_the_chunks(corpus):
    from lightning_memkit.activations.saved import SavedTensors

    packed = []
    original = SavedTensors.pack

    def spy(self, x, slot, per_group):
        packed.append(x.shape)
        return original(self, x, slot, per_group)

    SavedTensors.pack = spy
    try:
        _, _, losses = _fit(corpus, steps=2, activations={"compress": "int8", "min_numel": 64},
                            sequence={"method": "seco", "chunk_size": 16})
    finally:
        SavedTensors.pack = original
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(16 in shape for shape in packed)  # the chunks' saved tensors (16 tokens) went through the hooks


def test_spaco_trains_and_is_reproducible(corpus):
    a = _fit(corpus, sequence={"method": "spaco", "chunk_size": 12, "keep": 0.5, "seed": 3})
    b = _fit(corpus, sequence={"method": "spaco", "chunk_size": 12, "keep": 0.5, "seed": 3})
    _assert_same_training(a, b, rtol=0, atol=0)
    c = _fit(corpus, sequence={"method": "spaco", "chunk_size": 12, "keep": 0.5, "seed": 4})
    assert not all(torch.equal(x, y) for x, y in zip(a[1].parameters(), c[1].parameters()))
    assert a[0].strategy.techniques[-1].exact is False


class UserLM(pl.LightningModule):
    """An ordinary module: its own reference model, the loss through causal_lm_loss (the documented way)."""

    def __init__(self):
        super().__init__()
        self.lm = Transformer(get_config("tiny"))

    def training_step(self, batch, batch_idx):
        return causal_lm_loss(self.lm, batch["input_ids"], batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class UserHF(pl.LightningModule):
    """An ordinary module around a bare Hugging Face model called with labels=."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hf = tiny_hf("llama").train()

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"] % 101
        return self.hf(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.parametrize("module_cls", [UserLM, UserHF])
def test_ordinary_modules_the_documented_way(module_cls, corpus):
    plain = _fit(corpus, module=module_cls(), steps=3)
    chunked = _fit(corpus, module=module_cls(), steps=3, sequence={"method": "streambp", "chunk_size": 10})
    _assert_same_training(plain, chunked)
    # teardown restored the Hugging Face forward
    if module_cls is UserHF:
        assert "forward" not in chunked[1].hf.__dict__


def test_hf_path_module(corpus, tmp_path):
    hf = tiny_hf("qwen2")
    hf.resize_token_embeddings(258)  # the byte tokenizer's vocabulary
    hf.save_pretrained(tmp_path / "qwen2")
    make = lambda: CausalLMModule(hf_path=str(tmp_path / "qwen2"), learning_rate=3e-3, warmup_steps=1)  # noqa: E731
    # one of 4224 weights of an up_proj whose gradient is near 0 moves 4e-5 apart under AdamW (measured); gradients
    # themselves are compared exactly in test_exactness.py
    _assert_same_training(_fit(corpus, module=make(), steps=3),
                          _fit(corpus, module=make(), steps=3, sequence={"method": "seco", "chunk_size": 10}),
                          atol=1e-4)


def test_setup_refusals_name_the_fix(corpus):
    from tests.helpers.models import UserModule

    with pytest.raises(MemKitConfigError, match="found no causal LM it can drive in UserModule"):
        _fit(corpus, module=UserModule(), steps=1, sequence="streambp")
    with pytest.raises(MemKitConfigError,
                       match=r"sequence.chunk_size=4096 is longer than Transformer's max_seq_len=512"):
        _fit(corpus, steps=1, sequence={"method": "seco", "chunk_size": 4096})
    with pytest.raises(MemKitConfigError, match="sequence='sparse' is not a known name"):
        MemKitStrategy(sequence="sparse")
    with pytest.raises(MemKitConfigError, match="sequence has unknown key"):
        MemKitStrategy(sequence={"method": "seco", "chunks": 4})


def test_padding_through_an_attention_mask_is_refused_with_the_fix():
    from lightning_memkit.config import SequenceConfig
    from lightning_memkit.sequence.runtime import SequenceRuntime, patch_hf_forward, use_sequence

    hf = tiny_hf("llama")
    patch_hf_forward(hf)
    ids = torch.randint(0, 101, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with use_sequence(SequenceRuntime(SequenceConfig(method="seco", chunk_size=4))):
        with pytest.raises(ValueError, match="pad on the right and mark the padding -100"):
            hf(input_ids=ids, attention_mask=mask, labels=ids)
        out = hf(input_ids=ids, labels=ids)
        assert out.logits is None
    torch.testing.assert_close(out.loss, F.cross_entropy(hf(input_ids=ids).logits[:, :-1].flatten(0, 1),
                                                         ids[:, 1:].flatten()))


def test_positional_arguments_named_by_the_models_own_signature_under_both_wrappers():
    """hf(ids, mask, labels=ids) with the fused loss and the sequence method both on: the positional arguments are
    named by LlamaForCausalLM.forward, not by the fused wrapper's (*args, **kwargs) (which made them 'args')."""
    from lightning_memkit.config import CrossEntropyConfig, SequenceConfig
    from lightning_memkit.loss.causal_lm import patch_hf_causal_lm, use_cross_entropy
    from lightning_memkit.sequence.runtime import SequenceRuntime, patch_hf_forward, use_sequence

    hf = tiny_hf("llama")
    ids = torch.randint(0, 101, (2, 12))
    expected = hf(input_ids=ids, labels=ids).loss
    patch_hf_causal_lm(hf)  # the strategy's order: the fused wrapper inside, the sequence wrapper outside
    patch_hf_forward(hf)
    with use_cross_entropy(CrossEntropyConfig()), use_sequence(SequenceRuntime(SequenceConfig(method="streambp"))):
        for out in (hf(ids, labels=ids), hf(ids, torch.ones_like(ids), labels=ids),
                    hf(ids, torch.ones_like(ids), torch.arange(12)[None], labels=ids)):
            assert out.logits is None
            torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="position_ids other than 0..T-1"):
            hf(input_ids=ids, position_ids=torch.arange(1, 13)[None], labels=ids)
        (loss,) = hf(ids, labels=ids, return_dict=False)  # Hugging Face's tuple without its None fields
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["streambp", "seco"])
def test_bf16_mixed_precision(method, corpus):
    """Lightning's bf16-mixed (autocast in the forward only) trains with the sequence methods."""
    kwargs = dict(trainer_kwargs={"precision": "bf16-mixed"})
    plain = _fit(corpus, steps=3, **kwargs)
    chunked = _fit(corpus, steps=3, sequence={"method": method, "chunk_size": 16}, **kwargs)
    # losses agree to bf16's resolution (gradients under autocast are compared in test_exactness.py)
    torch.testing.assert_close(torch.tensor(chunked[2]), torch.tensor(plain[2]), rtol=2e-2, atol=0)


def test_hf_num_items_in_batch_and_a_fully_masked_micro_batch():
    from lightning_memkit.config import SequenceConfig
    from lightning_memkit.sequence.runtime import SequenceRuntime, patch_hf_forward, use_sequence

    hf = tiny_hf("llama")
    ids = torch.randint(0, 101, (2, 12))
    masked = torch.full_like(ids, -100)
    expected = hf(input_ids=ids, labels=ids, num_items_in_batch=30).loss
    expected_masked = hf(input_ids=ids, labels=masked, num_items_in_batch=7).loss
    patch_hf_forward(hf)
    with use_sequence(SequenceRuntime(SequenceConfig(method="streambp", chunk_size=5))):
        torch.testing.assert_close(hf(input_ids=ids, labels=ids, num_items_in_batch=30).loss, expected)
        got = hf(input_ids=ids, labels=masked, num_items_in_batch=7).loss
        assert float(got) == float(expected_masked) == 0.0  # not NaN: a micro-batch of prompts only


def test_step_in_backward_with_streambp_refuses_a_second_loss_call(corpus):
    class TwoCalls(UserLM):
        def training_step(self, batch, batch_idx):
            half = batch["input_ids"].shape[0] // 2
            a = causal_lm_loss(self.lm, batch["input_ids"][:half], batch["labels"][:half])
            b = causal_lm_loss(self.lm, batch["input_ids"][half:], batch["labels"][half:])
            return a + b

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    with pytest.raises(RuntimeError, match="made a second one"):
        _fit(corpus, module=TwoCalls(), steps=1, optimizer={"name": "adamw", "in_backward": True},
             sequence={"method": "streambp", "chunk_size": 16})
    _fit(corpus, module=TwoCalls(), steps=1, optimizer={"name": "adamw", "in_backward": True},
         sequence={"method": "seco", "chunk_size": 16})


def test_an_unsupported_second_model_is_left_alone(corpus):
    transformers = pytest.importorskip("transformers")

    class WithTeacher(UserLM):
        def __init__(self):
            super().__init__()
            self.teacher = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=50, n_embd=16, n_layer=1, n_head=2))
            self.teacher.requires_grad_(False)

    with pytest.warns(UserWarning,
                      match="leaves these models to ordinary backprop: self.teacher \\(GPT2LMHeadModel\\): .*'gpt2'"):
        _fit(corpus, module=WithTeacher(), steps=1, sequence={"method": "streambp", "chunk_size": 16})
