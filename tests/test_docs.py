"""The documentation site: it builds with --strict, and its generated references hold every configuration key and
every command (read from the built HTML); the README stays the front door."""

from __future__ import annotations

import dataclasses
import html
import re
import tomllib

import pytest
from helpers import ROOT, run

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocs_click")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    result = run(["python", "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], NO_MKDOCS_2_WARNING="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def text_of(path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", path.read_text()))


def test_every_configuration_key_has_its_row_in_the_built_reference(site):
    from smptrain.config import Config

    page = text_of(site / "reference" / "configuration" / "index.html")
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(section.default_factory):
            assert f"{section.name}.{field.name}" in page, f"{section.name}.{field.name} is not in the reference"


def test_every_command_has_its_section_in_the_built_reference(site):
    page = text_of(site / "reference" / "commands" / "index.html")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in scripts:
        assert name in page, name
    for option in ("--recipes", "--threshold", "--resume", "--format", "--task", "--space"):  # click's own options
        assert option in page, option


def test_the_error_catalogue_and_the_api_are_generated(site):
    errors = text_of(site / "troubleshooting" / "index.html")
    assert "must be one of" in errors and "Reading the configuration" in errors and "Writing files" in errors
    api = (site / "reference" / "api" / "index.html").read_text()
    for name in ("smptrain.train.train", "smptrain.evaluation.assess.assess_checkpoint", "smptrain.export.convert.convert",
                 "smptrain.search.cv.cross_validate", "smptrain.export.predict.predict_in_patches"):
        assert f'id="{name}"' in api, name


def test_the_readme_is_the_front_door_and_links_only_to_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target
    assert "bash tools/demo.sh" in readme and "bash tools/test.sh" in readme
