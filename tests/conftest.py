import pytest
import torch

torch.set_num_threads(1)  # tiny CPU ops: threads only add contention

from graphrt.models.wan import CausalWan, ReferenceWan, WanConfig


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _graph_cache(tmp_path_factory):
    """Compiled graphs of the tests go to a folder of the test session, not the user's cache."""
    from graphrt.capture.diskcache import ENV

    mp = pytest.MonkeyPatch()
    mp.setenv(ENV, str(tmp_path_factory.mktemp("graphrt-cache")))
    yield
    mp.undo()


@pytest.fixture
def cfg():
    return WanConfig.preset("tiny")


@pytest.fixture
def models(cfg):
    """A ReferenceWan and a CausalWan with the same random weights (fp32, eval)."""
    ref = ReferenceWan(cfg).eval()
    causal = CausalWan(cfg, attention="sdpa").eval()
    causal.load_state_dict(ref.state_dict())
    return ref, causal


def rel_err(a, b):
    """Max abs error relative to the reference's max abs value."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
