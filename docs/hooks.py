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
import re
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
        out += [f"## `[{section.name}]`", "", '<div class="keys" markdown>', "",
                "| key | default | constraint | what it does |", "|---|---|---|---|"]
        for field in dataclasses.fields(kind):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            text = escape(comments.get((kind.__name__, field.name), ""))
            out.append(f"| `{section.name}.{field.name}` | `{toml_value(default)}` | {escape(constraint(field))} | "
                       f"{text} |")
        out += ["", "</div>", ""]
    return "\n".join(out)


# --- the error sentences --------------------------------------------------------------------------------------------


# The words a sentence's placeholders are read as: the value a name holds where it is one (a file name, a list of
# choices), else what the variable stands for, in capitals.
WORDS = {
    "path": "PATH", "source": "FILE", "where": "FILE", "name": "NAME", "key": "KEY", "value": "VALUE", "item": "VALUE",
    "run_dir": "RUN_DIR", "root": "DATASET", "self.root": "DATASET", "info.root": "DATASET", "tile": "TILE",
    "image.path": "IMAGE", "paths[0]": "IMAGE", "first": "FIRST", "checkpoint": "CHECKPOINT", "resume": "RUN_DIR",
    "target": "FILE", "out": "OUT", "section": "SECTION", "method": "METHOD", "column": "COLUMN", "kind": "KIND",
    "encoder": "ENCODER", "arch": "ARCH", "weights": "WEIGHTS", "patch_size": "P", "patch": "P", "overlap": "OVERLAP",
    "fold": "FOLD", "by": "VALUES", "what": "WHAT", "description": "DESCRIPTION", "difference": "DIFFERENCE",
    "first_step": "STEP", "differing": "KEY",
}
REASONS = ("error", "reason", "message", "text", "hint", "first_sentence", "strerror", "shown")
SKIP = {"str", "len", "join", "sorted", "splitlines", "split", "strip", "replace", "self", "cfg", "int", "float",
        "repr", "list", "tuple", "min", "max", "round", "abs", "data", "train", "model", "log", "config", "or", "if",
        "else", "for", "in", "not", "and", "is", "None"}


def constants() -> dict:
    """Every upper-case constant of smptrain's modules (file names, choices) by name, for placeholders made of them."""
    import importlib
    import sys

    sys.path.insert(0, str(ROOT))
    found = {}
    for module in ("smptrain.core.choices", "smptrain.data.darts", "smptrain.training.layout", "smptrain.data.imagery",
                   "smptrain.training.runs"):
        found |= {k: v for k, v in vars(importlib.import_module(module)).items() if k.isupper()}
    return found


def word(expression: str, known: dict) -> str:
    """A placeholder as a reader takes it: its value when it is made of constants only (a file name, the choices),
    `DATASET/data.zarr` for a path joined to one, the reason a library gave, or what the variable stands for."""
    expression = expression.strip()
    try:
        value = eval(expression, {"__builtins__": {"sorted": sorted, "len": len, "list": list}}, dict(known))
        return ", ".join(map(str, value)) if isinstance(value, (list, tuple, set, frozenset)) else str(value)
    except Exception:  # a variable: not known here
        pass
    if " / " in expression:
        left, _, right = expression.rpartition(" / ")
        return f"{word(left, known)}/{word(right, known)}"
    if expression in WORDS:
        return WORDS[expression]
    identifiers = set(re.findall(r"[A-Za-z_]+", expression))
    if identifiers & set(REASONS) or "result.message" in expression:
        return "REASON"
    if expression.startswith("len("):
        return "N"
    names = [n for n in re.findall(r"[A-Za-z_]+", expression) if n not in SKIP and len(n) > 1]
    if not names:
        return "VALUE"
    last = names[-1]
    return WORDS.get(last, last.upper())


# Placeholders that stand for a phrase appended to the text before them, not a value: written as the phrase reads.
PHRASES = {"_suggest": "; did you mean NAME?", "where": " in FILE", "hint": "; HINT"}


def placeholder(node: ast.AST, source: str, known: dict, before: str) -> str:
    """One `{...}` of a sentence: a phrase glued to the text `before` it as it reads, the first wording of a
    conditional one (`'a' if ... else 'an'`), else a word in capitals (`word`)."""
    expression = ast.get_source_segment(source, node) or ""
    if isinstance(node, ast.IfExp) and isinstance(node.body, ast.Constant) and isinstance(node.body.value, str):
        return node.body.value
    called = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else expression
    glued = re.search(r"[A-Za-z]{2}$|\)$", before) is not None  # not the x of «H»x«W»
    if called in PHRASES and before and not before[-1].isspace() and before[-1] not in "(;:,'\"[":
        return PHRASES[called]
    if glued:  # text composed elsewhere appended to the sentence: a hint, an alternative
        return "; HINT"
    return f"«{word(expression, known)}»"


def template(node: ast.AST, source: str, known: dict) -> str:
    """The message of a raise as a reader meets it: literal text, each `{...}` as a word in capitals (`word`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        text = ""
        for part in node.values:
            text += part.value if isinstance(part, ast.Constant) else placeholder(part.value, source, known, text)
        return text
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return template(node.left, source, known) + template(node.right, source, known)
    return f"«{word(ast.get_source_segment(source, node), known)}»"


FIXES = ("use ", "give ", "pass ", "set ", "run ", "choose ", "drop ", "add ", "install", "free ", "rename ",
         "reproject", "import ", "write ", "lower ", "raise ", "continue ", "resume ", "correct ", "remove ", "copy ",
         "rewrite ", "start ", "export ", "test ", "sync ", "did you mean", "pip install", "replace ", "reduce ")


# What to do where a sentence says what is wrong but not what to do, by the kind of mistake it names (checked in
# order; the first that matches). Each names the page or the command that helps.
ADVICE = (
    (r"self-check failed|nothing was written", "another model.arch or model.encoder: the one named cannot be "
     "converted or exported as it is (nothing was written)"),
    (r"pip install|needs the \w+ extra|is not installed", "install what the sentence names, then run the command again"),
    (r"does not exist|no such (file|run)|there is no such|lists .* that do not exist",
     "check the path: a relative one is read from the directory the command runs in"),
    (r"not valid TOML", "correct the file at the line and column the reason names"),
    (r"^«?(DATASET|FILE|PATH)»?(/data\.zarr|/metadata\.parquet|/config\.toml)?»?:? .*(zarr|parquet|index|column|"
     r"\[darts\]|x |x, |bands?\b|DARTS dataset)",
     "make the dataset DARTS' layout ([Data](data.md)); `smptrain-inspect` checks every file and row of it"),
    (r"are not in «?DATASET/config\.toml|which «?DATASET/config\.toml»? lacks", "name only bands the dataset has "
     "(the sentence lists them)"),
    (r"a DARTS dataset holds|are not the zarr rows|has no rows$", "make the dataset DARTS' layout ([Data](data.md)); "
     "`smptrain-inspect` checks every file and row of it"),
    (r"continues only the same run", "keep the run's settings (those listed may change), or start another run "
     "under another log.run_name"),
    (r"has no smptrain metadata", "export the model with `smptrain-convert --format onnx` ([Export](export.md))"),
    (r"does not match «?DESCRIPTION»?", "give weights of the model described (the same arch, encoder and bands), "
     "or a model description that fits them"),
    (r"the retraining ended", "the retraining's run directory holds its log; its REASON says what stopped it "
     "([Cross-validation and tuning](cv-and-tuning.md))"),
    (r"not a readable|cannot be (read|decoded|opened|loaded)|is damaged|is incomplete|points to a missing|"
     r"GDAL can read|not JSON", "the file is damaged or of another kind: copy it again, or give the file the "
     "sentence expects (REASON is the library's own words)"),
    (r"data\.(split|fold|subsample|total_folds|positive_fraction)|split is empty|training split",
     "`smptrain-inspect --config ...` lists every region, sample and fold with its size: choose from those "
     "([Data](data.md#splits-and-folds))"),
    (r"^«?FILE»? must be (an integer|true|a string|a metric)|unknown key .* no DARTS command",
     "correct the key in the DARTS configuration file ([For DARTS users](darts-users.md))"),
    (r"^«?(KEY|SECTION)»? in|^\[«?SECTION»?\]|in «?FILE»? must|^(train|data|model|log)\.[a-z_.]+ (in|must|=)",
     "correct the key in the file or its `--set`: [Configuration](reference/configuration.md) gives every key's "
     "default and constraint"),
    (r"^--|^«?OPTION»?", "`smptrain-COMMAND --help` says what each option takes ([Commands](reference/commands.md))"),
    (r"space file|hyper-parameter|^«?FILE»?: |grid search|sampler|scoring metric",
     "see [Cross-validation and tuning](cv-and-tuning.md) for the search space file and the options"),
    (r"model\.(arch|encoder)|encoder|patch(es)? sizes?|state dict|weights", "another encoder, architecture or "
     "patch size ([Training](training.md)); weights are checked against the model they are loaded into"),
    (r"cannot write|another process could not write", "free space or fix the permissions, then `--resume` "
     "([Troubleshooting](#a-full-disk-a-half-copied-dataset))"),
    (r"holds no run|is not a directory$", "give a run directory, or a folder of them such as log.artifact_dir "
     "(`smptrain-compare`, [Evaluation](evaluation.md))"),
    (r"checkpoint|run directory|--resume|meta\.json", "give a run directory or one of its checkpoints "
     "(`checkpoints/best`, `checkpoints/last`; [Training](training.md))"),
    (r"images?|mask|outlines|raster|polygon|held-out|tile|scene|band", "see [Your own imagery](imagery.md) for "
     "what the import and `smptrain-predict` take"),
)


def split_fix(text: str) -> tuple[str, str]:
    """(what is wrong, what to do): the advice a sentence gives after a `;`, else what `ADVICE` says for its kind."""
    parts = [part.strip() for part in text.split("; ")]
    for index in range(1, len(parts)):
        if parts[index].lower().startswith(FIXES) or " with --" in parts[index] or parts[index].startswith("--"):
            return "; ".join(parts[:index]), "; ".join(parts[index:])
    return text, next((advice for pattern, advice in ADVICE if re.search(pattern, text)), "")


def error_catalogue() -> str:
    known = constants()
    groups: dict[str, list[tuple[str, str]]] = {activity: [] for _, activity in ACTIVITIES}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        relative = str(path.relative_to(PACKAGE))
        activity = next(a for prefix, a in ACTIVITIES if relative.startswith(prefix) or relative == prefix) \
            if any(relative.startswith(p) for p, _ in ACTIVITIES) else "Other"
        for function in ast.walk(ast.parse(source)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ERRORS
                        and node.args):
                    text = " ".join(template(node.args[0], source, known).split())
                    if text.startswith("«") and text.endswith("»") and text.count("«") == 1:
                        continue  # a sentence composed elsewhere and passed on: listed where it is composed
                    groups.setdefault(activity, []).append((text, f"{relative}: {function.name}"))
    out = []
    for activity, entries in groups.items():
        if not entries:
            continue
        out += [f"## {activity}", "", "| the sentence after `error: `: what is wrong | what to do | raised in |",
                "|---|---|---|"]
        seen = set()
        for text, where in entries:
            if text in seen:
                continue
            seen.add(text)
            wrong, fix = split_fix(text)
            fix = fix if any(fix == advice for _, advice in ADVICE) else escape(fix)
            out.append(f"| {escape(wrong).replace('«', '<i>').replace('»', '</i>')} | "
                       f"{fix.replace('«', '<i>').replace('»', '</i>') or '–'} | "
                       f"`{where}` |")
        out.append("")
    return "\n".join(out)


def escape(text: str) -> str:
    """Text for a Markdown table cell, taken literally: no column breaks, tags, links or emphasis."""
    for char, entity in (("&", "&amp;"), ("|", "&#124;"), ("<", "&lt;"), ("[", "&#91;"), ("]", "&#93;"),
                         ("*", "&#42;"), ("_", "&#95;"), ("`", "&#96;")):
        text = text.replace(char, entity)
    return text
