"""Paper references with the protocol they were measured under, and how ours differs.

Published baselines are copied across papers that trained them differently (DESIGN.md §4),
so a reference is compared with a board row only when its backbone, LT generator, epochs and
augmentation equal ours and it reports the method itself, not a variant of it. Differences
in how the number was obtained (framework, epoch selection, runs averaged, test-time
augmentation) do not stop Δ but are named beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# all equal to ours, or no Δ. A reference's recipe is benchmarks.yaml's, which states none: a
# row whose recipe another benchmarks file changed (its runs' recipe_changes) is not its protocol
MATCHED = ("backbone", "generator", "epochs", "augmentation", "recipe")
NOTED = ("framework", "selection", "runs", "tta", "precision")   # named beside Δ when they differ
# what makes a board row's setup: the matched fields, the arithmetic, and the split a post-hoc τ
# was chosen on (test where the run had no validation split: an oracle, never ranked as val's)
SETUP = (*MATCHED, "precision", "tau_chosen_on")
# what a reference that leaves a noted field out used: no test-time augmentation, and fp32, in
# which every official code of benchmarks.yaml's methods trains and evaluates
UNSTATED = {"tta": "none", "precision": "fp32"}
DEFAULT_AUGMENTATION = "crop+flip"   # what a recipe trained with before the resolver recorded it
# How every run of this harness obtains its number (README, Protocol); runs is the row's n.
OUR_METHOD_OF_REPORTING = {"framework": "pytorch", "selection": "last", "tta": "none"}


@dataclass(frozen=True)
class Reference:
    """One paper-reported number from benchmarks.yaml."""
    method: str
    rho: float
    top1: float
    source: str
    protocol: dict = field(default_factory=dict)
    variant: str | None = None      # a different configuration of the method: never gives Δ
    many: float | None = None
    medium: float | None = None
    few: float | None = None
    ece: float | None = None        # expected calibration error (%), where the paper reports one

    @classmethod
    def from_entry(cls, entry: dict) -> "Reference":
        return cls(method=entry["method"], rho=float(entry["rho"]), top1=float(entry["top1"]),
                   source=entry.get("source", ""), protocol=dict(entry.get("protocol") or {}),
                   variant=entry.get("variant"), many=entry.get("many"), medium=entry.get("medium"),
                   few=entry.get("few"), ece=entry.get("ece"))

    def stated(self, name: str):
        """The protocol's value for a field (UNSTATED: what an omitted tta or precision was)."""
        return self.protocol.get(name, UNSTATED.get(name))

    def summary(self) -> str:
        """The protocol in one short line: resnet32 · cui · 200 ep · crop+flip · tensorflow · last."""
        p = self.protocol
        parts = [p.get("backbone"), p.get("generator"), f"{readable(p['epochs'])} ep" if "epochs" in p else None,
                 p.get("augmentation"), p.get("framework"), p.get("selection"),
                 f"mean of {p['runs']}" if "runs" in p else None,
                 f"TTA {p['tta']}" if self.stated("tta") != "none" else None,
                 self.stated("precision") if self.stated("precision") != "fp32" else None]
        return " · ".join(str(part) for part in parts if part is not None)


@dataclass(frozen=True)
class Difference:
    """One way a reference's protocol differs from ours, or the variant of the method it reports."""
    name: str
    theirs: object
    ours: object = None

    def __str__(self) -> str:
        if self.name == "variant":   # a configuration of the method, not of the protocol: nothing of ours to name
            return f"variant: {self.theirs}"
        if self.name == "recipe":    # theirs is the shipped benchmarks.yaml's, which ours names beside its own
            return f"recipe {self.ours}"
        return f"{self.name} {readable(self.theirs)} (ours {readable(self.ours)})"


def readable(value) -> str:
    """A protocol value as people read it: 200, not 200.0; an unknown value as —."""
    if value is None:
        return "—"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def our_protocol(row: dict) -> dict:
    """The protocol of one board row: its runs' setup plus how this harness reports."""
    ours = {name: row.get(name) for name in SETUP}
    return {**ours, **OUR_METHOD_OF_REPORTING, "runs": row.get("n")}


def differences(ref: Reference, ours: dict) -> list[Difference]:
    """The variant first, then every stated protocol field that is not ours.

    A matched field the reference leaves out is a difference (nothing says it matches);
    an omitted noted field is not (nothing to name)."""
    found = [Difference("variant", ref.variant)] if ref.variant else []
    for name in MATCHED + NOTED:
        theirs = ref.stated(name)
        if (theirs is not None or name in MATCHED) and readable(theirs) != readable(ours.get(name)):
            found.append(Difference(name, theirs, ours.get(name)))
    return found


def is_comparable(found: list[Difference]) -> bool:
    return not any(d.name == "variant" or d.name in MATCHED for d in found)


@dataclass(frozen=True)
class Comparison:
    """What a board row shows about the paper: a reference, Δ if comparable, the differences."""
    reference: Reference | None = None
    delta: float | None = None
    differs: tuple[Difference, ...] = ()


def compare(ours: dict, mean: float | None, refs: list[Reference], with_delta: bool) -> Comparison:
    """The first comparable reference of the row's method, with Δ when `with_delta`; else the
    first reference without a variant (or the first at all), with its differences and no Δ."""
    candidates = [(ref, differences(ref, ours)) for ref in refs]
    if not candidates:
        return Comparison()
    comparable = [(ref, found) for ref, found in candidates if is_comparable(found)]
    if comparable:
        ref, found = comparable[0]
        measured = mean is not None and not math.isnan(mean)
        delta = mean - ref.top1 if with_delta and measured else None
        return Comparison(ref, delta, tuple(found))
    plain = [(ref, found) for ref, found in candidates if not ref.variant]
    ref, found = (plain or candidates)[0]
    return Comparison(ref, None, tuple(found))


def closest_differences(ref: Reference, rows: list[dict]) -> list[Difference] | None:
    """The reference against the board row of its method it differs from least; None when
    no row runs that method."""
    mine = [differences(ref, our_protocol(row)) for row in rows if row["method"] == ref.method]
    return min(mine, key=len) if mine else None
