"""API keys: from the key file the config names and from BAGEL_RAY_API_KEYS on the ingress
replica, sent as `Authorization: Bearer KEY`; /health public by config, everything else
protected; 401 with a JSON error otherwise; keys never written to any log, and never in the
config (whose args Ray Serve logs when it deploys from a config file)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import requests

from bagel_ray.client import Client, ClientError
from bagel_ray.serve.access import API_KEYS_ENV, AccessControl
from bagel_ray.serve.config import AccessConfig, AppConfig
from tests.serve.conftest import deploy_variant

CONFIG_KEY = "cfg-" + secrets.token_hex(12)
ENV_KEYS = ["env-" + secrets.token_hex(12), "env-" + secrets.token_hex(12)]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api_keys.txt"
    path.write_text(f"# the API keys of the locked app\n\n  {CONFIG_KEY}  \n")
    return path


@pytest.fixture(scope="module")
def locked(serve_app, key_file):
    from ray import serve

    app = deploy_variant(serve_app, "locked", {
        "access.api_keys_file": str(key_file),
        "access.public_paths": ["/health"],
        "ingress.ray_actor_options.runtime_env": {"env_vars": {API_KEYS_ENV: f" {ENV_KEYS[0]} ,{ENV_KEYS[1]}"}},
    })
    yield app
    serve.delete(app.name)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_401(resp: requests.Response) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == "invalid_api_key"


def test_keys_are_required_and_accepted(locked):
    wrong = "wrong-" + secrets.token_hex(12)
    for headers in ({}, bearer(wrong), {"Authorization": f"Basic {CONFIG_KEY}"}, bearer(""), bearer(CONFIG_KEY[:-1])):
        assert_401(requests.post(locked.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=60))
        assert_401(requests.post(locked.url + "/v1/images/generations", json={"prompt": "x"}, headers=headers, timeout=60))
        assert_401(requests.post(locked.url + "/v1/images/edits", data={"prompt": "x"}, headers=headers, timeout=60))
        assert_401(requests.get(locked.url + "/v1/models", headers=headers, timeout=60))
    assert requests.get(locked.url + "/health", timeout=60).status_code == 200  # public by config
    for key in (CONFIG_KEY, *ENV_KEYS):
        assert requests.post(locked.url + "/v1/chat/completions", json=CHAT, headers=bearer(key), timeout=60).status_code == 200
        assert requests.get(locked.url + "/v1/models", headers=bearer(key), timeout=60).status_code == 200
    # a bad request with a good key is judged on its content, not refused for access
    resp = requests.post(locked.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 0}, headers=bearer(CONFIG_KEY), timeout=60)
    assert resp.status_code == 422

    assert Client(url=locked.url, api_key=ENV_KEYS[1]).chat("hello", max_tokens=2) is not None
    with pytest.raises(ClientError) as refused:
        Client(url=locked.url).chat("hello", max_tokens=2)
    assert refused.value.status == 401


def test_keys_are_never_logged(locked, ray_session):
    wrong = "wrong-" + secrets.token_hex(12)
    for key in (wrong, *ENV_KEYS, CONFIG_KEY):
        requests.post(locked.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 0}, headers=bearer(key), timeout=60)
    # the app's args (which Serve logs when it deploys from a config file) name the key file,
    # not its keys (the env keys are in them only because this test hands them over in runtime_env)
    reported = locked.handle.app_config.remote().result()
    assert reported["access"]["api_keys_file"] == locked.args["access"]["api_keys_file"]
    assert CONFIG_KEY not in repr(reported) and CONFIG_KEY not in repr(locked.args)
    # Every log of the cluster, but Ray's runtime-env agent's, which records the env_vars this
    # test hands the ingress through `runtime_env` (set keys in the nodes' environment instead).
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())  # noqa: SLF001
    for path in logs.rglob("*"):
        if path.is_file() and not path.name.startswith("runtime_env") and path.stat().st_size < 64 * 1024 * 1024:
            text = path.read_text(errors="replace")
            for key in (wrong, *ENV_KEYS, CONFIG_KEY):
                assert key not in text, f"an API key is in {path}"


# -- the rules themselves ----------------------------------------------------------------


def test_access_control_rules():
    keys = AccessControl(["k1", "k2"], ["/health"])
    assert keys.enabled and "k1" not in repr(keys) and "k2" not in repr(keys)
    assert keys.allows("/health", None)
    assert keys.allows("/v1/models", "Bearer k2") and keys.allows("/v1/models", "bearer  k1 ")
    for header in (None, "", "Bearer", "Bearer k3", "Basic k1", "k1", "Bearer k1k2", "Bearer k"):
        assert not keys.allows("/v1/models", header), header
    assert AccessControl([], []).allows("/v1/chat/completions", None)  # no keys: open


def test_keys_from_the_key_file_and_environment(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("a\n# a comment\n\n d \n")
    config = AccessConfig(api_keys_file=str(keys), public_paths=["/health", "/v1/models"])
    control = AccessControl.from_config(config, {API_KEYS_ENV: " b, ,c "})
    assert all(control.allows("/v1/chat/completions", f"Bearer {k}") for k in "abcd")
    assert control.allows("/v1/models", None)
    assert not AccessControl.from_config(AccessConfig(), {}).enabled
    keys.write_text("good\nhas space-secret-9f3\n")
    with pytest.raises(ValueError, match="line 2") as bad:
        AccessControl.from_config(config, {})
    assert "secret-9f3" not in str(bad.value)
    with pytest.raises(ValueError, match="cannot read"):
        AccessControl.from_config(AccessConfig(api_keys_file=str(tmp_path / "missing")), {})
    with pytest.raises(ValueError):
        AccessConfig(public_paths=["/v1/chat/completions"])


def test_keys_written_in_the_config_are_refused_without_repeating_them():
    with pytest.raises(ValueError, match="api_keys_file") as refused:
        AppConfig.model_validate({"access": {"api_keys": [CONFIG_KEY]}})
    assert CONFIG_KEY not in str(refused.value)
