"""Server settings: one pydantic-settings class, read from QUORUM_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["MIN_TOKEN_LENGTH", "Settings"]

MIN_TOKEN_LENGTH = 16  # a shorter admin token is guessable: the admin API stays off


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUORUM_", extra="ignore")

    bundle: Path = Field(Path("bundles/demo"), description="Bundle folder to serve.")
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port).")
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
    wait_for_first: bool = Field(
        False, description="Under deadline_ms, wait past the deadline for the first module rather than answer 503."
    )
    breaker_failures: int = Field(5, ge=0, description="Failures within the window that open a module's breaker.")
    breaker_window_s: float = Field(30.0, gt=0, description="Window in which failures are counted.")
    breaker_open_s: float = Field(30.0, gt=0, description="Time a module stays out of rotation before a retry.")
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
    bundle_root: Path | None = Field(
        None, description="Folder that /admin/reload may load bundles from (default: the served bundle's parent)."
    )
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

    @property
    def reload_root(self) -> Path:
        """The folder /admin/reload may load bundles from."""
        return (self.bundle_root or Path(self.bundle).absolute().parent).resolve()
