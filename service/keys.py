"""Typed keys for what the app holds; nothing else lives here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from service.cascade import Cascade
    from service.coherence import Coherence
    from service.metrics import Metrics
    from service.mode import Mode
    from service.settings import Settings
    from service.tiers.memory import MemoryTier
    from service.tiers.redis import RedisTier
    from service.tiers.sqlite import SqliteTier

settings_key: web.AppKey[Settings] = web.AppKey("settings")
metrics_key: web.AppKey[Metrics] = web.AppKey("metrics")
mode_key: web.AppKey[Mode] = web.AppKey("mode")
redis_key: web.AppKey[RedisTier] = web.AppKey("redis")
memory_key: web.AppKey[MemoryTier] = web.AppKey("memory")
sqlite_key: web.AppKey[SqliteTier] = web.AppKey("sqlite")
cascade_key: web.AppKey[Cascade] = web.AppKey("cascade")
coherence_key: web.AppKey[Coherence] = web.AppKey("coherence")
