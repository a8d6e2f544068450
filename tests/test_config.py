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
