"""Typed daemon settings: `config.yaml`, then the environment, then command-line overrides.

Unknown keys are errors (named in the message), values are range-checked, and secrets never come from the file:
the database password and the Kafka SASL/SSL passwords are read from the environment only.

    settings = load_settings("config.yaml", overrides={"kafka.group_id": "g1"})
    settings.resolved()  # JSON-ready dict, secrets masked; stored with checkpoints and rounds
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pipelines.settings import EngineSettings, LearnerSettings
from storage.db import DEFAULT_DATABASE_URL, ENV_DATABASE_URL

ENV_DATABASE_PASSWORD = "ONLINESPEC_DATABASE_PASSWORD"
ENV_KAFKA_SASL_PASSWORD = "ONLINESPEC_KAFKA_SASL_PASSWORD"
ENV_KAFKA_SSL_PASSWORD = "ONLINESPEC_KAFKA_SSL_PASSWORD"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and what is wrong with it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    prompts_topic: str = Field("prompts", min_length=1)
    completions_topic: str = Field("completions", min_length=1)
    dlq_topic: str = Field("prompts.dlq", min_length=1)
    group_id: str = Field("onlinespec", min_length=1)
    client_id: str = "onlinespec"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(10_000, ge=1_000, le=3_600_000)
    heartbeat_interval_ms: int = Field(3_000, ge=100, le=600_000)
    max_poll_interval_ms: int = Field(300_000, ge=1_000, le=86_400_000)
    max_poll_records: int = Field(256, ge=1, le=100_000)
    fetch_max_wait_ms: int = Field(100, ge=0, le=60_000)  # a broker that holds fetches delays every new prompt
    request_timeout_ms: int = Field(30_000, ge=1_000, le=600_000)
    produce_timeout_s: float = Field(30.0, gt=0, le=600)
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    max_request_size: int = Field(1_048_576, ge=16_384, le=100_000_000)  # a dead letter's headers fit
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None  # environment only
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None  # environment only
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> KafkaSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be at most a third of "
                f"session_timeout_ms ({self.session_timeout_ms})"
            )
        if self.max_poll_interval_ms < self.session_timeout_ms:
            raise ValueError("max_poll_interval_ms must not be below session_timeout_ms")
        if len({self.prompts_topic, self.completions_topic, self.dlq_topic}) != 3:
            raise ValueError("prompts_topic, completions_topic and dlq_topic must be three different topics")
        return self

    def client_options(self) -> dict[str, Any]:
        """Connection and security options shared by consumer, producer and admin clients."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_plain_username
            if self.sasl_plain_password is not None:
                options["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name):
                options[name] = getattr(self, name)
        if self.ssl_password is not None:
            options["ssl_password"] = self.ssl_password.get_secret_value()
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_check_hostname"] = self.ssl_check_hostname
        return options


class DatabaseSettings(_Section):
    url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    auto_migrate: bool = False


class ModelSettings(_Section):
    target: str | None = None
    draft: str | None = None  # a draft LM, a head folder, or "new-head" (pipelines.models.load_pair)
    head_layers: int = Field(1, ge=1, le=8)  # decoder layers of a new head
    head_feature_layers: list[int] = []  # target layers a new head fuses beside the last (pipelines.heads.model)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device(value)


def check_device(value: str) -> str:
    if value != "cpu" and value != "cuda" and not (value.startswith("cuda:") and value[5:].isdigit()):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {value!r}")
    return value


class BatchingSettings(_Section):
    max_wait_ms: int = Field(20, ge=0, le=60_000)
    queue_size: int = Field(64, ge=1, le=100_000)
    resume_below: float = Field(0.5, gt=0, lt=1)


class LimitSettings(_Section):
    max_message_bytes: int = Field(1_000_000, ge=256, le=100_000_000)
    max_prompt_chars: int = Field(200_000, ge=1)
    max_id_chars: int = Field(256, ge=1, le=512)  # storage keeps ids up to 512 characters
    max_messages: int = Field(256, ge=1)
    max_metadata_bytes: int = Field(16_384, ge=0)
    max_stop_strings: int = Field(8, ge=0, le=64)
    default_max_new_tokens: int = Field(256, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    keep_dead_letter_values: bool = False  # the whole value of every dead letter in dead_letters.value

    @model_validator(mode="after")
    def _default_within_limit(self) -> LimitSettings:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must be <= max_new_tokens")
        return self


class DaemonSettings(_Section):
    shutdown_grace_s: float = Field(30.0, gt=0, le=3600)
    retry_initial_s: float = Field(0.5, gt=0, le=60)
    retry_max_s: float = Field(15.0, gt=0, le=600)
    metrics_port: int = Field(9464, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    status_interval_s: float = Field(5.0, gt=0, le=600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    stall_after_s: float = Field(30.0, gt=0, le=3600)  # committed offset still while records wait: a stall

    @model_validator(mode="after")
    def _backoff_order(self) -> DaemonSettings:
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be >= retry_initial_s")
        return self


class LiveGuardSettings(_Section):
    enabled: bool = True
    min_requests: int = Field(64, ge=1, le=1_000_000)
    margin: float = Field(0.05, ge=0, lt=1)
    check_interval_s: float = Field(10.0, gt=0, le=3600)


class LearningSettings(_Section):
    enabled: bool = False
    learner: LearnerSettings = LearnerSettings()
    interval_s: float = Field(3600.0, gt=0, le=7 * 86_400)
    check_interval_s: float = Field(10.0, gt=0, le=3600)
    min_new_tokens: int = Field(20_000, ge=1)
    window_max_rows: int = Field(2_000, ge=2, le=1_000_000)
    heldout_rows: int = Field(64, ge=1, le=100_000)
    train_history_rows: int = Field(0, ge=0, le=1_000_000)  # rows from before the window trained on too
    min_heldout_tokens: int = Field(2_000, ge=1)
    promote_margin: float = Field(0.02, ge=0, le=10)
    checkpoint_dir: str = Field("var/checkpoints", min_length=1)
    device: str | None = None
    training_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    store_rejected: bool = False  # a rejected candidate's weights are a draft-sized file per round
    cpu_threads: int = Field(1, ge=1, le=1024)
    deployment: str = Field("default", min_length=1, max_length=64)
    follow_interval_ms: int = Field(100, ge=0, le=600_000)
    live_guard: LiveGuardSettings = LiveGuardSettings()

    @field_validator("device")
    @classmethod
    def _known_training_device(cls, value: str | None) -> str | None:
        return None if value is None else check_device(value)

    @model_validator(mode="after")
    def _heldout_fits_the_window(self) -> LearningSettings:
        if self.heldout_rows >= self.window_max_rows:
            raise ValueError(
                f"heldout_rows ({self.heldout_rows}) must be below window_max_rows ({self.window_max_rows}): "
                "the held-out rows are the newest rows of the window"
            )
        return self


class Settings(_Section):
    kafka: KafkaSettings = KafkaSettings()
    database: DatabaseSettings = DatabaseSettings()
    models: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    batching: BatchingSettings = BatchingSettings()
    limits: LimitSettings = LimitSettings()
    daemon: DaemonSettings = DaemonSettings()
    learning: LearningSettings = LearningSettings()

    @model_validator(mode="after")
    def _prompt_limit_fits(self) -> Settings:
        if self.limits.max_new_tokens >= self.engine.max_seq_len:
            raise ValueError("limits.max_new_tokens must be below engine.max_seq_len")
        return self

    def resolved(self) -> dict[str, Any]:
        """Every setting after file, environment and overrides; secrets masked. JSON-serialisable."""
        data = self.model_dump(mode="json")
        data["database"]["url"] = mask_url_password(self.database.url.get_secret_value())
        return data


def mask_url_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return "<unparseable>"
    return parsed.render_as_string(hide_password=True)


def _url_has_password(url: str) -> bool:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password is not None
    except Exception:
        return False


SECRET_KEYS = {("kafka", "sasl_plain_password"), ("kafka", "ssl_password")}


def load_settings(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings: file (optional), then environment secrets and URL, then `section.key` overrides."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
        _refuse_secrets_in_file(data, path)
    data = _deep_copy(data)
    _apply_environment(data, environ)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r} must be written section.key")
        data.setdefault(section, {})[key] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for section, body in data.items():
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
    return {section: body or {} for section, body in data.items()}


def _refuse_secrets_in_file(data: dict[str, Any], path) -> None:
    for section, key in SECRET_KEYS:
        if data.get(section, {}).get(key) is not None:
            env = ENV_KAFKA_SASL_PASSWORD if key == "sasl_plain_password" else ENV_KAFKA_SSL_PASSWORD
            raise ConfigError(f"{path}: {section}.{key} must not be in the file; set {env} in the environment")
    url = data.get("database", {}).get("url")
    if isinstance(url, str) and _url_has_password(url):
        raise ConfigError(
            f"{path}: database.url contains a password; put it in {ENV_DATABASE_PASSWORD} "
            f"(or the whole URL in {ENV_DATABASE_URL})"
        )


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    database = data.setdefault("database", {})
    if environ.get(ENV_DATABASE_URL):
        database["url"] = environ[ENV_DATABASE_URL]
    if environ.get(ENV_DATABASE_PASSWORD):
        from sqlalchemy.engine import make_url

        url = database.get("url", DatabaseSettings().url.get_secret_value())
        database["url"] = (
            make_url(url).set(password=environ[ENV_DATABASE_PASSWORD]).render_as_string(hide_password=False)
        )
    kafka = data.setdefault("kafka", {})
    if environ.get(ENV_KAFKA_SASL_PASSWORD):
        kafka["sasl_plain_password"] = environ[ENV_KAFKA_SASL_PASSWORD]
    if environ.get(ENV_KAFKA_SSL_PASSWORD):
        kafka["ssl_password"] = environ[ENV_KAFKA_SSL_PASSWORD]


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {section: dict(body) for section, body in data.items()}


def _describe(exc: ValidationError, path) -> str:
    """One line per problem, naming the key: `kafka.sesion_timeout_ms: unknown key`."""
    where = f"{path}: " if path else ""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            message = error["msg"].removeprefix("Value error, ")
            value = error.get("input")
            secret = any(part in ("url", "sasl_plain_password", "ssl_password") for part in error["loc"])
            shown = f" (got {value!r})" if isinstance(value, (str, int, float, bool)) and not secret else ""
            lines.append(f"{key}: {message}{shown}")
    return f"{where}invalid configuration:\n  " + "\n  ".join(lines)
