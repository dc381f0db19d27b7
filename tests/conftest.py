import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Scripts the tests run in a subprocess (demo.py, gpu_check.py) count compiled variants too.
os.environ["PATCH_BACKEND_COMPILE_POLICY"] = "sync"

BACKENDS = ["graphpatch_eager", "graphpatch"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with no compiled frames, so counts and names never leak across tests."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _compile_in_the_call():
    """Tests compile in the call that first needs them (compile_policy "sync"; the library's
    default is "background"), whatever the environment says, so counts of compiled variants
    and tiers are deterministic; test_tiers.py sets the other policies explicitly."""
    import patch_backend as pb

    with pb.config.patch(compile_policy="sync"):
        yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param
