import pytest
from conftest import sd35_sigmas

from flowbp_ops.backbones.table import BACKBONES
from flowbp_ops.methods import METHODS, get_method
from flowbp_ops.surrogate import ConfigError, build_plan


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_preset_validates_and_plans(method, backbone):
    cfg = get_method(method, backbone)
    plan = build_plan(cfg, sd35_sigmas(25), 0)
    assert plan.active and plan.n_steps == 25


@pytest.mark.parametrize("method, overrides, steps, words", [
    ("flowbp_sparse", ["active.k=30"], 25, ["active.k", "1..25"]),
    ("flowbp_sparse", ["active.k=12", "active.tail_ratio=0.4"], 25, ["active.k", "1..10"]),
    ("flowbp_bridge", ["bridge.alpha=1.5"], 25, ["bridge.alpha", "less than or equal to 1"]),
    ("flowbp_lagrange", ["bridge.alpha=-0.1"], 25, ["bridge.alpha", "greater than or equal to 0"]),
    ("flowbp_lagrange", ["weights.order=0"], 25, ["weights.order", "greater than or equal to 1"]),
    ("flowbp_lagrange", [], 2, ["steps", "at least 3"]),
    ("leapalign", [], 1, ["steps", "at least 2"]),
    ("drtune", ["active.k=30"], 25, ["active.k", "1..16"]),
    ("flowbp_lagrange", ["weights.max_active_supports=4"], 25, ["weights.max_active_supports", "1..weights.order"]),
    ("flowbp_sparse", ["reward_input.kind=posterior_mean"], 25, ["reward_input.kind", "endpoint"]),
    ("flowbp_sparse", ["active.nope=1"], 25, ["active.nope", "unknown setting"]),
    ("custom", ["active.sampler=explicit", "active.indices=[3, 3]"], 25, ["active.indices", "distinct"]),
])
def test_invalid_settings_fail_at_config_time_naming_field_and_range(method, overrides, steps, words):
    with pytest.raises(ConfigError) as exc:
        cfg = get_method(method, "sd35", overrides=overrides)
        cfg.check(steps)
    for w in words:
        assert w in str(exc.value)


def test_unknown_method_and_backbone():
    with pytest.raises(ConfigError, match="unknown method 'dpo'.*refl"):
        get_method("dpo")
    with pytest.raises(ConfigError, match="unknown backbone 'sdxl'.*sd35"):
        get_method("refl", "sdxl")
