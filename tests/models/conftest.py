"""Fixtures for model tests: run under both NNX graph mode and tree mode."""

import pytest
from flax import nnx


@pytest.fixture(params=[True, False], ids=['graph', 'tree'])
def graph_mode(request):
    with nnx.set_graph_mode(request.param):
        yield request.param
