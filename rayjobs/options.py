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
from typing import Any, Literal

from pydantic import BaseModel, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, CliApp, CliSettingsSource, CliVariadicArg, SettingsConfigDict

DISCRIMINATOR = "model"
SHORTCUTS = {"learning-rate": "lr"}  # the spelling the docs use


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


def _flag_field(info: FieldInfo, default: Any, description: str | None) -> tuple[Any, Any]:
    """The flat field of one option; lists take space-separated values (``--orders 2 3``).
    Only the flags given reach the configuration (the rest keep its own defaults)."""
    annotation = info.annotation if info.is_required() else info.annotation | None
    if _is_list(annotation):
        annotation = CliVariadicArg[annotation]
    if info.is_required():
        return annotation, FieldInfo(description=description)
    return annotation, FieldInfo(default=default, description=description)


def _default(info: FieldInfo) -> Any:
    return info.get_default(call_default_factory=True)


class FlatCommand:
    """Flat flags for a configuration made of sections.

    ``top``: the configuration; ``sections``: its fields that hold a model of their own
    (field name → that model; the top's default for it gives the flags' defaults);
    ``kinds``: (field name, classes, default kind) of a union discriminated on ``model``
    (their options merged; each flag's help says which kinds take it); ``exclude``:
    fields without a flag; ``shortcuts``: flag → another spelling of it.
    """

    def __init__(
        self, name: str, top: type[BaseModel], sections: dict[str, type[BaseModel]] | None = None,
        kinds: tuple[str, Sequence[type[BaseModel]], str] | None = None, exclude: Sequence[str] = (),
        shortcuts: dict[str, str] | None = None,
    ):  # fmt: skip
        self.top, self.sections, self.kinds = top, sections or {}, kinds
        self.exclude = set(exclude)
        self.shortcuts = {**SHORTCUTS, **(shortcuts or {})}
        fields: dict[str, tuple[Any, Any]] = {}
        self.home: dict[str, str | None] = {}  # flat name → section (None: the top level)

        def add(name: str, spec: tuple[Any, Any], section: str | None) -> None:
            if name in fields:
                raise ValueError(f"option {name!r} is declared twice (in {self.home[name]!r} and {section!r})")
            fields[name], self.home[name] = spec, section

        nested = set(self.sections) | ({kinds[0]} if kinds else set())
        for field_name, info in top.model_fields.items():
            if field_name not in nested and field_name not in self.exclude:
                add(field_name, _flag_field(info, _default(info), info.description), None)
        # A section's defaults are the configuration's default for it (e.g. a benchmark's batch size).
        self.section_defaults = {section: _default(top.model_fields[section]) for section in self.sections}
        for section, model in self.sections.items():
            for field_name, info in model.model_fields.items():
                if field_name not in self.exclude:
                    default = getattr(self.section_defaults[section], field_name)
                    add(field_name, _flag_field(info, default, info.description), section)
        if kinds:
            section, classes, default_kind = kinds
            by_kind = {c.model_fields[DISCRIMINATOR].default: c for c in classes}
            add(DISCRIMINATOR, (Literal[tuple(by_kind)], FieldInfo(default=default_kind, description="the model kind")), section)  # type: ignore[misc]
            options: dict[str, dict[str, FieldInfo]] = {}
            for kind, model in by_kind.items():
                for field_name, info in model.model_fields.items():
                    if field_name != DISCRIMINATOR and field_name not in self.exclude:
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
        nested: dict[str, Any] = {section: default.model_dump() for section, default in self.section_defaults.items()}
        for name, value in flat.items():
            section = self.home[name]
            if section is None:
                nested[name] = value
            else:
                nested.setdefault(section, {})[name] = value
        if self.kinds:
            nested.setdefault(self.kinds[0], {}).setdefault(DISCRIMINATOR, self.default_kind)
        return nested

    def argv(self, config: BaseModel) -> list[str]:
        """The flags that give ``config`` (the inverse of ``parse``)."""
        data = config.model_dump(mode="json")
        flat = {name: data[name] if section is None else data[section].get(name) for name, section in self.home.items()}
        given = {name: value for name, value in flat.items() if value is not None}
        return CliApp.serialize(self.flags.model_construct(_fields_set=set(given), **given), list_style="argparse")

    def parse(self, args: argparse.Namespace) -> Any:
        """The validated configuration from the namespace of the command's parser."""
        assert self.source is not None, "add_to(parser) first"
        given = {key: value for key, value in vars(args).items() if key in self.flags.model_fields}
        try:
            flags = CliApp.run(self.flags, cli_args=argparse.Namespace(**given), cli_settings_source=self.source)
        except ValidationError as error:
            raise ValueError(one_line(error)) from None
        return validated(self.top, self.nest(flags.model_dump(exclude_unset=True)))


def validated(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """``model(**data)``; a validation failure is one ValueError line naming each bad option."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ValueError(one_line(error)) from None


def one_line(error: ValidationError) -> str:
    """Each problem as ``--flag: message`` (a model validator's, which names its flags, as it is)."""
    problems = []
    for item in error.errors():
        names = [part for part in item["loc"] if isinstance(part, str)]  # without list indices
        if item["type"] == "value_error":
            problems.append(item["msg"].removeprefix("Value error, "))
            continue
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = f"not an option of {names[-2]}" if len(names) > 1 else "not an option"
        problems.append(f"--{names[-1].replace('_', '-')}: {message}" if names else message)
    return "; ".join(problems)


def command(parser: argparse.ArgumentParser, flags: FlatCommand, handler: Callable[[Any], int]) -> None:
    """Give ``parser`` the generated flags and run ``handler(config)`` when it is chosen."""
    flags.add_to(parser)
    parser.set_defaults(func=lambda args: handler(flags.parse(args)))
