import pytest

from lightning_memkit.config import ActivationsConfig, MemKitConfigError, parse_activations


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ActivationsConfig()),
        ("none", ActivationsConfig()),
        ("checkpoint", ActivationsConfig(checkpoint="blocks")),
        ({"checkpoint": "blocks", "checkpoint_every": 3}, ActivationsConfig(checkpoint="blocks", checkpoint_every=3)),
        (ActivationsConfig(checkpoint="blocks"), ActivationsConfig(checkpoint="blocks")),
    ],
)
def test_parse_activations(value, expected):
    assert parse_activations(value) == expected


@pytest.mark.parametrize(
    ("value", "fragments"),
    [
        ("int9", ["activations='int9'", "'none'", "'checkpoint'"]),
        ({"checkpoint": "everything"}, ["activations.checkpoint='everything'", "'blocks'"]),
        ({"chekpoint": "blocks"}, ["unknown key", "'chekpoint'", "'checkpoint_every'"]),
        ({"checkpoint": "blocks", "checkpoint_every": 0}, ["activations.checkpoint_every=0", ">= 1"]),
        ({"checkpoint": "blocks", "checkpoint_every": "2"}, ["activations.checkpoint_every='2'", "str"]),
        ({"checkpoint": "blocks", "checkpoint_every": True}, ["activations.checkpoint_every=True", "bool"]),
        ({"checkpoint": 1}, ["activations.checkpoint=1", "int"]),
        (3, ["activations=3", "int"]),
    ],
)
def test_bad_activations_name_key_and_fix(value, fragments):
    with pytest.raises(MemKitConfigError) as err:
        parse_activations(value)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message
    assert "Fix:" in message


# ----- optimizer: the names and keys of issue 19 ------------------------------------------------------------------
from lightning_memkit.config import (  # noqa: E402
    IN_BACKWARD_OPTIMIZERS, OPTIMIZER_KEYS, OPTIMIZER_NAMES, OptimizerConfig, parse_optimizer,
)


@pytest.mark.parametrize("setting", [
    {"name": "spam", "reset_interval": 500, "spike_threshold": 5000, "reset_warmup": 150, "density": 0.25,
     "target_modules": ["*.q_proj"], "in_backward": True},
    {"name": "sgd_sai", "in_backward": True},
    {"name": "cosmos", "rank": 64, "update_gap": 100, "scale": 0.5, "target_modules": ["*"], "in_backward": True},
    {"name": "natural_galore", "rank": 8, "update_gap": 200, "scale": 0.25, "history": 10, "damping": 1e-3},
    {"name": "natural_galore8bit", "history": 4, "damping": 0.1, "in_backward": True},
    {"name": "zo_sgd", "perturbation": 1e-3, "n_perturbations": 2, "blockwise": True, "seed": 7},
    {"name": "zo_adam", "perturbation": 1e-3},
])
def test_new_optimizers_take_their_keys(setting):
    config = parse_optimizer(setting)
    assert config.name == setting["name"] and setting["name"] in OPTIMIZER_NAMES
    for key, value in setting.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(config, key) == expected


def test_the_new_names_and_what_runs_in_backward():
    assert {"spam", "sgd_sai", "cosmos", "natural_galore", "natural_galore8bit", "zo_sgd", "zo_adam"} <= \
        set(OPTIMIZER_NAMES)
    assert OPTIMIZER_KEYS["sgd_sai"] == ()
    assert not {"zo_sgd", "zo_adam"} & set(IN_BACKWARD_OPTIMIZERS)
    assert OptimizerConfig(name="spam").optimizer_kwargs() == {}
    assert OptimizerConfig(name="zo_sgd", perturbation=1e-3, blockwise=False).optimizer_kwargs() == {
        "perturbation": 1e-3, "blockwise": False}


@pytest.mark.parametrize("name", ["apollo", "apollo_mini"])
def test_apollo_limiter_on_is_a_key_that_reaches_the_optimizer(name):
    """``limiter_on`` (issue 19's APOLLO fidelity change) is an optimizer key of APOLLO / APOLLO-Mini only, checked
    at construction, and passed to the optimizer class; unset, the optimizer's default ("raw") applies."""
    import torch

    from lightning_memkit.optim import OPTIMIZER_CLASSES

    config = parse_optimizer({"name": name, "limiter_on": "corrected"})
    assert config.limiter_on == "corrected" and config.optimizer_kwargs() == {"limiter_on": "corrected"}
    weight = torch.nn.Parameter(torch.randn(8, 6))
    opt = OPTIMIZER_CLASSES[name]([weight], lr=1e-2, rank=2, lowrank_params=[weight], **config.optimizer_kwargs())
    assert opt.param_groups[0]["limiter_on"] == "corrected"
    default = OPTIMIZER_CLASSES[name]([weight], lr=1e-2, rank=2, lowrank_params=[weight],
                                      **parse_optimizer(name).optimizer_kwargs())
    assert default.param_groups[0]["limiter_on"] == "raw"
    with pytest.raises(MemKitConfigError, match=r"optimizer.limiter_on='bias'.*Fix: set optimizer.limiter_on to one "
                                                r"of 'raw', 'corrected'"):
        parse_optimizer({"name": name, "limiter_on": "bias"})
    with pytest.raises(MemKitConfigError, match=r"optimizer.limiter_on='raw' does not apply to optimizer "
                                                r"'galore_adamw' \(it is a setting of apollo, apollo_mini\)"):
        parse_optimizer({"name": "galore_adamw", "limiter_on": "raw"})


@pytest.mark.parametrize(("setting", "fragments"), [
    ({"name": "spam", "density": 0}, ["optimizer.density=0", "(0, 1]"]),
    ({"name": "spam", "density": 1.01}, ["optimizer.density=1.01"]),
    ({"name": "spam", "reset_interval": 0}, ["optimizer.reset_interval=0", ">= 1"]),
    ({"name": "spam", "reset_warmup": -1}, ["optimizer.reset_warmup=-1"]),
    ({"name": "spam", "reset_warmup": 200, "reset_interval": 100}, ["reset_warmup=200", "reset_interval=100"]),
    ({"name": "spam", "spike_threshold": "big"}, ["optimizer.spike_threshold='big'", "str"]),
    ({"name": "spam", "rank": 8}, ["optimizer.rank=8 does not apply to optimizer 'spam'"]),
    ({"name": "spam", "target_modules": ["*"]}, ["optimizer.target_modules=['*']", "density=None", "below 1"]),
    ({"name": "sgd_sai", "reset_interval": 10}, ["optimizer.reset_interval=10 does not apply", "spam"]),
    ({"name": "natural_galore", "damping": 0}, ["optimizer.damping=0", "> 0"]),
    ({"name": "natural_galore", "history": 0}, ["optimizer.history=0"]),
    ({"name": "zo_sgd", "perturbation": 0.0}, ["optimizer.perturbation=0.0"]),
    ({"name": "zo_sgd", "n_perturbations": 0}, ["optimizer.n_perturbations=0"]),
    ({"name": "zo_adam", "blockwise": "yes"}, ["optimizer.blockwise='yes'", "true or"]),
    ({"name": "zo_adam", "in_backward": True}, ["in_backward=true with optimizer 'zo_adam'", "no backward"]),
    ({"name": "adamw8bit", "in_backward": True}, ["bitsandbytes"]),
    ({"name": "cosmos", "density": 0.5}, ["optimizer.density=0.5 does not apply to optimizer 'cosmos'"]),
])
def test_bad_optimizer_settings_name_key_value_and_fix(setting, fragments):
    with pytest.raises(MemKitConfigError) as err:
        parse_optimizer(setting)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "Fix:" in message
