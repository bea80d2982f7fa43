"""The one settings object: every knob of the service, read from the environment or `.env`.

Durations are in seconds and sizes in bytes; each name says so where it could be doubted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

from pydantic import (
    AnyUrl,
    Field,
    SecretStr,
    UrlConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

RedisUrl = Annotated[AnyUrl, UrlConstraints(allowed_schemes=["redis", "rediss", "unix"])]

#: Where the service keeps its own keys in Redis (the invalidation feed and the data-set id).
INTERNAL_NAMESPACE = "tiercache-internal:"

KiB = 1024
MiB = 1024 * KiB


class Settings(BaseSettings):
    """Configuration of one service process. See `config/example.env` for every variable."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,  # `VAR=` means "the default", as in config/example.env
        extra="ignore",
        frozen=True,
    )

    # Redis: REDIS_URL wins over the separate parts when set.
    redis_url: RedisUrl | None = None
    redis_host: str = "localhost"
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_password: SecretStr = SecretStr("")
    redis_db: int = Field(0, ge=0)
    redis_username: str | None = None
    # Sentinel: comma-separated host:port of the sentinels, and the master's name.
    redis_sentinels: Annotated[list[tuple[str, int]], NoDecode] = []
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: SecretStr | None = None
    # Cluster: comma-separated host:port of some of its nodes (the rest are discovered).
    redis_cluster_nodes: Annotated[list[tuple[str, int]], NoDecode] = []
    # TLS (rediss:// URLs, or Sentinel with REDIS_TLS=true): CA and optional client cert.
    redis_tls: bool = False
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = None
    redis_socket_timeout_seconds: float = Field(0.25, gt=0, le=30)
    redis_connect_timeout_seconds: float = Field(0.25, gt=0, le=30)
    redis_pool_size: int = Field(32, ge=1, le=10_000)

    # HTTP
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    # Worker processes sharing the port (SO_REUSEPORT), each with its own SQLite file.
    workers: int = Field(1, ge=1, le=64)
    # Access: a token for everything, or separate read and write tokens (write implies read).
    cache_api_token: SecretStr | None = None
    cache_read_token: SecretStr | None = None
    cache_write_token: SecretStr | None = None
    rate_limit_per_second: float | None = Field(None, gt=0)
    rate_limit_burst: int | None = Field(None, ge=1)

    # Cache
    cache_db_path: Path = Path("data/cache.db")
    cache_key_prefix: str = Field("cache:", min_length=1)
    cache_read_mode: Literal["cascade", "near"] = "cascade"
    cache_default_ttl_seconds: int | None = Field(None, gt=0)
    cache_max_value_bytes: int = Field(1 * MiB, gt=0)
    cache_max_pattern_delete_keys: int = Field(1_000_000, ge=1)
    memory_max_entries: int = Field(100_000, gt=0)
    memory_max_bytes: int = Field(64 * MiB, gt=0)
    sqlite_sweep_interval_seconds: float = Field(60.0, gt=0)
    feed_max_length: int = Field(100_000, ge=100)
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    sqlite_busy_timeout_seconds: float = Field(2.0, ge=0, le=60)

    # Health monitor
    health_interval_seconds: float = Field(1.0, gt=0)
    health_timeout_seconds: float = Field(0.25, gt=0)
    reconnect_backoff_base_seconds: float = Field(0.1, gt=0)
    reconnect_backoff_cap_seconds: float = Field(30.0, gt=0)
    health_stable_seconds: float = Field(30.0, gt=0)

    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    @field_validator("redis_sentinels", "redis_cluster_nodes", mode="before")
    @classmethod
    def _parse_addresses(cls, value: object) -> object:
        """`host:port,host:port` as in the environment, or already a list."""
        if not isinstance(value, str):
            return value
        addresses = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {item!r}")
            addresses.append((host.strip("[]"), int(port)))
        return addresses

    @field_validator("cache_key_prefix")
    @classmethod
    def _prefix_clear_of_internal_keys(cls, prefix: str) -> str:
        # The service's own keys (the feed, the epoch) must never match a user pattern.
        if prefix.startswith(INTERNAL_NAMESPACE) or INTERNAL_NAMESPACE.startswith(prefix):
            raise ValueError(f"must not overlap the service's own namespace {INTERNAL_NAMESPACE!r}")
        return prefix

    @model_validator(mode="after")
    def _one_topology(self) -> Settings:
        if self.redis_sentinels and self.redis_cluster_nodes:
            raise ValueError("set REDIS_SENTINELS or REDIS_CLUSTER_NODES, not both")
        return self

    @model_validator(mode="after")
    def _backoff_cap_not_below_base(self) -> Settings:
        if self.reconnect_backoff_cap_seconds < self.reconnect_backoff_base_seconds:
            raise ValueError(
                "RECONNECT_BACKOFF_CAP_SECONDS must be >= RECONNECT_BACKOFF_BASE_SECONDS"
            )
        return self

    def redis_connection_url(self) -> str:
        """The URL redis-py connects to (it may hold the password: never log it)."""
        if self.redis_url is not None:
            return str(self.redis_url)
        password = self.redis_password.get_secret_value()
        user = quote(self.redis_username or "", safe="")
        auth = f"{user}:{quote(password, safe='')}@" if password else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"

    def redis_tls_options(self) -> dict[str, object]:
        """redis-py connection options for TLS (empty when TLS is off)."""
        tls = self.redis_tls or (self.redis_url is not None and self.redis_url.scheme == "rediss")
        if not tls:
            return {}
        options: dict[str, object] = {"ssl_cert_reqs": "required"}
        if self.redis_sentinels or self.redis_cluster_nodes:
            options["ssl"] = True
        for option, path in (("ssl_ca_certs", self.redis_tls_ca_file),
                             ("ssl_certfile", self.redis_tls_cert_file),
                             ("ssl_keyfile", self.redis_tls_key_file)):  # fmt: skip
            if path is not None:
                options[option] = str(path)
        return options

    def redis_sentinel_password_value(self) -> str | None:
        secret = self.redis_sentinel_password
        return secret.get_secret_value() if secret is not None else None

    def redis_display(self) -> str:
        """Where Redis is, fit for a log line: no password."""
        if self.redis_sentinels:
            where = ",".join(f"{host}:{port}" for host, port in self.redis_sentinels)
            return f"sentinel://{where}/{self.redis_sentinel_master}"
        if self.redis_cluster_nodes:
            where = ",".join(f"{host}:{port}" for host, port in self.redis_cluster_nodes)
            return f"cluster://{where}"
        if self.redis_url is not None:
            url = self.redis_url
            if url.scheme == "unix":
                return f"unix://{url.path}"
            return f"{url.scheme}://{url.host}:{url.port}{url.path or ''}"
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"


_SECRET_NAMES = {
    "REDIS_URL", "REDIS_PASSWORD", "CACHE_API_TOKEN", "CACHE_READ_TOKEN", "CACHE_WRITE_TOKEN",
}  # fmt: skip


def describe_error(error: ValidationError) -> str:
    """One line naming each invalid variable and what it accepts."""
    parts = []
    for item in error.errors():
        name = "_".join(str(p) for p in item["loc"]).upper() or "settings"
        shown = "<hidden>" if name in _SECRET_NAMES else repr(item.get("input"))
        parts.append(f"{name}: {item['msg']} (got {shown})")
    return "invalid setting " + "; ".join(parts)
