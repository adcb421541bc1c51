"""Upstream: the OpenAI API (or the simulator) behind one port, its errors translated."""

from openai.types import Batch

from service.upstream.errors import UpstreamError, UpstreamRateLimited
from service.upstream.port import Upstream

__all__ = ["Batch", "Upstream", "UpstreamError", "UpstreamRateLimited"]
