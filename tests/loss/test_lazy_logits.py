"""Lazy logits: a nanoGPT / litgpt-style module gets the fused loss under ``strategy="memkit"`` with no change.

Every fused run is compared with ``MemKitStrategy(cross_entropy="plain")``: two SGD steps, the losses and the
final weights agree (fp32, chunked implementation on CPU).
"""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_memkit import CrossEntropyConfig, MemKitStrategy
from lightning_memkit.loss import use_cross_entropy
from lightning_memkit.loss.lazy import LazyLogits, find_lm_head_candidates, lazy_counts
from lightning_memkit.loss.technique import FusedCrossEntropyTechnique
from lightning_memkit.memory import LiveBytes

V, D, T, B = 256, 32, 16, 4


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP (nanoGPT's Block, without dropout)."""

    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):  # (B, T, D)
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class NanoGPT(pl.LightningModule):
    """nanoGPT's GPT: embeddings, blocks, final norm, ``lm_head``; the loss as nanoGPT computes it."""

    def __init__(self, vocab: int = V, d: int = D, seq: int = T, tied: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.h = nn.ModuleList([Block(d), Block(d)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=bias)
        if tied:
            self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does
        self.losses = []

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    def loss(self, logits, targets):
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def training_step(self, batch, batch_idx):
        idx, targets = batch
        loss = self.loss(self(idx), targets)
        self.losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, V, (2 * B, T + 1), generator=g)
        targets = data[:, 1:].clone()
        targets[0, :3] = -1
        return torch.utils.data.DataLoader(list(zip(data[:, :-1], targets)), batch_size=B)


class LitGPT(NanoGPT):
    """litgpt's loss: the model predicts ``input_ids`` shifted by one; the last position is sliced off."""

    def training_step(self, batch, batch_idx):
        idx, _ = batch
        logits = self(idx)
        logits = logits[..., :-1, :]
        targets = idx[..., 1:].clone()
        targets[0, :2] = -1
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        self.losses.append(loss.detach().clone())
        return loss


class SmoothedLoss(NanoGPT):
    def loss(self, logits, targets):
        return nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=0.1)(logits.float().flatten(0, 1),
                                                                         targets.flatten())


class SumLoss(NanoGPT):
    def loss(self, logits, targets):
        return F.cross_entropy(logits[:, :-1].contiguous().view(-1, V), targets[:, :-1].reshape(-1),
                               ignore_index=-1, reduction="sum") / 100


class PerTokenLoss(NanoGPT):
    def loss(self, logits, targets):
        per_token = F.cross_entropy(logits.to(torch.float32).reshape(-1, V), targets.reshape(-1), ignore_index=-1,
                                    reduction="none", label_smoothing=0.05)
        return (per_token * torch.linspace(0.5, 1.5, per_token.numel())).mean()


class WithAccuracy(NanoGPT):
    """Also computes accuracy from ``logits.argmax(-1)``: the logits are materialized, once per step."""

    def loss(self, logits, targets):
        self.accuracy = (logits.argmax(-1) == targets).float().mean()
        return super().loss(logits, targets) + 0.1 * logits.softmax(-1)[..., 0].mean()


class Unsupported(NanoGPT):
    """Scales the logits before the loss (a temperature): the loss gets materialized logits, computed plainly."""

    def loss(self, logits, targets):
        return super().loss(logits / 0.7, targets)


def _fit(module_cls, trainer_kwargs, cross_entropy, **kwargs):
    torch.manual_seed(0)
    module = module_cls(**kwargs)
    trainer = pl.Trainer(strategy=MemKitStrategy(cross_entropy=cross_entropy),
                         **{**trainer_kwargs, "max_steps": 2, "limit_val_batches": 0})
    before = lazy_counts()
    trainer.fit(module)
    after = lazy_counts()
    return module, (after[0] - before[0], after[1] - before[1])


CASES = {  # module, kwargs, (materializations, fused losses) over the two steps
    "nanogpt": (NanoGPT, {}, (0, 2)),
    "nanogpt_bias": (NanoGPT, {"bias": True}, (0, 2)),
    "tied": (NanoGPT, {"tied": True}, (0, 2)),
    "litgpt": (LitGPT, {}, (0, 2)),
    "label_smoothing": (SmoothedLoss, {}, (0, 2)),
    "sum": (SumLoss, {}, (0, 2)),
    "none": (PerTokenLoss, {}, (0, 2)),
    "accuracy": (WithAccuracy, {}, (2, 2)),
    "unsupported": (Unsupported, {}, (2, 0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_plain(case, trainer_kwargs):
    module_cls, kwargs, expected_counts = CASES[case]
    plain, _ = _fit(module_cls, trainer_kwargs, "plain", **kwargs)
    ctx = pytest.warns(UserWarning, match="computed its loss without it") if case == "unsupported" else None
    if ctx is None:
        fused, counts = _fit(module_cls, trainer_kwargs, {"impl": "chunked", "chunk_size": 24}, **kwargs)
    else:
        with ctx:
            fused, counts = _fit(module_cls, trainer_kwargs, {"impl": "chunked", "chunk_size": 24}, **kwargs)
    assert counts == expected_counts
    assert len(fused.losses) == len(plain.losses) == 2
    for got, want in zip(fused.losses, plain.losses):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(plain.losses[0], plain.losses[1])  # the first step changed the weights
    plain_params = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p, plain_params[name], rtol=1e-5, atol=1e-6, msg=name)
    assert "forward" not in fused.lm_head.__dict__  # teardown restored the head
    if case == "tied":
        assert fused.wte.weight is fused.lm_head.weight


def test_head_found_named_and_removed():
    torch.manual_seed(0)
    module = NanoGPT()
    assert [name for name, _ in find_lm_head_candidates(module)] == ["lm_head"]
    technique = FusedCrossEntropyTechnique(CrossEntropyConfig(impl="chunked"))
    technique.setup_module(module)
    assert "'lm_head' Linear(32->256)" in technique.describe()
    with use_cross_entropy(technique.config):
        assert isinstance(module(torch.zeros(1, 4, dtype=torch.long)), LazyLogits)
    assert not isinstance(module(torch.zeros(1, 4, dtype=torch.long)), LazyLogits)  # toggle off: plain head
    technique.teardown(module)
    assert "forward" not in module.lm_head.__dict__
    # conservative: no Linear wider than 4x its input (an MLP), or two equally wide ones: nothing is wrapped
    assert find_lm_head_candidates(nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 8))) == []
    assert find_lm_head_candidates(nn.ModuleList([nn.Linear(8, 64), nn.Linear(8, 64)])) == []


def test_lazy_ops_stay_lazy_and_other_uses_materialize_once():
    torch.manual_seed(0)
    head = nn.Linear(8, 50)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    plain = head(hidden)
    technique = FusedCrossEntropyTechnique(CrossEntropyConfig(impl="chunked"))
    technique.setup_module(nn.Sequential(head))
    with use_cross_entropy(technique.config):
        logits = head(hidden)
        for lazy in (logits.view(-1, 50), logits.reshape(10, 50), logits.flatten(0, 1), logits.float(),
                     logits.to(torch.float32), logits.contiguous(), logits[:, :-1], logits[..., 1:, :]):
            assert isinstance(lazy, LazyLogits)
        assert logits.shape == (2, 5, 50) and logits.requires_grad
        before = lazy_counts()[0]
        torch.testing.assert_close(logits.argmax(-1), plain.argmax(-1))
        torch.testing.assert_close(logits[0, :, 3], plain[0, :, 3])  # an int index: materialized
        torch.testing.assert_close(logits.double(), plain.double())
        torch.testing.assert_close(logits.view(torch.int32), plain.view(torch.int32))
        assert not isinstance(logits.view(torch.int32), LazyLogits)  # a view of the bits, not a reshape
        assert lazy_counts()[0] == before + 1  # materialized once, then cached
        g_plain = torch.autograd.grad(plain.softmax(-1)[..., 0].sum(), hidden)[0]
        g_lazy = torch.autograd.grad(logits.softmax(-1)[..., 0].sum(), hidden)[0]
        torch.testing.assert_close(g_lazy, g_plain)
    technique.teardown(nn.Sequential(head))


def test_step_peak_loses_the_logits():
    """vocab 4096, seq 256, batch 4: the fused step's peak is below the plain one by more than the fp32 logits."""
    v, t, b = 4096, 256, 4
    torch.manual_seed(0)
    module = NanoGPT(vocab=v, d=64, seq=t)
    idx = torch.randint(0, v, (b, t))
    technique = FusedCrossEntropyTechnique(CrossEntropyConfig(impl="chunked", chunk_size=128))
    technique.setup_module(module)

    def peak(config):
        module.zero_grad(set_to_none=True)
        with use_cross_entropy(config), LiveBytes() as counted:
            loss = module.loss(module(idx), idx)
            loss.backward()
        return loss.detach(), counted.peak

    plain_loss, plain_peak = peak(None)
    fused_loss, fused_peak = peak(technique.config)
    technique.teardown(module)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    logits_bytes = b * t * v * 4
    print(f"plain peak {plain_peak / 2**20:.1f} MiB, fused peak {fused_peak / 2**20:.1f} MiB, "
          f"logits {logits_bytes / 2**20:.1f} MiB")
    assert plain_peak - fused_peak > logits_bytes


def test_planner_fake_step_sees_the_saving():
    """The planner's fake-tensor step carries the lazy logits too, so its memory estimate is the fused step's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_memkit.planner.auto import fake_weights
    from lightning_memkit.planner.tracker import CategoryTracker

    v, t, b = 4096, 256, 4
    module = NanoGPT(vocab=v, d=64, seq=t)
    technique = FusedCrossEntropyTechnique(CrossEntropyConfig(impl="chunked", chunk_size=128))
    technique.setup_module(module)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    peaks = []
    with fake_weights(module, fake_mode, None, torch.device("cpu")):
        for config in (None, technique.config):
            with fake_mode:
                idx = torch.randint(0, v, (b, t))
            tracker = CategoryTracker(module.parameters(), [module.lm_head])
            with fake_mode, tracker, use_cross_entropy(config):
                module.loss(module(idx), idx).backward()
            module.zero_grad(set_to_none=True)
            peaks.append(tracker.peak)
    technique.teardown(module)
    assert peaks[0] - peaks[1] > b * t * v * 4


def test_bf16_autocast_close_to_plain(trainer_kwargs):
    """Under bf16-mixed autocast the head computes in bf16 as autocast's F.linear does; the loss is fp32."""
    kwargs = {**trainer_kwargs, "precision": "bf16-mixed"}
    plain, _ = _fit(NanoGPT, kwargs, "plain")
    fused, counts = _fit(NanoGPT, kwargs, {"impl": "chunked", "chunk_size": 24})
    assert counts == (0, 2)
    for got, want in zip(fused.losses, plain.losses):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    plain_params = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p, plain_params[name], rtol=1e-2, atol=1e-3, msg=name)


def test_zero3_partitioned_head_stays_plain():
    """A DeepSpeed ZeRO-3 parameter (``ds_id``) is released after the head's forward: the head stays plain."""
    head = nn.Linear(8, 50)
    technique = FusedCrossEntropyTechnique(CrossEntropyConfig(impl="chunked"))
    technique.setup_module(nn.Sequential(head))
    with use_cross_entropy(technique.config):
        assert isinstance(head(torch.randn(2, 8)), LazyLogits)
        head.weight.ds_id = 0
        assert not isinstance(head(torch.randn(2, 8)), LazyLogits)
    technique.teardown(nn.Sequential(head))
