"""The ways users call a Hugging Face causal LM, under every exact technique: the plain run's training.

Each case is a LightningModule around a tiny random-init ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``
(Qwen2's head is tied to its embedding) that calls the model in one form; two SGD steps under each
exact technique must give the losses and final weights of the plain run (``cross_entropy="plain"``,
no other technique). The sequence methods refuse a padded attention mask with a clear message.
"""

from __future__ import annotations

import functools
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_memkit import MemKitStrategy
from tests.models.test_llama import tiny_hf

B, T, PAD = 2, 24, 5

#: technique -> MemKitStrategy arguments (the fused loss is the default, so it is on under the sequence methods)
TECHNIQUES = {
    "fused": {},
    "checkpoint": {"activations": "checkpoint", "cross_entropy": "plain"},
    "streambp": {"sequence": {"method": "streambp", "chunk_size": 10}},
    "seco": {"sequence": {"method": "seco", "chunk_size": 10}},
}
SEQUENCE = ("streambp", "seco")


def _ids() -> torch.Tensor:
    return torch.randint(0, 101, (B, T), generator=torch.Generator().manual_seed(1))


def _padded(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0 right-padded: pad id 0, attention 0, labels -100."""
    ids, mask, labels = ids.clone(), torch.ones_like(ids), ids.clone()
    ids[0, -PAD:], mask[0, -PAD:], labels[0, -PAD:] = 0, 0, -100
    return ids, mask, labels


def _own_loss(m, ids):
    logits = m(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


#: call form -> the step's loss from the model ``m`` and the batch ``ids`` (B, T)
FORMS = {
    "keyword": lambda m, ids: m(input_ids=ids, labels=ids).loss,
    "positional": lambda m, ids: m(ids, labels=ids).loss,
    "positional_mask": lambda m, ids: m(ids, torch.ones_like(ids), labels=ids).loss,  # input_ids, attention_mask
    "attention_mask": lambda m, ids: m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss,
    "position_ids": lambda m, ids: m(input_ids=ids, position_ids=torch.arange(T).expand(B, T), labels=ids).loss,
    "return_dict_false": lambda m, ids: m(input_ids=ids, labels=ids, return_dict=False)[0],
    "num_items_in_batch": lambda m, ids: m(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(37)).loss,
    "logits_to_keep": lambda m, ids: m(input_ids=ids, labels=ids, logits_to_keep=T).loss,  # all positions
    "padded": lambda m, ids: (lambda i, a, lab: m(input_ids=i, attention_mask=a, labels=lab).loss)(*_padded(ids)),
    "own_loss": _own_loss,  # the module computes the loss from outputs.logits
}


def _lora(hf):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(hf, config)  # everything but the adapters frozen, the head included


#: what is frozen -> the model to train (Qwen2's head is its embedding: freezing one freezes both)
FROZEN = {
    "none": lambda hf: hf,
    "head": lambda hf: hf.lm_head.requires_grad_(False) and hf,
    "embeddings": lambda hf: hf.model.embed_tokens.requires_grad_(False) and hf,
    "lora": _lora,
}


class CallForm(pl.LightningModule):
    def __init__(self, family: str, form: str, frozen: str = "none") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hf = FROZEN[frozen](tiny_hf(family).train())
        self.form = form

    def training_step(self, batch, batch_idx):
        return FORMS[self.form](self.hf, batch)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader([_ids()[0], _ids()[1]] * 2, batch_size=B)


def _fit(module: CallForm, **strategy) -> tuple[list[float], dict[str, torch.Tensor], list[str]]:
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        strategy=MemKitStrategy(**strategy), accelerator="cpu", devices=1, max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    lines = [str(w.message) for w in caught if "computed its loss without it" in str(w.message)]
    return losses, {n: p.detach().clone() for n, p in module.named_parameters()}, lines


def _assert_same(plain, got, what):
    (la, wa, _), (lb, wb, _) = plain, got
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
    for name, w in wa.items():  # atol: rounding-level gradient noise on weights whose exact gradient is ~0
        torch.testing.assert_close(wb[name], w, rtol=2e-4, atol=1e-5, msg=lambda m: f"{what} {name}: {m}")


CASES = [(form, "none") for form in FORMS] + [("keyword", "head"), ("positional", "head"), ("keyword", "embeddings"),
                                              ("keyword", "lora"), ("positional", "lora")]
@functools.lru_cache(maxsize=None)
def _plain(family: str, form: str, frozen: str):
    out = _fit(CallForm(family, form, frozen), cross_entropy="plain")
    assert out[0] and not out[2]
    return out


def _params():
    for family in ("llama", "qwen2"):
        for form, frozen in CASES:
            for technique in TECHNIQUES:
                yield pytest.param(family, form, frozen, technique, id=f"{technique}-{form}-frozen_{frozen}-{family}")


@pytest.mark.parametrize("family,form,frozen,technique", list(_params()))
def test_exact_technique_trains_as_the_plain_run(family, form, frozen, technique):
    plain = _plain(family, form, frozen)
    module = CallForm(family, form, frozen)
    if form == "padded" and technique in SEQUENCE:
        with pytest.raises(ValueError, match="attention_mask with padding.*pad on the right"):
            _fit(module, **TECHNIQUES[technique])
        return
    got = _fit(module, **TECHNIQUES[technique])
    _assert_same(plain, got, f"{technique}/{form}/frozen {frozen}")
    fused_lines = [line for line in got[2] if "cross_entropy='fused'" in line]
    sequence_lines = [line for line in got[2] if "sequence=" in line]
    # a loss computed from outputs.logits: the fused loss (and the sequence method) step aside, each saying so once;
    # return_dict=False: the fused loss keeps Hugging Face's tuple (logits included) and says so; the sequence
    # methods return (loss,)
    steps_aside = form == "own_loss" or (form == "return_dict_false" and technique == "fused")
    assert len(fused_lines) == (steps_aside and technique != "checkpoint"), got[2]
    assert len(sequence_lines) == (form == "own_loss" and technique in SEQUENCE), got[2]
    assert len(got[2]) == len(fused_lines) + len(sequence_lines)
