import csv
import glob

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_memkit import MemoryReport
from lightning_memkit.memory import StepMemoryTracker, fake_training_step, parameter_bytes
from lightning_memkit.models import LlamaConfig, get_config
from lightning_memkit.module import CausalLMModule


def _fit_with_report(strategy, trainer_kwargs, small_corpus_dir, **kwargs):
    from lightning_memkit import TextDataModule

    report = MemoryReport(every_n_steps=2, **kwargs)
    module = CausalLMModule(model="tiny")
    data = TextDataModule(paths=small_corpus_dir, seq_len=64, batch_size=4)
    trainer = pl.Trainer(strategy=strategy, callbacks=[report], **{**trainer_kwargs, "max_steps": 3})
    trainer.fit(module, data)
    return report, module


def test_parameter_bytes_are_exact_and_categories_make_sense(trainer_kwargs, small_corpus_dir, caplog):
    caplog.set_level("INFO")
    report, module = _fit_with_report("memkit", trainer_kwargs, small_corpus_dir)
    assert [r.step for r in report.reports] == [0, 2]
    exact = sum(p.numel() * p.element_size() for p in module.parameters())
    assert exact == parameter_bytes(module)
    for r in report.reports:
        assert r.by_category["parameters"] == exact
        assert r.by_category["activations"] > 0
        assert r.peak == sum(r.by_category.values())
    # AdamW keeps two fp32 moments per parameter once it has stepped
    assert report.reports[-1].by_category["optimizer_state"] >= 2 * exact
    assert "MemoryReport: optimizer step 2" in caplog.text and "optimizer_state" in caplog.text


def test_checkpointing_lowers_measured_activations(trainer_kwargs, small_corpus_dir):
    plain, _ = _fit_with_report("memkit", trainer_kwargs, small_corpus_dir)
    ckpt, _ = _fit_with_report("memkit_checkpoint", trainer_kwargs, small_corpus_dir)
    assert ckpt.reports[-1].by_category["activations"] < plain.reports[-1].by_category["activations"]
    assert ckpt.reports[-1].peak < plain.reports[-1].peak


def test_logged_to_the_trainers_loggers(trainer_kwargs, small_corpus_dir, tmp_path):
    from lightning_memkit import TextDataModule

    logger = CSVLogger(tmp_path, name="mem")
    trainer = pl.Trainer(
        strategy="memkit", callbacks=[MemoryReport(every_n_steps=1)],
        **{**trainer_kwargs, "logger": logger, "max_steps": 2, "log_every_n_steps": 1},
    )
    trainer.fit(CausalLMModule(model="tiny"), TextDataModule(paths=small_corpus_dir, seq_len=32, batch_size=2))
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "mem" / "*" / "metrics.csv"))[0])))
    peaks = [(int(r["step"]), r["memory/peak_mib"]) for r in rows if r.get("memory/peak_mib")]
    assert [step for step, _ in peaks] == [0, 1]  # logged at the step that was measured
    assert all(float(p) > 0 for _, p in peaks)


def test_tracker_outside_lightning_closure_categories():
    """Without a closure, the optimizer's own allocations are optimizer state, the forward's are activations."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(128, 64)
    for _ in range(2):
        with StepMemoryTracker(model, [opt]) as tracker:
            model(x).square().mean().backward()
            opt.step()
    r = tracker.result()
    # two fp32 moments per parameter, plus Adam's fp32 scalar "step" per parameter tensor
    assert r.by_category["optimizer_state"] == 2 * parameter_bytes(model) + 4 * len(list(model.parameters()))
    assert r.by_category["activations"] >= 128 * 256 * 4  # the hidden layer's output is saved


def test_closure_work_is_not_counted_as_optimizer_state():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # SGD without momentum keeps no state
    x = torch.randn(128, 64)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    with StepMemoryTracker(model, [opt]) as tracker:
        opt.step(closure)
    r = tracker.result()
    assert r.by_category["optimizer_state"] == 0
    assert r.by_category["activations"] > 0


def test_fake_full_size_step_allocates_nothing_and_counts_exact_parameters():
    report = fake_training_step("llama-3.2-1b", seq_len=128)
    assert report.by_category["parameters"] == get_config("llama-3.2-1b").num_parameters() * 2  # bf16
    assert report.peak > report.by_category["parameters"] * 3  # + gradients and two AdamW moments


def test_fake_step_checkpointing_saves_activations():
    cfg = LlamaConfig(vocab_size=1000, dim=1024, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=2816, max_seq_len=4096)
    plain = fake_training_step(cfg, seq_len=2048)
    ckpt = fake_training_step(cfg, seq_len=2048, checkpoint_every=1)
    half = fake_training_step(cfg, seq_len=2048, checkpoint_every=2)
    assert plain.by_category["parameters"] == ckpt.by_category["parameters"] == cfg.num_parameters() * 2
    assert ckpt.by_category["activations"] < plain.by_category["activations"] / 4
    assert ckpt.peak < half.peak < plain.peak


def test_bad_interval():
    with pytest.raises(ValueError, match="every_n_steps=0"):
        MemoryReport(every_n_steps=0)


def test_allocator_method_needs_cuda():
    from lightning_memkit.memory import make_step_tracker

    with pytest.raises(ValueError, match="needs a model on CUDA"):
        make_step_tracker(torch.nn.Linear(2, 2), method="allocator")
    with pytest.raises(ValueError, match="MemoryReport.method='rss'"):
        MemoryReport(method="rss")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_allocator_method_on_cuda():
    from lightning_memkit.memory import make_step_tracker

    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256)).cuda()
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(512, 256, device="cuda")
    for _ in range(2):
        with make_step_tracker(model, [opt]) as tracker:
            model(x).square().mean().backward()
            opt.step()
    r = tracker.result()
    assert r.by_category["parameters"] == parameter_bytes(model)
    assert r.by_category["activations"] >= 512 * 1024 * 4
    assert r.allocator_peak == r.peak


def test_tracker_measures_a_module_called_twice_in_one_step():
    """Two forward/backward passes of the root module in one step (MemTracker, used before, refused this)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(128, 64)
    with StepMemoryTracker(model, [opt]) as tracker:
        for _ in range(2):
            model(x).square().mean().backward()
        opt.step()
    r = tracker.result()
    assert r.by_category["parameters"] == parameter_bytes(model)
    assert r.by_category["activations"] >= 128 * 256 * 4  # the hidden layer's output is saved
    assert r.by_category["gradients"] == parameter_bytes(model)  # the first pass's gradients live through the second


def test_report_and_planner_count_the_same_step_alike():
    """StepMemoryTracker (MemoryReport) and the planner's StepRunner share one tracker: on the same step they
    agree on the peak, the batch aside (the planner counts it under 'buffers + batch'; the report cannot see it)."""
    from lightning_memkit.planner.step import Setting, StepRunner

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))

        def training_step(self, batch, batch_idx):
            return self.net(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    torch.manual_seed(0)
    module, batch = Tiny(), torch.randn(48, 32)
    runner = StepRunner(module, None, batch)
    planned = runner.run(Setting(cross_entropy="plain"), measure=True, warm=True)
    with StepMemoryTracker(module) as tracker:  # the optimizer is built (and warmed) inside the measured step
        runner.run(Setting(cross_entropy="plain"), warm=True)
    r = tracker.result()
    assert r.peak == planned.peak - batch.nbytes > 0
    assert r.by_category["parameters"] == planned.at_peak["parameters"] == parameter_bytes(module)
    assert r.by_category["gradients"] == planned.at_peak["gradients"]
    assert r.by_category["optimizer_state"] == planned.at_peak["optimizer_state"] == 2 * parameter_bytes(module) + 4 * 4


def test_one_byte_formatter():
    from lightning_memkit import units
    from lightning_memkit.planner import search

    assert units.human_bytes(14.96 * units.GIB) == "14.96 GiB" and units.human_bytes(2 * units.MIB) == "2.00 MiB"
    assert units.human_bytes(512) == "0.50 KiB" and units.human_bytes(100) == "100 B"
    assert units.human_bytes(-3 * units.GIB) == "-3.00 GiB"  # an overshoot keeps its sign
    assert units.table_unit(units.GIB / 4) == ("GiB", units.GIB) and units.table_unit(units.GIB / 5)[0] == "MiB"
    assert search.human_bytes is units.human_bytes  # the planner's messages use the same formatter
