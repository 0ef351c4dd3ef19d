"""The reference batching server that infer-bench tests against and learns from."""

from reference_server.app import create_app
from reference_server.settings import ServerSettings, load_settings

__all__ = ["ServerSettings", "create_app", "load_settings"]
