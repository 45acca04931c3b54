"""Command-line flags generated from the typed configurations (pydantic-settings' CLI).

A command's configuration is nested (``TrainJobConfig``: job settings, ``train:
TrainConfig``, ``model``: one class per model kind); its flags are flat
(``--epochs``, ``--rank``, ``--orders 2 3``). ``FlatCommand`` builds one flat settings
class from the sections, adds its flags to the command's argparse parser and nests
the parsed values again, so pydantic validates them (an option that the chosen model
kind does not have is an error, as is an unknown flag).
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, StringConstraints, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, CliApp, CliSettingsSource, CliVariadicArg, SettingsConfigDict

DISCRIMINATOR = "model"
SHORTCUTS = {"learning-rate": "lr"}  # the spelling the docs use
# A set of tensorFM interaction orders as one flag value: "2+3" is orders 2 and 3.
OrderSet = Annotated[str, StringConstraints(pattern=r"^[0-9]+(\+[0-9]+)*$")]


def order_sets(values: Sequence[str]) -> list[list[int]]:
    """``["2", "2+3"]`` -> ``[[2], [2, 3]]``."""
    return [[int(order) for order in orders.split("+")] for orders in values]


class _Flags(BaseSettings):
    """Flags only: no environment variables, no dotenv files."""

    model_config = SettingsConfigDict(
        extra="forbid", cli_kebab_case=True, cli_implicit_flags="dual", cli_hide_none_type=True, cli_enforce_required=True
    )

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):  # type: ignore[no-untyped-def]
        return (init_settings,)


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(arg) is list for arg in (annotation, *typing.get_args(annotation)))


def _flag_field(info: FieldInfo, default: Any, description: str | None, optional: bool = False) -> tuple[Any, Any]:
    """The flat field of one option; lists take space-separated values (``--orders 2 3``).
    Only the flags given reach the configuration (the rest keep its own defaults).
    pydantic-settings' own markers (``CliPositionalArg``) stay with the option. ``optional``:
    an option of a section that is built only when one of its flags is given."""
    required = info.is_required() and not optional
    annotation = info.annotation if required else info.annotation | None
    if _is_list(annotation):
        annotation = CliVariadicArg[annotation]
    markers = [m for m in info.metadata if getattr(m, "__module__", "").startswith("pydantic_settings")]
    if markers:
        annotation = Annotated[(annotation, *markers)]
    if required:
        return annotation, FieldInfo(description=description)
    return annotation, FieldInfo(default=default, description=description)


def _default(info: FieldInfo) -> Any:
    return info.get_default(call_default_factory=True)


class FlatCommand:
    """Flat flags for a configuration made of sections.

    ``top``: the configuration; ``sections``: its fields that hold a model of their own,
    by dotted path (``"train"``, ``"scorer.topics"``) → that model; the configuration's
    default for it gives the flags' defaults, and a section whose default is None is
    built only when one of its flags is given. ``kinds``: (field name, classes, default
    kind) of a union discriminated on ``model`` (their options merged; each flag's help
    says which kinds take it); ``exclude``: options without a flag (a field name, or a
    dotted path); ``renames``: option (field name or dotted path) → its flag's name
    (``{"auctions": "auctions_topic"}``); ``shortcuts``: flag → another spelling of it.
    """

    def __init__(
        self, name: str, top: type[BaseModel], sections: dict[str, type[BaseModel]] | None = None,
        kinds: tuple[str, Sequence[type[BaseModel]], str] | None = None, exclude: Sequence[str] = (),
        renames: dict[str, str] | None = None, shortcuts: dict[str, str] | None = None,
    ):  # fmt: skip
        self.top, self.sections, self.kinds = top, sections or {}, kinds
        self.exclude = set(exclude)
        renames = renames or {}
        self.shortcuts = {**SHORTCUTS, **(shortcuts or {})}
        fields: dict[str, tuple[Any, Any]] = {}
        self.home: dict[str, tuple[str | None, str]] = {}  # flag's field → (section or None: the top, option)

        def add(field_name: str, spec: tuple[Any, Any], section: str | None) -> None:
            path = field_name if section is None else f"{section}.{field_name}"
            if field_name in self.exclude or path in self.exclude:
                return
            name = renames.get(path, renames.get(field_name, field_name))
            if name in fields:
                raise ValueError(f"option {name!r} is declared twice (in {self.home[name][0]!r} and {section!r})")
            fields[name], self.home[name] = spec, (section, field_name)

        def own(path: str | None) -> dict[str, FieldInfo]:
            """A section's options that are not sections themselves."""
            model = top if path is None else self.sections[path]
            inner = {f"{path}.{n}" if path else n for n in model.model_fields}
            nested = inner & (set(self.sections) | ({kinds[0]} if kinds else set()))
            return {n: info for n, info in model.model_fields.items() if (f"{path}.{n}" if path else n) not in nested}

        for field_name, info in own(None).items():
            add(field_name, _flag_field(info, _default(info), info.description), None)
        # A section's defaults are the configuration's default for it (e.g. a benchmark's batch size).
        self.section_defaults: dict[str, BaseModel | None] = {}
        for section, model in self.sections.items():
            parent, _, last = section.rpartition(".")
            outer = top if not parent else self.sections[parent]
            default = _default(outer.model_fields[last]) if not parent or self.section_defaults[parent] is None else getattr(self.section_defaults[parent], last)
            self.section_defaults[section] = default
            for field_name, info in own(section).items():
                if default is not None:
                    value = getattr(default, field_name)
                else:
                    value = None if info.is_required() else _default(info)
                add(field_name, _flag_field(info, value, info.description, optional=default is None), section)
        if kinds:
            section, classes, default_kind = kinds
            by_kind = {c.model_fields[DISCRIMINATOR].default: c for c in classes}
            add(DISCRIMINATOR, (Literal[tuple(by_kind)], FieldInfo(default=default_kind, description="the model kind")), section)  # type: ignore[misc]
            options: dict[str, dict[str, FieldInfo]] = {}
            for kind, model in by_kind.items():
                for field_name, info in model.model_fields.items():
                    if field_name != DISCRIMINATOR:
                        options.setdefault(field_name, {})[kind] = info
            for field_name, per_kind in options.items():
                first = next(iter(per_kind.values()))
                if any(info.annotation != first.annotation for info in per_kind.values()):
                    raise ValueError(f"option {field_name!r} has different types in different model kinds")
                defaults = {kind: _default(info) for kind, info in per_kind.items()}
                shared = len({repr(d) for d in defaults.values()}) == 1
                if shared:
                    text = f"{first.description or ''} [{', '.join(per_kind)}]"
                else:
                    text = f"{first.description or ''} [" + "; ".join(f"{k}: default {d}" for k, d in defaults.items()) + "]"
                add(field_name, _flag_field(first, next(iter(defaults.values())) if shared else None, text.strip()), section)
            self.default_kind = default_kind
        self.flags = create_model(f"{name}Flags", __base__=_Flags, **fields)  # type: ignore[call-overload]
        self.source: CliSettingsSource | None = None

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        self.source = CliSettingsSource(self.flags, root_parser=parser, cli_shortcuts=self.shortcuts)

    def nest(self, flat: dict[str, Any]) -> dict[str, Any]:
        """The given flags as the nested configuration's input (absent flags left out)."""
        nested: dict[str, Any] = {}

        def at(path: str) -> dict[str, Any]:
            place = nested
            for part in path.split("."):
                place = place.setdefault(part, {})
            return place

        for section, default in self.section_defaults.items():  # outer sections first
            if default is not None:
                at(section).update({k: v for k, v in default.model_dump().items() if k not in at(section)})
        for name, value in flat.items():
            section, field_name = self.home[name]
            (nested if section is None else at(section))[field_name] = value
        if self.kinds:
            nested.setdefault(self.kinds[0], {}).setdefault(DISCRIMINATOR, self.default_kind)
        return nested

    def argv(self, config: BaseModel) -> list[str]:
        """The flags that give ``config`` (the inverse of ``parse``)."""
        data = config.model_dump(mode="json")

        def value(section: str | None, field_name: str) -> Any:
            place: Any = data
            for part in section.split(".") if section else ():
                place = (place or {}).get(part)
            return (place or {}).get(field_name)

        given = {name: v for name, home in self.home.items() if (v := value(*home)) is not None}
        return CliApp.serialize(self.flags.model_construct(_fields_set=set(given), **given), list_style="argparse")

    def parse(self, args: argparse.Namespace) -> Any:
        """The validated configuration from the namespace of the command's parser."""
        assert self.source is not None, "add_to(parser) first"
        given = {key: value for key, value in vars(args).items() if key in self.flags.model_fields}
        try:
            flags = CliApp.run(self.flags, cli_args=argparse.Namespace(**given), cli_settings_source=self.source)
        except ValidationError as error:
            raise ValueError(one_line(error)) from None
        flag_names = {(f"{section}.{option}" if section else option): name for name, (section, option) in self.home.items()}
        return validated(self.top, self.nest(flags.model_dump(exclude_unset=True)), flag_names)


def validated(model: type[BaseModel], data: dict[str, Any], flag_names: dict[str, str] | None = None) -> Any:
    """``model(**data)``; a validation failure is one ValueError line naming each bad option."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ValueError(one_line(error, flag_names)) from None


def one_line(error: ValidationError, flag_names: dict[str, str] | None = None) -> str:
    """Each problem as ``--flag: message`` (a model validator's, which names its flags, as it is);
    ``flag_names``: option's dotted path → its flag's field, where the two differ."""
    problems = []
    for item in error.errors():
        names = [part for part in item["loc"] if isinstance(part, str)]  # without list indices
        if item["type"] == "value_error":
            problems.append(item["msg"].removeprefix("Value error, "))
            continue
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = f"not an option of {names[-2]}" if len(names) > 1 else "not an option"
        flag = (flag_names or {}).get(".".join(names), names[-1]) if names else None
        problems.append(f"--{flag.replace('_', '-')}: {message}" if flag else message)
    return "; ".join(problems)


def command(parser: argparse.ArgumentParser, flags: FlatCommand, handler: Callable[[Any], int]) -> None:
    """Give ``parser`` the generated flags and run ``handler(config)`` when it is chosen."""
    flags.add_to(parser)
    parser.set_defaults(func=lambda args: handler(flags.parse(args)))
