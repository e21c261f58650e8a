"""The published JSON Schemas (draft 2020-12): the bundle manifest, the benchmark's results.json and an evaluation's
accuracy.json.

Each ships in the package whole, as the file an app developer validates against (``pipeline/schemas/
manifest.schema.json``, ``runtime_bench/schemas/results.schema.json``, ``pipeline/schemas/accuracy.schema.json``),
read with :mod:`importlib.resources`. Each is generated: a ``*.source.json`` beside it holds what every format
shares, and the formats' modules add what they record (their names, precisions, runtimes, manifest facts), so a
new format brings its part of the schema with it. After a change to either::

    python -m cloformer_deploy.pipeline.schema --write

and a test fails while a published file differs from what it would write. :func:`problem` names the first place
a document breaks its schema in one line; :func:`render` turns a schema into the Markdown page app developers read
(docs/manifest.md, docs/results.md, docs/accuracy.md)::

    python -m cloformer_deploy.pipeline.schema manifest > docs/manifest.md

A shared base module, like :mod:`cloformer_deploy.files`: every layer may use it.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from functools import cache
from importlib import resources
from pathlib import Path

# name -> (the published file in the package, its source beside it, the file it describes, the page of docs/)
SCHEMAS = {
    "manifest": (
        "pipeline/schemas/manifest.schema.json",
        "pipeline/schemas/manifest.source.json",
        "manifest.json",
        "docs/manifest.md",
    ),
    "results": (
        "runtime_bench/schemas/results.schema.json",
        "runtime_bench/schemas/results.source.json",
        "results.json",
        "docs/results.md",
    ),
    "accuracy": (
        "pipeline/schemas/accuracy.schema.json",
        "pipeline/schemas/accuracy.source.json",
        "accuracy.json",
        "docs/accuracy.md",
    ),
    "drift_by_block": (
        "pipeline/schemas/drift_by_block.schema.json",
        "pipeline/schemas/drift_by_block.source.json",
        "drift_by_block.json",
        "docs/drift_by_block.md",
    ),
}
RESULTS_SCHEMA_VERSION = 1  # results.json's "schema_version" (optional: older results have none)


class SchemaError(ValueError):
    """A document that breaks its schema: one line naming the first place it does and how."""


def schema_file(name: str):
    """The published schema's file in the installed package (an importlib.resources Traversable)."""
    if name not in SCHEMAS:
        raise KeyError(f"no schema {name!r}; choose from {', '.join(SCHEMAS)}")
    return resources.files("cloformer_deploy").joinpath(SCHEMAS[name][0])


@cache
def _schema(name: str) -> dict:
    return json.loads(schema_file(name).read_text(encoding="utf-8"))


def assemble(name: str) -> dict:
    """The whole schema ``name`` from its source and what this version's formats add: what ``--write`` publishes."""
    if name not in SCHEMAS:
        raise KeyError(f"no schema {name!r}; choose from {', '.join(SCHEMAS)}")
    source = json.loads(resources.files("cloformer_deploy").joinpath(SCHEMAS[name][1]).read_text(encoding="utf-8"))
    return {
        "manifest": _with_formats,
        "results": _with_runtimes,
        "accuracy": _with_artifacts,
        "drift_by_block": _with_block_artifacts,
    }[name](source)


def published_text(name: str) -> str:
    """The text of the published file, as ``--write`` writes it."""
    return json.dumps(assemble(name), indent=1, ensure_ascii=False) + "\n"


def write_published() -> list[Path]:
    """Write every published schema from its source (into the package's folder: a checkout, not a wheel)."""
    written = []
    for name, (published, *_rest) in SCHEMAS.items():
        path = Path(str(resources.files("cloformer_deploy").joinpath(published)))
        path.write_text(published_text(name), encoding="utf-8")
        written.append(path)
    _schema.cache_clear()
    return written


def _with_artifacts(schema: dict) -> dict:
    """accuracy.json's schema with the formats and precisions of this version."""
    from ..formats import BACKENDS

    row = schema["$defs"]["row"]["properties"]
    row["format"]["enum"] = list(BACKENDS)
    row["precision"]["enum"] = list(dict.fromkeys(p for b in BACKENDS.values() for p in b.precisions))
    return schema


def _with_block_artifacts(schema: dict) -> dict:
    """drift_by_block.json's schema with the formats and precisions of this version."""
    from ..formats import BACKENDS

    row = schema["$defs"]["artifact"]["properties"]
    row["format"]["enum"] = list(BACKENDS)
    row["precision"]["enum"] = list(dict.fromkeys(p for b in BACKENDS.values() for p in b.precisions))
    return schema


def _with_runtimes(schema: dict) -> dict:
    """results.json's schema with the runtimes and precisions of the formats this version has."""
    from ..formats import BACKENDS

    row = schema["$defs"]["row"]["properties"]
    # "torch": the eager model, the one row kind that is not a format's
    ways = sorted((r for b in BACKENDS.values() for r in b.bench_runtimes), key=lambda r: r.position)
    row["runtime"]["enum"] = ["torch", *(r.name for r in ways)]
    row["precision"]["enum"] = list(dict.fromkeys(p for b in BACKENDS.values() for p in b.precisions))
    return schema


def _merged_fact(name: str, known: dict | None, new: dict) -> dict:
    """A manifest fact two formats record (``partitions``, ``nodes``): one schema, both descriptions, the union
    of their named sub-properties; the rest must agree."""
    if known is None:
        return new
    rest = {k: v for k, v in known.items() if k not in ("description", "properties")}
    if rest != {k: v for k, v in new.items() if k not in ("description", "properties")}:
        raise ValueError(f"two formats record {name!r} with different schemas")
    merged = {**rest, "description": f"{known['description']} {new['description']}"}
    if "properties" in known or "properties" in new:
        mine, theirs = known.get("properties", {}), new.get("properties", {})
        merged["properties"] = {
            key: _merged_fact(f"{name}.{key}", mine.get(key), theirs[key]) if key in theirs else mine[key]
            for key in dict.fromkeys([*mine, *theirs])
        }
    return merged


def _with_formats(schema: dict) -> dict:
    """The manifest's schema with what each format records: the formats' modules hold those facts, so a new
    format brings its part of the schema with it."""
    from ..formats import BACKENDS

    defs = schema["$defs"]
    artifact = defs["artifact"]
    props = artifact["properties"]
    props["format"]["enum"] = list(BACKENDS)
    props["format"]["description"] = "; ".join(f"`{n}`: {b.summary}" for n, b in BACKENDS.items()) + "."
    props["precision"]["enum"] = list(dict.fromkeys(p for b in BACKENDS.values() for p in b.precisions))
    conditions = []
    for name, backend in BACKENDS.items():
        for fact, spec in backend.manifest_facts.items():
            props[fact] = _merged_fact(fact, props.get(fact), spec)
        when = {"properties": {"format": {"const": name}}, "required": ["format"]}
        conditions.append(
            {
                "if": when,
                "then": {
                    "required": list(backend.manifest_required),
                    "properties": {"precision": {"enum": list(backend.precisions)}},
                },
            }
        )
        for precision in backend.calibration_recorded:
            conditions.append(
                {
                    "if": {
                        "properties": {"format": {"const": name}, "precision": {"const": precision}},
                        "required": ["format", "precision"],
                    },
                    "then": {"required": ["calibration"]},
                }
            )
    artifact["allOf"] = conditions
    method = defs["validation"]["properties"]["method"]
    method["enum"] = list(dict.fromkeys(m for b in BACKENDS.values() for m in b.runner_methods))
    preprocessing = defs["preprocessing"]
    for name, backend in BACKENDS.items():
        if backend.input_note:
            preprocessing["properties"][name] = {
                "type": "string",
                "description": f"What a {backend.label} artifact takes instead of the normalised tensor.",
            }
            preprocessing["required"].append(name)
    return schema


def load(name: str) -> dict:
    """The schema ``name`` (``manifest`` or ``results``) as a dict of its own (a copy: change it freely)."""
    return copy.deepcopy(_schema(name))


def _date_time(value) -> bool:
    """RFC 3339 date and time with its offset (what the tools write: ``2026-11-30T17:25:15+00:00``); jsonschema's own
    check needs a package of its own, so the standard library's parser does it here."""
    from datetime import datetime

    if not isinstance(value, str):
        return True
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    if len(text) < 20 or text[10] not in "Tt ":
        return False
    try:
        return datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False


@cache
def _validator(name: str):
    from jsonschema import Draft202012Validator, FormatChecker

    checker = FormatChecker()
    checker.checks("date-time")(_date_time)
    return Draft202012Validator(_schema(name), format_checker=checker)


def errors(name: str, document) -> list:
    """Every :class:`jsonschema.ValidationError` of ``document`` against the schema ``name``."""
    return list(_validator(name).iter_errors(document))


def first_error(name: str, document):
    """The error that explains most (jsonschema's best match: the shallowest place), or None when it conforms."""
    from jsonschema.exceptions import best_match

    return best_match(_validator(name).iter_errors(document))


def problem(name: str, document) -> str | None:
    """Where and how ``document`` first breaks the schema ``name``, as a phrase (``artifacts[0].sha256 is
    missing``); None when it conforms."""
    error = first_error(name, document)
    return None if error is None else describe(error, _schema(name))


def check(name: str, document) -> None:
    """:class:`SchemaError` (``results.json: rows[3].latency_ms is missing``) unless ``document`` conforms."""
    why = problem(name, document)
    if why is not None:
        raise SchemaError(f"{SCHEMAS[name][2]}: {why}")


# ---- one line per error ---------------------------------------------------------------------------------------


def where(path) -> str:
    """A JSON path as the docs write it: ``artifacts[0].validation.figures``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(value) -> str:
    """A value as an error names it: ``'1' (a string)``, ``null``, ``an array``; any other object by its repr."""
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    try:
        text = repr(value) if isinstance(value, str) else json.dumps(value)
    except (TypeError, ValueError):  # not JSON at all (a NumPy scalar in results not yet written)
        text = f"{value!r} (a {type(value).__name__})"
    text = text if len(text) <= 40 else text[:37] + "..."
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(value))
    return f"{text} ({kind})" if kind else text


_ARTICLE = {
    "integer": "an integer",
    "object": "an object",
    "array": "an array",
    "null": "null",
    "string": "a string",
    "number": "a number",
    "boolean": "a boolean",
}


def _missing(error) -> str:
    return next((k for k in error.validator_value if k not in error.instance), str(error.validator_value))


def _condition(error, root: dict | None) -> str | None:
    """For an error inside an ``if``/``then`` rule of ``root``: its condition (``format is onnx``)."""
    parts = list(error.absolute_schema_path)
    if root is None or "then" not in parts:
        return None
    node = root
    try:
        for part in parts[: len(parts) - 1 - parts[::-1].index("then")]:
            while isinstance(node, dict) and part not in node and "$ref" in node:  # paths step through $ref
                node = root["$defs"][node["$ref"].split("/")[-1]]
            node = node[part]
        tests = (node.get("if") or {}).get("properties", {})
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    words = [
        f"{k} is {v['const']}" if "const" in v else f"{k} is {' or '.join(map(str, v.get('enum', [])))}"
        for k, v in tests.items()
    ]
    return " and ".join(words) or None


def describe(error, root: dict | None = None) -> str:
    """One jsonschema error as a short phrase naming its place: ``model.batch is '1' (a string), not an integer``.
    ``root``: the schema, to name the condition of a rule that holds only under one (``when format is onnx``)."""
    path = list(error.absolute_path)
    here = where(path) or "the top level"
    kind, rule, value = error.validator, error.validator_value, error.instance

    def field(name: str) -> str:
        return where([*path, name])

    if kind == "required":
        return f"{field(_missing(error))} is missing"
    if kind == "dependentRequired":
        for key, needs in rule.items():
            lacking = [n for n in needs if key in value and n not in value]
            if lacking:
                return f"{field(lacking[0])} is missing (it comes with {key})"
    if kind == "type":
        wanted = " or ".join(_ARTICLE.get(t, t) for t in ([rule] if isinstance(rule, str) else rule))
        return f"{here} is {_shown(value)}, not {wanted}"
    if kind == "enum":
        choices = ", ".join(str(c) for c in rule)
        if path and isinstance(path[-1], str):
            owner = where(path[:-1]) or "it"
            shown = _shown(value).split(" (")[0]
            condition = _condition(error, root)
            if condition:
                return f"{owner} has {path[-1]} {shown}, which is not offered when {condition} ({choices})"
            return f"{owner} has {path[-1]} {shown}, which this version does not know ({choices})"
        return f"{here} is {_shown(value)}, not one of {choices}"
    if kind == "const":
        return f"{here} is {_shown(value)}, not {json.dumps(rule)}"
    if kind == "additionalProperties":
        known = error.schema.get("properties", {})
        patterns = error.schema.get("patternProperties", {})
        extra = [k for k in value if k not in known and not any(re.search(p, k) for p in patterns)]
        return f"{here} has a field this version does not know: {extra[0]!r}" if extra else f"{here}: {error.message}"
    if kind in ("minItems", "minProperties", "minLength") and rule == 1:
        return f"{here} is empty"
    if kind in ("minItems", "maxItems"):
        items = f"{len(value)} item{'' if len(value) == 1 else 's'}"
        return f"{here} has {items}, {'fewer' if kind == 'minItems' else 'more'} than the {rule} it needs"
    if kind == "pattern":
        return f"{here} is {_shown(value)}, not {error.schema.get('title') or f'text matching {rule}'}"
    if kind == "format":
        return f"{here} is {_shown(value)}, not a {rule}"
    limit = {
        "minimum": "below the minimum",
        "exclusiveMinimum": "not above",
        "maximum": "above the maximum",
        "exclusiveMaximum": "not below",
    }.get(kind)
    if limit:
        return f"{here} is {value}, {limit} {rule}"
    message = error.message if len(error.message) <= 120 else error.message[:117] + "..."
    return f"{here}: {message}"


# ---- Markdown ---------------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


class _Page:
    """A schema walked from its top: a section (a table) per object that has fields of its own."""

    def __init__(self, schema: dict, top: str):
        self.schema, self.defs = schema, schema.get("$defs", {})
        self.queue: list[tuple[str, dict]] = [(top, schema)]
        self.titled: dict[int, str] = {id(schema): top}  # id of an object schema -> its section's heading

    def resolve(self, node: dict) -> dict:
        while "$ref" in node:
            target = self.defs[node["$ref"].split("/")[-1]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            if "$ref" in target:
                node["$ref"] = target["$ref"]
        return node

    def _target(self, node: dict) -> dict:
        """The schema object a section is made for: the $defs entry itself when referenced (so it is shared)."""
        while "$ref" in node:
            node = self.defs[node["$ref"].split("/")[-1]]
        return node

    def link(self, node: dict, heading: str) -> str:
        target = self._target(node)
        if id(target) not in self.titled:
            self.titled[id(target)] = heading
            self.queue.append((heading, node))
        title = self.titled[id(target)]
        return f"[{title}](#{_slug(title)})"

    def type_text(self, node: dict, path: str) -> str:
        n = self.resolve(node)
        types = n.get("type", [])
        types = [types] if isinstance(types, str) else list(types)
        nullable = " or null" if "null" in types else ""
        if "const" in n:
            return f"`{json.dumps(n['const'])}`"
        if "enum" in n:
            return "one of " + ", ".join(f"`{json.dumps(e) if not isinstance(e, str) else e}`" for e in n["enum"])
        if "properties" in n:
            return f"object{nullable}: {self.link(node, path)}"
        if "array" in types:
            items = n.get("items", {})
            count = ""
            if n.get("minItems") is not None and n.get("minItems") == n.get("maxItems"):
                count = f"{n['minItems']} "
            elif n.get("minItems"):
                count = f"{n['minItems']}+ "
            return f"array of {count}{self.plural(items, path + '[]')}{nullable}"
        if "object" in types:
            values = n.get("additionalProperties")
            if isinstance(values, dict):
                key = (n.get("propertyNames") or {}).get("description", "name")
                return f"object{nullable}: {key} → {self.type_text(values, f'{path}.<{key}>')}"
            return f"object{nullable}"
        base = " or ".join(t for t in types if t != "null") or "any"
        limits = []
        if "minimum" in n and "maximum" in n:
            limits.append(f"{n['minimum']:g} to {n['maximum']:g}")
        elif "minimum" in n:
            limits.append(f"≥ {n['minimum']:g}")
        elif "exclusiveMinimum" in n:
            limits.append(f"> {n['exclusiveMinimum']:g}")
        if n.get("title"):
            limits.append(n["title"])
        elif n.get("format"):
            limits.append(n["format"])
        return f"{base}{' (' + '; '.join(limits) + ')' if limits else ''}{nullable}"

    def plural(self, items: dict, path: str) -> str:
        text = self.type_text(items, path)
        for word, many in (
            ("integer", "integers"),
            ("string", "strings"),
            ("number", "numbers"),
            ("object", "objects"),
            ("boolean", "booleans"),
        ):
            if text.startswith(word):
                return many + text[len(word) :]
        return text

    def conditions(self, node: dict) -> tuple[dict[str, list[str]], list[str]]:
        """Fields required only under a condition (field -> conditions), and each condition's other rules."""
        when: dict[str, list[str]] = {}
        notes = []
        for rule in node.get("allOf", []):
            test, then = rule.get("if", {}), rule.get("then", {})
            parts = []
            for key, cond in test.get("properties", {}).items():
                if "const" in cond:
                    parts.append(f"{key} is `{json.dumps(cond['const']).strip(chr(34))}`")
                elif "enum" in cond:
                    parts.append(f"{key} is " + " or ".join(f"`{e}`" for e in cond["enum"]))
            text = " and ".join(parts)
            for key in then.get("required", []):
                when.setdefault(key, []).append(text)
            for key, sub in then.get("properties", {}).items():
                if "enum" in sub:
                    notes.append(f"When {text}, `{key}` is one of " + ", ".join(f"`{e}`" for e in sub["enum"]) + ".")
        return when, notes

    def section(self, heading: str, node: dict, top: bool) -> str:
        n = self.resolve(node)
        required = set(n.get("required", []))
        when, notes = self.conditions(n)
        for key, deps in n.get("dependentRequired", {}).items():
            for dep in deps:
                when.setdefault(dep, []).append(f"{key} is present")
        lines = [f"## {heading}", ""]
        if not top and n.get("description"):
            lines += [_cell(n["description"]), ""]
        extra = n.get("additionalProperties", True)
        if extra is True:
            lines += ["Other fields may appear beside these.", ""]
        lines += ["| Field | Type | Required | Description |", "| --- | --- | --- | --- |"]
        for key, sub in n.get("properties", {}).items():
            r = self.resolve(sub)
            need = "yes" if key in required else ("if " + "; if ".join(when[key]) if key in when else "no")
            lines.append(
                f"| `{key}` | {_cell(self.type_text(sub, f'{heading}.{key}' if not top else key))} | "
                f"{_cell(need)} | {_cell(r.get('description', ''))} |"
            )
        if notes:
            lines += [""] + [f"- {_cell(note)}" for note in notes]
        return "\n".join(lines)

    def render(self) -> str:
        out = []
        while self.queue:
            heading, node = self.queue.pop(0)
            out.append(self.section(heading, node, node is self.schema))
        return "\n\n".join(out)


def render(name: str) -> str:
    """The schema ``name`` as a Markdown page: what the file is, then a table per object (field, type,
    required, description)."""
    schema = _schema(name)
    package_path, source_path, document, page = SCHEMAS[name]
    version = schema["properties"]["schema_version"]["const"]
    head = [
        f"# {schema['title']}, schema version {version}",
        "",
        f"<!-- Generated from cloformer_deploy/{package_path} by `python -m cloformer_deploy.pipeline.schema {name} > "
        f"{page}`: edit cloformer_deploy/{source_path}, run `python -m cloformer_deploy.pipeline.schema --write`, "
        "then that command. -->",
        "",
        _cell(schema["description"]),
        "",
        f"The JSON Schema (draft 2020-12) ships in the package, whole, as `cloformer_deploy/{package_path}` "
        "(generated from the parts every format shares and what each format's module adds). "
        f"Any JSON Schema 2020-12 validator checks a {document} against it, and in Python "
        f'`cloformer_deploy.pipeline.schema.check("{name}", data)` raises one line naming the first field that '
        "breaks it.",
        "",
        "Required: `yes`, always present (a type that includes null: present, possibly null); `no`, may be absent; "
        "`if ...`, present under that condition. Numbers written as `Infinity` or `NaN` can appear where outputs "
        "were not finite.",
        "",
    ]
    return "\n".join(head) + "\n" + _Page(schema, document).render() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--write"]:
        for path in write_published():
            print(f"wrote {path}", file=sys.stderr)
        return 0
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    if len(args) != 1 or args[0] not in SCHEMAS:
        print(
            f"usage: python -m cloformer_deploy.pipeline.schema {{{','.join(SCHEMAS)}}} [--json] > docs/<name>.md\n"
            "       python -m cloformer_deploy.pipeline.schema --write   (the published schemas, from their sources)",
            file=sys.stderr,
        )
        return 2
    sys.stdout.write(json.dumps(_schema(args[0]), indent=2, ensure_ascii=False) + "\n" if as_json else render(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
