"""`--format` rules: which format each linear weight gets.

    nf3,lm_head=int4,*.down_proj=int4

The first item is the default for every linear weight; each later `GLOB=FORMAT` overrides it for the weights whose
name matches GLOB (fnmatch: `*` also matches dots). A glob is matched against the module name, the HF weight name
without ".weight" (`model.layers.3.mlp.down_proj`, `lm_head`), and also against the full weight name, so
`*.down_proj` and `*.down_proj.weight` both work. When several globs match, the last one wins. FORMAT is any format
name or `fp16`, which leaves the weight unquantized (stored as fp16), optionally with its own group size as
FORMAT:G (`*.down_proj=int4:32`; without it, --group-size). The default may be `auto` with --bits-budget: the planner
then chooses the format of every weight that no glob pins.

`@FILE` reads the rules from a file instead: the same items, separated by commas or newlines, `#` starting a
comment. A plan that `--bits-budget` chose can be kept that way and rounded again (the weights' formats are in the
directory's quant_report.json; recipes/ holds such files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import NamedTuple

from lutq.errors import LutqError
from lutq.quantize.registry import FORMATS, KEEP

AUTO = "auto"
GROUP_SIZES = (32, 64, 128)


class Choice(NamedTuple):
    format: str
    group_size: int | None = None  # None: the --group-size

    def __str__(self) -> str:
        return self.format if self.group_size is None else f"{self.format}:{self.group_size}"


@dataclass
class Rules:
    default: Choice
    overrides: list[tuple[str, Choice]] = field(default_factory=list)  # (glob, choice), in the order given

    def matching(self, weight_name: str) -> Choice | None:
        """The choice the last matching glob names, or None when no glob matches."""
        module = weight_name.removesuffix(".weight")
        found = None
        for glob, choice in self.overrides:
            if fnmatchcase(module, glob) or fnmatchcase(weight_name, glob):
                found = choice
        return found

    def format_for(self, weight_name: str) -> Choice:
        return self.matching(weight_name) or self.default

    def __str__(self) -> str:
        return ",".join([str(self.default)] + [f"{g}={c}" for g, c in self.overrides])


def parse_choice(text: str, where: str) -> Choice:
    name, colon, g = text.partition(":")
    if name != KEEP and name not in FORMATS:
        raise LutqError(f"--format: unknown format {name!r} in {where!r} (formats: {', '.join(FORMATS)}, {KEEP})")
    if not colon:
        return Choice(name)
    if not g.isdigit() or int(g) not in GROUP_SIZES:
        raise LutqError(f"--format: group size {g!r} in {where!r} must be one of {', '.join(map(str, GROUP_SIZES))}")
    return Choice(name, int(g))


def read_rules_file(spec: str) -> str:
    """`@FILE` -> the file's rules as one comma-separated spec (comments and blank lines dropped)."""
    path = spec[1:]
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise LutqError(f"--format {spec}: cannot read {path} ({getattr(e, 'strerror', None) or type(e).__name__})")
    items = [item.strip() for line in text.splitlines() for item in line.split("#", 1)[0].split(",")]
    items = [item for item in items if item]
    if not items:
        raise LutqError(f"--format {spec}: {path} holds no rules")
    return ",".join(items)


def parse_rules(spec: str) -> Rules:
    if spec.startswith("@"):
        text = read_rules_file(spec)
        try:
            return parse_rules(text)
        except LutqError as e:
            raise LutqError(f"{spec[1:]}: {e}") from None
    items = [item.strip() for item in spec.split(",")]
    if not items or not items[0] or "=" in items[0]:
        raise LutqError(f"--format {spec!r}: the first item must be the default format, e.g. nf3,lm_head=int4")
    rules = Rules(Choice(AUTO) if items[0] == AUTO else parse_choice(items[0], items[0]))
    for item in items[1:]:
        glob, eq, fmt = item.partition("=")
        if not eq or not glob.strip() or not fmt.strip():
            raise LutqError(f"--format: {item!r} is not GLOB=FORMAT (e.g. *.down_proj=int4)")
        rules.overrides.append((glob.strip(), parse_choice(fmt.strip(), item)))
    return rules
