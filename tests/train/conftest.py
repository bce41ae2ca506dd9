"""Fixtures for the train tests: tiny configs and models (no downloads)."""

import pytest

from jaxprune import config


def tiny_cfg(tmp_path, *overrides):
    """The tiny config on one device with a run dir under ``tmp_path``."""
    return config.load_config(
        config.CONFIG_DIR / 'tiny.yaml',
        [f'run_dir={tmp_path / "run"}', 'mesh.data=1', *overrides])


@pytest.fixture
def tiny(tmp_path):
    return lambda *overrides: tiny_cfg(tmp_path, *overrides)


@pytest.fixture(autouse=True)
def _models_exports(monkeypatch):
    """Stand-in until ``jaxprune/models/__init__.py`` re-exports its public API (no-op after)."""
    from jaxprune import models

    if hasattr(models, 'BertConfig'):
        return
    from jaxprune.models import _bert, _hf, _llama

    for mod in (_bert, _llama, _hf):
        for name in dir(mod):
            if not name.startswith('_') and not hasattr(models, name):
                monkeypatch.setattr(models, name, getattr(mod, name), raising=False)
