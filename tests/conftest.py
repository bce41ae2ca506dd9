"""Test-wide setup: 8 simulated CPU devices and no hub access, set before jax is imported."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import pytest


@pytest.fixture
def tmp_ckpt(tmp_path):
    """A fresh checkpoint directory."""
    return tmp_path / 'ckpt'
