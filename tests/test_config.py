"""Settings: file + environment + overrides, unknown keys named, ranges checked, secrets only from the env."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from daemon.config import (
    ENV_DATABASE_PASSWORD,
    ENV_DATABASE_URL,
    ENV_KAFKA_SASL_PASSWORD,
    ConfigError,
    Settings,
    load_settings,
)

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_repo_config_loads_and_equals_the_defaults():
    assert load_settings(REPO_CONFIG, environ={}) == Settings()


def test_repo_config_documents_every_key_with_a_comment():
    from pydantic import BaseModel

    lines = REPO_CONFIG.read_text().splitlines()
    documented: set[str] = set()
    path: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([a-z_]+):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        path = [(i, k) for i, k in path if i < indent]
        if path:
            previous = lines[index - 1].strip()
            dotted = ".".join([k for _, k in path] + [key])
            assert previous.startswith("#"), f"{dotted} has no comment above it"
            documented.add(dotted)
        path.append((indent, key))

    def keys(model: type[BaseModel], prefix: str) -> set[str]:
        out = set()
        for name, field in model.model_fields.items():
            out.add(f"{prefix}{name}")
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                out |= keys(annotation, f"{prefix}{name}.")
        return out

    secrets = {"kafka.sasl_plain_password", "kafka.ssl_password"}
    expected = set().union(*(keys(field.annotation, f"{name}.") for name, field in Settings.model_fields.items()))
    assert documented == expected - secrets


def test_unknown_keys_are_rejected_by_name(tmp_path):
    path = write(tmp_path, "kafka:\n  sesion_timeout_ms: 6000\nbatching:\n  max_batch: 4\nextra: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert "kafka.sesion_timeout_ms: unknown key" in message
    assert "batching.max_batch: unknown key" in message
    assert "extra: unknown key" in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("kafka:\n  session_timeout_ms: 500\n", "kafka.session_timeout_ms"),
        ("kafka:\n  session_timeout_ms: 6000\n  heartbeat_interval_ms: 3000\n", "at most a third"),
        ("engine:\n  max_batch_size: 0\n", "engine.max_batch_size"),
        ("engine:\n  proposer: magic\n", "engine.proposer"),
        ("engine:\n  suffix:\n    table_buckets: 3000\n", "power of two"),
        ("batching:\n  resume_below: 1.5\n", "batching.resume_below"),
        ("daemon:\n  metrics_port: 70000\n", "daemon.metrics_port"),
        ("models:\n  device: gpu\n", "device must be cpu, cuda or cuda:N"),
        ("engine:\n  k: 17\n", "engine.k"),
        ("limits:\n  max_new_tokens: 4096\n", "limits.max_new_tokens must be below engine.max_seq_len"),
        ("kafka:\n  prompts_topic: a\n  completions_topic: a\n", "three different topics"),
        ("kafka:\n  session_timeout_ms: ten\n", "kafka.session_timeout_ms"),
        ("kafka: [1, 2]\n", "section 'kafka' must be a mapping"),
        ("kafka:\n  auto_offset_reset: middle\n", "kafka.auto_offset_reset"),
        ("learning:\n  heldout_rows: 500\n  window_max_rows: 400\n", "must be below window_max_rows"),
        ("learning:\n  promote_margin: -0.1\n", "learning.promote_margin"),
        ("learning:\n  min_new_tokens: 0\n", "learning.min_new_tokens"),
        ("learning:\n  interval_s: 0\n", "learning.interval_s"),
        ("learning:\n  device: tpu\n", "learning.device: device must be cpu, cuda or cuda:N"),
        ("learning:\n  training_dtype: int8\n", "learning.training_dtype"),
        ("learning:\n  live_guard:\n    margin: 1.5\n", "learning.live_guard.margin"),
        ("learning:\n  live_guard:\n    min_requests: 0\n", "learning.live_guard.min_requests"),
        ("learning:\n  live_guard:\n    minimum: 3\n", "learning.live_guard.minimum: unknown key"),
        ("learning:\n  learner:\n    name: sgd\n", "learning.learner.name:"),
        ("learning:\n  learner:\n    lr: 0\n", "learning.learner.lr:"),
        ("learning:\n  learner:\n    learning_rate: 0.1\n", "learning.learner.learning_rate: unknown key"),
        ("learning:\n  trigger_tokens: 5\n", "learning.trigger_tokens: unknown key"),
    ],
)
def test_values_are_validated(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_settings(write(tmp_path, text), environ={})


def test_production_defaults_keep_sessions_acceptable_to_real_kafka():
    kafka = Settings().kafka
    assert kafka.session_timeout_ms >= 6000
    assert kafka.heartbeat_interval_ms * 3 <= kafka.session_timeout_ms


def test_test_broker_timings_are_accepted(tmp_path):
    path = write(tmp_path, "kafka:\n  session_timeout_ms: 2000\n  heartbeat_interval_ms: 500\n")
    assert load_settings(path, environ={}).kafka.session_timeout_ms == 2000


def test_environment_then_overrides(tmp_path):
    path = write(tmp_path, "kafka:\n  group_id: from-file\ndatabase:\n  url: sqlite:///file.db\n")
    settings = load_settings(
        path,
        overrides={"kafka.group_id": "from-flag", "models.target": "/models/t", "kafka.dlq_topic": None},
        environ={ENV_DATABASE_URL: "postgresql+psycopg://app@db/onlinespec"},
    )
    assert settings.kafka.group_id == "from-flag"
    assert settings.kafka.dlq_topic == "prompts.dlq"  # None means "flag not given"
    assert settings.models.target == "/models/t"
    assert settings.database.url.get_secret_value() == "postgresql+psycopg://app@db/onlinespec"


def test_secrets_come_from_the_environment_and_are_masked_in_the_dump(tmp_path):
    path = write(
        tmp_path,
        "kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: SCRAM-SHA-512\n  sasl_plain_username: svc\n"
        "database:\n  url: postgresql+psycopg://svc@db:5432/onlinespec\n",
    )
    settings = load_settings(path, environ={ENV_KAFKA_SASL_PASSWORD: "k-secret", ENV_DATABASE_PASSWORD: "db-secret"})
    options = settings.kafka.client_options()
    assert options["sasl_plain_password"] == "k-secret"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert "db-secret" in settings.database.url.get_secret_value()
    dumped = json.dumps(settings.resolved())
    assert "k-secret" not in dumped and "db-secret" not in dumped
    assert json.loads(dumped)["database"]["url"] == "postgresql+psycopg://svc:***@db:5432/onlinespec"


@pytest.mark.parametrize(
    "text, env_name",
    [
        ("kafka:\n  sasl_plain_password: hunter2\n", ENV_KAFKA_SASL_PASSWORD),
        ("database:\n  url: postgresql://u:hunter2@db/x\n", ENV_DATABASE_PASSWORD),
    ],
)
def test_secrets_in_the_file_are_refused(tmp_path, text, env_name):
    with pytest.raises(ConfigError, match=env_name) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert "hunter2" not in str(caught.value)


def test_broken_yaml_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "kafka: [\n"), environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml", environ={})


def test_resolved_settings_round_trip_through_json():
    settings = load_settings(None, overrides={"kafka.group_id": "g"}, environ={})
    data = json.loads(json.dumps(settings.resolved()))
    assert Settings.model_validate(data) == settings
    assert yaml.safe_dump(data)  # also representable as a config file


def test_serve_flags_override_file_and_environment(tmp_path, monkeypatch):
    from daemon.cli import build_parser
    from daemon.cli.serve import settings_from_args

    path = write(tmp_path, "kafka:\n  group_id: file-group\n  prompts_topic: file-prompts\n")
    monkeypatch.setenv(ENV_DATABASE_URL, "sqlite:///env.db")
    args = build_parser().parse_args(
        [
            "serve",
            "--config",
            str(path),
            "--bootstrap-servers",
            "b1:9092,b2:9092",
            "--group-id",
            "flag-group",
            "--completions-topic",
            "out",
            "--dlq-topic",
            "dead",
            "--target",
            "/m/t",
            "--draft",
            "/m/d",
            "--device",
            "cuda:1",
            "--database-url",
            "sqlite:///flag.db",
            "--auto-migrate",
            "--metrics-port",
            "0",
        ]
    )
    settings = settings_from_args(args)
    assert settings.kafka.bootstrap_servers == "b1:9092,b2:9092"
    assert settings.kafka.client_options()["bootstrap_servers"] == ["b1:9092", "b2:9092"]
    assert (settings.kafka.group_id, settings.kafka.prompts_topic) == ("flag-group", "file-prompts")
    assert (settings.kafka.completions_topic, settings.kafka.dlq_topic) == ("out", "dead")
    assert (settings.models.target, settings.models.draft, settings.models.device) == ("/m/t", "/m/d", "cuda:1")
    assert settings.database.url.get_secret_value() == "sqlite:///flag.db"
    assert settings.database.auto_migrate and settings.daemon.metrics_port == 0


def test_learning_section_is_the_learners_own_settings_type(tmp_path):
    from pipelines.learners import LearnerSettings

    path = write(tmp_path, "learning:\n  enabled: true\n  learner:\n    name: osd\n    lr: 5.0e-06\n    epochs: 3\n")
    learning = load_settings(path, environ={}).learning
    assert learning.enabled and isinstance(learning.learner, LearnerSettings)
    full = learning.learner
    assert (full.name, full.epochs, full.lr, full.trainable) == ("osd", 3, 5e-06, "layers")
    assert Settings().learning.enabled is False  # serving alone never trains unless asked
