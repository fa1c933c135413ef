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


def test_every_sentence_of_the_catalogue_reads_in_words(site):
    """Troubleshooting's generated rows: every placeholder a word (a file name, the choices, or what it stands for in
    capitals), none of them Python; beside each, what to do: its own advice, or where the fix for its kind is."""
    page = (site / "troubleshooting" / "index.html").read_text()
    placeholders = [html.unescape(re.sub(r"<[^>]+>", "", p)) for p in re.findall(r"<i>(.*?)</i>", page, re.S)]
    assert len(placeholders) > 200
    code = re.compile(r"[()\[\]'\"={}]|\bif\b|\.join|\bself\b|\bcfg\b")
    assert [p for p in placeholders if code.search(p)] == []
    assert "<i>DATASET/data.zarr</i>" in page
    rows = re.findall(r"<tr>\s*<td>(.*?)</td>\s*<td>(.*?)</td>", page, re.S)
    without = [sentence for sentence, fix in rows if fix.strip() in ("–", "")]
    assert len(rows) > 200 and len(without) <= len(rows) // 50, without  # what to do, beside (nearly) every one


def test_the_readme_is_the_front_door_and_links_only_to_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target
    assert "bash tools/demo.sh" in readme and "bash tools/test.sh" in readme
