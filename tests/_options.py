"""Every adapter takes the shared options with the same names and defaults as GuardConfig."""

from __future__ import annotations

import dataclasses
import inspect

from nanguard.config import GuardConfig


def assert_shared_options(cls: type) -> None:
    params = inspect.signature(cls.__init__).parameters
    for field in dataclasses.fields(GuardConfig):
        assert field.name in params, f"{cls.__module__}.{cls.__name__} lacks `{field.name}`"
        assert params[field.name].default == field.default, (cls, field.name)
    guard_config = cls.__init__.__globals__["GuardConfig"]
    assert guard_config is GuardConfig
