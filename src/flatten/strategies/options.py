"""Strategy options, declared once and parsed from ``NAME:key=value`` text alike by Python code,
``flatten compress --method`` and ``benchmarks/compare.py``.

A strategy declares an option as a parameter of its constructor, with its type, default and help:

    search_samples: Annotated[int | None, "calibration sequences a search scores on (default: all)"] = None

A subclass that passes a parameter on to its base need not repeat the help. The caller sets ``model``,
``calibration`` and the harness parameters (``batch_size``, ``device``, ``progress``); they are no options.

Text form: ``name:key=value:key=value``. A key the strategy declares is converted to its declared type. An
option that takes a scorer or a pair-selection policy takes a registered name, and that object's own options
follow with its prefix: ``flattengpt:policy=fixed:policy.spans=9-10+13-14``, ``flattengpt:scorer.ridge=3``.
An unprefixed key the strategy does not declare goes to its scorer (``flattengpt:ridge=3``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import sys
import types
import typing
from collections import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable

from flatten.criteria import POLICIES, SCORERS, ChannelScorer, PairPolicy, get_policy, get_scorer
from flatten.strategies.compressor import STRATEGIES, Compressor, get_strategy

HARNESS = frozenset({"self", "model", "calibration", "batch_size", "device", "progress"})
# option types whose values are registered objects: (registry, factory from name and options)
REGISTERED = {ChannelScorer: (SCORERS, get_scorer), PairPolicy: (POLICIES, get_policy)}
TRUE, FALSE = ("true", "yes", "on"), ("false", "no", "off")


@dataclass(frozen=True)
class Option:
    """One option of a strategy (or of a scorer or policy): what ``--help`` lists and the parser converts to."""

    name: str
    kind: Any  # the declared type (``inspect.Parameter.empty`` where none is declared)
    default: Any
    help: str = ""

    def types(self) -> tuple:
        if self.kind is inspect.Parameter.empty:
            return ()
        args = typing.get_args(self.kind) if isinstance(self.kind, types.UnionType) or \
            typing.get_origin(self.kind) is typing.Union else (self.kind,)
        return tuple(type(None) if a is None else a for a in args)

    def registered(self):
        """``(registry, factory)`` when the option's values are registered scorers or policies, else None."""
        return next((found for kind, found in REGISTERED.items() if kind in self.types()), None)

    def convert(self, text: str) -> Any:
        """``text`` as a value of the declared type (by its look where no type is declared)."""
        kinds = self.types() or (bool, int, float, str)
        lower = text.lower()
        if type(None) in kinds and lower == "none":
            return None
        if bool in kinds and (lower in TRUE + FALSE or int not in kinds and lower in ("0", "1")):
            return lower in TRUE + ("1",)
        if any(typing.get_origin(k) in (list, tuple, abc.Sequence) for k in kinds):
            return parse_spans(text, self.name)
        for kind in (int, float):
            if kind in kinds:
                try:
                    return kind(text)
                except ValueError:
                    pass
        if str in kinds or any(k in REGISTERED for k in kinds):
            return text
        if Path in kinds:
            return Path(text)
        raise ValueError(f"option {self.name}={text!r}: expected {self.type_names()}")

    def type_names(self) -> str:
        return " | ".join("None" if k is type(None) else getattr(k, "__name__", str(k)) for k in self.types())

    def describe(self) -> str:
        kinds = self.type_names()
        default = "" if self.default is inspect.Parameter.empty else f", default {self.default!r}"
        return f"{self.name} ({kinds or 'any'}{default})" + (f": {self.help}" if self.help else "")


def parse_spans(text: str, name: str = "spans") -> list[tuple[int, int]]:
    """``"9-10+13-14"`` (or ``"9-10,13-14"``) -> ``[(9, 10), (13, 14)]``."""
    try:
        return [tuple(int(i) for i in part.split("-", 1)) for part in text.replace(",", "+").split("+")]
    except ValueError:
        raise ValueError(f"{name} must look like 9-10+13-14 (first-last blocks of each span), got {text!r}") from None


def options_of(factory: Callable) -> dict[str, Option]:
    """The options a strategy class (or scorer or policy factory) declares, by name, harness parameters left
    out. Types and help come from the nearest class in the MRO that annotates the parameter."""
    hints, helps = {}, {}
    owners = [c.__init__ for c in reversed(factory.__mro__) if "__init__" in vars(c)] if isinstance(factory, type) \
        else [factory.func if isinstance(factory, functools.partial) else factory]
    for owner in owners:
        try:
            found = typing.get_type_hints(owner, include_extras=True)
        except (NameError, TypeError):  # annotations that do not resolve: no declared types
            found = {}
        for name, hint in found.items():
            if typing.get_origin(hint) is Annotated:
                hint, *extras = typing.get_args(hint)
                helps.update({name: extra for extra in extras if isinstance(extra, str)})
            hints[name] = hint
    return {name: Option(name, hints.get(name, inspect.Parameter.empty), p.default, helps.get(name, ""))
            for name, p in inspect.signature(factory).parameters.items()
            if name not in HARNESS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


@dataclass
class Method:
    """A strategy name and its options as text, parsed from ``name:key=value:key=value`` (callers may add
    options before building, as the command line's shorthand flags do)."""

    name: str
    options: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> "Method":
        name, *pairs = text.split(":")
        options = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"method option {pair!r} in {text!r} is not key=value")
            options[key] = value
        get_strategy(name)  # an unknown name fails before any model is loaded
        return cls(name, options)

    def __str__(self) -> str:
        return ":".join([self.name, *(f"{k}={v}" for k, v in self.options.items())])

    def arguments(self) -> dict[str, Any]:
        """The strategy's constructor arguments: declared options converted, scorers and policies built."""
        strategy = get_strategy(self.name)
        declared = options_of(strategy)
        own, nested = {}, {}
        for key, text in self.options.items():
            prefix, dot, rest = key.partition(".")
            if dot and prefix in declared and declared[prefix].registered():
                nested.setdefault(prefix, {})[rest] = text
            elif key in declared:
                own[key] = declared[key].convert(text)
            elif "scorer" in declared:
                nested.setdefault("scorer", {})[key] = text
            else:
                raise ValueError(f"{self.name} has no option {key!r}; its options: "
                                 + ("; ".join(o.describe() for o in declared.values()) or "none"))
        named = {key for key, option in declared.items() if option.registered() and isinstance(own.get(key), str)}
        for prefix in sorted(named | nested.keys()):
            name = own.get(prefix, declared[prefix].default)
            instance = self._registered(declared[prefix], name, nested.get(prefix, {}))
            own[prefix] = instance if prefix in nested else name  # a name alone stays a name: records keep it
        return own

    def _registered(self, option: Option, name: str, texts: dict[str, str]):
        """The scorer or policy ``name`` with the options ``texts`` (checked even when there are none)."""
        registry, factory = option.registered()
        sub = options_of(registry.get(name))
        open_ended = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(registry.get(name)).parameters.values())
        unknown = [] if open_ended else sorted(set(texts) - set(sub))
        if unknown:
            raise ValueError(f"{option.name} {name!r} has no option {unknown[0]!r}; its options: "
                             + ("; ".join(o.describe() for o in sub.values()) or "none"))
        missing = [o.name for o in sub.values() if o.default is inspect.Parameter.empty and o.name not in texts]
        if missing:
            raise ValueError(f"{option.name} {name!r} needs its option {missing[0]}, e.g. "
                             f"{self.name}:{option.name}={name}:{option.name}.{missing[0]}=...")
        return factory(name, **{k: sub.get(k, Option(k, inspect.Parameter.empty, None)).convert(v)
                                for k, v in texts.items()})

    def build(self, model, calibration, **harness) -> Compressor:
        """The strategy on ``model`` and ``calibration``; ``harness``: batch_size, device, progress."""
        return get_strategy(self.name)(model, calibration, **harness, **self.arguments())


def build_strategy(method: str | Method, model, calibration, **harness) -> Compressor:
    """``build_strategy("sleb:search_samples=4", model, calibration)``: the strategy, with its options."""
    return (method if isinstance(method, Method) else Method.parse(method)).build(model, calibration, **harness)


def strategies_help() -> str:
    """Every registered strategy with its options, and the registered scorers and policies with theirs."""
    lines = []
    for name in STRATEGIES.names():
        strategy = get_strategy(name)
        lines.append(f"{name}: {strategy.title}")
        lines += [f"    {option.describe()}" for option in options_of(strategy).values()]
    for kind, registry in (("scorers", SCORERS), ("policies", POLICIES)):
        lines.append(f"{kind} (options with their prefix, e.g. policy.tokens=all):")
        for name in registry.names():
            found = options_of(registry.get(name))
            lines.append(f"    {name}(" + ", ".join(
                f"{o.name}={o.default!r}" if o.default is not inspect.Parameter.empty else o.name
                for o in found.values()) + ")")
    return "\n".join(lines)


def load_plugins(paths: list[str | Path]) -> None:
    """Import each Python file in ``paths`` (its registrations then take effect): how the command line and
    ``compare.py`` find a strategy, scorer or policy defined in a user's own file."""
    for path in map(Path, paths):
        if not path.is_file() or path.suffix != ".py":
            raise FileNotFoundError(f"plugin {path} is not a Python file")
        name = f"flatten_plugin_{path.stem}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        if name in sys.modules:  # loaded already (flatten reproduce runs the recorded command in this process)
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
