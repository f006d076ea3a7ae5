"""`align explain [KEY]`: the recipe schema's own descriptions, for the whole recipe, a section or one key.

    align explain                     # the recipe's top-level keys
    align explain sft                 # a section: every field with type, default and description
    align explain teacher.engine      # a nested section (also through lists and dicts: reward.verifiers)
    align explain dpo.beta            # one field

The walk starts at `alignment.config.Recipe` and follows annotations (Optional, unions, list and dict of models),
so new fields and renamed classes show up here without any change.
"""

from __future__ import annotations

import difflib
import enum
import json
import textwrap
import types
import typing

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from alignment.config import TRANSPORT, InputError, Recipe


def nested_model(annotation) -> type[BaseModel] | None:
    """The model a field's value is, or holds through Optional, unions, list[...] and dict[..., ...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(nested_model, typing.get_args(annotation))), None)


def type_name(t) -> str:
    """A type as a recipe author reads it: `float`, `int | null`, `list[section]`, `"a" | "b"`, `path`."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is type(None) or (isinstance(t, type) and issubclass(t, BaseModel)):
        return "null" if t is type(None) else "section"
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return " | ".join(json.dumps(m.value) for m in t)
    if origin is typing.Literal or origin in (typing.Union, types.UnionType):
        return " | ".join(json.dumps(a) if origin is typing.Literal else type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(map(type_name, args))}]"
    return "path" if t.__name__.endswith("Path") else t.__name__


def default_text(field) -> str:
    """The default as YAML would say it, or `required`."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "its fields' defaults"
    value = to_jsonable_python(value)
    return value if isinstance(value, str) and value.strip() == value != "" else json.dumps(value)


def all_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections and leaves, in declaration order."""
    out = []
    for name, field in (model or Recipe).model_fields.items():
        sub = nested_model(field.annotation)
        out += [prefix + name] + (all_keys(sub, f"{prefix}{name}.") if sub else [])
    return out


def nearest(key: str, known: str, model) -> list[str]:
    """Keys like `key`: a sibling in the section it reached (`sft.lerning_rate`), else by its whole path
    (`dpo.beta.x`), else by its last part (`beta`, wherever it lives)."""
    keys, part = all_keys(), key[len(known):].lstrip(".").split(".")[0]
    near = [f"{known}.{n}".lstrip(".") for n in difflib.get_close_matches(part, list(model.model_fields), 3, 0.6)
            ] if model else []
    near = near or difflib.get_close_matches(key, keys, 3, 0.6)
    for leaf in [] if near else difflib.get_close_matches(key.rsplit(".", 1)[-1], [k.rsplit(".", 1)[-1] for k in keys]):
        near += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in near]
    return near[:5]


def head(name: str, field) -> str:
    default = default_text(field)
    return f"{name}: {type_name(field.annotation)}" + (" (required)" if default == "required" else f" = {default}")


def wrap(text: str, indent: int) -> str:
    return textwrap.fill(text or "(no description)", 100, initial_indent=" " * indent, subsequent_indent=" " * indent,
                         break_on_hyphens=False, break_long_words=False)


def explain(key: str = "") -> str:
    """The text `align explain KEY` prints."""
    model, field = Recipe, None
    parts = key.split(".") if key else []
    for i, part in enumerate(parts):
        if part.isdigit() and field is not None and list in map(typing.get_origin, (field.annotation, *typing.get_args(
                field.annotation))):  # an item of a list, as validation errors write it: reward.verifiers.0.name
            continue
        if model is None or part not in model.model_fields:
            near = nearest(key, ".".join(parts[:i]), model)
            raise InputError(f"unknown recipe key {key!r}; " + (f"nearest: {', '.join(near)}" if near else
                                                                 "`align explain` lists the top-level keys"))
        field = model.model_fields[part]
        model = nested_model(field.annotation)
    if field is None:  # the whole recipe: a line per top-level key, with the first clause of its description
        rows = [(n, type_name(f.annotation) + (" (required)" if f.is_required() else ""),
                 (f.description or "").split("; ")[0].split(". ")[0]) for n, f in Recipe.model_fields.items()]
        w0, w1 = (max(len(r[i]) for r in rows) + 2 for i in (0, 1))
        return "\n".join(["Top-level keys of a recipe (`align explain KEY` for a section's fields or one field):", ""]
                         + [textwrap.fill(d, 100, initial_indent=f"  {n:<{w0}}{t:<{w1}}", subsequent_indent=" " *
                                          (2 + w0 + w1)) for n, t, d in rows])
    if model is None:  # a leaf
        transport = ("\n  transport: not hashed into the stages that read it; editing it resumes them"
                     if field.json_schema_extra == TRANSPORT else "")
        return (f"{key}: {type_name(field.annotation)}\n  default: {default_text(field)}\n"
                f"{wrap(field.description, 2)}{transport}")
    lines = [head(key, field)] + [wrap(t, 2) for t in (field.description, " ".join(
        (model.__dict__.get("__doc__") or "").split())) if t] + [""]
    for name, f in model.model_fields.items():
        more = f"   (fields: align explain {key}.{name})" if nested_model(f.annotation) else ""
        lines += [f"  {head(name, f)}{more}", wrap(f.description, 6)]
    return "\n".join(lines)
