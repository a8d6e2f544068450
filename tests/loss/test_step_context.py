"""The per-step context (lightning_memkit.step_context): the loss and sequence families read it instead of each
other, and the planner observes the fused loss through it; imports flow one way."""

import ast
from pathlib import Path

import torch

import lightning_memkit
from lightning_memkit import step_context
from lightning_memkit.config import CrossEntropyConfig, SequenceConfig
from lightning_memkit.loss.linear_ce import linear_cross_entropy
from lightning_memkit.loss.causal_lm import causal_lm_loss, fused_call_count, use_cross_entropy
from lightning_memkit.planner.tracker import CategoryTracker
from lightning_memkit.sequence.runtime import SequenceRuntime, active_sequence, use_sequence

PACKAGE = Path(lightning_memkit.__file__).parent


def _imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` for every import in the file, also those inside functions (name "" for ``import m``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.module, a.name) for a in node.names]
    return out


def layering_violations(package: Path) -> list[str]:
    """Imports against the one-way flow step_context -> loss -> sequence (and loss below the planner)."""
    bad = []
    for path in sorted((package / "loss").glob("*.py")):
        for module, name in _imports(path):
            if module.startswith(("lightning_memkit.sequence", "lightning_memkit.planner")):
                bad.append(f"loss/{path.name} imports {module}")
    for path in sorted((package / "sequence").glob("*.py")):
        for module, name in _imports(path):
            if module.startswith("lightning_memkit.loss") and (name.startswith("_") or module.endswith("toggle")):
                bad.append(f"sequence/{path.name} imports {module}.{name}")
    for module, name in _imports(package / "step_context.py") if (package / "step_context.py").exists() else ():
        if module.startswith(tuple(f"lightning_memkit.{p}" for p in ("loss", "sequence", "planner", "strategy"))):
            bad.append(f"step_context imports {module}")
    return bad


def test_loss_and_sequence_import_one_way():
    """loss/* never imports sequence/* or the planner (not even inside a function); sequence/* uses loss's public
    API only, not the toggle's private names (the old cycle loss.toggle <-> sequence.*)."""
    assert layering_violations(PACKAGE) == []


def test_cross_entropy_and_counter_are_shared():
    """The loss toggle's names are step_context's: one context variable, one counter."""
    assert use_cross_entropy is step_context.use_cross_entropy and fused_call_count is step_context.fused_call_count
    with use_cross_entropy(CrossEntropyConfig(chunk_size=8)):
        assert step_context.active_cross_entropy() is not None
    with use_cross_entropy(CrossEntropyConfig(impl="torch", fused=False)):  # unfused: off
        assert step_context.active_cross_entropy() is None
    before = fused_call_count()
    step_context.count_fused_call()
    assert fused_call_count() == before + 1


def test_causal_lm_loss_asks_the_active_sequence_runtime():
    """Any object with the SequenceLoss method, made active through step_context, computes causal_lm_loss; the
    sequence toggle's runtime is the one step_context holds (and a disabled config activates none)."""
    seen = []

    class Runtime:
        def loss(self, model, input_ids, labels, *, ignore_index=-100, shift=False, reduction="mean"):
            seen.append((ignore_index, shift, reduction))
            return torch.tensor(1.5)

    with step_context.use_sequence_runtime(Runtime()):
        out = causal_lm_loss(torch.nn.Identity(), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4,
                             dtype=torch.long), ignore_index=-1, shift=True)
    assert out.item() == 1.5 and seen == [(-1, True, "mean")]
    runtime = SequenceRuntime(SequenceConfig(method="streambp", chunk_size=4))
    with use_sequence(runtime):
        assert active_sequence() is runtime and step_context.active_sequence_runtime() is runtime
    with use_sequence(SequenceRuntime(SequenceConfig(method="none"))):
        assert step_context.active_sequence_runtime() is None


def test_head_input_observers():
    """note_head_input calls the observers registered inside the block only; the planner's tracker registers one,
    so the fused loss's work is filed under logits_loss."""
    seen = []
    with step_context.observe_head_inputs(seen.append):
        step_context.note_head_input(torch.ones(1))
    step_context.note_head_input(torch.ones(2))
    assert [t.numel() for t in seen] == [1]

    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(50, 8)
    with CategoryTracker() as tracker:
        hidden2 = hidden * 2  # forward work before the head: activations
        linear_cross_entropy(hidden2, weight, torch.randint(0, 50, (6,)), impl="torch")
    assert tracker.max_by_category["activations"] > 0 and tracker.max_by_category["logits_loss"] > 0
    tracker._in_head = False
    step_context.note_head_input(hidden)  # the tracker stopped observing at its exit
    assert not tracker._in_head


def test_old_names_still_importable():
    """The names tests and users import from the toggles stay where they were (re-exported)."""
    from lightning_memkit.loss import causal_lm as loss_toggle
    from lightning_memkit.models import families
    from lightning_memkit.sequence import runtime as sequence_toggle

    assert loss_toggle.active_cross_entropy is step_context.active_cross_entropy
    assert loss_toggle._as_keywords is step_context.as_keywords
    assert loss_toggle.is_hf_causal_lm is families.is_hf_causal_lm
    assert loss_toggle.is_hf_language_model is families.is_hf_language_model
    assert callable(sequence_toggle.patch_hf_forward) and callable(loss_toggle.is_fusable_hf_causal_lm)
