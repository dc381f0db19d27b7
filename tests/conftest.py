import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

BACKENDS = ["graphpatch_eager", "graphpatch"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with no compiled frames, so counts and names never leak across tests."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param
