"""fastlayers.accelerate(model): swap known modules for their fastlayers twins in place, weights kept.

Each nn module file registers its rules with `register(...)`: a rule says which module classes it can replace
(matched by class name and module path, so timm / mamba_ssm need not be importable) and how. A rule's `convert`
returns the new module, or a string saying why this instance is kept as it is.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Union

from torch import nn

Convert = Callable[[nn.Module], Union[nn.Module, str]]


@dataclasses.dataclass
class Rule:
    name: str
    matches: Callable[[nn.Module], bool]
    convert: Convert


_RULES: list[Rule] = []


def register(name: str, matches: Callable[[nn.Module], bool], convert: Convert) -> None:
    """Add a rule (later registrations of the same name replace earlier ones)."""
    _RULES[:] = [r for r in _RULES if r.name != name]
    _RULES.append(Rule(name, matches, convert))


def class_is(*qualnames: str) -> Callable[[nn.Module], bool]:
    """Match modules whose class (or a base) is named e.g. 'timm.layers.attention.Attention' or just 'Attention'
    with a module path prefix 'timm.'."""
    def match(m: nn.Module) -> bool:
        for cls in type(m).__mro__:
            full = f"{cls.__module__}.{cls.__qualname__}"
            for q in qualnames:
                if full == q or (q.endswith(cls.__qualname__) and full.startswith(q.rsplit(".", 1)[0])):
                    return True
        return False
    return match


@dataclasses.dataclass
class AccelerateReport:
    replaced: list = dataclasses.field(default_factory=list)  # (path, old class, new class)
    kept: list = dataclasses.field(default_factory=list)      # (path, class, why)

    def __str__(self) -> str:
        lines = [f"fastlayers.accelerate: replaced {len(self.replaced)} module(s), kept {len(self.kept)}"]
        lines += [f"  replaced {p or '<root>'}: {a} -> {b}" for p, a, b in self.replaced]
        lines += [f"  kept     {p or '<root>'}: {a} ({why})" for p, a, why in self.kept]
        return "\n".join(lines)


def accelerate(model: nn.Module, *, verbose: bool = False) -> AccelerateReport:
    """Replace, in place, every module a registered rule supports with its fastlayers twin (parameters and
    buffers are shared, so weights, devices, dtypes and train/eval mode are kept). Returns a report of what was
    replaced and what was kept and why. A replaced module's children are not visited again.
    """
    from . import nn as _register_rules  # noqa: F401  (importing the modules registers their rules)

    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: `model` must be an nn.Module, got {type(model).__name__}")
    report = AccelerateReport()

    def visit(parent: nn.Module, prefix: str):
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            rule = next((r for r in _RULES if r.matches(child)), None)
            if rule is None:
                visit(child, path)
                continue
            new = rule.convert(child)
            if isinstance(new, str):
                report.kept.append((path, type(child).__name__, new))
                visit(child, path)
                continue
            new.train(child.training)
            setattr(parent, name, new)
            report.replaced.append((path, type(child).__name__, type(new).__name__))

    root_rule = next((r for r in _RULES if r.matches(model)), None)
    if root_rule is not None:
        report.kept.append(("", type(model).__name__, "the root module itself is not replaced in place; wrap it"))
    visit(model, "")
    if verbose:
        print(report)
    return report
