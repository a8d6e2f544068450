"""Frozen parameters (``requires_grad=False``) under every memkit optimizer and the step in backward.

Cases: a frozen LM head, frozen embeddings, a frozen first block, and a PEFT LoRA model (a tiny random
Hugging Face Llama, LoRA r=4 on q_proj / v_proj: everything but the LoRA factors frozen). Each is trained
for 2 steps twice: once with the frozen parameters in the optimizer's group (``AdamW(self.parameters())``,
what a user often writes) and once with them absent. The trainable parameters must come out equal bit for
bit, the frozen ones unchanged bit for bit, with no optimizer state and no gradient hook, and never chosen
for the low-rank rule; PEFT's LoRA factors, low-rank already, stay on AdamW unless ``target_modules`` names
them. The ZeRO-2/3 cases are in tests/test_zero_frozen.py.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_memkit import MemKitConfigError, MemKitStrategy
from lightning_memkit.config import OPTIMIZER_NAMES
from lightning_memkit.module import CausalLMModule
from lightning_memkit.optim import AdamW, Apollo, Frugal, GaLoreAdamW, StepInBackward

CASES = ("lm_head", "embeddings", "first_block", "lora")
#: optimizers with a per-parameter update (step in backward drives those)
IN_BACKWARD = ("adamw", "galore_adamw", "galore_adamw8bit", "apollo", "apollo_mini", "frugal", "spam", "sgd_sai",
               "cosmos", "natural_galore", "natural_galore8bit")
LOW_RANK = ("galore_adamw", "galore_adamw8bit", "apollo", "apollo_mini", "frugal", "cosmos", "natural_galore",
            "natural_galore8bit")
#: zeroth-order optimizers: the step perturbs the trainable tensors in place and evaluates the loss forward-only
FORWARD_ONLY = ("zo_sgd", "zo_adam")
VOCAB = 101


class Module(CausalLMModule):
    """The reference module with one AdamW group: over every parameter, or over the trainable ones only."""

    def __init__(self, include_frozen: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.include_frozen = include_frozen

    def configure_optimizers(self):
        params = [p for p in self.parameters() if self.include_frozen or p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def lora_llama(**lora):
    """A tiny random-init Hugging Face Llama with PEFT LoRA (r=4) on q_proj and v_proj, modified in place."""
    peft = pytest.importorskip("peft")
    from tests.models.test_llama import tiny_hf

    hf = tiny_hf("llama").train()
    peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **lora))
    return hf


def build(case: str, include_frozen: bool, hf=None) -> Module:
    """The module of ``case``; ``"lora"``: over ``hf`` (a PEFT model made in place), default :func:`lora_llama`."""
    pl.seed_everything(0, verbose=False)
    module = Module(include_frozen, model="tiny", vocab_size=VOCAB)
    if case == "lora":
        from lightning_memkit.models.hf import HFCausalLM

        module.model = HFCausalLM(lora_llama() if hf is None else hf)
        return module
    frozen = {"lm_head": module.model.lm_head, "embeddings": module.model.embed_tokens,
              "first_block": module.model.blocks[0]}[case]
    frozen.requires_grad_(False)
    return module


class Watch(pl.Callback):
    """After each backward: which frozen parameters carry a gradient or a gradient hook."""

    def __init__(self) -> None:
        self.bad: list[str] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        for name, p in pl_module.named_parameters():
            if not p.requires_grad and (p.grad is not None or getattr(p, "_post_accumulate_grad_hooks", None)):
                self.bad.append(name)


def setting(name: str, **extra):
    if name == "none":
        return None
    return {"name": name, **({"rank": 8} if name in LOW_RANK else {}), **extra}


def fit(case: str, optimizer, include_frozen: bool = True, steps: int = 2, hf=None):
    module = build(case, include_frozen, hf)
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 17), generator=g)
    data = [{"input_ids": row[:-1], "labels": row[1:]} for row in ids]
    watch = Watch()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[watch], strategy=MemKitStrategy(optimizer=optimizer))
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert not watch.bad, f"frozen parameters with a gradient or a hook: {watch.bad[:4]}"
    return trainer, module, initial


def inner(optimizer):
    return optimizer.optimizer if isinstance(optimizer, StepInBackward) else optimizer


_RUNS: dict = {}


def cached_fit(case: str, name: str, include_frozen: bool):
    key = (case, name, include_frozen)
    if key not in _RUNS:
        trainer, module, initial = fit(case, setting(name), include_frozen)
        technique = next((t for t in trainer.strategy.techniques if t.name == "optimizer"), None)
        _RUNS[key] = {
            "initial": initial, "final": {n: p.detach().clone() for n, p in module.named_parameters()},
            "frozen": {n for n, p in module.named_parameters() if not p.requires_grad},
            "state_names": {module_name(module, p) for p in inner(trainer.optimizers[0]).state},
            "lowrank": technique.lowrank_names if technique else [],
            "line": technique.describe() if technique else "",
        }
    return _RUNS[key]


def module_name(module, p) -> str:
    return next(n for n, q in module.named_parameters() if q is p)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_frozen_parameters_in_the_optimizer_change_nothing(name, case):
    """Every optimizer: the frozen parameters in the group take no step and keep no state; the trainable ones
    train exactly as with the frozen ones absent from the optimizer."""
    held, absent = cached_fit(case, name, True), cached_fit(case, name, False)
    frozen = held["frozen"]
    assert frozen and len(frozen) < len(held["final"])
    for run in (held, absent):
        for n in frozen:
            assert torch.equal(run["final"][n], run["initial"][n]), f"{n} (frozen) changed"
        assert not frozen & run["state_names"], f"optimizer state for frozen {sorted(frozen & run['state_names'])[:3]}"
        assert not frozen & set(run["lowrank"]), "a frozen weight was chosen for the low-rank rule"
        assert not any(".lora_" in n for n in run["lowrank"]), "LoRA factors were given the low-rank rule"
    trainable = [n for n in held["final"] if n not in frozen]
    assert all(not torch.equal(held["final"][n], held["initial"][n]) for n in trainable)
    for n in trainable:
        assert torch.equal(held["final"][n], absent["final"][n]), f"{name}/{case}: {n} differs"
    if name != "none":
        assert held["line"].startswith(f"optimizer {name}: {len(trainable)} trainable tensors ({len(frozen)} frozen")
    if name in FORWARD_ONLY:
        assert held["lowrank"] == [] and "zeroth-order" in held["line"]


class FrozenProbe(Module):
    """Checks, at every loss evaluation of the step, that the frozen parameters hold their initial values (a
    zeroth-order step evaluates the loss with the trainable parameters perturbed in place)."""

    def training_step(self, batch, batch_idx):
        for n, p in self.named_parameters():
            if not p.requires_grad:
                self.evaluations_seen_moved += not torch.equal(p, self.initial_frozen[n])
        self.evaluations += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("case", ["first_block", "lora"])
@pytest.mark.parametrize("name", FORWARD_ONLY)
def test_zeroth_order_never_perturbs_a_frozen_parameter(name, case):
    """Frozen parameters in the group are neither perturbed (checked at each of the step's forward passes) nor
    updated, and hold no state; the trainable ones moved. Blockwise too (the frozen block is not a block)."""
    module = build(case, True)
    probe = FrozenProbe(True, model="tiny", vocab_size=VOCAB)
    probe.model = module.model
    probe.initial_frozen = {n: p.detach().clone() for n, p in probe.named_parameters() if not p.requires_grad}
    probe.evaluations, probe.evaluations_seen_moved = 0, 0
    before = {n: p.detach().clone() for n, p in probe.named_parameters()}
    ids = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row[:-1], "labels": row[1:]} for row in ids]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0,
                         strategy=MemKitStrategy(optimizer={"name": name, "blockwise": True, "n_perturbations": 2}))
    trainer.fit(probe, DataLoader(data, batch_size=2))
    optimizer = inner(trainer.optimizers[0])
    blocks = len(optimizer.blocks())
    assert probe.evaluations == 2 * 2 * 2 * blocks and probe.evaluations_seen_moved == 0
    for n, p in probe.named_parameters():
        assert p.grad is None, n
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]) and p not in optimizer.state, n


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", IN_BACKWARD)
def test_step_in_backward_with_frozen_parameters(name, case):
    """The step in backward hooks no frozen parameter (checked after each backward), keeps no state for them, and
    gives the ordinary step's parameters bit for bit."""
    trainer, module, initial = fit(case, setting(name, in_backward=True))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, StepInBackward)
    plain = cached_fit(case, name, False)
    for n, p in module.named_parameters():
        assert torch.equal(p, plain["final"][n]), f"{name}/{case}: {n} differs from the ordinary step"
        if not p.requires_grad:
            assert torch.equal(p, initial[n]) and p not in optimizer.state, n


# ----- PEFT LoRA: the setup line, target_modules ---------------------------------------------------------
def test_lora_factors_stay_on_adamw_and_the_setup_line_counts_what_the_optimizer_holds():
    """Finding 4 of issue 16: GaLore over a LoRA model counted the frozen base weights as low-rank (and gave the
    LoRA factors, r=4, the low-rank rule: rank 8 did not even fit them). Now the optimizer holds the 8 LoRA
    factors, none low-rank, and trains them exactly as AdamW."""
    galore = cached_fit("lora", "galore_adamw", True)
    adamw = cached_fit("lora", "adamw", True)
    n_frozen = len(galore["frozen"])
    assert galore["lowrank"] == []
    assert galore["line"] == (f"optimizer galore_adamw: 8 trainable tensors ({n_frozen} frozen left out), 0 low-rank; "
                              "8 LoRA factors (lora_A/lora_B) are low-rank already and are updated by AdamW (name "
                              "them in optimizer.target_modules to change that)")
    for n, value in galore["final"].items():
        assert torch.equal(value, adamw["final"][n]), n


def test_target_modules_naming_the_lora_factors_is_honoured():
    setting = {"name": "galore_adamw", "rank": 2, "target_modules": ["*.lora_A.*", "*.lora_B.*"]}
    trainer, module, _ = fit("lora", setting)
    technique = trainer.strategy.techniques[-1]
    names = technique.lowrank_names
    assert len(names) == 8 and all(".lora_A." in n or ".lora_B." in n for n in names)
    optimizer = trainer.optimizers[0]
    assert sum(optimizer.is_lowrank(p) for p in module.parameters()) == 8
    assert ", 8 low-rank" in technique.describe() and "LoRA factors" not in technique.describe()


def test_a_pattern_that_matches_only_frozen_weights_is_refused():
    with pytest.raises(MemKitConfigError, match=r"pattern '\*.q_proj' matches only frozen weights.*"
                                                r"Fix: name trainable modules \(the LoRA factors of this PEFT model, "
                                                r"\['\*.lora_A.\*', '\*.lora_B.\*'\]"):
        fit("lora", {"name": "apollo", "rank": 2, "target_modules": ["*.q_proj"]}, steps=1)


def test_lora_embedding_factors_are_candidates_for_target_modules():
    """PEFT keeps an embedding's LoRA factors in parameter dicts (no module with a weight): the default leaves
    them dense, a pattern naming them makes them low-rank."""
    from lightning_memkit.optim.convert import lora_weights, select_lowrank

    peft = pytest.importorskip("peft")
    from tests.models.test_llama import tiny_hf

    hf = tiny_hf("llama")
    peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    lora = lora_weights(hf)
    assert any("lora_embedding_A" in n for n in lora.values()) and len(lora) == 6
    assert select_lowrank(hf, None) == {}
    chosen = select_lowrank(hf, ("*.lora_embedding_*",))
    assert sorted(chosen.values()) == ["model.embed_tokens.lora_embedding_A.default",
                                       "model.embed_tokens.lora_embedding_B.default"]


# ----- the optimizers themselves ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Apollo, Frugal])
def test_frozen_parameters_in_a_group_change_no_random_basis(cls):
    """APOLLO / FRUGAL seed each weight's random basis from its index: frozen parameters in the groups are
    numbered apart, so the trainable ones train exactly as in an optimizer without them."""
    torch.manual_seed(0)
    frozen, w = torch.nn.Parameter(torch.randn(6, 6), requires_grad=False), torch.nn.Parameter(torch.randn(8, 6))
    w2 = torch.nn.Parameter(w.detach().clone())
    with_frozen = cls([frozen, w], lr=0.1, rank=2, lowrank_params=[w])
    alone = cls([w2], lr=0.1, rank=2, lowrank_params=[w2])
    for step in range(3):
        grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        w.grad, w2.grad = grad.clone(), grad.clone()
        with_frozen.step()
        alone.step()
    assert torch.equal(w, w2)
    assert frozen not in with_frozen.state and "(frozen)" in with_frozen.param_name(frozen)


def test_the_setup_line_says_when_the_optimizer_holds_fewer_than_the_trainable_tensors():
    from lightning_memkit.config import OptimizerConfig
    from lightning_memkit.optim.technique import OptimizerTechnique

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    model.memkit_blocks = lambda: [model[0], model[1]]
    technique = OptimizerTechnique(OptimizerConfig(name="galore_adamw", rank=2))
    technique.setup_module(model)
    assert technique.describe() == "optimizer galore_adamw: 4 trainable tensors, 2 low-rank"
    [converted] = technique.setup_optimizers([torch.optim.AdamW([model[0].weight, model[0].bias], lr=0.1)])
    assert isinstance(converted, GaLoreAdamW) and converted.is_lowrank(model[0].weight)
    assert technique.describe() == "optimizer galore_adamw: 2 trainable tensors, 1 low-rank"


def test_adamw_over_frozen_and_trainable_parameters_equals_torch():
    """memkit's AdamW with a frozen parameter in the group: torch's update for the others, no state for it."""
    torch.manual_seed(0)
    frozen, w = torch.nn.Parameter(torch.randn(5), requires_grad=False), torch.nn.Parameter(torch.randn(4, 3))
    ref = torch.nn.Parameter(w.detach().clone())
    ours, theirs = AdamW([frozen, w], lr=0.1, weight_decay=0.1), torch.optim.AdamW([ref], lr=0.1, weight_decay=0.1,
                                                                                   foreach=False)
    before = frozen.clone()
    for _ in range(2):
        w.grad, ref.grad = torch.ones(4, 3), torch.ones(4, 3)
        ours.step()
        theirs.step()
    assert torch.equal(w, ref) and torch.equal(frozen, before) and frozen not in ours.state


# ----- QLoRA: LoRA over a 4-bit (bitsandbytes NF4) base, on the CPU ----------------------------------------
def qlora_llama(folder):
    """A tiny Llama loaded as QLoRA users load one: 4-bit NF4 linear layers in the blocks (bitsandbytes' CPU
    support), PEFT LoRA r=4 on q_proj / v_proj. Layer widths are multiples of 32: bitsandbytes repacks a 4-bit
    weight for its CPU inference kernel in eval mode, which needs that."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map="cpu",
                                                           dtype=torch.float32)
    peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return hf.train()


@pytest.mark.parametrize("optimizer", [{"name": "adamw8bit"}, {"name": "galore_adamw", "rank": 2},
                                       {"name": "galore_adamw", "rank": 2, "target_modules": ["*"]}])
def test_qlora_trains_the_lora_factors_and_never_picks_a_4bit_weight(optimizer, tmp_path):
    """The frozen 4-bit weights (uint8, shape (m*n/2, 1): 2-D, so the old selection took them for low-rank, where
    no rank fits) stay bit for bit; even ``target_modules=['*']`` picks only the LoRA factors."""
    hf = qlora_llama(tmp_path / "llama")
    four_bit = {n for n, p in hf.named_parameters() if p.dtype == torch.uint8}
    assert len(four_bit) == 14
    trainer, module, initial = fit("lora", optimizer, hf=hf)
    technique = trainer.strategy.techniques[-1]
    lora = [n for n, p in module.named_parameters() if p.requires_grad]
    assert len(lora) == 8 and all(".lora_" in n for n in lora)
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, initial[n]), n
        else:
            assert torch.equal(p, initial[n]), f"{n} (frozen) changed"
    expected = [n for n in lora if ".lora_" in n] if "target_modules" in optimizer else []
    assert sorted(technique.lowrank_names) == sorted(expected)
    assert not {f"model.hf.{n}" for n in four_bit} & set(technique.lowrank_names)



@pytest.mark.parametrize("name", ["galore_adamw", "apollo_mini", "frugal"])
def test_gpt2_conv1d_weights_get_the_low_rank_rule(name, tmp_path):
    """GPT-2's blocks are built of Hugging Face's Conv1D (the weight stored (in, out)): by default the low-rank
    optimizers take them as they take nn.Linear layers (before, GPT-2 was refused: no nn.Linear in its blocks)."""
    transformers = pytest.importorskip("transformers")
    import lightning.pytorch as pl

    from lightning_memkit import MemKitStrategy

    config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)

    class GPT2Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = transformers.GPT2LMHeadModel(config)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    module = GPT2Module()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    data = torch.utils.data.DataLoader(torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)),
                                       batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MemKitStrategy(optimizer={"name": name, "rank": 4}),
                         max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, data)
    technique = trainer.strategy.techniques[-1]
    chosen = technique.lowrank_names
    # 4 Conv1D layers per block (c_attn, c_proj, mlp.c_fc, mlp.c_proj), 2 blocks; embeddings and head stay dense
    assert len(chosen) == 8 and all(n.startswith("model.transformer.h.") for n in chosen), chosen
    for n, p in module.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[n]), n
