"""`shoal.llm` configs, builders and request validation, without loading any model."""

from __future__ import annotations

import textwrap

import pytest
from pydantic import ValidationError

from shoal.llm import LLMConfig, LLMServingArgs, build_openai_app
from shoal.llm.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, from_validation_error
from shoal.schema import build_applications, graph_deployments, load_config_file


def config(**extra) -> LLMConfig:
    return LLMConfig(model_loading_config={"model_id": "org/My.Model"}, **extra)


def test_deployment_name_and_options_follow_ray_serve_llm():
    c = config(deployment_config={"num_replicas": 2, "max_ongoing_requests": 8})
    options = c.deployment_options()
    assert options["name"] == "LLMServer:org--My_Model"
    assert options["num_replicas"] == 2 and options["max_ongoing_requests"] == 8
    assert config().deployment_options()["max_ongoing_requests"] == 256  # the LLM default, not 5
    assert c.model_loading_config.source == "org/My.Model"  # model_source defaults to the id


@pytest.mark.parametrize("extra, fragment", [
    ({"bogus": 1}, "bogus"),
    ({"deployment_config": {"num_replica": 2}}, "num_replica"),
    ({"deployment_config": {"placement_group_bundles": [{"CPU": 1}]}}, "placement_group_bundles"),
    ({"llm_engine": "tensorrt"}, "llm_engine must be one of"),
    ({"lora_config": {"max_num_adapters_per_replica": 2}}, "dynamic_lora_loading_path"),
    ({"lora_config": {"dynamic_lora_loading_path": "s3://bucket/loras"}}, "local directory"),
    ({"lora_config": {"dynamic_lora_loading_path": "/x", "max_num_adapters_per_replica": 0}},
     "max_num_adapters_per_replica"),
])
def test_bad_configs_name_the_field(extra, fragment):
    with pytest.raises(ValidationError) as info:
        config(**extra)
    assert fragment in str(info.value)


def test_ray_only_choices_are_accepted_and_reported(caplog):
    c = config(llm_engine="vLLM", accelerator_type="A10G", runtime_env={"pip": ["x"]})
    assert c.llm_engine == "auto"
    assert "accelerator_type" in caplog.text and "vLLM" in caplog.text


def test_serving_args_refuse_a_model_twice():
    with pytest.raises(ValidationError, match="appears twice"):
        LLMServingArgs(llm_configs=[config(), config()])


def test_openai_app_from_a_ray_serve_llm_style_config_file(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(textwrap.dedent("""
        applications:
        - name: llm
          route_prefix: /
          import_path: shoal.llm:build_openai_app
          args:
            llm_configs:
            - model_loading_config: {model_id: SmolLM2-135M-Instruct}
              deployment_config:
                autoscaling_config: {min_replicas: 1, max_replicas: 3}
            - model_loading_config: {model_id: all-MiniLM-L6-v2}
    """))
    [(_, app)] = build_applications(load_config_file(path))
    deployments = {d.name: d for d in graph_deployments(app)}
    assert set(deployments) == {"OpenAiIngress", "LLMServer:SmolLM2-135M-Instruct", "LLMServer:all-MiniLM-L6-v2"}
    assert deployments["LLMServer:SmolLM2-135M-Instruct"].config.autoscaling_config.max_replicas == 3
    assert deployments["OpenAiIngress"].config.max_ongoing_requests >= 1000  # never the bottleneck


def test_build_openai_app_accepts_a_plain_list():
    app = build_openai_app([{"model_loading_config": {"model_id": "a"}}, config()])
    assert {d.name for d in graph_deployments(app)} == {"OpenAiIngress", "LLMServer:a", "LLMServer:org--My_Model"}


def test_one_model_serves_the_api_itself_unless_something_needs_the_ingress(tmp_path):
    """One model: a single deployment, named like its `LLMServer`, that serves HTTP (no ingress hop).
    Keys, LoRA, ingress options, a queue limit (the ingress answers its overflow with a 429) or
    scaling to zero keep the `OpenAiIngress` in front."""
    from shoal.http.ingress import is_ingress

    [alone] = graph_deployments(build_openai_app([config(deployment_config={"num_replicas": 2})]))
    assert alone.name == "LLMServer:org--My_Model" and is_ingress(alone)
    assert alone.config.num_replicas == 2 and alone.config.max_ongoing_requests == 256

    (tmp_path / "m").mkdir()
    needs_ingress = [
        {"llm_configs": [config()], "api_keys": ["sk-test-1234567890"]},
        {"llm_configs": [config(lora_config={"dynamic_lora_loading_path": str(tmp_path)})]},
        {"llm_configs": [config()], "ingress_deployment_config": {"num_replicas": 2}},
        {"llm_configs": [config(deployment_config={"max_queued_requests": 4})]},
        {"llm_configs": [config(deployment_config={"autoscaling_config": {"min_replicas": 0, "max_replicas": 2}})]},
    ]
    for args in needs_ingress:
        names = {d.name for d in graph_deployments(build_openai_app(args))}
        assert names == {"OpenAiIngress", "LLMServer:org--My_Model"}, args


def _error(model_cls, body) -> OpenAIError:
    with pytest.raises(ValidationError) as info:
        model_cls.model_validate(body)
    return from_validation_error(info.value)


def test_request_validation_errors_are_openai_shaped():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    e = _error(ChatCompletionRequest, {**base, "top_p": 0})
    assert (e.status, e.param, e.body()["error"]["type"]) == (400, "top_p", "invalid_request_error")
    assert _error(ChatCompletionRequest, {**base, "frobnicate": True}).message == (
        "Unrecognized request argument supplied: frobnicate")
    assert _error(ChatCompletionRequest, {"model": "m"}).param == "messages"
    assert _error(ChatCompletionRequest, {**base, "n": 17}).param == "n"
    assert _error(ChatCompletionRequest, {**base, "n": 0}).param == "n"
    assert _error(ChatCompletionRequest, {**base, "presence_penalty": 2.5}).param == "presence_penalty"
    assert _error(ChatCompletionRequest, {**base, "frequency_penalty": -3}).param == "frequency_penalty"
    assert _error(ChatCompletionRequest, {**base, "logit_bias": {"5": 101}}).param == "logit_bias"
    assert _error(ChatCompletionRequest, {**base, "logit_bias": {"x": 1}}).param == "logit_bias"
    assert _error(ChatCompletionRequest, {**base, "logprobs": True, "top_logprobs": 21}).param == "top_logprobs"
    assert "logprobs must be set" in _error(ChatCompletionRequest, {**base, "top_logprobs": 2}).message
    assert _error(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 6}).param == "logprobs"
    assert _error(ChatCompletionRequest, {**base, "stop": ["a", "b", "c", "d", "e"]}).param == "stop"
    assert _error(ChatCompletionRequest, {**base, "tools": [{"type": "function"}]}).param == "tools"
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    assert "only text parts" in _error(ChatCompletionRequest, {**base, "messages": [image]}).message


def test_chat_request_normalizes_messages_and_limits():
    req = ChatCompletionRequest.model_validate({
        "model": "m", "max_tokens": 9, "max_completion_tokens": 5,
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
    })
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert req.sampling_kwargs()["max_tokens"] == 5  # max_completion_tokens wins, as in OpenAI's API
    assert req.sampling_kwargs()["temperature"] == 1.0  # OpenAI's default


def test_completion_prompt_forms():
    assert CompletionRequest(model="m", prompt="one").prompts() == ["one"]
    assert CompletionRequest(model="m", prompt=["only one"]).prompts() == ["only one"]
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(model="m", prompt=[[1, 2], [3]]).prompts() == [[1, 2], [3]]
    with pytest.raises(OpenAIError, match="at most 128 choices"):
        CompletionRequest(model="m", prompt=["a"] * 9, n=16).prompts()


def test_sampling_fields_reach_the_engine_params():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    chat = ChatCompletionRequest.model_validate({
        **base, "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"7": -100}, "n": 3,
        "logprobs": True, "top_logprobs": 4,
    }).sampling_kwargs()
    assert (chat["presence_penalty"], chat["frequency_penalty"], chat["logit_bias"], chat["logprobs"]) == (
        0.5, -1, {7: -100.0}, 4)
    assert ChatCompletionRequest.model_validate({**base, "logprobs": True}).sampling_kwargs()["logprobs"] == 0
    assert ChatCompletionRequest.model_validate(base).sampling_kwargs()["logprobs"] is None
    text = CompletionRequest(model="m", prompt="x", logprobs=2).sampling_kwargs()
    assert text["logprobs"] == 2
