"""Generate the reference part of docs/protocol.md from the pydantic models.

    python -m improv.protocol.doc docs/protocol.md     # rewrite the generated section

Only the text between `<!-- generated:start -->` and `<!-- generated:end -->` is replaced; the
prose around it is hand-written. tests/protocol/test_messages.py fails when the file is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import messages as p

START, END = "<!-- generated:start -->", "<!-- generated:end -->"

CLIENT = [p.Start, p.Params, p.Ping, p.ClientMidi, p.Trigger, p.Stop]
SERVER = [p.Started, p.Pong, p.ServerMidi, p.Retract, p.Chord, p.Beat, p.ErrorMessage, p.Stopped]


def _type_name(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " \\| ".join(_type_name(s) for s in schema["anyOf"])
    if "const" in schema:
        return f'`"{schema["const"]}"`'
    if "enum" in schema:
        return " \\| ".join(f'`"{e}"`' for e in schema["enum"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    t = schema.get("type", "any")
    if t == "array":
        return f"array of {_type_name(schema.get('items', {}))}"
    if t == "object" and "additionalProperties" in schema:
        keys = schema.get("propertyNames", {})
        k = _type_name(keys) if keys else "string"
        return f"object {k} -> {_type_name(schema['additionalProperties'])}"
    return t


def _range(schema: dict[str, Any]) -> str:
    parts = []
    for s in schema.get("anyOf", [schema]):
        for key, sym in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
            ("minItems", "items >="),
            ("maxLength", "length <="),
        ):
            if key in s:
                parts.append(f"{sym} {s[key]}")
    return ", ".join(parts)


def _default(name: str, model: type[BaseModel], schema: dict[str, Any]) -> str:
    if name in schema.get("required", []):
        return "required"
    d = schema["properties"][name].get("default", None)
    f = model.model_fields[name]
    if f.default_factory is not None:
        d = f.default_factory()
    if model is p.Params:
        return "unchanged"
    return f"`{_json(d)}`"


def _json(v: Any) -> str:
    import json

    return json.dumps(v)


def message_table(model: type[BaseModel]) -> str:
    schema = model.model_json_schema()
    lines = [
        f"### `{model.model_fields['type'].annotation.__args__[0]}` ({model.__name__})",
        "",
        " ".join((model.__doc__ or "").split()),
        "",
        "| field | type | default | valid | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, prop in schema["properties"].items():
        desc = prop.get("description", "").replace("|", "\\|")
        lines.append(
            f"| `{name}` | {_type_name(prop)} | {_default(name, model, schema)} | "
            f"{_range(prop)} | {desc} |"
        )
    return "\n".join(lines)


def render() -> str:
    out = [START, "", "## Client -> server", ""]
    for m in CLIENT:
        out += [message_table(m), ""]
    out += ["## Server -> client", ""]
    for m in SERVER:
        out += [message_table(m), ""]
    out += [
        "## JSON Schema",
        "",
        "Generated from `improv.protocol.messages` (`client_adapter` / `server_adapter`).",
        "",
        "```json",
        p.schema_json(),
        "```",
        "",
        END,
    ]
    return "\n".join(out)


def update(text: str) -> str:
    """`text` with its generated section replaced by the current one."""
    if START not in text or END not in text:
        raise ValueError(f"no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + render() + tail


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "docs/protocol.md")
    path.write_text(update(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
