import pytest

from cprec.errors import ConfigError
from cprec.model.sharing import SHARING_SCHEMES, conv_sharing_index


# Conv layer -> kernel index for 4 blocks of two convs each, written out from the paper's definitions.
EXPECTED = {
    "none": (8, (0, 1, 2, 3, 4, 5, 6, 7)),
    "cross_layer": (1, (0,) * 8),
    "cross_block": (2, (0, 1) * 4),
    "adjacent_layer": (4, (0, 0, 1, 1, 2, 2, 3, 3)),
    "adjacent_block": (4, (0, 1, 0, 1, 2, 3, 2, 3)),
}


@pytest.mark.parametrize("scheme", SHARING_SCHEMES)
def test_sharing_index(scheme):
    # Parametrized over the library's list: a scheme added there without an expected map fails here.
    assert conv_sharing_index(scheme, 4) == EXPECTED[scheme]
    n_unique, index = conv_sharing_index(scheme, 6)
    assert sorted(set(index)) == list(range(n_unique))  # every kernel is used, none is left untrained


def test_unknown_scheme_names_choices():
    with pytest.raises(ConfigError, match="model.sharing='layerwise' is unknown; valid choices: none"):
        conv_sharing_index("layerwise", 4)


def test_adjacent_block_needs_even_blocks():
    with pytest.raises(ConfigError, match="even number of residual blocks, got 5"):
        conv_sharing_index("adjacent_block", 5)

