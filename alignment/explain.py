"""`align explain [KEY]`: the recipe schema's own descriptions, printed for a section or a key.

    align explain                     # the recipe's top-level keys
    align explain sft                 # a section: every field with type, default and description
    align explain teacher.engine      # a nested section (also through lists and dicts: reward.verifiers)
    align explain dpo.beta            # one field

The walk starts at `alignment.config.Recipe` and follows annotations generically (Optional, unions, list and dict
of models), so new fields and renamed classes show up here without any change.
"""

from __future__ import annotations

import difflib
import enum
import json
import textwrap
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from alignment.config import InputError, Recipe

WIDTH = 100


def nested_model(annotation) -> type[BaseModel] | None:
    """The model a field's value is (or holds, through Optional, unions, list[...] and dict[..., ...]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        model = nested_model(arg)
        if model is not None:
            return model
    return None


def type_name(annotation) -> str:
    """A field's type as a recipe author reads it: `float`, `int | null`, `list[section]`, `"a" | "b"`."""
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(json.dumps(m.value) for m in annotation)
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    """The default as it would be written in YAML, or `required`."""
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if isinstance(value, BaseModel) and value == type(value).model_construct():
        return "its fields' defaults"
    value = to_jsonable_python(value)
    if isinstance(value, str):
        return json.dumps(value) if value == "" or value != value.strip() else value
    return json.dumps(value)  # null, true/false, numbers, [..] and {..} read as YAML


def description(field: FieldInfo) -> str:
    return (field.description or "").strip()


def model_doc(model: type[BaseModel]) -> str:
    """A model's own docstring (not one inherited from pydantic's BaseModel), collapsed to one paragraph."""
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(doc.split())


def all_keys(model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, FieldInfo]:
    """Every dotted key of the schema, sections and leaves, in declaration order."""
    out: dict[str, FieldInfo] = {}
    for name, field in (model or Recipe).model_fields.items():
        key = prefix + name
        out[key] = field
        sub = nested_model(field.annotation)
        if sub is not None:
            out.update(all_keys(sub, key + "."))
    return out


def lookup(key: str) -> tuple[FieldInfo | None, type[BaseModel] | None]:
    """(the field named by `key`, or None for the whole recipe; the model it opens, or None for a leaf).
    Unknown keys raise InputError with the nearest valid keys."""
    if not key:
        return None, Recipe
    model: type[BaseModel] | None = Recipe
    field, parts = None, key.split(".")
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            raise InputError(unknown_key_message(key, ".".join(parts[:i]), model))
        field = model.model_fields[part]
        model = nested_model(field.annotation)
    return field, model


def unknown_key_message(key: str, known: str, model: type[BaseModel] | None) -> str:
    """Nearest keys: a sibling in the section the key reaches (`sft.lerning_rate`), else any key by its whole
    path (`dpo.beta.x`), else by its last part (`beta`, wherever it lives)."""
    keys = list(all_keys())
    part = key[len(known):].lstrip(".").split(".")[0]
    near = []
    if model is not None:
        near = [f"{known}.{n}".lstrip(".") for n in difflib.get_close_matches(part, list(model.model_fields), 3, 0.6)]
    near = near or difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not near:
        last = key.rsplit(".", 1)[-1]
        by_leaf: dict[str, list[str]] = {}
        for k in keys:
            by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        for leaf in difflib.get_close_matches(last, list(by_leaf), n=3, cutoff=0.6):
            near += by_leaf[leaf]
        near = near[:5]
    hint = f"; nearest: {', '.join(near)}" if near else "; `align explain` lists the top-level keys"
    return f"unknown recipe key {key!r}{hint}"


def fill(text: str, first: str, rest: str) -> str:
    return textwrap.fill(text, WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False,
                         break_long_words=False)


def wrap(text: str, indent: int) -> str:
    return fill(text, " " * indent, " " * indent)


def head(name: str, field: FieldInfo) -> str:
    """`name: type = default`, or `name: type (required)`."""
    default = default_text(field)
    return f"{name}: {type_name(field.annotation)}" + (" (required)" if default == "required" else f" = {default}")


def field_block(name: str, field: FieldInfo, path: str) -> str:
    """The field's head line, then its description indented below it."""
    head_line = head(name, field)
    if nested_model(field.annotation) is not None:
        head_line += f"   (fields: align explain {path})"
    return head_line + "\n" + wrap(description(field) or "(no description)", 4)


def explain(key: str = "") -> str:
    """The text `align explain KEY` prints."""
    field, model = lookup(key)
    if field is None:  # the whole recipe: one line per top-level key
        lines = ["Top-level keys of a recipe (`align explain KEY` for a section's fields or one field):", ""]
        rows = [(name, type_name(f.annotation) + (" (required)" if f.is_required() else ""),
                 description(f).split("; ")[0].split(". ")[0]) for name, f in Recipe.model_fields.items()]
        w0, w1 = (max(len(r[i]) for r in rows) + 2 for i in (0, 1))
        lines += [fill(d, f"  {n:<{w0}}{t:<{w1}}", " " * (2 + w0 + w1))
                  for n, t, d in rows]
        return "\n".join(lines)
    if model is None:  # a leaf
        return f"{key}: {type_name(field.annotation)}\n" \
               f"  default: {default_text(field)}\n" + wrap(description(field) or "(no description)", 2)
    # a section: its own line, then each field
    lines = [head(key, field)]
    for text in (description(field), model_doc(model)):
        if text:
            lines.append(wrap(text, 2))
    lines.append("")
    for name, f in model.model_fields.items():
        lines.append(textwrap.indent(field_block(name, f, f"{key}.{name}"), "  "))
    return "\n".join(lines)
