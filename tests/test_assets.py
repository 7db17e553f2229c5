"""harness.assets: the bundled assets' references, and a hub that cannot be reached."""

from __future__ import annotations

import pytest

from harness import assets
from harness.errors import HarnessError


@pytest.fixture
def no_hub(monkeypatch):
    """A hub endpoint on a closed local port: the probe is refused at once, as on a node without
    a route out (no network is needed, and none is used)."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    assets.hub_reachable.cache_clear()
    yield
    assets.hub_reachable.cache_clear()


def test_an_unreachable_hub_is_probed_once_and_the_cache_alone_is_asked(no_hub):
    from harness.config import ModelConfig
    from harness.data.corpus import load_tokenizer
    from harness.model.build import model_spec

    assert assets.hub_reachable() is False
    with pytest.raises(HarnessError) as model:
        model_spec(ModelConfig(pretrained="meta-llama/Llama-3.1-8B", config={}), 0, locate_weights=False)
    assert "the hub cannot be reached from this machine" in str(model.value)
    assert "a local folder with the model's config.json" in str(model.value) and "\n" not in str(model.value)
    with pytest.raises(HarnessError, match="data.tokenizer 'meta-llama/Llama-3.1-8B' is not a local folder"):
        load_tokenizer("meta-llama/Llama-3.1-8B")


def test_a_proxy_or_offline_flag_decides_without_a_probe(monkeypatch, no_hub):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert assets.hub_reachable() is True
    assets.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert assets.hub_reachable() is False
