"""The configuration reference is generated, complete, and every shipped YAML example is valid.

docs/config-reference.md must equal `python -m mtrank.jobs.config_doc`; every field of every config
model has a description; jobs/default_job.yaml, features/default_spec.yaml and the ```yaml blocks of
the README (and docs/) validate against the models.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mtrank.features.spec import load_spec, parse_spec
from mtrank.jobs import config_doc
from mtrank.jobs.config import JobConfig, load_config, parse_config

ROOT = Path(__file__).parents[1]
REFERENCE = ROOT / "docs" / "config-reference.md"


def test_committed_reference_matches_the_models():
    assert REFERENCE.exists(), f"docs drifted: run {config_doc.COMMAND}"
    assert REFERENCE.read_text() == config_doc.render(), f"docs drifted: run {config_doc.COMMAND}"


def test_render_is_deterministic():
    assert config_doc.render() == config_doc.render()


def test_reference_covers_job_scoring_and_spec_models():
    names = {m.__name__ for m in config_doc.all_models()}
    assert {"JobConfig", "TrackingConfig", "ModelConfig", "TrainConfig", "EvalConfig", "PromoteConfig",
            "WarmStartConfig", "ScoringConfig", "FusionConfig", "Factor", "FactorSearch", "Range", "TuneConfig",
            "WindowRule", "TrafficCap", "NewItemBoost", "CampaignBoost", "LowQuality",
            "FeatureSpec", "TableSpec", "CategoricalFeature", "MultiHotFeature", "NumericFeature",
            "TaskSpec"} <= names
    text = config_doc.render()
    for name in names:
        assert f"\n### {name}\n" in text, name
    # the aliased key is documented under its YAML name
    assert "| `from` |" in text


def test_every_field_is_described():
    missing = [f"{m.__name__}.{name}" for m in config_doc.all_models() for name in m.model_fields
               if not config_doc.description(m, name)]
    assert not missing, "fields without a description (add Field(description=...)): " + ", ".join(missing)


def test_supplement_only_covers_undescribed_fields():
    """The generator's own descriptions are a stopgap for models it may not edit: each names a real
    field that has no description of its own (once the model describes it, drop the entry)."""
    models = {m.__name__: m for m in config_doc.all_models()}
    for (model, name) in config_doc.SUPPLEMENT:
        assert model in models and name in models[model].model_fields, (model, name)
        assert not models[model].model_fields[name].description, \
            f"{model}.{name} now has its own description: remove it from config_doc.SUPPLEMENT"


def test_shipped_defaults_validate():
    assert load_config(ROOT / "jobs" / "default_job.yaml").name
    assert load_spec(ROOT / "features" / "default_spec.yaml").tasks


def _yaml_blocks() -> list[tuple[str, str]]:
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, m in enumerate(re.finditer(r"^```yaml\n(.*?)^```", doc.read_text(), re.S | re.M)):
            out.append((f"{doc.relative_to(ROOT)}#yaml{i}", m.group(1)))
    return out


def test_readme_has_yaml_examples():
    assert len(_yaml_blocks()) >= 2


@pytest.mark.parametrize("where,text", _yaml_blocks(), ids=[w for w, _ in _yaml_blocks()])
def test_documented_yaml_validates(where, text):
    """A block with `features` is a FeatureSpec; any other is a job config or a fragment of one (a
    fragment gets the one required key, `data`)."""
    raw = yaml.safe_load(text)
    assert isinstance(raw, dict), where
    if "features" in raw:
        parse_spec(raw, where)
    else:
        assert set(raw) <= set(JobConfig.model_fields) | {"data"}, where
        parse_config({"data": "logs", **raw}, where)
