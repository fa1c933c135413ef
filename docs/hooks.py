"""MkDocs hooks: the references that are generated from the code when the site is built, so they cannot drift.

A page holds a marker where a generated part goes:

    <!-- smptrain:configuration -->   every configuration key: its default, its constraint and its comment, read
                                       from the frozen dataclasses of smptrain/config/schema.py and their source
    <!-- smptrain:errors -->           every sentence smptrain can end a command with (a UserError and its kinds),
                                       read from the source, grouped by what the user was doing
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "smptrain"
ERRORS = ("UserError", "CannotBuild", "WriteFailed", "TrainingStopped")
ACTIVITIES = [  # (module path prefix, what the user was doing), the first match wins
    ("config/darts.py", "Reading a DARTS configuration file"), ("config/", "Reading the configuration"),
    ("cli.py", "Reading the configuration"), ("data/demo.py", "Generating demo data"),
    ("commands/demo.py", "Generating demo data"), ("training/inspection.py", "Inspecting a dataset"),
    ("commands/inspect.py", "Inspecting a dataset"), ("data/", "Reading the dataset"), ("model/", "Building the model"),
    ("core/runtime.py", "Starting on the device"), ("core/processes.py", "Starting on the device"),
    ("core/storage.py", "Writing files"), ("training/", "Training, resuming and stopping"),
    ("train.py", "Training, resuming and stopping"), ("commands/train.py", "Training, resuming and stopping"),
    ("commands/launch.py", "Training, resuming and stopping"), ("evaluation/", "Testing and comparing"),
    ("commands/test.py", "Testing and comparing"), ("commands/compare.py", "Testing and comparing"),
    ("export/", "Converting, exporting and predicting"), ("commands/convert.py", "Converting, exporting and predicting"),
    ("commands/predict.py", "Converting, exporting and predicting"),
    ("search/", "Cross-validation, tuning and recipe comparisons"),
    ("commands/", "Cross-validation, tuning and recipe comparisons"),
]


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- smptrain:configuration -->" in markdown:
        markdown = markdown.replace("<!-- smptrain:configuration -->", configuration_reference())
    if "<!-- smptrain:errors -->" in markdown:
        markdown = markdown.replace("<!-- smptrain:errors -->", error_catalogue())
    return markdown


# --- the configuration ------------------------------------------------------------------------------------------


def field_comments() -> dict[tuple[str, str], str]:
    """{(dataclass name, field name): the comment written beside the field in smptrain/config/schema.py}."""
    source = (PACKAGE / "config" / "schema.py").read_text()
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments.setdefault(token.start[0], token.string.lstrip("#").strip())
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    lines = range(item.lineno, (item.end_lineno or item.lineno) + 1)
                    found[node.name, item.target.id] = " ".join(comments[n] for n in lines if n in comments)
    return found


def constraint(field) -> str:
    rule = field.metadata or {}
    parts = []
    if rule.get("one_of"):
        parts.append("one of " + ", ".join(str(v) for v in rule["one_of"]))
    if rule.get("at_least") is not None:
        parts.append(f"at least {rule['at_least']}")
    if rule.get("rule"):
        parts.append(rule["rule"][1])
    return "; ".join(parts)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return '"none"'
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value) if not isinstance(value, float) else repr(value)


def configuration_reference() -> str:
    import sys

    sys.path.insert(0, str(ROOT))
    from smptrain.config import Config

    comments = field_comments()
    out = []
    for section in dataclasses.fields(Config):
        kind = section.default_factory
        out += [f"## `[{section.name}]`", "", "| key | default | constraint | what it does |", "|---|---|---|---|"]
        for field in dataclasses.fields(kind):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            text = escape(comments.get((kind.__name__, field.name), ""))
            out.append(f"| `{section.name}.{field.name}` | `{toml_value(default)}` | {escape(constraint(field))} | "
                       f"{text} |")
        out.append("")
    return "\n".join(out)


# --- the error sentences --------------------------------------------------------------------------------------------


def template(node: ast.AST, source: str) -> str:
    """The message of a raise as written: literal text, and each `{...}` as the expression's source in italics."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else
                       f"«{ast.get_source_segment(source, part.value)}»" for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return template(node.left, source) + template(node.right, source)
    return f"«{ast.get_source_segment(source, node)}»"


def error_catalogue() -> str:
    groups: dict[str, list[tuple[str, str, str]]] = {activity: [] for _, activity in ACTIVITIES}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        relative = str(path.relative_to(PACKAGE))
        activity = next(a for prefix, a in ACTIVITIES if relative.startswith(prefix) or relative == prefix) \
            if any(relative.startswith(p) for p, _ in ACTIVITIES) else "Other"
        tree = ast.parse(source)
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = " ".join((ast.get_docstring(function) or "").split("\n\n")[0].split())
            doc = doc.split(". ")[0].rstrip(".") + "." if doc else ""
            for node in ast.walk(function):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ERRORS
                        and node.args):
                    text = " ".join(template(node.args[0], source).split())
                    groups.setdefault(activity, []).append((text, f"{relative}: {function.name}", doc))
    out = []
    for activity, entries in groups.items():
        if not entries:
            continue
        out += [f"## {activity}", "", "| the sentence (after `error: `) | where, and what that code does |", "|---|---|"]
        seen = set()
        for text, where, doc in entries:
            if text in seen:
                continue
            seen.add(text)
            cell = escape(text)
            context = f"`{where}`" + (f": {escape(doc)}" if doc else "")
            out.append(f"| {cell} | {context} |")
        out.append("")
    return "\n".join(out)


def escape(text: str) -> str:
    """Text for a Markdown table cell, taken literally: no column breaks, tags, links or emphasis."""
    for char, entity in (("&", "&amp;"), ("|", "&#124;"), ("<", "&lt;"), ("[", "&#91;"), ("]", "&#93;"),
                         ("*", "&#42;"), ("_", "&#95;"), ("`", "&#96;")):
        text = text.replace(char, entity)
    return text
