"""Configuration: a valid file loads, every kind of mistake is named exactly, env overrides win."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streamlme.config import (
    ConfigError,
    check_config_file,
    load_config,
    parse_duration,
)
from streamlme.spec import ModelSpec

FULL = """
[model]
response = "los"
fixed = ["1", "age", "severity"]
random = ["1", "age"]
group = "hospital"
covariance = "unstructured"
method = "REML"

[kafka]
bootstrap_servers = "127.0.0.1:9092"
topic = "events"
group_id = "streamlme"
dead_letter_topic = "events.dlq"

[redis]
url = "redis://127.0.0.1:6379/0"
namespace = "hospital_los"

[refresh]
every = "60s"
"""

MINIMAL = """
[model]
response = "y"
fixed = ["1"]
random = ["1"]
group = "g"
"""


def write(tmp_path: Path, text: str, name: str = "streamlme.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def errors(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    assert all(line.startswith((f"{path}: ", "environment ")) for line in info.value.errors)
    return [line.removeprefix(f"{path}: ") for line in info.value.errors]


def test_the_public_example_loads(tmp_path):
    config = load_config(write(tmp_path, FULL), env={})
    assert config.spec == ModelSpec("los", ["1", "age", "severity"], ["1", "age"], "hospital")
    assert config.kafka is not None and config.redis is not None
    assert config.kafka.bootstrap_servers == ["127.0.0.1:9092"]
    assert (config.kafka.topic, config.kafka.group_id) == ("events", "streamlme")
    assert config.kafka.dead_letter_topic == "events.dlq"
    assert config.kafka.max_message_bytes == 1 << 20
    assert (config.redis.url, config.redis.namespace) == ("redis://127.0.0.1:6379/0",
                                                          "hospital_los")
    assert config.refresh.every == 60.0 and config.refresh.history == 50
    assert config.model.half_life is None


def test_minimal_file_is_embedded_mode_with_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), env={})
    assert config.kafka is None and config.redis is None and config.store.snapshot is None
    assert (config.api.host, config.api.port, config.api.token) == ("127.0.0.1", 8000, None)
    assert config.source.endswith("streamlme.toml")


def test_optional_keys(tmp_path):
    snapshot_dir = tmp_path / "state"
    snapshot_dir.mkdir()
    ca = tmp_path / "ca.pem"
    ca.write_text("not really a certificate")
    config = load_config(write(tmp_path, MINIMAL + """
        half_life = "7d"
        [kafka]
        bootstrap_servers = ["k1:9093", "k2:9093"]
        topic = "ev"
        security_protocol = "SASL_SSL"
        sasl_mechanism = "SCRAM-SHA-512"
        sasl_plain_username = "app"
        sasl_plain_password = "pw"
        ssl_cafile = "ca.pem"
        batch_max_seconds = "250ms"
        [kafka.client]
        request_timeout_ms = 20000
        api_version = [2, 8, 0]
        [redis]
        url = "rediss://:secret@redis.example:6380/2"
        [refresh]
        every = "5m"
        history = 10
        tolerance = 1e-10
        max_iter = 500
        [api]
        port = 9000
        token = "t0k"
        [store]
        snapshot = "state/snap.bin"
    """), env={})
    assert config.model.half_life == 7 * 86400
    k = config.kafka
    assert k.dead_letter_topic == "ev.dlq"
    assert k.batch_max_seconds == 0.25
    assert k.ssl_cafile == str(ca)  # relative to the config file, made absolute
    assert config.store.snapshot == str(snapshot_dir / "snap.bin")
    consumer = k.consumer_kwargs()
    assert consumer["bootstrap_servers"] == ["k1:9093", "k2:9093"]
    assert consumer["enable_auto_commit"] is False and consumer["group_id"] == "streamlme"
    assert consumer["sasl_mechanism"] == "SCRAM-SHA-512" and consumer["ssl_cafile"] == str(ca)
    assert consumer["request_timeout_ms"] == 20000 and consumer["api_version"] == (2, 8, 0)
    producer = k.producer_kwargs()
    assert "group_id" not in producer and "max_poll_records" not in producer
    assert producer["security_protocol"] == "SASL_SSL"
    assert "group_id" not in k.admin_kwargs()
    assert config.redis.safe_url == "rediss://:***@redis.example:6380/2"
    assert (config.refresh.every, config.refresh.history) == (300.0, 10)
    assert (config.refresh.tolerance, config.refresh.max_iter) == (1e-10, 500)
    assert (config.api.port, config.api.token) == (9000, "t0k")


def test_kafka_kwargs_are_accepted_by_kafka_python(tmp_path):
    """Whatever we pass must be a setting the clients know (they raise on unknown ones)."""
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    config = load_config(write(tmp_path, FULL + """
        [kafka.client]
        session_timeout_ms = 6000
        linger_ms = 5
        retry_backoff_ms = 200
    """), env={})
    for kwargs, client in ((config.kafka.consumer_kwargs(), KafkaConsumer),
                           (config.kafka.producer_kwargs(), KafkaProducer),
                           (config.kafka.admin_kwargs(), KafkaAdminClient)):
        assert set(kwargs) <= set(client.DEFAULT_CONFIG)
    assert config.kafka.consumer_kwargs()["session_timeout_ms"] == 6000
    assert "session_timeout_ms" not in config.kafka.producer_kwargs()
    assert config.kafka.producer_kwargs()["linger_ms"] == 5


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[refresh]\nevery = '60x'",
         "refresh.every: '60x' is not a duration; use e.g. '60s', '5m', '1h'"),
        ("[refresh]\nevery = 0", "refresh.every: 0 must be longer than zero"),
        ("[refresh]\nevry = '60s'", "refresh.evry: unknown key (did you mean 'every'?)"),
        ("[refresh]\nhistory = '3'", "refresh.history: expected `int`, got `str` ('3')"),
        ("[refresh]\nhistory = 0", "refresh.history: expected `int` >= 1, got 0"),
        ("[api]\nport = 70000", "api.port: expected `int` <= 65535, got 70000"),
        ("[redis]\nnamespace = 'a b'", "redis.namespace: 'a b': use 1-100 letters"),
        ("[redis]\nurl = 'http://x'", "redis.url: 'http://x': expected redis://, rediss://"),
        ("[kafka]\ntopic = 'e'", "kafka.bootstrap_servers: missing"),
        ("[kafka]\nbootstrap_servers = 'k:1'\ntopic = 'e'\nsecurity_protocol = 'TLS'",
         "kafka.security_protocol: invalid value 'TLS'; expected one of 'PLAINTEXT', "),
        ("[kafka]\nbootstrap_servers = 'k:1'\ntopic = 'e'\nsecurity_protocol = 'SASL_SSL'",
         "kafka.sasl_mechanism: required with security_protocol SASL_SSL"),
        ("[kafka]\nbootstrap_servers = 'k:1'\ntopic = 'e'\nsecurity_protocol = 'SASL_SSL'\n"
         "sasl_mechanism = 'PLAIN'", "kafka.sasl_plain_username: required with sasl_mechanism"),
        ("[kafka]\nbootstrap_servers = 'k:1'\ntopic = 'e'\nssl_cafile = 'nope.pem'",
         "kafka.ssl_cafile: "),
        ("[kafka]\nbootstrap_servers = 'k:1'\ntopic = 'e'\n[kafka.client]\nreqest_timeout_ms = 1",
         "kafka.client.reqest_timeout_ms: not a kafka-python client setting "
         "(did you mean 'request_timeout_ms'?)"),
        ("[kafka]\nbootstrap_servers = 'k:1'\ntopic = 'e'\n[kafka.client]\nenable_auto_commit = true",
         "kafka.client.enable_auto_commit: not settable: streamlme commits offsets itself"),
        ("[kafka]\nbootstrap_servers = 'k:1'\ntopic = 'e'\n[kafka.client]\nclient_id = 'x'",
         "kafka.client.client_id: set it as kafka.client_id"),
        ("[kafka]\nbootstrap_servers = 'k:1'\ntopic = 'e'\n[kafka.client]\nselector = 'x'",
         "kafka.client.selector: not a kafka-python client setting"),
        ("[store]\nsnapshot = 'no/such/dir/s.bin'", "store.snapshot: folder "),
        ("[bogus]\nx = 1", "bogus: unknown section"),
    ],
)
def test_each_mistake_is_named(tmp_path, extra, expected):
    found = errors(tmp_path, MINIMAL + extra)
    assert any(line.startswith(expected) for line in found), found


def test_a_section_that_is_not_a_table(tmp_path):
    found = errors(tmp_path, "refresh = 5\n" + MINIMAL)
    assert found == ["refresh: expected a table [refresh], got an integer"]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ('response = "y"\nfixed = []\nrandom = ["1"]\ngroup = "g"',
         'model.fixed: the fixed part is empty; give at least "1" for an intercept'),
        ('response = "y"\nfixed = ["1", "y"]\nrandom = ["1"]\ngroup = "g"',
         "model.fixed: 'y' is the response column"),
        ('response = "y"\nfixed = ["1"]\nrandom = ["1"]\ngroup = "g"\ncovariance = "full"',
         "model.covariance: 'full' is not one of unstructured, diagonal"),
        ('response = "y"\nfixed = ["1"]\nrandom = ["1"]\ngroup = "g"\nmethod = "OLS"',
         "model.method: 'OLS' is not one of REML, ML, EM"),
        ('response = "y"\nfixed = ["1"]\nrandom = ["1"]', "model.group: missing"),
        ('response = "y"\nfixed = "1"\nrandom = ["1"]\ngroup = "g"',
         "model.fixed: expected `array`, got `str` ('1')"),
        ('response = "y"\nfixed = ["1", "weight"]\nrandom = ["1"]\ngroup = "g"',
         "model: column 'weight' clashes with the event field"),
        ('response = "y"\nfixed = ["1"]\nrandom = ["1"]\ngroup = "g"\nhalf_life = "soon"',
         "model.half_life: 'soon' is not a duration"),
    ],
)
def test_model_mistakes_are_named(tmp_path, model, expected):
    found = errors(tmp_path, f"[model]\n{model}\n")
    assert any(line.startswith(expected) for line in found), found


def test_all_problems_are_reported_at_once(tmp_path):
    found = errors(tmp_path, MINIMAL + "[refresh]\nevery = 'x'\n[api]\nprot = 1\n[redis]\nurl = 1\n")
    assert len(found) == 3, found


def test_missing_model_and_unreadable_files(tmp_path):
    assert errors(tmp_path, "[refresh]\nevery = '1m'\n") == [
        "model: missing; give a formula, or at least response, fixed, random and group"
    ]
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        load_config(tmp_path / "absent.toml", env={})
    bad = write(tmp_path, "[model\nresponse = 1")
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 1"):
        load_config(bad, env={})


def test_environment_overrides_the_file(tmp_path):
    env = {
        "STREAMLME_REDIS_URL": "redis://:pw@10.0.0.1:6379/3",
        "STREAMLME_KAFKA_BOOTSTRAP_SERVERS": "a:1, b:2",
        "STREAMLME_KAFKA_MAX_POLL_RECORDS": "100",
        "STREAMLME_KAFKA_CLIENT_RETRY_BACKOFF_MS": "250",
        "STREAMLME_KAFKA_SSL_CHECK_HOSTNAME": "false",
        "STREAMLME_MODEL_FIXED": "1,age",
        "STREAMLME_REFRESH_EVERY": "2h",
        "STREAMLME_API_TOKEN": "secret",
        "STREAMLME_API_PORT": "",  # empty: ignored
        "STREAMLME_KAFKA": "host:9092",  # the test suite's variable, not a config key
        "STREAMLME_LOG_LEVEL": "debug",  # not a config section
        "OTHER_REDIS_URL": "redis://nope",
    }
    config = load_config(write(tmp_path, FULL), env=env)
    assert config.redis.url == "redis://:pw@10.0.0.1:6379/3"
    assert config.kafka.bootstrap_servers == ["a:1", "b:2"]
    assert config.kafka.max_poll_records == 100
    assert config.kafka.client == {"retry_backoff_ms": 250}
    assert config.kafka.ssl_check_hostname is False
    assert config.spec.fixed == ("1", "age")
    assert config.refresh.every == 7200.0
    assert (config.api.token, config.api.port) == ("secret", 8000)


def test_environment_alone_and_its_mistakes(tmp_path):
    env = {"STREAMLME_MODEL_RESPONSE": "y", "STREAMLME_MODEL_FIXED": "1",
           "STREAMLME_MODEL_RANDOM": "1", "STREAMLME_MODEL_GROUP": "g",
           "STREAMLME_REDIS_NAMESPACE": "ns"}
    config = load_config(None, env=env)
    assert config.spec.formula == "y ~ 1 + (1 | g)" and config.redis.namespace == "ns"
    assert config.source == "<environment>"
    with pytest.raises(ConfigError) as info:
        load_config(None, env=env | {"STREAMLME_API_PROT": "1", "STREAMLME_API_PORT": "x"})
    assert info.value.errors == [
        "environment STREAMLME_API_PORT: api.port: 'x' is not an integer",
        "environment STREAMLME_API_PROT: api.prot is not a known key (did you mean 'port'?);"
        " known: host, port, token, max_request_bytes",
    ]


def test_check_config_file(tmp_path):
    ok, message = check_config_file(write(tmp_path, FULL), env={})
    assert ok and message.startswith("ok: ")
    assert "los ~ 1 + age + severity + (1 + age | hospital)" in message
    assert "topic 'events'" in message and "namespace 'hospital_los'" in message
    ok, message = check_config_file(write(tmp_path, FULL + "[api]\nport = -1\n"), env={})
    assert not ok and "api.port: expected `int` >= 0, got -1" in message
    secret = FULL.replace("redis://127", "redis://:hunter2@127")
    ok, message = check_config_file(write(tmp_path, secret), env={})
    assert ok and "hunter2" not in message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60), ("5m", 300), ("1h", 3600), ("7d", 604800), ("1w", 604800), ("250ms", 0.25),
     ("1h30m", 5400), ("1.5h", 5400), (" 2 m ", 120), ("90", 90), (45, 45), (0.5, 0.5), ("0s", 0)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["60x", "", "s", "-5s", "5s-", "1e999", "nan", "inf", True,
                                  None, [1], "5 minutes"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_reads_toml_without_tomllib(tmp_path):
    """Python 3.10 has no tomllib: with it hidden, the module falls back to the tomli backport."""
    pytest.importorskip("tomli")
    path = write(tmp_path, FULL)
    code = (
        "import sys; sys.modules['tomllib'] = None\n"
        "import streamlme.config as c\n"
        "assert c.tomllib.__name__ == 'tomli', c.tomllib\n"
        f"print(c.load_config({str(path)!r}, env={{}}).kafka.topic)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "events"


# --- formulas and categorical levels ---------------------------------------------------------

CROSSED = """
[model]
formula = "y ~ 1 + x + sex + (1 | s) + (1 | s:d)"
method = "ML"
half_life = "1d"
[model.levels]
sex = ["F", "M"]
"""


def test_a_formula_with_declared_levels_loads(tmp_path):
    config = load_config(write(tmp_path, CROSSED), env={})
    spec = config.spec
    assert spec == ModelSpec.from_formula("y ~ 1 + x + sex + (1 | s) + (1 | s:d)",
                                          levels={"sex": ["F", "M"]}, method="ML")
    assert [t.group for t in spec.terms] == ["s", "s:d"] and spec.grouping_columns == ("s", "d")
    assert spec.fixed == ("1", "x", "sexM") and spec.levels == {"sex": ("F", "M")}
    assert config.model.half_life == 86400.0 and spec.method == "ML"
    # the record of a refresh names the same spec, so a warm start finds it
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_levels_in_the_formula_or_as_integers(tmp_path):
    config = load_config(write(tmp_path, """
        [model]
        formula = 'y ~ 1 + C(sex, levels=["F", "M"]) + dose + (1 | g)'
        [model.levels]
        dose = [1, 2, 3]
    """), env={})
    assert config.spec.levels == {"sex": ("F", "M"), "dose": ("1", "2", "3")}
    assert config.spec.fixed == ("1", "sexM", "dose2", "dose3")


def test_the_shorthand_may_name_a_categorical_covariate(tmp_path):
    config = load_config(write(tmp_path, MINIMAL.replace('fixed = ["1"]', 'fixed = ["1", "sex"]')
                               + '[model.levels]\nsex = ["F", "M"]\n'), env={})
    assert config.spec.fixed == ("1", "sexM") and config.spec.group == "g"


def test_a_formula_from_the_environment(tmp_path):
    config = load_config(None, env={"STREAMLME_MODEL_FORMULA": "y ~ x + (1 | s) + (1 | d)"})
    assert len(config.spec.terms) == 2 and config.spec.grouping_columns == ("s", "d")
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"STREAMLME_MODEL_FORMULA": "y ~ x + (1 | s)",
                               "STREAMLME_MODEL_LEVELS": "F,M"})
    assert info.value.errors == ["environment STREAMLME_MODEL_LEVELS: model.levels: declare "
                                 "levels in the file's [model.levels] table (column names are "
                                 "case-sensitive)"]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ('formula = "y ~ x + (1 | s)"\nresponse = "y"\ngroup = "g"',
         "model: give formula or the one-term shorthand (response, fixed, random, group, "
         "covariance), not both; this section has formula and response, group"),
        ('formula = "y ~ x + (1 | s)"\ncovariance = "diagonal"',
         "model: give formula or the one-term shorthand"),
        ('method = "ML"', 'model: give formula = "y ~ x + (1 | g)", or response, fixed, random '
         "and group"),
        ('formula = "y ~ x + C(sex) + (1 | s)"',
         "model.formula: at character 8: categorical 'sex' has no declared levels, and a stream "
         'cannot learn them from the data; declare them in [model.levels] (sex = ["a", "b"], '
         'first level the reference) or write C(sex, levels=["a", "b"])\n'
         "  y ~ x + C(sex) + (1 | s)\n          ^"),
        ('formula = "y ~ x + (1 | )"', "model.formula: at character 13: expected a grouping "
         "factor after '|'"),
        ('formula = "y ~ x + s + (1 | s)"',
         "model.formula: fixed: 's' is a grouping column and cannot also be a term"),
        ('formula = "y ~ x + (1 | s) + (1 | d)"\nmethod = "EM"',
         "model.method: EM fits one random-effect term; use REML or ML"),
        ('formula = "y ~ x + (1 | s) + (1 | ts)"',
         "model: column 'ts' clashes with the event field 'ts'"),
        ('formula = \'y ~ C(op, levels=["a", "b"]) + (1 | s)\'',
         "model: column 'op' clashes with the event field 'op'"),
        ('formula = "y ~ x + (1 | s)"\n[model.levels]\nsex = ["F", "M"]',
         "model.levels.sex: 'sex' is not a categorical covariate of 'y ~ x + (1 | s)'"),
        ('formula = "y ~ x + (1 | s)"\n[model.levels]\ns = ["a", "b"]',
         "model.levels.s: 's' is not a categorical covariate"),
        ('formula = \'y ~ C(sex, levels=["F", "M"]) + (1 | s)\'\n[model.levels]\nsex = ["M", "F"]',
         "model.levels.sex: the formula declares the levels F, M; declare them in one place"),
        ('formula = "y ~ sex + (1 | s)"\n[model.levels]\nsex = ["F", "F"]',
         "model.levels.sex: give distinct level names, got ['F', 'F']"),
        ('formula = "y ~ sex + (1 | s)"\n[model.levels]\nsex = []',
         "model.levels.sex: give distinct level names, got []"),
        ('formula = "y ~ sex + (1 | s)"\n[model.levels]\nsex = "F,M"',
         "model.levels.sex: expected a list of level names such as [\"F\", \"M\"], got 'F,M'"),
        ('formula = "y ~ sex + (1 | s)"\n[model.levels]\nsex = [true, false]',
         "model.levels.sex: expected a list of level names"),
        ('formula = "y ~ sex + (1 | s)"\nlevels = ["F", "M"]',
         "model.levels: expected a table [model.levels] of column = [levels], got a list"),
        ('formula = 42', "model.formula: expected `str`, got `int` (42)"),
    ],
)
def test_formula_mistakes_are_named(tmp_path, model, expected):
    found = errors(tmp_path, f"[model]\n{model}\n")
    assert any(line.startswith(expected) for line in found), found


def test_config_check_describes_cells_and_levels(tmp_path):
    ok, message = check_config_file(write(tmp_path, CROSSED), env={})
    assert ok, message
    assert "model: y ~ 1 + x + sex + (1 | s) + (1 | s:d) (ML), half-life 86400s" in message
    assert "cells: the levels of s, d; every event carries each of them" in message
    assert ("categorical sex: F, M (F the reference); other values are dead-lettered as "
            "unknown_level") in message
    ok, message = check_config_file(write(tmp_path, "[model]\nformula = 'y ~ C(k) + (1|g)'\n"),
                                    env={})
    assert not ok and "categorical 'k' has no declared levels" in message
    assert "[model.levels]" in message


@pytest.mark.parametrize("section, problem", [
    ('[api]\ntoken = ""', "an empty token would turn authentication off"),
    ('[api]\ntoken = "  "', "an empty token would turn authentication off"),
    ('[refresh]\nlease_ttl = "1ms"', "lease_ttl: 0.001s is under one second"),
    ('[kafka]\nbootstrap_servers = ["b:9092"]\ntopic = "t"\non_gap = "skip"', "on_gap"),
    ('[api]\nmax_request_bytes = 0', "max_request_bytes"),
])
def test_settings_that_would_hide_a_fault_are_refused(tmp_path, section, problem):
    text = '[model]\nformula = "y ~ 1 + (1 | g)"\nmax_future = "1h"\n' + section + "\n"
    with pytest.raises(ConfigError, match=problem):
        load_config(write(tmp_path, text), env={})


def test_defaults_of_the_fault_settings(tmp_path):
    config = load_config(write(tmp_path, '[model]\nformula = "y ~ 1 + (1 | g)"\n'
                               '[kafka]\nbootstrap_servers = ["b:9092"]\ntopic = "t"\n'), env={})
    assert config.model.max_future == 3600.0
    assert config.kafka.on_gap == "stop"
    assert config.api.max_request_bytes == 1 << 20


def test_every_missing_and_bad_key_of_a_section_at_once(tmp_path):
    found = errors(tmp_path, MINIMAL + "[kafka]\ngroup_id = 'x'\nmax_poll_records = 0\n"
                   "[refresh]\nevery = 'x'\nhistory = 'y'\n")
    assert "kafka.bootstrap_servers: missing" in found and "kafka.topic: missing" in found
    assert any(line.startswith("kafka.max_poll_records: expected `int` >= 1") for line in found)
    assert any(line.startswith("refresh.every: 'x' is not a duration") for line in found)
    assert any(line.startswith("refresh.history: expected `int`, got `str`") for line in found)
    assert len(found) == 5, found
    bad_item = errors(tmp_path, MINIMAL + "[kafka]\nbootstrap_servers = ['k:1', '']\ntopic = 't'\n")
    assert bad_item == ["kafka.bootstrap_servers[1]: expected `str` of length >= 1, got ''"]


def test_a_mistyped_section_in_the_environment_gets_a_hint(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"STREAMLME_REDSI_URL": "redis://x", "STREAMLME_LOG_LEVEL": "1",
                               "STREAMLME_DEBUG": "1", "STREAMLME_KAFKA": "k:1"})
    assert info.value.errors == [
        "environment STREAMLME_REDSI_URL: no section [redsi] (did you mean STREAMLME_REDIS_URL?); "
        "sections are model, kafka, redis, refresh, api, store"]


def test_kafka_clients_give_up_on_an_absent_broker_within_ten_seconds(tmp_path):
    config = load_config(write(tmp_path, FULL), env={})
    k = config.kafka
    assert k.producer_kwargs()["bootstrap_timeout_ms"] == 10_000
    assert k.producer_kwargs()["max_block_ms"] == 10_000
    assert "max_block_ms" not in k.consumer_kwargs()  # not a consumer setting
    assert k.consumer_kwargs()["bootstrap_timeout_ms"] == k.admin_kwargs()["bootstrap_timeout_ms"]
    assert k.connect_timeout == 10.0
    overridden = load_config(write(tmp_path, FULL + "[kafka.client]\nbootstrap_timeout_ms = 2500\n"),
                             env={}).kafka
    assert overridden.producer_kwargs()["bootstrap_timeout_ms"] == 2500
    assert overridden.connect_timeout == 2.5


@pytest.mark.parametrize(("kafka", "redis"), [(None, None), ("k:9092", "redis://r:6379/1")])
def test_the_starter_file_loads(tmp_path, kafka, redis):
    from streamlme.config import starter_config

    config = load_config(write(tmp_path, starter_config(kafka=kafka, redis=redis)), env={})
    assert config.spec.formula == "los ~ 1 + age + severity + (1 + age | hospital)"
    assert (config.kafka is None) == (kafka is None) and (config.redis is None) == (redis is None)
    if kafka:
        assert config.kafka.bootstrap_servers == [kafka]
        assert config.kafka.consumer_kwargs()["session_timeout_ms"] == 6000
    else:
        assert config.store.snapshot == str(tmp_path / "state.npz")


def test_a_formula_column_is_the_data_s_business_not_the_config_s(tmp_path):
    """The configuration cannot know the data's columns: a misspelt one loads (the consumer
    and publish --config name it, with a hint, when they see the events)."""
    config = load_config(write(tmp_path, '[model]\nformula = "los ~ agee + (1 | hospital)"\n'),
                         env={})
    assert config.spec.columns == ("agee", "los")
