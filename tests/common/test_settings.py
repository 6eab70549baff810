"""Settings from `CBIR_*` variables (services/common/settings.py): a bad value fails at start-up with one line
naming the variable, placeholder API keys are refused outside development, and defaults are shared."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from services.common.errors import ConfigError
from services.common.settings import (
    Backend,
    ModelSettings,
    StoreSettings,
    UploadSettings,
    WatchSettings,
    default,
)
from services.embedder.settings import EmbedderSettings
from services.search.settings import SearchSettings

pytestmark = pytest.mark.usefixtures("clean_environment")

PLACEHOLDERS = ["changeme", "secret", ""]

# --- load() -------------------------------------------------------------------------------------


def test_settings_are_read_from_cbir_variables_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_BACKEND", "elasticsearch")
    monkeypatch.setenv("CBIR_ES_SHARDS", "7")
    monkeypatch.setenv("ES_REPLICAS", "3")  # no prefix: not ours
    monkeypatch.setenv("CBIR_NO_SUCH_SETTING", "1")  # unknown: ignored, not an error
    settings = StoreSettings.load()
    assert (settings.backend, settings.es_shards) == (Backend.elasticsearch, 7)
    assert settings.es_replicas == default(StoreSettings, "es_replicas")


def test_settings_are_read_from_a_dot_env_file_below_the_variables(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CBIR_ES_INDEX=from-file\nCBIR_ES_SHARDS=4\n")
    monkeypatch.setenv("CBIR_ES_SHARDS", "9")
    settings = StoreSettings.load()
    assert (settings.es_index, settings.es_shards) == ("from-file", 9)


def test_a_bad_value_is_one_line_naming_the_variable_and_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_ES_SHARDS", "many")
    with pytest.raises(ConfigError) as refused:
        StoreSettings.load()
    message = refused.value.message
    assert message.startswith("invalid settings: CBIR_ES_SHARDS: ") and "(got 'many')" in message
    assert "\n" not in message


def test_every_bad_value_is_named_in_the_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_ES_SHARDS", "0")
    monkeypatch.setenv("CBIR_DEVICE", "tpu")
    monkeypatch.setenv("CBIR_MAX_BATCH", "64")  # a good one is not mentioned
    with pytest.raises(ConfigError) as refused:
        SearchSettings.load()
    message = refused.value.message
    assert "CBIR_ES_SHARDS: " in message and "(got '0')" in message
    assert "CBIR_DEVICE: " in message and "(got 'tpu')" in message
    assert "CBIR_MAX_BATCH" not in message and "\n" not in message and message.count("; ") == 1


def test_a_bad_secret_is_named_but_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_API_KEYS", "[8675309]")  # a number, not a string: invalid
    with pytest.raises(ConfigError) as refused:
        UploadSettings.load()
    assert "CBIR_API_KEYS: " in refused.value.message and "8675309" not in refused.value.message


# --- placeholder API keys -----------------------------------------------------------------------


@pytest.mark.parametrize("settings_class", [UploadSettings, EmbedderSettings, SearchSettings])
@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_a_placeholder_api_key_is_refused_outside_development(
        monkeypatch: pytest.MonkeyPatch, settings_class: type[UploadSettings], placeholder: str) -> None:
    monkeypatch.setenv("CBIR_API_KEYS", f'["a-real-key", "{placeholder}"]')
    monkeypatch.setenv("CBIR_ENVIRONMENT", "production")
    with pytest.raises(ConfigError) as refused:
        settings_class.load()
    message = refused.value.message
    assert "CBIR_API_KEYS holds a placeholder key" in message and "\n" not in message
    assert "Value error" not in message  # the validator's message is the user's, without pydantic's prefix


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_a_placeholder_write_key_is_refused_outside_development(
        monkeypatch: pytest.MonkeyPatch, placeholder: str) -> None:
    monkeypatch.setenv("CBIR_WRITE_API_KEYS", f'["{placeholder}"]')
    monkeypatch.setenv("CBIR_ENVIRONMENT", "production")
    with pytest.raises(ConfigError) as refused:
        SearchSettings.load()
    message = refused.value.message
    assert "CBIR_WRITE_API_KEYS holds a placeholder key" in message and "CBIR_API_KEYS holds" not in message


@pytest.mark.parametrize("variable", ["CBIR_API_KEYS", "CBIR_WRITE_API_KEYS"])
def test_placeholder_keys_are_accepted_in_development(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv(variable, '["changeme"]')
    settings = SearchSettings.load()  # CBIR_ENVIRONMENT defaults to development
    assert settings.environment == "development"
    keys = settings.api_keys if variable == "CBIR_API_KEYS" else settings.write_api_keys
    assert [key.get_secret_value() for key in keys] == ["changeme"]


def test_real_keys_are_accepted_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_ENVIRONMENT", "production")
    monkeypatch.setenv("CBIR_API_KEYS", '["k-3f9a"]')
    monkeypatch.setenv("CBIR_WRITE_API_KEYS", '["w-81c2"]')
    settings = SearchSettings.load()
    assert [k.get_secret_value() for k in settings.api_keys] == ["k-3f9a"]
    assert [k.get_secret_value() for k in settings.write_api_keys] == ["w-81c2"]


def test_keys_built_in_code_are_checked_too() -> None:
    # `create_app(SearchSettings(...))` builds settings without load(): the check is the model's, not load()'s.
    with pytest.raises(ValueError, match="CBIR_WRITE_API_KEYS holds a placeholder key"):
        SearchSettings(environment="production", write_api_keys=[SecretStr("secret")])


# --- default() and the paths of the state dir ---------------------------------------------------


def test_default_is_the_settings_default() -> None:
    model = ModelSettings()
    assert default(ModelSettings, "max_batch") == model.max_batch
    assert default(ModelSettings, "max_wait_ms") == model.max_wait_ms
    assert default(StoreSettings, "state_dir") == StoreSettings().state_dir


def test_default_calls_a_default_factory_each_time() -> None:
    first, second = default(UploadSettings, "api_keys"), default(UploadSettings, "api_keys")
    assert first == [] and first is not second  # a fresh list: a caller that appends changes no one else's


def test_default_of_an_unknown_setting_is_an_error() -> None:
    with pytest.raises(KeyError):
        default(ModelSettings, "no_such_setting")


def test_the_index_file_and_the_uploads_live_in_the_state_dir(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv("CBIR_STATE_DIR", str(tmp_path / "state"))
    settings = StoreSettings.load()
    assert settings.faiss_path == tmp_path / "state" / "index.npz"
    assert settings.uploads_dir == tmp_path / "state" / "uploads"


@pytest.mark.parametrize("value", ['["/photos", "/mnt/camera"]', "/photos:/mnt/camera"])
def test_watched_folders_are_a_json_list_or_paths_separated_by_colons(monkeypatch: pytest.MonkeyPatch,
                                                                      value: str) -> None:
    monkeypatch.setenv("CBIR_WATCH", value)
    assert WatchSettings.load().watch == [Path("/photos"), Path("/mnt/camera")]


def test_a_broken_watch_list_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_WATCH", '["/photos"')
    with pytest.raises(ConfigError, match="CBIR_WATCH"):
        WatchSettings.load()
