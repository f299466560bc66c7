"""One list of each thing: the framework ids (frameworks/registry.py) and the runner names
(workflow/lib/launch.py) are written once; every other place either derives them or is checked
here, so that a framework or runner added in one place and not another fails at once."""

from __future__ import annotations

from pathlib import Path

import yaml

from frameworks import registry
from workflow.lib import images, launch

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = set(registry.FRAMEWORKS)


def _schema(name: str) -> dict:
    return yaml.safe_load((ROOT / "workflow" / "schemas" / name).read_text())


def test_schemas_name_the_registry_frameworks():
    config, preset = _schema("config.schema.yaml"), _schema("preset.schema.yaml")
    assert set(config["properties"]["frameworks"]["items"]["enum"]) == FRAMEWORKS
    assert set(preset["properties"]["frameworks"]["propertyNames"]["enum"]) == FRAMEWORKS
    build_args = config["properties"]["images"]["properties"]["build_args"]["propertyNames"]["enum"]
    assert set(build_args) == set(images.IMAGES)


def test_images_and_figures_cover_every_framework():
    from workflow.lib import plotting

    assert set(images.IMAGES) == FRAMEWORKS | {"engine"} == set(images.COPIES)
    assert all(images.image_of(f) in images.IMAGES for f in FRAMEWORKS)
    assert set(plotting.COLORS) == FRAMEWORKS == set(plotting.LABELS)
    assert len(set(plotting.COLORS.values())) == len(FRAMEWORKS)  # a colour tells one framework


def test_schema_names_the_launcher_runners():
    assert set(_schema("config.schema.yaml")["properties"]["runner"]["enum"]) == set(launch.RUNNERS)


def test_makefile_builds_every_image():
    import re

    listed = re.search(r"addsuffix \.iid,([a-z0-9 ]+)\)", (ROOT / "Makefile").read_text()).group(1).split()
    assert sorted(listed) == sorted(images.IMAGES)


def test_infinigen_policy_keys_are_its_options():
    from frameworks.infinigen import options

    assert registry.get("infinigen").policy_keys == set(options.DEFAULTS)
