import pytest

from cprec.errors import ConfigError
from cprec.sharing import SHARING_SCHEMES, conv_sharing_index


@pytest.mark.parametrize(
    "scheme,expected",
    [
        ("none", (8, (0, 1, 2, 3, 4, 5, 6, 7))),
        ("cross_layer", (1, (0,) * 8)),
        ("cross_block", (2, (0, 1) * 4)),
        ("adjacent_layer", (4, (0, 0, 1, 1, 2, 2, 3, 3))),
        ("adjacent_block", (4, (0, 1, 0, 1, 2, 3, 2, 3))),
    ],
)
def test_sharing_index(scheme, expected):
    assert conv_sharing_index(scheme, 4) == expected


def test_unknown_scheme_names_choices():
    with pytest.raises(ConfigError, match="model.sharing='layerwise' is unknown; valid choices: none"):
        conv_sharing_index("layerwise", 4)


def test_adjacent_block_needs_even_blocks():
    with pytest.raises(ConfigError, match="even number of residual blocks, got 5"):
        conv_sharing_index("adjacent_block", 5)


def test_all_schemes_listed():
    assert set(SHARING_SCHEMES) == {"none", "cross_layer", "cross_block", "adjacent_layer", "adjacent_block"}
