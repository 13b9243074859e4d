from pathlib import Path

import pytest
import yaml

from schemas.config import ConfigError, load_config


def write(tmp_path: Path, sources, **extra) -> Path:
    (tmp_path / "data.json").write_text("[]")
    p = tmp_path / "corpus.yaml"
    p.write_text(yaml.safe_dump({"sources": sources, **extra}))
    return p


def src(**kw):
    base = {"name": "a", "kind": "caption", "format": "llava", "path": "data.json"}
    base.update(kw)
    return base


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    cfg = load_config(write(tmp_path, [src(media_root=".")]))
    assert cfg.sources[0].path == str(tmp_path / "data.json")
    assert cfg.sources[0].media_root == str(tmp_path)
    assert cfg.shard.max_samples == 1000 and cfg.sources[0].language == "auto"


def test_unknown_kind_names_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, [src(), src(name="b", kind="podcast")]))
    msg = str(e.value)
    assert "sources[1].kind" in msg and "'podcast'" in msg


def test_missing_path_names_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, [src(path="nowhere.json")]))
    assert "sources[0].path" in str(e.value) and "does not exist" in str(e.value)


def test_missing_media_root_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"sources\[0\]\.media_root"):
        load_config(write(tmp_path, [src(media_root="no_media")]))


def test_format_must_fit_kind(tmp_path):
    with pytest.raises(ConfigError, match="does not fit kind 'asr'"):
        load_config(write(tmp_path, [src(kind="asr")]))


def test_unknown_field_and_duplicate_names_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"sources\[0\]\.colour"):
        load_config(write(tmp_path, [src(colour="red")]))
    with pytest.raises(ConfigError, match="repeated"):
        load_config(write(tmp_path, [src(), src()]))


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_fingerprint_changes_with_settings(tmp_path):
    a = load_config(write(tmp_path, [src()]))
    b = load_config(write(tmp_path, [src()], shard={"max_samples": 7}))
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == load_config(write(tmp_path, [src()])).fingerprint()
