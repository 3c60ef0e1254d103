"""Server settings, read from QUORUM_* environment variables (pydantic-settings).

`ApiSettings` holds what the public API's routes read (address, limits, admin); `Settings` adds
how a server loads and runs its bundle (or its shard of one); `GatewaySettings` which shards a
gateway answers from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["MIN_TOKEN_LENGTH", "ApiSettings", "GatewaySettings", "Settings"]

MIN_TOKEN_LENGTH = 16  # a shorter admin token is guessable: the admin API stays off


class ApiSettings(BaseSettings):
    """What the public API's routes read: the address, the limits, the admin surface."""

    model_config = SettingsConfigDict(env_prefix="QUORUM_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port).")
    admin_token: SecretStr | None = Field(
        None,
        description=f"Bearer token of /admin/* (at least {MIN_TOKEN_LENGTH} characters); unset, empty or shorter: "
        "the admin API is off.",
    )
    admin_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve /admin/* and /metrics on this port only, apart from the public API (default: on the "
        "public port).",
    )
    admin_host: str = Field("127.0.0.1", description="Address of the admin port.")
    allow_fault_injection: bool = Field(
        False, description="Let any client inject faults per request (fail, nan, delay_ms); else admins only."
    )
    max_batch: int = Field(256, ge=1, description="Most inputs in one request (413 beyond).")
    max_elements: int = Field(
        262_144, ge=1, description="Most numbers in one request, over all its inputs (413 beyond)."
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body (413 beyond).")
    max_in_flight: int = Field(
        32, ge=1, description="Inference requests handled at once; beyond, a 503 with Retry-After at once."
    )
    log_level: str = Field("info", description="uvicorn log level.")

    @property
    def admin_enabled(self) -> bool:
        """An admin token of the minimum length is set."""
        return self.admin_token is not None and len(self.admin_token.get_secret_value()) >= MIN_TOKEN_LENGTH


class Settings(ApiSettings):
    """A server of a bundle, or of a shard of one (`modules`, `shard`)."""

    bundle: Path = Field(Path("bundles/demo"), description="Bundle folder to serve.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="ONNX Runtime device.")
    executor: Literal["auto", "packed", "isolated"] = Field(
        "auto", description="packed: one call of the bundle's packed graph; isolated: one session per module."
    )
    workers: int | None = Field(
        None, ge=1, description="Concurrent module runs per request (isolated; default: cores)."
    )
    module_timeout_ms: float = Field(
        1000.0, gt=0, description="Time a module run may take, from its start (isolated); a request ends by twice this."
    )
    packed_cache_mb: float = Field(
        64.0, ge=0, description="Memory for cached gathered weights of repeated subsets (packed; 0: off)."
    )
    packed_threads: int = Field(1, ge=1, description="Intra-op threads of the packed session (2 helps big batches).")
    packed_compile: bool = Field(
        True, description="Compile cached subsets into sessions with constant weights (in the background)."
    )
    disagreement: bool = Field(
        True,
        description="Answers carry the modules' disagreement (mutual information, vote share); off saves its cost.",
    )
    wait_for_first: bool = Field(
        False, description="Under deadline_ms, wait past the deadline for the first module rather than answer 503."
    )
    breaker_failures: int = Field(5, ge=0, description="Failures within the window that open a module's breaker.")
    breaker_window_s: float = Field(30.0, gt=0, description="Window in which failures are counted.")
    breaker_open_s: float = Field(30.0, gt=0, description="Time a module stays out of rotation before a retry.")
    bundle_root: Path | None = Field(
        None, description="Folder that /admin/reload may load bundles from (default: the served bundle's parent)."
    )
    modules: str | None = Field(
        None, description="Serve only these modules, a shard of the bundle: ids and ranges, e.g. 0-63 or 0,5,9-12."
    )
    shard: str | None = Field(
        None, description="Serve shard i of n of the bundle's modules (ids in n blocks), e.g. 1/4."
    )

    def served_modules(self, num_modules: int) -> set[int] | None:
        """The module ids this server loads: those of `modules` or `shard`, or None for all."""
        if self.modules is not None and self.shard is not None:
            raise ValueError("give --modules or --shard, not both")
        if self.shard is not None:
            i, _, n = self.shard.partition("/")
            if not (i.isascii() and i.isdigit() and n.isascii() and n.isdigit()) or not 1 <= int(i) <= int(n):
                raise ValueError(f"--shard must be i/n with 1 <= i <= n, e.g. 1/4; got {self.shard!r}")
            k, count = int(i) - 1, int(n)
            return set(range(k * num_modules // count, (k + 1) * num_modules // count))
        if self.modules is None:
            return None
        ids: set[int] = set()
        for part in self.modules.replace(" ", "").split(","):
            lo, dash, hi = part.partition("-")
            if not (lo.isascii() and lo.isdigit() and (not dash or (hi.isascii() and hi.isdigit()))):
                raise ValueError(f"--modules takes ids and ranges like 0-63 or 0,5,9-12; got {self.modules!r}")
            ids.update(range(int(lo), int(hi if dash else lo) + 1))
        if bad := sorted(j for j in ids if j >= num_modules):
            raise ValueError(
                f"--modules names {bad[:5]}, beyond the bundle's {num_modules} modules (0..{num_modules - 1})"
            )
        return ids

    @property
    def reload_root(self) -> Path:
        """The folder /admin/reload may load bundles from."""
        return (self.bundle_root or Path(self.bundle).absolute().parent).resolve()


class GatewaySettings(ApiSettings):
    """A gateway over shards (`quorum gateway`)."""

    shards: list[str] = Field(
        default_factory=list,
        description="Base URLs of the shards, e.g. http://10.0.0.1:8000 (QUORUM_SHARDS: a JSON list).",
    )
    shard_timeout_ms: float = Field(
        2000.0, gt=0, description="Time a shard may take to answer a request without a deadline."
    )
    health_interval_s: float = Field(0.5, gt=0, description="Time between two health checks of every shard.")
    connect_wait_s: float = Field(60.0, ge=0, description="Time to wait at start for a first shard to answer.")
    coalesce_rows: int = Field(
        256,
        ge=0,
        le=4096,
        description="Most inputs in one call to a shard that coalesces concurrent requests for the same modules "
        "(0: one call per request).",
    )
