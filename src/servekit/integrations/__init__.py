"""Adapters that serve models from other ecosystems; each needs its own extra.

Import the submodule you need, e.g. ``servekit.integrations.mlflow`` (extra ``mlflow``);
``import servekit`` imports none of them.
"""
