"""Conformance matrix: every technique × every Hugging Face family in the table × what is frozen.

Each case is a LightningModule around one of the ten families built tiny from its config
(``tests/loss/test_families.py``), called positionally as users do (``self.hf(ids, labels=ids).loss``),
trained two steps under one technique and compared with the plain run (``MemKitStrategy(cross_entropy="plain")``,
no technique): exact techniques give the plain run's losses (rtol 1e-5) and weights (rtol 2e-4, atol 1e-5);
8-bit saved activations stay within the tolerances measured here (``APPROX``); the sequence methods either
train as the plain run (families whose table entry has a sequence adapter) or are refused at setup with a
message naming the family and the fix. SpaCO with ``keep=1.0`` back-propagates every chunk: it is SeCO,
bit for bit. Every case also checks that its technique acted (fused losses counted, blocks wrapped, chunks
driven, the optimizer stepped in backward), so that none can pass by doing nothing.

Frozen variants: none, the LM head, the input embedding, the first block, and PEFT LoRA on the attention
projections. Tied families (Gemma 2, Gemma 3, GPT-2: the head's weight is the embedding) freeze both
together in "head" and "embeddings"; the tiny Qwen2 here is untied (``tie_word_embeddings`` defaults false).
"""

from __future__ import annotations

import functools
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_memkit import MemKitConfigError, MemKitStrategy
from lightning_memkit.loss.causal_lm import fused_call_count
from lightning_memkit.models.families import HF_FAMILIES
from lightning_memkit.optim import StepInBackward
from tests.loss.test_families import CONFIGS, V, tiny

B, T = 2, 24  # T within every tiny config's max_position_embeddings (64) and Gemma's sliding window
FAMILIES = sorted(CONFIGS)
CHUNK = 10  # does not divide T: the last chunk is shorter

#: technique -> MemKitStrategy arguments. The activation techniques and step in backward run with the plain loss
#: so that each row measures one technique (the fused loss is the default, hence on under the sequence methods).
#: min_numel=1: the tiny blocks' tensors (B*T*32 values) are below the default 4096, which would compress nothing.
TECHNIQUES = {
    "fused": {},
    "checkpoint": {"activations": "checkpoint", "cross_entropy": "plain"},
    "offload": {"activations": {"offload": True, "min_numel": 1}, "cross_entropy": "plain"},
    "int8": {"activations": {"compress": "int8", "min_numel": 1}, "cross_entropy": "plain"},
    "fp8": {"activations": {"compress": "fp8", "min_numel": 1}, "cross_entropy": "plain"},
    "in_backward": {"optimizer": {"name": "adamw", "in_backward": True}, "cross_entropy": "plain"},
    "streambp": {"sequence": {"method": "streambp", "chunk_size": CHUNK}},
    "seco": {"sequence": {"method": "seco", "chunk_size": CHUNK}},
    "spaco": {"sequence": {"method": "spaco", "chunk_size": CHUNK, "keep": 1.0}},
}
SEQUENCE = ("streambp", "seco", "spaco")
APPROXIMATE = ("int8", "fp8")
EXACT = tuple(t for t in TECHNIQUES if t not in APPROXIMATE)
#: approximate technique -> (max relative loss difference, weight rtol, weight atol) allowed. Measured over the whole
#: matrix (printed with -s; SGD lr 0.2, 2 steps): max relative loss difference int8 3.8e-5, fp8 8.8e-5 (Gemma 2/3,
#: Qwen3 largest; the first step's loss is exact), max absolute weight difference int8 1.2e-3, fp8 4.5e-3. The
#: bounds allow about 4x.
APPROX = {"int8": (1.5e-4, 0.0, 5e-3), "fp8": (4e-4, 0.0, 2e-2)}

#: LoRA's targets per family (the attention projections); the default is Llama's q_proj / v_proj
LORA_TARGETS = {"phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"]}


def sequence_supported(model_type: str) -> bool:
    """Whether the sequence methods drive this family (its table entry has a block layout)."""
    return HF_FAMILIES[model_type].sequence is not None


def _parts(hf):
    family = HF_FAMILIES[hf.config.model_type]
    return family.head(hf), family.part(hf, "embed"), family.part(hf, "blocks")


def _lora(hf):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    model_type = hf.config.model_type
    config = peft.LoraConfig(r=4, target_modules=LORA_TARGETS.get(model_type, ["q_proj", "v_proj"]),
                             init_lora_weights=False, fan_in_fan_out=model_type == "gpt2")  # GPT-2's Conv1D
    return peft.get_peft_model(hf, config)  # everything but the adapters frozen, the head included


#: what is frozen -> the model to train
FROZEN = {
    "none": lambda hf: hf,
    "head": lambda hf: _parts(hf)[0].requires_grad_(False) and hf,
    "embeddings": lambda hf: _parts(hf)[1].requires_grad_(False) and hf,
    "block": lambda hf: _parts(hf)[2][0].requires_grad_(False) and hf,
    "lora": _lora,
}


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (2 * B, T), generator=torch.Generator().manual_seed(1))


class Conformance(pl.LightningModule):
    """A Hugging Face family called positionally; SGD (or torch AdamW, which step in backward converts)."""

    def __init__(self, family: str, frozen: str, optimizer: str = "sgd") -> None:
        super().__init__()
        self.hf = FROZEN[frozen](tiny(family).train())
        self.optimizer = optimizer
        n_frozen = sum(not p.requires_grad for p in self.parameters())
        assert (n_frozen > 0) == (frozen != "none"), (family, frozen)

    def training_step(self, batch, batch_idx):
        return self.hf(batch, labels=batch).loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=1e-3)
        return torch.optim.SGD(params, lr=0.2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_ids(), batch_size=B)


def _optimizer(technique: str) -> str:
    return "adamw" if technique == "in_backward" else "sgd"


def _fit(family: str, frozen: str, module_optimizer: str, **strategy) -> dict:
    """Two steps; the losses, the final weights, and what shows that the technique acted."""
    module = Conformance(family, frozen, module_optimizer)
    out: dict = {"losses": []}

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            out["describe"] = "; ".join(t.describe() for t in trainer.strategy.techniques)
            out["optimizer"] = type(trainer.strategy.optimizers[0])  # the type: keep no module alive

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            out["losses"].append(float(outputs["loss"]))

    trainer = pl.Trainer(
        strategy=MemKitStrategy(**strategy), accelerator="cpu", devices=1, max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
    )
    before = fused_call_count()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    out["fused_calls"] = fused_call_count() - before
    out["warnings"] = [str(w.message) for w in caught]
    out["weights"] = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert len(out["losses"]) == 2
    return out


@functools.lru_cache(maxsize=None)
def _plain(family: str, frozen: str, module_optimizer: str) -> dict:
    out = _fit(family, frozen, module_optimizer, cross_entropy="plain")
    assert out["fused_calls"] == 0
    return out


@functools.lru_cache(maxsize=None)
def _run(family: str, frozen: str, technique: str) -> dict:
    return _fit(family, frozen, _optimizer(technique), **TECHNIQUES[technique])


def _assert_acted(technique: str, got: dict) -> None:
    """The technique did something (so that equality with the plain run is not vacuous)."""
    desc = got["describe"]
    if technique == "fused" or technique in SEQUENCE:
        assert got["fused_calls"] == 2, (technique, got["fused_calls"], desc)
    if technique == "checkpoint":
        assert "activation checkpointing of every block (2 blocks)" in desc, desc
    if technique == "offload":
        assert "offloaded to host memory (2 modules)" in desc, desc
        # on a CPU there is no host memory to offload to: the setting stays on, said once, and changes nothing
        assert sum("activations.offload" in w and "not a GPU" in w for w in got["warnings"]) == 1, got["warnings"]
    if technique in APPROXIMATE:
        assert f"{technique} saved activations (2 modules)" in desc, desc
    if technique == "in_backward":
        assert issubclass(got["optimizer"], StepInBackward), got["optimizer"]
    if technique in SEQUENCE:
        assert "1 model(s)" in desc, desc


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _params(techniques, frozen_variants=None):
    for technique in techniques:
        for family in FAMILIES:
            for frozen in frozen_variants or FROZEN:
                yield pytest.param(technique, family, frozen, id=f"{technique}-{family}-frozen_{frozen}")


def _exact_params():
    for param in _params(EXACT):
        technique, family, _ = param.values
        if technique not in SEQUENCE or sequence_supported(family):
            yield param


@pytest.mark.parametrize("technique,family,frozen", list(_exact_params()))
def test_exact_technique_trains_as_the_plain_run(technique, family, frozen):
    plain, got = _plain(family, frozen, _optimizer(technique)), _run(family, frozen, technique)
    _assert_acted(technique, got)
    what = f"{technique}/{family}/frozen {frozen}"
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=0,
                               msg=lambda m: f"{what}: {m}")
    assert got["weights"].keys() == plain["weights"].keys()
    for name, w in plain["weights"].items():  # atol: rounding-level noise on weights whose exact gradient is ~0
        torch.testing.assert_close(got["weights"][name], w, rtol=2e-4, atol=1e-5, msg=lambda m: f"{what} {name}: {m}")
    if technique == "spaco":  # keep=1.0: every chunk back-propagated with weight 1/keep = 1, i.e. SeCO exactly
        seco = _run(family, frozen, "seco")
        assert got["losses"] == seco["losses"], what
        for name, w in seco["weights"].items():
            assert torch.equal(got["weights"][name], w), f"{what} {name}"


@pytest.mark.parametrize("technique,family,frozen", list(_params(APPROXIMATE)))
def test_compressed_activations_train_close_to_the_plain_run(technique, family, frozen, record_property):
    plain, got = _plain(family, frozen, "sgd"), _run(family, frozen, technique)
    _assert_acted(technique, got)
    loss_tol, rtol, atol = APPROX[technique]
    rel = _max_rel(got["losses"], plain["losses"])
    weight = max(float((got["weights"][n] - w).abs().max()) for n, w in plain["weights"].items())
    record_property("max_rel_loss_diff", rel)
    record_property("max_abs_weight_diff", weight)
    print(f"\n{technique} {family} frozen={frozen}: max rel loss diff {rel:.2e}, max abs weight diff {weight:.2e}")
    assert got["losses"][0] == pytest.approx(plain["losses"][0], rel=1e-5)  # the forward is exact; the backward is not
    assert rel <= loss_tol, f"{technique}/{family}/frozen {frozen}: max rel loss diff {rel:.2e} > {loss_tol:.0e}"
    assert any(not torch.equal(got["weights"][n], w) for n, w in plain["weights"].items()), "nothing was compressed"
    for name, w in plain["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{technique}/{family}/frozen {frozen} {name}: {m}")


def _refused_params():
    for param in _params(SEQUENCE, ("none", "lora")):
        if not sequence_supported(param.values[1]):
            yield param


@pytest.mark.parametrize("technique,family,frozen", list(_refused_params()))
def test_sequence_method_refuses_an_unsupported_family_at_setup(technique, family, frozen):
    with pytest.raises(MemKitConfigError) as err:
        _fit(family, frozen, "sgd", **TECHNIQUES[technique])
    message = str(err.value)
    assert repr(family) in message and "Fix:" in message, message


def test_every_family_and_technique_is_in_the_matrix():
    assert sorted(FAMILIES) == sorted(HF_FAMILIES)
    for family in FAMILIES:  # the sequences fit every model and its sliding window (the chunks cover T unevenly)
        config = tiny(family).config
        assert T <= config.max_position_embeddings, family  # GPT-2: n_positions, by its attribute map
        assert T <= (getattr(config, "sliding_window", None) or T), family
    assert T % CHUNK != 0 and CHUNK < T
    covered = {(p.values[0], p.values[1]) for gen in (_exact_params(), _params(APPROXIMATE), _refused_params())
               for p in gen}
    assert covered == {(t, f) for t in TECHNIQUES for f in FAMILIES}
