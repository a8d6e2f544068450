"""memkit verify: each technique against the plain step; a broken one is flagged."""

from __future__ import annotations

import os

import pytest

from lightning_memkit.planner.verify import verify

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes")
TINY = ["--model.init_args.model=tiny", "--data.init_args.seq_len=64", "--data.init_args.batch_size=2",
        "--data.init_args.max_tokens=20000", "--data.init_args.num_workers=0", "--trainer.logger=false",
        "--trainer.callbacks=[]"]


def test_verify_passes_exact_techniques_and_reports_approximate_ones():
    checks, description = verify(
        os.path.join(RECIPES, "quickstart.yaml"),
        [*TINY, "--trainer.strategy.init_args.optimizer={name: apollo_mini, in_backward: true}",
         "--trainer.strategy.init_args.activations={checkpoint: blocks, checkpoint_every: 2, compress: int8}"])
    by_name = {c.technique: c for c in checks}
    assert set(by_name) == {"activations: checkpoint=blocks", "activations: compress=int8",
                            "cross_entropy: fused (auto)", "optimizer: apollo_mini (step in backward)",
                            "all together"}
    assert all(c.passed for c in checks), checks
    assert by_name["activations: checkpoint=blocks"].max_grad_diff == 0.0  # recomputation is bitwise here
    assert by_name["cross_entropy: fused (auto)"].max_grad_rel < 1e-5
    int8 = by_name["activations: compress=int8"]
    assert not int8.exact and 1e-4 < int8.grad_rel_error < 0.5
    apollo = by_name["optimizer: apollo_mini (step in backward)"]
    assert apollo.max_grad_diff == 0.0  # the gradients, caught before the step in backward consumes them, are the same
    assert apollo.update_rel_error > 0.1 and apollo.update_cosine > 0  # a different optimizer: reported
    assert "0.13M parameters" in description


def test_verify_flags_a_broken_exact_technique(monkeypatch):
    """Checkpointing that changes what a block computes (a 1% error in one block's output) must fail."""
    from lightning_memkit.activations import checkpoint

    original = checkpoint.CheckpointTechnique.setup_module

    def broken(self, module):
        original(self, module)
        block = module.model.blocks[0]
        self._broken = block.register_forward_hook(lambda m, a, out: out * 1.01)

    monkeypatch.setattr(checkpoint.CheckpointTechnique, "setup_module", broken)
    monkeypatch.setattr(checkpoint.CheckpointTechnique, "teardown",
                        lambda self, module: self._broken.remove())
    checks, _ = verify(os.path.join(RECIPES, "quickstart.yaml"), TINY)
    by_name = {c.technique: c for c in checks}
    bad = by_name["activations: checkpoint=blocks"]
    assert bad.exact and not bad.passed and bad.max_grad_rel > 1e-3
    assert by_name["cross_entropy: fused (auto)"].passed


def test_memkit_verify_command(capsys):
    from lightning_memkit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--config", os.path.join(RECIPES, "quickstart.yaml"), *TINY])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "activations: checkpoint=blocks" in out and "ok" in out


ZO_ARGS = "--trainer.strategy.init_args.optimizer={name: zo_sgd, n_perturbations: 2}"


@pytest.mark.parametrize("extra, row", [
    ("--trainer.strategy.init_args.optimizer={name: spam, density: 0.25}", "optimizer: spam"),
    ("--trainer.strategy.init_args.optimizer={name: sgd_sai, in_backward: true}",
     "optimizer: sgd_sai (step in backward)"),
    ("--trainer.strategy.init_args.optimizer={name: natural_galore, rank: 8}", "optimizer: natural_galore"),
    (ZO_ARGS, "optimizer: zo_sgd"),
    ("--trainer.strategy.init_args.activations={sampled_backward: 0.3, compress: int8, checkpoint: blocks, "
     "checkpoint_every: 2}", "activations: sampled_backward keep=0.3"),
])
def test_verify_checks_the_newer_optimizers_and_wta_crs(extra, row):
    """Each newer technique gets its own row and passes. WTA-CRS runs alone (before, it had no row of its own and rode
    along in the checkpoint and int8 rows, where a layer inside a checkpointed block made setup refuse it); a
    zeroth-order step, which has no gradients, has its projected gradients checked against z . g_ref."""
    checks, _ = verify(os.path.join(RECIPES, "quickstart.yaml"), [*TINY, extra])
    by_name = {c.technique: c for c in checks}
    assert row in by_name and all(c.passed for c in checks), checks
    check = by_name[row]
    assert not check.exact and check.max_grad_rel is not None  # the gradients (or the ZO projections) were compared
    if "zo_sgd" in extra:
        assert check.max_grad_rel < 2e-2 and "projected gradient(s)" in check.note
    if "sampled_backward" in extra:
        assert 1e-3 < check.grad_rel_error < 1.0 and check.update_cosine > 0  # an unbiased estimate, not the gradient
        assert by_name["activations: checkpoint=blocks"].max_grad_diff == 0.0  # run without the sampling
        assert by_name["activations: compress=int8"].grad_rel_error < 1e-2


def test_verify_flags_a_zeroth_order_step_that_measures_the_wrong_slope(monkeypatch):
    """A ZO step whose loss pair is swapped (a sign error in the perturbation) estimates -z . g: it must fail."""
    from lightning_memkit.optim.zeroth_order import ZerothOrderOptimizer

    original = ZerothOrderOptimizer._evaluate

    def swapped(self, closure, block, keys, eps):
        plus, minus = original(self, closure, block, keys, eps)
        return minus, plus

    monkeypatch.setattr(ZerothOrderOptimizer, "_evaluate", swapped)
    checks, _ = verify(os.path.join(RECIPES, "quickstart.yaml"), [*TINY, ZO_ARGS])
    bad = {c.technique: c for c in checks}["optimizer: zo_sgd"]
    assert not bad.passed and bad.max_grad_rel > 0.1
