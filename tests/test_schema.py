"""The declarative config: Ray Serve's YAML schema, building Applications from it, and `shoal build`.

No processes: configs are validated and applications built in this process, from small modules
written to tmp_path.
"""

from __future__ import annotations

import textwrap
import uuid
import warnings

import pytest

from shoal.api import build_app_spec
from shoal.config import DeploymentConfig
from shoal.deployment import _DEPLOYMENT_OPTIONS, Application
from shoal.schema import (BUILD_HEADER, ConfigError, ConfigWarning, DeploymentSchema, ServeApplicationSchema,
                          ServeDeploySchema, build_application, build_applications, build_config,
                          graph_deployments, load_config_file, parse_config, to_yaml)

APP_SOURCE = '''
from pydantic import BaseModel

from shoal import serve


@serve.deployment(num_replicas=2, max_ongoing_requests=10, user_config={"threshold": 0.5},
                  ray_actor_options={"num_cpus": 0.5, "num_gpus": 0})
class Model:
    def __init__(self, weights="base"):
        self.weights = weights

    def reconfigure(self, config):
        self.config = config


@serve.deployment(health_check_period_s=5, autoscaling_config={"min_replicas": 1, "max_replicas": 3})
class Preprocessor:
    pass


@serve.deployment(num_replicas="auto", max_ongoing_requests=8)
class Ingress:
    def __init__(self, model, preprocessor=None, extra=None):
        self.model = model


app = Ingress.bind(Model.bind(), Preprocessor.bind())
shared = Model.bind("shared")
diamond = Ingress.bind(shared, extra={"again": [shared]})
plain = Model
auto_app = Model.options(name="AutoModel", num_replicas="auto",
                         autoscaling_config={"max_replicas": 7, "upscale_delay_s": 1}).bind()


def builder(args):
    return Ingress.bind(Model.bind(args.get("weights", "base")), Preprocessor.bind())


class Args(BaseModel):
    weights: str
    replicas: int = 1


def typed_builder(args: Args):
    return Ingress.bind(Model.options(num_replicas=args.replicas).bind(args.weights))


def no_arg_builder():
    return app


def failing_builder(args):
    raise RuntimeError("no model found")


def bad_builder(args):
    return 42


not_an_app = 42
'''


@pytest.fixture
def app_module(tmp_path, monkeypatch):
    """A fresh module with APP_SOURCE on sys.path; its name."""
    name = f"shoal_schema_app_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(APP_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def write_config(tmp_path, text: str, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def by_name(app: Application) -> dict:
    return {d.name: d for d in graph_deployments(app)}


def load_quietly(path) -> ServeDeploySchema:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return load_config_file(path)


# ----------------------------------------------------------------------------------------------
# A Ray Serve config file, unchanged

RAY_CONFIG = """\
# This file was generated using the `serve build` command on Ray v2.40.0.

proxy_location: EveryNode

http_options:
  host: 0.0.0.0
  port: 8000
  request_timeout_s: 30
  keep_alive_timeout_s: 5

grpc_options:
  port: 9000
  grpc_servicer_functions: []

logging_config:
  encoding: TEXT
  log_level: INFO
  logs_dir: null
  enable_access_log: true

applications:
- name: app1
  route_prefix: /
  import_path: {mod}:app
  runtime_env:
    pip: [torch==2.3.0]
    env_vars: {{MODEL_DIR: /models}}
  deployments:
  - name: Model
    num_replicas: 3
    user_config:
      threshold: 0.9
    ray_actor_options:
      num_cpus: 1.0
      num_gpus: 0.0
      accelerator_type: A10G
  - name: Ingress
    max_ongoing_requests: 100
    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      target_ongoing_requests: 5
- name: app2
  route_prefix: /v2
  import_path: {mod}.builder
  args:
    weights: large
"""


def test_ray_serve_config_loads_and_builds(tmp_path, app_module):
    path = write_config(tmp_path, RAY_CONFIG.format(mod=app_module))
    with pytest.warns(ConfigWarning) as record:
        schema = load_config_file(path)
    messages = [str(w.message) for w in record]
    assert f"{path}: applications[0].runtime_env: ignored (shoal runs replicas in the current Python environment)" \
        in messages
    assert any("applications[0].deployments[0].ray_actor_options.accelerator_type" in m for m in messages)
    assert schema.proxy_location.value == "EveryNode"
    assert schema.http_options.to_http_options() == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 30,
                                                     "keep_alive_timeout_s": 5}
    assert schema.logging_config.log_level == "INFO"
    assert [a.name for a in schema.applications] == ["app1", "app2"]

    built = dict((s.name, app) for s, app in build_applications(schema))
    app1 = by_name(built["app1"])
    assert app1["Model"].num_replicas == 3                        # set in the file
    assert app1["Model"].user_config == {"threshold": 0.9}
    assert app1["Model"].max_ongoing_requests == 10               # from the code
    assert app1["Model"].ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0, "accelerator_type": "A10G"}
    assert app1["Preprocessor"].config.health_check_period_s == 5  # not in the file: code values
    ingress = app1["Ingress"].config
    assert ingress.max_ongoing_requests == 100 and ingress.num_replicas is None
    assert (ingress.autoscaling_config.min_replicas, ingress.autoscaling_config.max_replicas,
            ingress.autoscaling_config.target_ongoing_requests) == (1, 4, 5)
    # The new graph still wires Model and Preprocessor into Ingress, and is deployable.
    assert [type(a).__name__ for a in app1["Ingress"].init_args] == ["Application", "Application"]
    assert app1["Ingress"].init_args[0].deployment is app1["Model"]
    spec = build_app_spec(built["app1"], "app1", "/")
    assert {d.name: d.config.num_replicas for d in spec.deployments}["Model"] == 3

    app2 = by_name(built["app2"])
    assert app2["Model"].init_args == ("large",)

    # The code's own graph is untouched.
    module = __import__(app_module)
    assert by_name(module.app)["Model"].num_replicas == 2


def test_every_deployment_option_is_in_the_schema():
    assert set(DeploymentSchema.model_fields) == {"name", *_DEPLOYMENT_OPTIONS}
    assert set(_DEPLOYMENT_OPTIONS) == set(DeploymentConfig.model_fields)
    # Constraints come from DeploymentConfig, not a second copy.
    assert DeploymentSchema.model_fields["max_ongoing_requests"].metadata == \
        DeploymentConfig.model_fields["max_ongoing_requests"].metadata


# ----------------------------------------------------------------------------------------------
# Override rules: config over code over defaults, only the keys set in the file

def app_schema(module: str, attr: str = "app", **fields) -> ServeApplicationSchema:
    return ServeApplicationSchema.model_validate({"import_path": f"{module}:{attr}", **fields})


def test_unset_keys_keep_code_values_set_keys_win(app_module):
    schema = app_schema(app_module, deployments=[{"name": "Model", "max_ongoing_requests": 3},
                                                 {"name": "Preprocessor"}])
    deps = by_name(build_application(schema))
    model = deps["Model"].config
    assert model.max_ongoing_requests == 3
    assert model.num_replicas == 2 and model.user_config == {"threshold": 0.5}
    assert deps["Model"].ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0}
    assert model.graceful_shutdown_timeout_s == 20.0  # default: neither code nor file
    pre = deps["Preprocessor"].config  # listed without options: nothing changes
    assert pre.health_check_period_s == 5 and pre.autoscaling_config.max_replicas == 3
    assert "max_ongoing_requests" in deps["Model"]._user_configured


def test_nested_option_from_file_replaces_the_codes(app_module):
    # As in Ray, ray_actor_options / autoscaling_config from the file replace the code's whole value.
    schema = app_schema(app_module, deployments=[
        {"name": "Model", "ray_actor_options": {"num_gpus": 1}},
        {"name": "Preprocessor", "autoscaling_config": {"max_replicas": 7}}])
    deps = by_name(build_application(schema))
    assert deps["Model"].ray_actor_options == {"num_gpus": 1.0}
    auto = deps["Preprocessor"].config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (1, 7)


def test_num_replicas_and_autoscaling_between_file_and_code(app_module):
    schema = app_schema(app_module, deployments=[
        {"name": "Preprocessor", "num_replicas": 4},            # code autoscales: the file's count wins
        {"name": "Model", "num_replicas": "auto"},               # code has a count: the file's "auto" wins
        {"name": "Ingress", "autoscaling_config": {"min_replicas": 2, "max_replicas": 9}}])
    deps = by_name(build_application(schema))
    pre = deps["Preprocessor"].config
    assert pre.num_replicas == 4 and pre.autoscaling_config is None
    model = deps["Model"].config
    assert model.num_replicas is None and model.autoscaling_config.max_replicas == 100
    ingress = deps["Ingress"].config
    assert ingress.num_replicas is None
    assert (ingress.autoscaling_config.min_replicas, ingress.autoscaling_config.max_replicas) == (2, 9)


def test_null_num_replicas_keeps_the_code_value(app_module):
    deps = by_name(build_application(app_schema(app_module, deployments=[{"name": "Model", "num_replicas": None}])))
    assert deps["Model"].num_replicas == 2


def test_app_logging_config_applies_to_deployments_without_one(app_module):
    schema = app_schema(app_module, logging_config={"log_level": "DEBUG"},
                        deployments=[{"name": "Model", "logging_config": {"encoding": "JSON"}}])
    deps = by_name(build_application(schema))
    assert deps["Ingress"].logging_config.log_level == "DEBUG"
    assert deps["Model"].logging_config.encoding == "JSON" and deps["Model"].logging_config.log_level == "INFO"


def test_shared_nodes_stay_shared_in_containers(app_module):
    deps = by_name(build_application(app_schema(app_module, "diamond",
                                                deployments=[{"name": "Model", "num_replicas": 5}])))
    ingress = deps["Ingress"]
    model_app = ingress.init_args[0]
    assert model_app.deployment.num_replicas == 5
    assert ingress.init_kwargs["extra"]["again"][0] is model_app
    assert len(graph_deployments(Application(ingress))) == 2
    build_app_spec(Application(ingress), "d", "/")  # one deployment per name: deployable


def test_override_of_a_deployment_not_in_the_graph(app_module):
    with pytest.raises(ConfigError) as e:
        build_application(app_schema(app_module, name="app1", deployments=[{"name": "Modle", "num_replicas": 2}]))
    assert str(e.value) == ("application 'app1': deployments[0].name: deployment 'Modle' is not in the application "
                            "(its deployments: 'Ingress', 'Model', 'Preprocessor')")


def test_override_invalid_against_the_code(app_module):
    with pytest.raises(ConfigError, match=r"application 'default': deployments\[0\] \(Model\): .*"
                                          r"placement_group_strategy is only allowed together"):
        build_application(app_schema(app_module, deployments=[{"name": "Model", "placement_group_strategy": "PACK"}]))


# ----------------------------------------------------------------------------------------------
# Import paths and builders

def test_builder_gets_args_dict(app_module):
    app = build_application(app_schema(app_module, "builder", args={"weights": "xl"}))
    assert by_name(app)["Model"].init_args == ("xl",)


def test_dotted_import_path_and_deployment_target(app_module):
    app = build_application({"import_path": f"{app_module}.plain"})
    assert app.deployment.name == "Model" and app.deployment.init_args == ()


def test_pydantic_typed_builder(app_module):
    app = build_application(app_schema(app_module, "typed_builder", args={"weights": "xl", "replicas": "3"}))
    assert by_name(app)["Model"].init_args == ("xl",)
    assert by_name(app)["Model"].num_replicas == 3

    with pytest.raises(ConfigError) as e:
        build_application(app_schema(app_module, "typed_builder", name="llm", args={"replicas": "many"}))
    assert str(e.value).splitlines() == [
        "application 'llm': args.weights: Field required",
        "application 'llm': args.replicas: Input should be a valid integer, unable to parse string as an "
        "integer (got 'many')",
    ]


def test_no_arg_builder_without_args(app_module):
    assert build_application(app_schema(app_module, "no_arg_builder")).deployment.name == "Ingress"


@pytest.mark.parametrize("attr, args, message", [
    ("app", {"x": 1}, "args: '{mod}:app' is an Application, not a builder function, so it takes no args"),
    ("no_arg_builder", {"x": 1}, "args: the application builder '{mod}:no_arg_builder' takes no arguments, "
                                 "but args were given (x)"),
    ("failing_builder", {}, "The application builder '{mod}:failing_builder' failed: RuntimeError: no model found"),
    ("bad_builder", {}, "The application builder '{mod}:bad_builder' returned int, not an Application"),
    ("not_an_app", {}, "'{mod}:not_an_app' is a int, not an application"),
    ("missing", {}, "Could not import '{mod}:missing': module '{mod}' has no attribute 'missing'."),
])
def test_builder_errors(app_module, attr, args, message):
    with pytest.raises(ConfigError) as e:
        build_application(app_schema(app_module, attr, name="a", args=args))
    assert str(e.value).startswith("application 'a': " + message.format(mod=app_module))


def test_missing_module(tmp_path):
    with pytest.raises(ConfigError, match="application 'default': Could not import 'no_such_mod_xyz:app': module "
                                          "'no_such_mod_xyz' not found"):
        build_application({"import_path": "no_such_mod_xyz:app"})


def test_base_dir_goes_on_sys_path(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"shoal_schema_basedir_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(APP_SOURCE)
    app = build_application({"import_path": f"{name}:app"}, base_dir=tmp_path)
    assert app.deployment.name == "Ingress" and sys.path[0] == str(tmp_path)


# ----------------------------------------------------------------------------------------------
# Rejections: file, field path and reason

REJECTIONS = [
    ("""\
     applications:
     - name: a
       import_path: m:app
     - name: b
       route_prefix: /b
       import_path: m:app
       deployments:
       - name: Model
         max_ongoing_requests: -1
     """, "applications[1].deployments[0].max_ongoing_requests: Input should be greater than 0 (got -1)"),
    ("""\
     applications:
     - {name: a, import_path: m:app}
     - {name: a, import_path: m:app, route_prefix: /other}
     """, "applications[1].name: application name already used by applications[0] (got 'a')"),
    ("""\
     applications:
     - {name: a, import_path: m:app, route_prefix: /api}
     - {name: b, import_path: m:app, route_prefix: /api}
     """, "applications[1].route_prefix: route prefix already used by applications[0] ('a') (got '/api')"),
    ("""\
     applications:
     - {name: "", import_path: m:app}
     """, "applications[0].name: application names must not be empty (got '')"),
    ("""\
     applications:
     - import_path: m:app
       deployments:
       - {name: Model, num_replicas: 2, autoscaling_config: {max_replicas: 4}}
     """, "applications[0].deployments[0].num_replicas: Manually setting num_replicas is not allowed when "
          "autoscaling_config is provided (remove one of them) (got 2)"),
    ("""\
     applications:
     - {import_path: m:app, port: 9000}
     """, "applications[0].port: port can only be set for all applications, in the top-level http_options; "
          "remove it from the application (got 9000)"),
    ("""\
     applications:
     - import_path: m:app
       host: 0.0.0.0
     """, "applications[0].host: host can only be set for all applications, in the top-level http_options"),
    ("""\
     applications:
     - import_path: m:app
       deployments:
       - {name: Model, num_replica: 2}
     """, "applications[0].deployments[0].num_replica: unknown field (allowed: name, num_replicas, "),
    ("""\
     applications:
     - import_path: m:app
       deployments:
       - {name: Model, num_replicas: 0}
     """, 'applications[0].deployments[0].num_replicas: must be an integer >= 1 or "auto" (got 0)'),
    ("""\
     proxy_location: Everywhere
     applications: []
     """, "proxy_location: Input should be 'Disabled', 'HeadOnly' or 'EveryNode' (got 'Everywhere')"),
    ("""\
     applications:
     - import_path: m:app
       deployments:
       - {name: Model, logging_config: {log_level: LOUD}}
     """, "applications[0].deployments[0].logging_config.log_level: Input should be an integer or 'DEBUG', "
          "'INFO', 'WARNING', 'ERROR' or 'CRITICAL' (got 'LOUD')"),
    ("""\
     applications:
     - import_path: m:app
       deployments:
       - {name: Model, placement_group_bundles: [{CPU: 1}], placement_group_strategy: CLOSE}
     """, "applications[0].deployments[0].placement_group_strategy: Input should be 'PACK', 'SPREAD', "
          "'STRICT_PACK' or 'STRICT_SPREAD' (got 'CLOSE')"),
    ("""\
     target_capacity: 150
     applications: []
     """, "target_capacity: Input should be less than or equal to 100 (got 150)"),
    ("""\
     applications:
     - {import_path: m:app, route_prefix: api}
     """, "applications[0].route_prefix: it must start with '/' (got 'api')"),
    ("""\
     applications:
     - {import_path: app}
     """, "applications[0].import_path: expected 'module:attribute' or 'module.attribute' (got 'app')"),
    ("""\
     applications:
     - {name: a}
     """, "applications[0].import_path: Field required"),
    ("""\
     http_options: {port: 70000}
     """, "applications: Field required"),
    ("""\
     applications:
     - import_path: m:app
       external_scaler_enabled: true
       deployments:
       - {name: Model, autoscaling_config: {max_replicas: 4}}
     """, "applications[0].deployments[0].autoscaling_config: autoscaling is not allowed when "
          "external_scaler_enabled is true"),
    ("""\
     applications:
     - import_path: m:app
       deployments:
       - {name: Model}
       - {name: Model, num_replicas: 2}
     """, "applications[0].deployments[1].name: deployment listed twice (also deployments[0]) (got 'Model')"),
    ("""\
     import_path: m:app
     deployments: []
     """, "import_path: this is the old single-application format; list the application under `applications:`"),
    ("""\
     applications:
     - import_path: m:app
       deployments:
       - {name: Model, autoscaling_config: {min_replicas: 5, max_replicas: 2}}
     """, "applications[0].deployments[0].autoscaling_config: min_replicas (5) must be less than or equal to "
          "max_replicas (2)"),
]


@pytest.mark.parametrize("text, expected", REJECTIONS, ids=[str(i) for i in range(len(REJECTIONS))])
def test_rejections_name_file_field_and_reason(tmp_path, text, expected):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_quietly(path)
    lines = str(e.value).splitlines()
    assert any(line.startswith(f"{path}: {expected}") for line in lines), lines
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert isinstance(e.value, ValueError) and e.value.source == str(path)


def test_every_problem_is_reported(tmp_path):
    path = write_config(tmp_path, """\
        target_capacity: -1
        applications:
        - import_path: m:app
          deployments:
          - {name: Model, max_ongoing_requests: 0, health_check_period_s: 0}
        """)
    with pytest.raises(ConfigError) as e:
        load_config_file(path)
    assert len(e.value.problems) == 3


@pytest.mark.parametrize("text, expected", [
    ("applications: [\n", "invalid YAML at line 2, column 1: expected the node content, but found "
                           "'<stream end>' (while parsing a flow node)"),
    ("", "the file is empty; expected a mapping with `applications:`"),
    ("- a\n- b\n", "the top level must be a mapping with `applications:`, not a list"),
    ("applications: []\napplications: []\n", "invalid YAML at line 2, column 1: duplicate key 'applications'"),
])
def test_unreadable_files(tmp_path, text, expected):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config_file(path)
    assert str(e.value) == f"{path}: {expected}"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read the config file: No such file"):
        load_config_file(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------------------------
# Tolerated and ignored fields

def test_unknown_top_level_field_is_tolerated_with_a_warning(tmp_path):
    path = write_config(tmp_path, """\
        future_option: {enabled: true}
        http_options: {port: 8123, ssl_ca_certs: /ca.pem, new_knob: 1}
        grpc_options: {port: 9001, grpc_servicer_functions: ["svc:add_servicer"]}
        applications:
        - import_path: m:app
          some_new_app_field: 1
        """)
    with pytest.warns(ConfigWarning) as record:
        schema = load_config_file(path)
    messages = [str(w.message) for w in record]
    assert messages == [
        f"{path}: future_option: unknown top-level field, ignored",
        f"{path}: http_options.new_knob: unknown http_options field, ignored",
        f"{path}: http_options.ssl_ca_certs: not supported by shoal, ignored",
        f"{path}: grpc_options.grpc_servicer_functions: shoal does not serve gRPC; grpc_options are ignored",
        f"{path}: applications[0].some_new_app_field: unknown application field, ignored",
    ]
    assert schema.config_warnings == [m.split(": ", 1)[1] for m in messages]
    assert "future_option" not in schema.model_dump()
    assert schema.http_options.to_http_options() == {"port": 8123}


def test_ray_only_fields_are_accepted(tmp_path):
    path = write_config(tmp_path, """\
        applications:
        - import_path: m:app
          deployments:
          - name: Model
            ray_actor_options:
              runtime_env: {pip: [numpy]}
              accelerator_type: H100
              object_store_memory: 1000
              resources: {custom: 1}
        """)
    with pytest.warns(ConfigWarning) as record:
        schema = load_config_file(path)
    assert [str(w.message).split(": ")[1] for w in record] == [
        "applications[0].deployments[0].ray_actor_options.runtime_env",
        "applications[0].deployments[0].ray_actor_options.accelerator_type",
        "applications[0].deployments[0].ray_actor_options.object_store_memory",
    ]
    assert schema.applications[0].deployments[0].overrides() == {"ray_actor_options": {
        "runtime_env": {"pip": ["numpy"]}, "accelerator_type": "H100", "resources": {"custom": 1.0}}}


def test_defaults_match_ray(tmp_path):
    schema = parse_config({"applications": [{"import_path": "m:app"}]})
    app = schema.applications[0]
    assert (app.name, app.route_prefix, app.args, app.runtime_env, app.deployments) == ("default", "/", {}, {}, [])
    assert schema.proxy_location.value == "EveryNode" and schema.target_capacity is None
    assert parse_config({"applications": [{"import_path": "m:app", "route_prefix": None}]}) \
        .applications[0].route_prefix is None
    # Two applications without HTTP do not clash.
    parse_config({"applications": [{"name": "a", "import_path": "m:a", "route_prefix": None},
                                   {"name": "b", "import_path": "m:b", "route_prefix": None}]})


def test_overrides_are_only_the_keys_in_the_file():
    d = DeploymentSchema.model_validate({"name": "M", "user_config": None, "autoscaling_config": {"max_replicas": 5}})
    assert d.overrides() == {"user_config": None, "autoscaling_config": {"max_replicas": 5}}


# ----------------------------------------------------------------------------------------------
# `shoal build`: Applications -> config -> YAML -> the same Applications

def test_build_config_yaml_round_trip(tmp_path, app_module):
    module = __import__(app_module)
    apps = [module.app, module.builder({"weights": "xl"}), module.auto_app]
    paths = [f"{app_module}:app", f"{app_module}:no_arg_builder", f"{app_module}:auto_app"]
    schema = build_config(apps, paths)
    text = to_yaml(schema)
    assert text.startswith(BUILD_HEADER + "\n")
    assert "# This file was generated using the `shoal build` command." in text.splitlines()[0]

    assert [(a.name, a.route_prefix, a.import_path) for a in schema.applications] == [
        ("app1", "/app1", paths[0]), ("app2", "/app2", paths[1]), ("app3", "/app3", paths[2])]
    entries = {d.name: d.model_dump(exclude_unset=True) for d in schema.applications[0].deployments}
    assert entries["Model"] == {"name": "Model", "num_replicas": 2, "max_ongoing_requests": 10,
                                "user_config": {"threshold": 0.5},
                                "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.0}}
    assert entries["Preprocessor"] == {"name": "Preprocessor", "autoscaling_config": {"min_replicas": 1,
                                       "max_replicas": 3}, "health_check_period_s": 5.0}
    assert entries["Ingress"] == {"name": "Ingress", "num_replicas": "auto", "max_ongoing_requests": 8}
    # "auto" with custom keys: only what differs from what "auto" means is written.
    assert schema.applications[2].deployments[0].model_dump(exclude_unset=True) == {
        "name": "AutoModel", "num_replicas": "auto", "max_ongoing_requests": 10, "user_config": {"threshold": 0.5},
        "autoscaling_config": {"max_replicas": 7, "upscale_delay_s": 1.0},
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.0}}

    path = tmp_path / "built.yaml"
    path.write_text(text)
    loaded = load_config_file(path)
    assert loaded.model_dump() == schema.model_dump()
    for (app_schema_, rebuilt), original in zip(build_applications(loaded), apps):
        before, after = by_name(original), by_name(rebuilt)
        assert before.keys() == after.keys()
        for name in before:
            assert after[name].config == before[name].config, name


def test_build_config_single_app_is_at_root(app_module):
    module = __import__(app_module)
    schema = build_config([module.app], [f"{app_module}:app"])
    assert [(a.name, a.route_prefix) for a in schema.applications] == [("app1", "/")]
    assert schema.http_options.to_http_options() == {"host": "127.0.0.1", "port": 8000}
    with pytest.raises(ValueError, match="one import path per application"):
        build_config([module.app], [])
