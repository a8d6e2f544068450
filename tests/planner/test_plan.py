"""memkit plan: the step on fake tensors, its categories against exact byte counts and the profiler."""

from __future__ import annotations

import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lightning_memkit.config import MemKitConfigError, parse_size
from lightning_memkit.planner.load import ModelBuildError, example_batch, load
from lightning_memkit.planner.plans import candidates, configured_candidate, measure, plan, plot, setting_of
from lightning_memkit.planner.step import Setting, StepRunner

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "quickstart.yaml")
TINY = ["--model.init_args.model=tiny", "--data.init_args.seq_len=128", "--data.init_args.batch_size=4",
        "--trainer.logger=false", "--trainer.callbacks=[]"]


def _fake_step(setting: Setting, overrides=TINY):
    loaded = load(QUICKSTART, overrides, fake=True)
    runner = StepRunner(loaded.module, loaded.trainer, example_batch(loaded))
    with loaded.fake_mode:
        return runner.run(setting, measure=True, warm=True), loaded


def _real(overrides=TINY):
    loaded = load(QUICKSTART, overrides, fake=False)
    return loaded, StepRunner(loaded.module, loaded.trainer, example_batch(loaded))


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_parameter_gradient_optimizer_figures_equal_exact_byte_counts():
    planned, _ = _fake_step(Setting(cross_entropy="plain"))
    loaded, runner = _real()
    module = loaded.module
    opt = module.configure_optimizers()["optimizer"]
    loss = module.loss(example_batch(loaded))
    loss.backward()
    grads = _storage_bytes(p.grad for p in module.parameters())
    opt.step()
    state = _storage_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    params = _storage_bytes(module.parameters())
    assert planned.at_peak["parameters"] == params == 125_504 * 4
    assert planned.maximum["gradients"] == grads == params
    assert planned.at_peak["optimizer_state"] == state == 2 * params + 4 * len(opt.state)  # m, v and a step counter


def test_apollo_in_backward_figures_equal_exact_byte_counts():
    """A memkit optimizer's state (rank-1 moments, dense AdamW for the embeddings) is counted exactly too."""
    setting = Setting(optimizer={"name": "apollo_mini", "in_backward": True})
    planned, _ = _fake_step(setting)
    loaded, runner = _real()
    runner.run(setting)  # a real step creates the real state
    from lightning_memkit.optim.memory import predict_state_bytes
    from lightning_memkit.optim.convert import select_lowrank
    from lightning_memkit.config import parse_optimizer

    module = loaded.module
    lowrank = set(select_lowrank(module, None).values())
    params = [(n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()]
    predicted = predict_state_bytes(params, parse_optimizer(setting.optimizer), lowrank)
    opt = runner.last_optimizer
    real = _storage_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert planned.at_peak["optimizer_state"] == predicted == real
    assert planned.maximum["gradients"] == 0  # each gradient is consumed by its hook: none is ever kept


def _profiled_peak(runner: StepRunner, setting: Setting, loaded) -> int:
    """Peak bytes of one real step: the parameters and the batch (exact) + the profiler's allocation timeline of
    the run (which creates the optimizer state on zero gradients, as the planner's warm-up does, then steps)."""
    original = runner._optimizer

    def warmed(techniques):  # the measured step starts with the optimizer state, as the planner's does
        opt = original(techniques)
        runner.warm_optimizer(opt)
        return opt

    runner._optimizer = warmed
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.run(setting)
    # every allocation and free the profiler recorded, in time order (the raw "[memory]" events)
    timeline = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]")
    current = peak = 0
    for _, delta in timeline:
        current += delta
        peak = max(peak, current)
    # the timeline holds the optimizer state's creation (it stays alive); what existed before is added exactly
    static = _storage_bytes(loaded.module.parameters()) + sum(t.nbytes for t in runner.batch.values())
    return static + peak


@pytest.mark.parametrize("setting", [Setting(cross_entropy="plain"), Setting(),
                                     Setting(activations={"checkpoint": "blocks"}),
                                     Setting(optimizer={"name": "apollo_mini", "in_backward": True})],
                         ids=["plain", "fused-ce", "checkpoint", "apollo-in-backward"])
def test_predicted_peak_within_10_percent_of_the_profiler(setting):
    overrides = ["--model.init_args.model=small", "--data.init_args.seq_len=256", "--data.init_args.batch_size=4",
                 "--trainer.logger=false", "--trainer.callbacks=[]"]
    planned, _ = _fake_step(setting, overrides)
    loaded, runner = _real(overrides)
    measured = _profiled_peak(runner, setting, loaded)
    assert abs(planned.peak - measured) <= 0.10 * measured, (planned.peak, measured, planned.at_peak)


def test_logits_are_their_own_category():
    plain, _ = _fake_step(Setting(cross_entropy="plain"))
    fused, _ = _fake_step(Setting())
    tokens, vocab = 4 * 128, 258
    assert plain.maximum["logits_loss"] >= tokens * vocab * 4  # the fp32 logits at least
    assert fused.maximum["logits_loss"] < plain.maximum["logits_loss"]


@pytest.mark.slow  # ~10 s on the 2-core CPU machine (compares every candidate, plots)
def test_plan_api_compare_and_plot(tmp_path):
    result = plan(QUICKSTART, TINY, gpu_memory="4MiB", compare=True)
    assert result.recipe.fits is not None and len(result.rows) > 10
    names = {r.candidate.name for r in result.rows}
    assert {"ZeRO-2 offload", "StreamBP 32, your optimizer"} <= names
    fitting = result.fitting()
    assert fitting and all(r.peak <= 4 * 2**20 for r in fitting)
    assert any(not r.fits for r in result.rows if r.result is not None)
    assert [r.candidate.overhead for r in fitting] == sorted(r.candidate.overhead for r in fitting)
    assert "fit in 4.00 MiB" in result.table() and "rank" in result.comparison()
    plot(result.rows, str(tmp_path / "plan.png"), result.gpu_memory)
    assert (tmp_path / "plan.png").stat().st_size > 10_000


@pytest.mark.slow  # ~9 s on the 2-core CPU machine (a CLI run comparing every candidate)
def test_memkit_plan_command(tmp_path, capsys):
    from lightning_memkit.cli import main

    png = tmp_path / "p.png"
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", QUICKSTART, *TINY, "--gpu-memory", "64MiB", "--compare", "--plot", str(png)])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, out
    assert "logits/loss" in out and "fits in 64.00 MiB" in out and png.exists()
    # a progress line per candidate on stderr, as it is measured; the result alone on stdout
    progress = [line for line in err.splitlines() if line.startswith("[")]
    n = int(progress[0].split("/")[1].split("]")[0])
    assert n > 10 and [p.split("]")[0] for p in progress] == [f"[{i}/{n}" for i in range(1, n + 1)]
    assert progress[0].startswith(f"[1/{n}] as configured: ") and "MiB, fits" in progress[0]
    assert not any(line.startswith("[") for line in out.splitlines())
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", QUICKSTART, *TINY, "--gpu-memory", "1KiB"])
    assert exit_.value.code == 2
    assert "smaller than the model's weights alone: 0.48 MiB (0.13M parameters in float32)" in capsys.readouterr().err


def test_bad_input():
    with pytest.raises(MemKitConfigError, match=r"gpu_memory='24 gigs' is not a memory size"):
        plan(QUICKSTART, TINY, gpu_memory="24 gigs")
    with pytest.raises(MemKitConfigError, match=r"gpu_memory=1.00 MiB is smaller than the model's weights alone: "
                                                r"6.38 MiB \(1.67M parameters in float32\)"):
        plan(QUICKSTART, [*TINY, "--model.init_args.model=small"], gpu_memory="1MiB")


def test_a_model_that_cannot_be_built_on_the_fake_device_is_named(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("trainer: {logger: false}\nmodel:\n  class_path: tests.helpers.unbuildable.UnbuildableModule\n")
    with pytest.raises(ModelBuildError,
                       match=r"cannot be built on the meta device: Calibrated \(.*unbuildable.py:\d+\)"):
        plan(str(recipe))


def test_a_hugging_face_checkpoint_is_planned_from_its_config(tmp_path):
    """hf_path: the planner reads only config.json (shapes) and builds the model on fake tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    result = plan(QUICKSTART, [*TINY, f"--model.init_args.hf_path={tmp_path / 'hf'}",
                               "--model.init_args.vocab_size=300"])
    n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert result.recipe.result.at_peak["parameters"] == 4 * n


def test_zero_rows_take_model_states_from_the_formula():
    from lightning_memkit.zero import zero_memory

    loaded = load(QUICKSTART, TINY, fake=True)
    runner = StepRunner(loaded.module, loaded.trainer, example_batch(loaded))
    cand = next(c for c in candidates(setting_of(loaded.trainer.strategy), seq_len=128, zero=True)
                if c.name == "ZeRO-3 offload")
    with loaded.fake_mode:
        row = measure(runner, cand)
    n = sum(p.numel() for p in loaded.module.parameters())
    largest = max(sum(p.numel() for p in b.parameters()) for b in loaded.module.model.blocks)
    mem = zero_memory(n, world_size=1, stage=3, offload_optimizer="cpu", offload_parameters="cpu",
                      largest_block_params=largest)
    assert row.result.at_peak["parameters"] == 0 and row.result.host == int(mem["host"]["total"])
    cand = next(c for c in candidates(setting_of(loaded.trainer.strategy), seq_len=128)
                if c.name == "AdamW in backward")
    zero_in_backward = Setting(optimizer={"name": "adamw", "in_backward": True}, zero_stage=2, offload_optimizer="cpu")
    with loaded.fake_mode:
        skipped = measure(runner, configured_candidate(zero_in_backward))
    assert skipped.result is None and "in_backward" in skipped.skipped


def test_a_model_built_in_configure_model_and_a_datamodule_example_batch(tmp_path):
    recipe = tmp_path / "lazy.yaml"
    recipe.write_text("trainer: {logger: false, strategy: memkit}\n"
                      "model: {class_path: tests.helpers.unbuildable.LazyModule, init_args: {width: 64}}\n"
                      "data: {class_path: tests.helpers.unbuildable.VectorData, "
                      "init_args: {width: 64, batch_size: 32}}\n")
    result = plan(str(recipe))
    params = (64 * 64 + 64 + 64 + 1) * 4
    at = result.recipe.result.at_peak
    assert at["parameters"] == params and at["optimizer_state"] == 2 * params + 4 * 4  # AdamW: m, v, 4 step counters
    assert result.recipe.result.maximum["gradients"] == params and at["other"] == 32 * 64 * 4  # the batch


def test_longest_sequence_bisects_to_the_last_length_that_fits():
    from lightning_memkit.planner.plans import longest_sequence

    overrides = [o for o in TINY if "seq_len" not in o]
    found = longest_sequence(QUICKSTART, overrides, gpu_memory="12MiB", multiple=64, upper=1024)
    length, row = found.length, found.row
    assert row is not None and row.fits and not found.capped and 64 <= length < 1024
    assert found.varies == ("--data.init_args.seq_len", "--model.init_args.max_seq_len")  # CausalLMModule takes one
    over = plan(QUICKSTART, [*overrides, f"--data.init_args.seq_len={length + 64}",
                             f"--model.init_args.max_seq_len={length + 64}"], gpu_memory="12MiB")
    assert not over.recipe.fits


def test_longest_sequence_equals_an_exhaustive_scan_in_four_plans():
    """Two lengths give the line, the third is the predicted answer and the fourth the next multiple: the same
    answer as trying every multiple (bisection took log2(1024 / 64) + more plans)."""
    from lightning_memkit.planner.plans import longest_sequence

    overrides = [o for o in TINY if "seq_len" not in o]  # the recipe's own length: 256
    peaks = {n: plan(QUICKSTART, [*overrides, f"--data.init_args.seq_len={n}", f"--model.init_args.max_seq_len={n}"]
                     ).recipe.peak for n in range(64, 1025, 64)}
    for budget in ("8MiB", "12MiB", "40MiB"):
        fit = [n for n, peak in peaks.items() if peak <= parse_size("gpu_memory", budget)]
        found = longest_sequence(QUICKSTART, overrides, gpu_memory=budget, multiple=64, upper=1024)
        assert found.length == max(fit) and found.capped == (max(fit) == 1024), budget
        assert len(found.tried) <= 4 and found.linear and found.tried[0][0] == 256, (budget, found.tried)
        first, second = found.tried[0][0], found.tried[1][0]
        assert found.per_token == (peaks[second] - peaks[first]) / (second - first)
        assert 25 * 1024 < found.per_token < 32 * 1024  # ~28.8 KiB/token: (B=4) x dim 64, fp32, the tiny model


def _fake_plans(monkeypatch, peak_of):
    """``plan`` replaced by a step whose device peak is ``peak_of(length)``; returns the lengths planned."""
    from lightning_memkit.planner import plans
    from lightning_memkit.planner.step import StepResult

    planned = []

    def fake_plan(config, overrides, *, gpu_memory, cpu_memory=None):
        length = int([o for o in overrides if o.startswith("--data.init_args.seq_len=")][-1].split("=")[1])
        planned.append(length)
        row = plans.Row(configured_candidate(Setting()), result=StepResult(at_peak={"activations": peak_of(length)}))
        return plans.Plan(recipe=plans.judge(row, gpu_memory, cpu_memory))

    monkeypatch.setattr(plans, "plan", fake_plan)
    return planned


def _exhaustive(peak_of, budget, multiple=1024, upper=1 << 17):
    return max((n for n in range(multiple, upper + 1, multiple) if peak_of(n) <= budget), default=0)


BUDGET = 24 << 30
OVERRIDES = [o for o in TINY if "seq_len" not in o]  # the recipe builds (sequence_arguments); the steps are fakes


def test_longest_sequence_reports_the_cost_per_token_of_a_linear_step(monkeypatch):
    from lightning_memkit.planner.plans import longest_sequence

    def linear(n):
        return (15 << 30) + 285 * 1024 * n  # Llama-3-8B's long-context recipe: bf16 weights, ~285 KiB/token

    planned = _fake_plans(monkeypatch, linear)
    found = longest_sequence(QUICKSTART, OVERRIDES, gpu_memory=BUDGET)
    assert found.length == _exhaustive(linear, BUDGET) == 32768 and not found.capped
    assert found.per_token == 285 * 1024 and found.fixed == 15 << 30 and found.error == 0 and found.linear
    assert planned == [1024, 2048, 32768, 33792]  # the recipe's 256 tokens round up to one multiple


def test_longest_sequence_steps_down_when_the_predicted_length_does_not_fit(monkeypatch):
    """A cost within the tolerance of the line but a little over it near the answer: the predicted length is
    planned, does not fit, and the multiple below is the answer (no bisection)."""
    from lightning_memkit.planner.plans import longest_sequence

    def bumped(n):
        return (15 << 30) + 285 * 1024 * n + (300 << 20 if n > 16384 else 0)  # +300 MiB: 1.2% of the budget

    planned = _fake_plans(monkeypatch, bumped)
    found = longest_sequence(QUICKSTART, OVERRIDES, gpu_memory=BUDGET)
    assert found.length == _exhaustive(bumped, BUDGET) == 31744 and found.linear
    assert found.predicted == 32768 and found.error == 300 << 20 and planned == [1024, 2048, 32768, 31744]


def test_longest_sequence_bisects_when_the_cost_is_not_linear(monkeypatch):
    """A quadratic step (attention scores held whole): the line's prediction misses by more than the tolerance,
    and bisection between the lengths measured finds the same answer as trying every multiple."""
    from lightning_memkit.planner.plans import LINEAR_TOLERANCE, longest_sequence

    def quadratic(n):
        return (2 << 30) + 64 * 1024 * n + 32 * n * n

    planned = _fake_plans(monkeypatch, quadratic)
    found = longest_sequence(QUICKSTART, OVERRIDES, gpu_memory=BUDGET)
    assert found.length == _exhaustive(quadratic, BUDGET) and found.row.fits and not found.linear
    assert abs(found.error) > LINEAR_TOLERANCE * BUDGET and len(planned) == len(set(planned)) <= 12
    assert found.length + 1024 in planned  # the next multiple was planned, and does not fit
    for budget in (1 << 30, 3 << 30, 100 << 30, 1 << 40):  # nothing fits; a few lengths; the upper bound fits
        planned.clear()
        found = longest_sequence(QUICKSTART, OVERRIDES, gpu_memory=budget)
        assert found.length == _exhaustive(quadratic, budget) and found.capped == (found.length == 1 << 17), budget
        assert (found.row is None) == (found.length == 0) and len(planned) == len(set(planned)) <= 12, planned


def test_longest_sequence_refuses_bounds_that_leave_no_length():
    """Before, upper < multiple returned length 0 as "capped" (the upper bound fits) after planning a longer length."""
    from lightning_memkit.planner.plans import longest_sequence

    with pytest.raises(MemKitConfigError, match=r"multiple=1024 and upper=512 leave no length to try. Fix: "):
        longest_sequence(QUICKSTART, OVERRIDES, gpu_memory="1GiB", upper=512)


def test_a_misspelled_model_name_is_reported_as_such(capsys):
    """jsonargparse buries the model's own message in Union machinery; the planner reports it, not 'meta device'."""
    from lightning_memkit.cli import main

    with pytest.raises(MemKitConfigError) as info:
        plan(QUICKSTART, [*TINY, "--model.init_args.model=tinny"])
    message = str(info.value)
    assert "model.model='tinny' is not a named model shape. Fix: use one of" in message
    assert "Union" not in message and "meta device" not in message and not isinstance(info.value, ModelBuildError)
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", QUICKSTART, *TINY, "--model.init_args.model=tinny"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "'tinny' is not a named model shape" in err and len(err.splitlines()) <= 5


def _recipe(tmp_path, model: str, data: str) -> str:
    path = tmp_path / "own.yaml"
    path.write_text(f"trainer: {{logger: false, strategy: memkit, enable_checkpointing: false}}\n"
                    f"model: {{class_path: {model}}}\ndata: {data}\n")
    return str(path)


def test_max_seq_len_varies_the_data_for_a_module_without_max_seq_len(tmp_path, capsys):
    from lightning_memkit.cli import main

    recipe = _recipe(tmp_path, "tests.helpers.planning.SmallLM",
                     "{class_path: lightning_memkit.TextDataModule, init_args: {seq_len: 1024, batch_size: 2}}")
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", recipe, "--max-seq-len", "--gpu-memory", "64MiB"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, out + err
    assert "varied data.init_args.seq_len)" in out and "max_seq_len" not in out
    length = int(out.split("fits 64MiB: ")[1].split(" tokens")[0])
    tried = [line for line in err.splitlines() if line.startswith("[")]
    assert tried[0].startswith("[1] 1024 tokens: ") and "fits" in tried[0] and len(tried) <= 5  # the recipe's length
    at = plan(recipe, [f"--data.init_args.seq_len={length}"], gpu_memory="64MiB")
    over = plan(recipe, [f"--data.init_args.seq_len={length + 1024}"], gpu_memory="64MiB")
    assert at.recipe.fits and not over.recipe.fits
    per_token = float(out.split("device cost per token: ")[1].split(" KiB/token")[0])  # printed with the answer
    assert per_token == pytest.approx((over.recipe.peak - at.recipe.peak) / 1024 / 1024, rel=0.01)
    assert f"planned {len(tried)} lengths: 1024 (" in out


def test_max_seq_len_reports_errors_as_errors_not_as_lengths_that_do_not_fit(tmp_path, capsys):
    from lightning_memkit.cli import main

    recipe = _recipe(tmp_path, "tests.helpers.planning.SmallLM",
                     "{class_path: lightning_memkit.TextDataModule, init_args: {seq_len: 1024, batch_size: 2}}")
    with pytest.raises(SystemExit) as exit_:  # a recipe that does not build
        main(["plan", "--config", recipe, "--max-seq-len", "--gpu-memory", "64MiB", "--model.init_args.widht=8"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and "widht" in err and "nothing fits" not in out
    vectors = _recipe(tmp_path, "tests.helpers.planning.ReadingModule",
                      "{class_path: tests.helpers.planning.VectorLoaderData}")
    with pytest.raises(SystemExit) as exit_:  # data without a seq_len: nothing to vary
        main(["plan", "--config", vectors, "--max-seq-len", "--gpu-memory", "64MiB"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and "has no seq_len argument" in err and "VectorLoaderData" in err


def test_candidates_from_a_strategys_parsed_settings():
    """A strategy's settings reach the planner parsed (MemKitSettings): the search reads them as configs. Before, a
    set ``sequence`` (a SequenceConfig) crashed the auto mode with AttributeError: 'SequenceConfig' has no 'get'."""
    from lightning_memkit import MemKitStrategy
    from lightning_memkit.config import SequenceConfig

    strategy = MemKitStrategy(sequence={"method": "spaco", "keep": 0.5, "chunk_size": 64},
                              activations={"compress": "int8"})
    base = setting_of(strategy)
    assert isinstance(base.sequence, SequenceConfig)
    rows = candidates(base, free=("optimizer",), seq_len=256)
    assert rows and not any(r.exact for r in rows)  # SpaCO and int8 activations are approximate in every row
    exact = candidates(setting_of(MemKitStrategy(sequence="streambp")), free=("optimizer",), seq_len=256)
    assert {r.name: r.exact for r in exact}["your optimizer"] is True


def test_sequence_offload_is_host_memory_in_the_plan():
    """With sequence.offload, the plan files StreamBP's block inputs under host memory (exactly L x B x T x D x 4
    bytes) and the device peak drops by all but the two inputs the backward holds at once."""
    overrides = ["--model.init_args.model=small", "--data.init_args.seq_len=256", "--data.init_args.batch_size=2",
                 "--trainer.logger=false", "--trainer.callbacks=[]"]
    rows = {}
    for offload in (False, True):
        setting = Setting(sequence={"method": "streambp", "chunk_size": 64, "offload": offload},
                          optimizer={"name": "apollo_mini", "in_backward": True})
        rows[offload], loaded = _fake_step(setting, overrides)
    model = loaded.module.model
    one = 2 * 256 * model.lm_head.in_features * 4  # one block's input: B x T x D x fp32
    n_layers = len(model.blocks)
    assert rows[False].host == 0 and not rows[False].notes
    assert rows[True].host == n_layers * one
    assert "host memory: " in rows[True].notes[-1]
    saved = rows[False].peak - rows[True].peak  # to a few scalars alive at one peak and not at the other
    assert abs(saved - (n_layers - 2) * one) <= 256, (saved, (n_layers - 2) * one)
    assert rows[False].at_peak["parameters"] == rows[True].at_peak["parameters"]


def test_a_zeroth_order_step_plans_forward_only():
    """zo_sgd: no gradients, no optimizer state, no saved activations: parameters plus one forward's working memory;
    zo_adam adds its two moments (exactly twice the parameters)."""
    adamw, _ = _fake_step(Setting(cross_entropy="plain"))
    zo_sgd, _ = _fake_step(Setting(optimizer="zo_sgd", cross_entropy="plain"))
    zo_adam, _ = _fake_step(Setting(optimizer="zo_adam", cross_entropy="plain"))
    params = adamw.at_peak["parameters"]
    for row in (zo_sgd, zo_adam):
        assert row.maximum["gradients"] == 0 and row.at_peak["activations"] == 0
        assert row.peak < adamw.peak - adamw.maximum["gradients"]
    assert zo_sgd.at_peak["optimizer_state"] == 0
    assert zo_adam.at_peak["optimizer_state"] == 2 * params


def test_the_newer_optimizers_and_wta_crs_are_candidates_only_when_approximation_is_allowed():
    """SPAM (density 0.25), Natural GaLore-8bit and SGD-SaI in backward and ZO-SGD, each once (with no activation
    technique), and WTA-CRS keep 0.3 (with your optimizer or AdamW in backward); all approximate, none under an
    exact search; COSMOS is not one (its Newton-Schulz is slow)."""
    from lightning_memkit.config import parse_activations, parse_optimizer
    from lightning_memkit.planner.search import OVERHEAD

    base = Setting()
    rows = {c.name: c for c in candidates(base, seq_len=128)}
    newer = {n: c for n, c in rows.items() if any(k in n for k in ("SPAM", "SGD-SaI", "Natural GaLore", "ZO-", "WTA"))}
    assert set(newer) == {
        "SPAM (density 0.25) in backward", "Natural GaLore-8bit in backward", "SGD-SaI in backward",
        "ZO-SGD (forward only)",
        "WTA-CRS 0.3, your optimizer", "WTA-CRS 0.3, AdamW in backward"}
    assert not any(c.exact for c in newer.values())
    assert parse_optimizer(rows["SGD-SaI in backward"].setting.optimizer).in_backward
    assert parse_optimizer(rows["SPAM (density 0.25) in backward"].setting.optimizer).density == 0.25
    assert parse_activations(rows["WTA-CRS 0.3, your optimizer"].setting.activations).sampled_backward.keep == 0.3
    zo = rows["ZO-SGD (forward only)"]
    assert zo.overhead == OVERHEAD["zeroth_order"][0] > max(c.overhead for c in rows.values() if c is not zo)
    assert "far more slowly" in zo.note and "learning rate" in rows["SGD-SaI in backward"].note
    assert not any("cosmos" in str(c.setting.optimizer) for c in rows.values())
    exact = candidates(base, seq_len=128, allow_approximate=False)
    assert {c.name for c in exact}.isdisjoint(newer) and all(c.exact for c in exact)
    # a recipe that sets them gets their time factor in its own row
    assert configured_candidate(Setting(optimizer="sgd_sai")).overhead == OVERHEAD["sgd_sai"][0]
    assert configured_candidate(Setting(activations={"sampled_backward": 0.5}, optimizer="zo_sgd")).parts == (
        "sampled_backward", "zeroth_order")


def test_the_newer_optimizers_plan_on_fake_tensors():
    """Each newer candidate's step runs on fake tensors. Natural GaLore's first step reads a Cholesky status
    (int(info)): before, the warm-up step that creates the state ran without the stand-in values and the plan
    crashed with DataDependentOutputException; a read inside memkit's optimizers is not the module's caveat.
    SGD-SaI keeps one buffer per weight: half of AdamW's m and v."""
    from lightning_memkit.planner.step import STAND_IN_NOTE

    adamw, _ = _fake_step(Setting(optimizer={"name": "adamw", "in_backward": True}))
    for opt in ({"name": "natural_galore8bit", "in_backward": True}, {"name": "natural_galore"},
                {"name": "spam", "density": 0.25, "in_backward": True}):
        row, _ = _fake_step(Setting(optimizer=opt))
        assert row.at_peak["optimizer_state"] > 0 and not [n for n in row.notes if n.startswith(STAND_IN_NOTE)]
    sgd_sai, _ = _fake_step(Setting(optimizer={"name": "sgd_sai", "in_backward": True}))
    assert 2 * sgd_sai.at_peak["optimizer_state"] == adamw.at_peak["optimizer_state"]
    wta, _ = _fake_step(Setting(activations={"sampled_backward": 0.3}))
    plain, _ = _fake_step(Setting())
    assert wta.at_peak["activations"] < plain.at_peak["activations"]
