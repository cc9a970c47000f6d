"""An OpenAI-compatible LLM deployment that scales with its load, down to one replica when idle.

`shoal run examples.llm_autoscaling:app` serves http://127.0.0.1:8000/v1; each model's replicas
follow the number of requests in flight (queued and running) per replica, as `autoscaling_config`
asks: more streams than `target_ongoing_requests` per replica for `upscale_delay_s` adds a replica
(up to `max_replicas`), and a quiet period of `downscale_delay_s` removes them again.
"""

from shoal.llm import LLMConfig, build_openai_app

llm_config = LLMConfig(
    model_loading_config={"model_id": "SmolLM2-135M-Instruct"},
    engine_kwargs={"max_num_seqs": 8},
    deployment_config={
        "autoscaling_config": {
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 4,
            "upscale_delay_s": 2,
            "downscale_delay_s": 30,
        },
        "max_ongoing_requests": 16,
    },
)

app = build_openai_app({"llm_configs": [llm_config]})
