"""``run --ray`` without the ``ray`` extra: a usage error that says how to install it."""

from __future__ import annotations

import sys

import pytest

from infer_bench.errors import UsageError
from infer_bench.ray_shards import connect


def test_without_ray_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed: ``import ray`` fails
    with pytest.raises(UsageError, match=r"--ray needs Ray, an optional extra: pip install 'infer-bench\[ray\]'"):
        connect("auto")
