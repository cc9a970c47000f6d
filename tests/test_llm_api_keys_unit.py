"""API keys and per-key limits of the OpenAI server, without a server: key configs, the ingress's key
table, the token buckets, usage parsing, and what `build_openai_app` / `shoal llm serve` hand the
ingress (digests, never keys). The real-server tests are in test_llm_api_keys.py."""

from __future__ import annotations

import hashlib

import pytest
from click.testing import CliRunner

from shoal.llm.api_keys import ApiKeyConfig, KeyTable, ingress_auth, keys_from_env, load_api_keys
from shoal.llm.config import LLMServingArgs
from shoal.llm.protocol import OpenAIError, usage_of
from shoal.llm.rate_limit import Bucket, KeyLimits

SECRET = "sk-test-0123456789abcdefSECRET"
MODEL = {"model_loading_config": {"model_id": "m"}}


def table(*entries: dict) -> KeyTable:
    return KeyTable(ingress_auth(load_api_keys(entries)))


# -- configs -------------------------------------------------------------------------------------------


def test_key_configs_from_strings_dicts_and_env(monkeypatch):
    monkeypatch.setenv("TEAM_B_KEY", "from-the-environment")
    keys = load_api_keys(["plain-key", {"name": "team-b", "key_env": "TEAM_B_KEY", "tokens_per_minute": 100}])
    assert [k.name for k in keys] == ["key-1", "team-b"]
    assert keys[1].secret() == "from-the-environment" and keys[1].tokens_per_minute == 100
    for wrong in ({"name": "a"}, {"name": "a", "key": "x", "key_env": "Y"}, {"name": "a b", "key": "x"},
                  {"name": "a", "key": "x", "requests_per_minute": 0}, {"name": "a", "key": "  "}):
        with pytest.raises(ValueError):
            load_api_keys([wrong])
    with pytest.raises(ValueError, match="appears twice"):
        load_api_keys([{"name": "a", "key": "x"}, {"name": "a", "key": "y"}])
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE"):
        load_api_keys([{"name": "a", "key_env": "NOT_SET_ANYWHERE"}])[0].secret()


def test_shoal_api_key_is_a_comma_separated_list():
    assert keys_from_env({"SHOAL_API_KEY": " a, b ,,c "}) == ["a", "b", "c"]
    assert keys_from_env({}) == []


def test_key_text_is_never_shown_by_configs_or_their_errors():
    args = LLMServingArgs.model_validate({"llm_configs": [MODEL], "api_keys": [SECRET]})
    assert SECRET not in repr(args) and SECRET not in str(args.model_dump())
    for bad in ({"name": "a b", "key": SECRET}, {"name": "a", "key": SECRET, "key_env": "X"},
                {"name": "a", "key": SECRET, "extra": 1}):
        with pytest.raises(ValueError) as info:
            LLMServingArgs.model_validate({"llm_configs": [MODEL], "api_keys": [bad]})
        assert "SECRET" not in str(info.value)


def test_the_ingress_gets_digests_only():
    auth = ingress_auth(load_api_keys([SECRET, {"name": "b", "key": "other", "requests_per_minute": 6}]), 2)
    assert SECRET not in repr(auth)
    assert auth["keys"][0]["sha256"] == hashlib.sha256(SECRET.encode()).hexdigest()
    assert auth["keys"][1]["requests_per_minute"] == 6 and auth["ingress_replicas"] == 2
    assert ingress_auth([]) is None
    with pytest.raises(ValueError, match="same key"):
        ingress_auth(load_api_keys([{"name": "a", "key": "k"}, {"name": "b", "key": "k"}]))


def test_build_openai_app_binds_digests_and_divides_limits_by_ingress_replicas():
    from shoal.llm import build_openai_app
    from shoal.llm.builders import _ingress_replicas

    app = build_openai_app({"llm_configs": [MODEL], "api_keys": [SECRET],
                            "ingress_deployment_config": {"num_replicas": 3}})
    import pickle

    servers, auth = app.deployment.init_args
    assert list(servers) == ["m"] and auth["ingress_replicas"] == 3
    assert auth["keys"] == [{"name": "key-1", "sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
                             "requests_per_minute": None, "tokens_per_minute": None}]
    assert SECRET.encode() not in pickle.dumps(app.deployment.init_args)
    assert _ingress_replicas({"num_replicas": 3}) == 3
    assert _ingress_replicas({"autoscaling_config": {"min_replicas": 2, "max_replicas": 5}}) == 2
    assert _ingress_replicas({}) == 1
    # No keys: the ingress gets no auth (the API is open).
    two = build_openai_app({"llm_configs": [MODEL, {"model_loading_config": {"model_id": "n"}}]})
    assert len(two.deployment.init_args) == 1


# -- the ingress's check -------------------------------------------------------------------------------


def test_key_table_accepts_known_keys_and_answers_401_otherwise():
    keys = table({"name": "a", "key": SECRET}, {"name": "b", "key": "second-key"})
    assert keys.check(f"Bearer {SECRET}").name == "a"
    assert keys.check("bearer second-key").name == "b"  # the scheme is case-insensitive
    for header, reason in ((None, "missing_key"), ("", "missing_key"), (f"Basic {SECRET}", "missing_key"),
                           ("Bearer ", "missing_key"), ("Bearer wrong-key-0123456789", "invalid_key"),
                           (f"Bearer {SECRET}x", "invalid_key")):
        with pytest.raises(OpenAIError) as info:
            keys.check(header)
        exc = info.value
        assert exc.status == 401 and exc.reason == reason and SECRET not in exc.message
        assert exc.body()["error"] == {"message": exc.message, "type": "invalid_request_error", "param": None,
                                       "code": "invalid_api_key"}
    with pytest.raises(OpenAIError) as info:
        keys.check("Bearer wrong-key-0123456789")
    assert info.value.message.startswith("Incorrect API key provided: wro****6789.")
    with pytest.raises(OpenAIError) as info:
        keys.check(None)
    assert info.value.message.startswith("You didn't provide an API key.")


# -- limits --------------------------------------------------------------------------------------------


def test_bucket_bursts_to_its_limit_then_refills_at_its_pace():
    b = Bucket(60, now=0.0)  # 1 per second
    assert all(b.take(1, 0.0) == 0.0 for _ in range(60))
    assert b.take(1, 0.0) == pytest.approx(1.0)
    assert b.take(1, 0.5) == pytest.approx(0.5)
    assert b.take(1, 1.0) == 0.0
    assert b.take(1, 1000.0) == 0.0 and b.level == pytest.approx(59)  # refill stops at the capacity
    b.charge(100, 1000.0)  # charged after the fact: may go below zero
    assert b.wait_positive(1000.0) == pytest.approx(41, abs=0.01)
    assert b.wait_positive(1042.0) == 0.0


def test_request_limit_answers_429_with_retry_after():
    limits = KeyLimits("team", requests_per_minute=2, tokens_per_minute=None, now=0.0)
    assert limits.admit(0.0) is None and limits.admit(0.0) is None
    exc = limits.admit(0.0)
    assert exc.status == 429 and exc.retry_after == 30 and exc.reason == "requests_per_minute"
    assert exc.body()["error"]["type"] == "requests" and exc.body()["error"]["code"] == "rate_limit_exceeded"
    assert "requests per min (RPM): Limit 2" in exc.message and "try again in 30s" in exc.message
    assert limits.admit(30.0) is None


def test_token_limit_admits_while_budget_is_left_and_charges_after():
    limits = KeyLimits("team", requests_per_minute=None, tokens_per_minute=600, now=0.0)  # 10 tokens/s
    assert limits.admit(0.0) is None
    limits.used(700, 0.0)  # one large request may overdraw
    exc = limits.admit(0.0)
    assert exc.body()["error"]["type"] == "tokens" and exc.reason == "tokens_per_minute"
    assert exc.retry_after == 11  # 100 tokens of overdraft at 10/s, rounded up
    assert limits.admit(9.5) is not None and limits.admit(10.5) is None


def test_limits_are_divided_among_ingress_replicas():
    limits = KeyLimits("team", requests_per_minute=10, tokens_per_minute=None, replicas=2, now=0.0)
    assert [limits.admit(0.0) is None for _ in range(6)] == [True] * 5 + [False]
    tiny = KeyLimits("team", requests_per_minute=1, tokens_per_minute=None, replicas=4, now=0.0)
    assert tiny.admit(0.0) is None  # a replica always admits at least one request at a time
    assert tiny.admit(0.0).retry_after == 240


# -- usage ---------------------------------------------------------------------------------------------


def test_usage_is_read_from_the_end_of_a_body():
    body = '{"id":"x","choices":[{"text":"\\"usage\\":{\\"prompt_tokens\\":99}"}],"usage":{"prompt_tokens":5,' \
           '"completion_tokens":7,"total_tokens":12}}'
    assert usage_of(body) == (5, 7)
    assert usage_of('{"data":[],"usage":{"prompt_tokens":3,"total_tokens":3}}') == (3, 0)
    assert usage_of('{"choices":[]}') == (0, 0) and usage_of('{"usage":{broken') == (0, 0)


# -- shoal llm serve -----------------------------------------------------------------------------------


def test_llm_serve_takes_keys_from_options_env_and_file(monkeypatch, tmp_path):
    from shoal.cli import llm as cli

    built: list = []
    monkeypatch.setattr(cli, "_serve_in_foreground", lambda app, *a: built.append((app, a)) or 0)
    monkeypatch.setattr("shoal.llm.builders.ingress_auth",
                        lambda keys, n: built.append([(k.name, k.secret()) for k in keys]) or None)
    runner = CliRunner()
    args = ["serve", "--model", "SmolLM2-135M-Instruct"]
    monkeypatch.setenv("SHOAL_API_KEY", "env-a,env-b")
    assert runner.invoke(cli.llm, args).exit_code == 0
    assert built[0] == [("key-1", "env-a"), ("key-2", "env-b")]
    built.clear()
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("- {name: batch, key_env: BATCH_KEY, requests_per_minute: 10}\n")
    monkeypatch.setenv("BATCH_KEY", "batch-secret")
    result = runner.invoke(cli.llm, args + ["--api-key", "cli-a", "--api-keys-file", str(keys_file)])
    assert result.exit_code == 0, result.output
    assert built[0] == [("key-1", "cli-a"), ("batch", "batch-secret")]  # --api-key replaces SHOAL_API_KEY
    keys_file.write_text("- {name: bad name, key: cli-secret}\n")
    result = runner.invoke(cli.llm, args + ["--api-keys-file", str(keys_file)])
    assert result.exit_code != 0 and "name" in result.output and "cli-secret" not in result.output


def test_api_keys_in_an_app_config_read_key_env_where_the_app_is_built(monkeypatch):
    from shoal.llm import build_openai_app
    from shoal.schema import ConfigError, call_app_builder

    args = {"llm_configs": [MODEL], "api_keys": [{"name": "ops", "key_env": "SHOAL_TEST_OPS_KEY",
                                                  "requests_per_minute": 30}]}
    with pytest.raises(ConfigError, match="SHOAL_TEST_OPS_KEY is not set"):
        call_app_builder(build_openai_app, args, "shoal.llm:build_openai_app")
    monkeypatch.setenv("SHOAL_TEST_OPS_KEY", SECRET)
    app = call_app_builder(build_openai_app, args, "shoal.llm:build_openai_app")
    (entry,) = app.deployment.init_args[1]["keys"]
    assert entry == {"name": "ops", "sha256": hashlib.sha256(SECRET.encode()).hexdigest(),
                     "requests_per_minute": 30, "tokens_per_minute": None}
