"""sequence.offload: StreamBP's block inputs wait in host memory; gradients equal the non-offloaded run bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_memkit import MemKitConfigError
from lightning_memkit.config import CrossEntropyConfig, SequenceConfig, parse_sequence
from lightning_memkit.models.llama import Transformer, get_config
from lightning_memkit.sequence import get_adapter, sequence_loss
from lightning_memkit.sequence.core import direct_call
from lightning_memkit.sequence.loss import _loss_fn
from lightning_memkit.sequence.offload import BlockStore
from lightning_memkit.sequence.streambp import StreamBP
from tests.models.test_llama import tiny_hf
from tests.sequence.test_exactness import _batch, _chunked
from tests.sequence.test_strategy_sequence import _assert_same_training, _fit, corpus  # noqa: F401


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(get_config("tiny", n_layers=3))


def _assert_equal(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name


@pytest.mark.parametrize("fused", [False, True])
def test_offloaded_gradients_equal_the_kept_ones_bit_for_bit(fused, model):
    ids, labels = _batch(model.vocab_size, t=40)
    ce = CrossEntropyConfig(impl="chunked") if fused else None
    kept = _chunked(model, ids, labels, method="streambp", chunk_size=16, cross_entropy=ce)
    offloaded = _chunked(model, ids, labels, method="streambp", chunk_size=16, cross_entropy=ce, offload=True)
    _assert_equal(offloaded, kept)


def test_frozen_head_and_early_gradients_with_offload():
    """A frozen head (LoRA-style) and the step-in-backward hand-over give the same result with and without offload."""
    from lightning_memkit.optim import AdamW, StepInBackward

    ids, labels = _batch(101, t=30)
    runs = []
    for offload in (False, True):
        torch.manual_seed(0)
        hf = tiny_hf("llama").train()
        hf.get_submodule("lm_head").requires_grad_(False)
        runs.append(_chunked(hf, ids, labels, method="streambp", chunk_size=8, offload=offload))
    _assert_equal(runs[1], runs[0])
    weights = []
    for offload in (False, True):
        torch.manual_seed(0)
        m = Transformer(get_config("tiny", n_layers=3))
        opt = StepInBackward(AdamW(m.parameters(), lr=1e-3))
        opt.step(lambda: sequence_loss(m, ids % m.vocab_size, labels, method="streambp", chunk_size=8,
                                       early_gradients=True, offload=offload).backward())
        weights.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def _step(model, ids, labels, offload):
    """One StreamBP step driven by hand; returns the method (its store keeps the byte counts)."""
    ad = get_adapter(model)
    sb = StreamBP(ad, ids, labels, 8, _loss_fn(ad, None, -100), direct_call, offload=offload)
    with torch.no_grad():  # as sequence_loss runs it (inside an autograd Function's forward)
        sb.forward()
    with torch.enable_grad():
        sb.backward(torch.tensor(1.0))
    return sb


def test_device_pool_holds_two_blocks_inputs_not_all_of_them():
    torch.manual_seed(0)
    n_layers = 6
    model = Transformer(get_config("tiny", n_layers=n_layers))
    ids, labels = _batch(model.vocab_size, t=32, pad=0)
    one = ids.shape[0] * ids.shape[1] * model.blocks[0].attn_norm.weight.shape[0] * 4  # B x T x D x fp32
    kept = _step(model, ids, labels, offload=False).store
    model.zero_grad(set_to_none=True)
    off = _step(model, ids, labels, offload=True).store
    assert kept.peak_nbytes("device") == n_layers * one and kept.peak_nbytes("host") == 0
    # block i's input in use while block i-1's comes back: two inputs at the peak, (L-2) fewer than without
    assert off.peak_nbytes("device") == 2 * one
    assert off.peak_nbytes("host") == n_layers * one
    assert kept.peak_nbytes("device") - off.peak_nbytes("device") == (n_layers - 2) * one
    assert off.nbytes("device") == off.nbytes("host") == 0 and len(off) == 0  # freed by the backward


def test_store_keeps_separate_copies_and_frees():
    store = BlockStore(offload=True, device=torch.device("cpu"))
    t = torch.arange(6.0)
    h = store.put(t)
    t.add_(100)  # the caller's tensor is not the stored one
    assert store.nbytes("host") == 24 and store.nbytes("device") == 0
    store.prefetch(h)
    assert store.nbytes("device") == 24
    out = store.get(h)
    assert torch.equal(out, torch.arange(6.0)) and store.nbytes("host") == 0
    store.free()
    assert store.nbytes("device") == 0 and store.peak_nbytes("device") == 24
    with pytest.raises(ValueError, match="pool"):
        store.nbytes("gpu")


def test_bad_settings_are_named():
    assert SequenceConfig().offload is False and parse_sequence("streambp").offload is False
    assert parse_sequence({"method": "streambp", "offload": True}).offload is True
    with pytest.raises(MemKitConfigError, match=r"sequence.offload='yes' has type str\. Fix: true or false"):
        parse_sequence({"method": "streambp", "offload": "yes"})
    for method in ("none", "seco", "spaco"):
        with pytest.raises(MemKitConfigError, match=f"method='{method}'.*Fix: set sequence.method='streambp'"):
            SequenceConfig(method=method, offload=True)


def _technique(offload=True):
    from lightning_memkit.sequence.technique import SequenceTechnique

    return SequenceTechnique(SequenceConfig(method="streambp", chunk_size=8, offload=offload))


class _Trainer:
    def __init__(self, seq_len, batch_size, limit=None):
        from types import SimpleNamespace

        self.datamodule = SimpleNamespace(seq_len=seq_len, batch_size=batch_size)
        self.strategy = SimpleNamespace(root_device=torch.device("cpu"),
                                        activations=SimpleNamespace(offload_host_memory=limit))


def test_a_cpu_device_warns_once_and_turns_offload_off(model):
    tech = _technique()
    with pytest.warns(UserWarning, match="sequence.offload=True has no effect on a cpu device") as caught:
        tech.setup_trainer(_Trainer(32, 2))
    assert len([w for w in caught if "offload" in str(w.message)]) == 1
    tech.setup_module(model)
    assert tech._runtime.config.offload is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _technique(offload=False).setup_trainer(_Trainer(32, 2))


def test_too_little_host_memory_is_refused_naming_both_sizes(model, monkeypatch):
    import lightning_memkit.activations.saved as saved
    import lightning_memkit.sequence.technique as technique

    monkeypatch.setattr(technique, "_device_type", lambda trainer: "cuda")
    need = 3 * 2 * 64 * model.lm_head.in_features * 4  # L x B x T x D x fp32
    monkeypatch.setattr(saved, "host_memory_available", lambda: need - 1)
    tech = _technique()
    tech.setup_trainer(_Trainer(64, 2))
    with pytest.raises(MemKitConfigError, match=rf"needs .*\({need} bytes.*available memory is .*\({need - 1} bytes\)"
                                                r".*Fix: lower data.seq_len"):
        tech.setup_module(model)
    tech = _technique()
    tech.setup_trainer(_Trainer(64, 2, limit=1024))  # activations.offload_host_memory wins over what the host has
    with pytest.raises(MemKitConfigError, match=r"activations.offload_host_memory is .*\(1024 bytes\)"):
        tech.setup_module(model)
    monkeypatch.setattr(saved, "host_memory_available", lambda: need)
    tech = _technique()
    tech.setup_trainer(_Trainer(64, 2))
    tech.setup_module(model)
    assert tech._runtime.config.offload is True


def test_fit_with_offload_trains_as_without(corpus, monkeypatch):  # noqa: F811
    import lightning_memkit.sequence.offload as offload

    plain = _fit(corpus, steps=2, sequence={"method": "streambp", "chunk_size": 8})
    with pytest.warns(UserWarning, match="no effect on a cpu device"):
        cpu = _fit(corpus, steps=2, sequence={"method": "streambp", "chunk_size": 8, "offload": True})
    _assert_same_training(plain, cpu, rtol=0, atol=0)
    # the store's mechanics under the strategy: the runtime as it is on CUDA, in CPU-pool mode
    import lightning_memkit.sequence.technique as technique

    puts = []
    real_put = offload.BlockStore.put
    monkeypatch.setattr(technique, "_device_type", lambda trainer: "cuda")
    monkeypatch.setattr(offload.BlockStore, "put", lambda self, t: puts.append(self.offload) or real_put(self, t))
    offloaded = _fit(corpus, steps=2, sequence={"method": "streambp", "chunk_size": 8, "offload": True})
    assert puts and all(puts)
    _assert_same_training(plain, offloaded, rtol=0, atol=0)


def test_the_memory_tracker_counts_offloaded_inputs_as_host_memory():
    """StepMemoryTracker (the MemoryReport callback's measurement) files the store's host copies under ``host``,
    outside the device peak (the planner's test checks the device peak's drop on a step the inputs dominate)."""
    from lightning_memkit.memory import StepMemoryTracker

    torch.manual_seed(0)
    n_layers = 5
    model = Transformer(get_config("tiny", n_layers=n_layers))
    ids, labels = _batch(model.vocab_size, t=32, pad=0)
    one = ids.shape[0] * ids.shape[1] * model.blocks[0].attn_norm.weight.shape[0] * 4
    reports = {}
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        with StepMemoryTracker(model) as tracker:
            _step(model, ids, labels, offload=offload)
        reports[offload] = tracker.result()
    assert reports[False].host == 0 and reports[True].host == n_layers * one
    assert reports[True].as_metrics()["memory/host_mib"] == n_layers * one / 2**20
    assert "memory/host_mib" not in reports[False].as_metrics()
    assert reports[True].peak <= reports[False].peak

