"""The tables scale to the published models: parameter counts, widths, depths (registry-wide contract)."""

import pytest

import effnet
from effnet.architectures import architecture, round_filters, round_repeats

# Trainable parameters with a 1000-class head, as the upstream implementations report them
# (keras.applications summaries, timm's tf_ models, automl's param counts), to 0.01M.
PUBLISHED_PARAMS_M = {
    "efficientnet_b0": 5.29, "efficientnet_b1": 7.79, "efficientnet_b2": 9.11, "efficientnet_b3": 12.23,
    "efficientnet_b4": 19.34, "efficientnet_b5": 30.39, "efficientnet_b6": 43.04, "efficientnet_b7": 66.35,
    "efficientnet_lite0": 4.65, "efficientnet_lite1": 5.42, "efficientnet_lite2": 6.09,
    "efficientnet_lite3": 8.20, "efficientnet_lite4": 13.01,
    "efficientnetv2_b0": 7.14, "efficientnetv2_b1": 8.14, "efficientnetv2_b2": 10.10, "efficientnetv2_b3": 14.36,
    "efficientnetv2_s": 21.46, "efficientnetv2_m": 54.14, "efficientnetv2_l": 118.52, "efficientnetv2_xl": 208.12,
}
FEATURE_DIMS = {
    **dict(zip([f"efficientnet_b{i}" for i in range(8)], [1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560])),
    **{f"efficientnet_lite{i}": 1280 for i in range(5)},
    "efficientnetv2_b0": 1280, "efficientnetv2_b1": 1280, "efficientnetv2_b2": 1408, "efficientnetv2_b3": 1536,
    "efficientnetv2_s": 1280, "efficientnetv2_m": 1280, "efficientnetv2_l": 1280, "efficientnetv2_xl": 1280,
}


def test_every_model_is_listed():
    assert sorted(effnet.list_models()) == sorted(PUBLISHED_PARAMS_M)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_and_feature_dim(name):
    model = effnet.create(name)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(PUBLISHED_PARAMS_M[name], abs=0.006)
    assert model.spec.feature_dim == model.num_features == FEATURE_DIMS[name]


def test_rounding_rules():
    assert round_filters(32, 1.8, True) == 56  # B6 stem
    assert round_filters(1280, 1.8, True) == 2304  # B6 head
    assert round_filters(16, 1.1, True) == 16
    # the 10% bump: 8 * 1.4 = 11.2 rounds to 8, 29% down, so V1 bumps to 16; automl V2 does not
    assert round_filters(8, 1.4, True) == 16 and round_filters(8, 1.4, False) == 8
    assert round_repeats(3, 1.1) == 4 and round_repeats(1, 3.1) == 4


def test_lite_keeps_stem_head_and_outer_repeats():
    lite4 = architecture("efficientnet_lite4")
    assert lite4.stem_channels == 32 and lite4.head_channels == 1280
    assert len(lite4.stages[0]) == 1 and len(lite4.stages[-1]) == 1
    assert all(block.se_ratio == 0 for stage in lite4.stages for block in stage)
    assert lite4.family.activation == "relu6"


def test_drop_path_grows_linearly_to_the_last_block():
    blocks = [b for stage in architecture("efficientnet_b0").stages for b in stage]
    rates = [b.drop_path_rate for b in blocks]
    assert rates[0] == 0 and rates == sorted(rates) and rates[-1] == pytest.approx(0.2 * 15 / 16)
