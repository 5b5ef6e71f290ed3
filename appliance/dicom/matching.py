"""C-FIND attribute matching (PS3.4 C.2.2.2): compile each query key once, test index records.

Pure Python and I/O-free (no pydicom): stored values are the index's JSON-able values
(None, str, int, float or a list of them); query values are the identifier's DICOM string
form, or numbers for binary numeric VRs. Choices the standard leaves open are marked "ours".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

Point = tuple[int, ...]  # an instant as comparable fields: (y, m, d), (h, m, s, us) or both
Bounds = tuple[Point, Point]  # the earliest and latest instant a (partial) value denotes

# PS3.4 C.2.2.2.4: the only VRs on which "*" and "?" are wild cards.
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_TEXT_VRS = (_WILDCARD_VRS - {"PN"}) | {"AS", "UI"}
_TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})
_NUMBER_STRING_VRS = frozenset({"IS", "DS"})
_BINARY_NUMBER_VRS = frozenset({"AT", "FD", "FL", "SL", "SS", "SV", "UL", "US", "UV"})
# Ours: SQ keys would need Sequence Matching (C.2.2.2.6) and bulk/unknown VRs have no defined
# matching; like an Optional Key the SCP does not match on (C.2.2.1), they match every entity.
_UNMATCHED_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_KNOWN_VRS = (
    _TEXT_VRS | {"PN"} | _TEMPORAL_VRS | _NUMBER_STRING_VRS | _BINARY_NUMBER_VRS | _UNMATCHED_VRS
)
# PS3.5 6.2: leading spaces are significant in these VRs, only trailing padding is not.
_LEADING_SPACE_VRS = frozenset({"LT", "ST", "UT", "UR"})
# PS3.5 6.4: these VRs always have VM 1, so "\" is an ordinary character in their values.
_SINGLE_VALUED_VRS = _LEADING_SPACE_VRS


class Matcher(Protocol):
    """One compiled query key."""

    def matches(self, stored: object) -> bool:
        """True when the stored value (None, scalar or list of values) matches the key."""
        ...


def compile_matcher(vr: str, query: object) -> Matcher | None:
    """The matcher for one query key, or None for universal matching (every entity matches)."""
    if vr not in _KNOWN_VRS:
        raise ValueError(f"unknown VR {vr!r}")
    if vr in _UNMATCHED_VRS:
        return None
    values = _query_values(vr, query)
    # C.2.2.2.3: a zero-length key is Universal Matching; C.2.2.2.4 Note: so is "*".
    # Ours: "*" alone is universal on every VR, even where it is no wild card (DA, UI, ...).
    if not values or any(isinstance(v, str) and not v.strip("*") for v in values):
        return None
    matchers = tuple(_compile_value(vr, v) for v in values)
    return matchers[0] if len(matchers) == 1 else _AnyOf(matchers)


def match_all(matchers: Mapping[str, Matcher], record: Mapping[str, object]) -> bool:
    """True when every key's matcher accepts the record's value (a missing key is absent)."""
    return all(m.matches(record.get(key)) for key, m in matchers.items())


# --- query and stored values ---------------------------------------------------------------


def _query_values(vr: str, query: object) -> list[str | int | float]:
    """The key's values in canonical form, zero-length ones dropped."""
    if query is None:
        return []
    if isinstance(query, list | tuple):
        items: list[object] = list(query)
    elif isinstance(query, str) and vr not in _SINGLE_VALUED_VRS:
        # Ours: PS3.4 allows several values only for List of UID Matching (C.2.2.2.2); for
        # other VRs their meaning is undefined without Multiple Value Matching negotiation
        # (C.2.2.2.8 Note 4), which we do not accept. Like dcm4chee-arc we read "CT\MR" as
        # "CT or MR": a superset of the negotiated "CT and MR", where a literal "CT\MR"
        # would match nothing (no stored value contains the value delimiter).
        items = list(query.split("\\"))
    else:
        items = [query]
    values: list[str | int | float] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise TypeError(f"unsupported {vr} query value type {type(item).__name__}")
        if isinstance(item, str):
            item = _canonical(vr, item)
            if not item:
                continue
        values.append(item)
    return values


def _canonical(vr: str, value: str) -> str:
    """`value` without the padding and delimiters PS3.5 6.2 calls insignificant for `vr`."""
    if vr in _LEADING_SPACE_VRS:
        return value.rstrip(" ")
    if vr == "UI":
        return value.strip("\0 ")  # PS3.5 6.2: UI is padded with a trailing NULL
    if vr == "PN":
        # PS3.5 6.2.1: trailing "^" and trailing empty "=" groups may be omitted.
        groups = (g.strip(" ").rstrip("^ ") for g in value.split("="))
        return "=".join(groups).rstrip("=")
    return value.strip(" ")


def _stored_values(stored: object) -> list[object]:
    """The stored values to try, any one matching is enough (C.2.2.3); absent ones never match."""
    items = stored if isinstance(stored, list | tuple) else [stored]
    return [v for v in items if v is not None and v != ""]


def _compile_value(vr: str, value: str | int | float) -> Matcher:
    """The matcher for one non-universal value of a key."""
    if vr in _NUMBER_STRING_VRS or vr in _BINARY_NUMBER_VRS:
        number = value if not isinstance(value, str) else _number(value, integer=vr == "IS")
        if number is None:
            return _Never(f"{value!r} is not a {vr} number")
        return _Number(number)
    text = str(value)
    if vr == "PN":
        return _PersonName.compile(text)
    if vr in _TEMPORAL_VRS:
        return _compile_temporal(vr, text)
    return _Text(vr, _Pattern.compile(text, wildcards=vr in _WILDCARD_VRS, ignore_case=False))


@dataclass(frozen=True, slots=True)
class _AnyOf:
    """Matches when any of several key values matches (see `_query_values`)."""

    matchers: tuple[Matcher, ...]

    def matches(self, stored: object) -> bool:
        return any(m.matches(stored) for m in self.matchers)


@dataclass(frozen=True, slots=True)
class _Never:
    """A key value nothing can match: malformed, or "*"/"?" on a VR without wild cards."""

    reason: str

    def matches(self, stored: object) -> bool:
        return False


# --- text: single value and wild card matching ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pattern:
    """An anchored key value: "*" any run, "?" one character, the rest literal (C.2.2.2.4)."""

    segments: tuple[re.Pattern[str], ...]  # the value split at "*", each "?" as "."
    tail: int  # characters in the last segment

    @classmethod
    def compile(cls, text: str, *, wildcards: bool, ignore_case: bool) -> _Pattern:
        """`text` as a pattern; without `wildcards` every character is literal."""
        flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
        parts = text.split("*") if wildcards else [text]
        # Only "*" and "?" are special: "[...]" classes and regex syntax stay literal.
        segments = tuple(
            re.compile(
                "".join("." if wildcards and c == "?" else re.escape(c) for c in part), flags
            )
            for part in parts
        )
        return cls(segments, len(parts[-1]))

    def fullmatch(self, value: str) -> bool:
        """True when the whole of `value` matches."""
        if len(self.segments) == 1:
            return self.segments[0].fullmatch(value) is not None
        first, *middle, last = self.segments
        # Each segment has a fixed width, so taking every middle segment at its leftmost
        # place is optimal: linear work, no backtracking on peer-controlled patterns.
        found = first.match(value)
        if found is None:
            return False
        pos = found.end()
        for segment in middle:
            found = segment.search(value, pos)
            if found is None:
                return False
            pos = found.end()
        start = len(value) - self.tail
        return start >= pos and last.fullmatch(value, start) is not None


@dataclass(frozen=True, slots=True)
class _Text:
    """Case-sensitive single value or wild card matching of a text VR (C.2.2.2.1, C.2.2.2.4)."""

    vr: str
    pattern: _Pattern

    def matches(self, stored: object) -> bool:
        for value in _stored_values(stored):
            if isinstance(value, str):
                text = _canonical(self.vr, value)
                if text and self.pattern.fullmatch(text):
                    return True
        return False


@dataclass(frozen=True, slots=True)
class _PersonName:
    """PN matching per component group, ignoring case; None leaves a group unconstrained."""

    # C.2.2.2.1 lets PN matching ignore case ("insensitive to some or all aspects of case")
    # and C.2.2.2.4 leaves PN wild cards to the implementation. Ours: case-insensitive, and
    # "^" is part of the value ("Doe" does not match "Doe^Jane", "Doe*" does). A key without
    # "=" constrains the alphabetic group only; "A=I=P" constrains each group it gives.
    groups: tuple[_Pattern | None, ...]

    @classmethod
    def compile(cls, text: str) -> _PersonName:
        """The matcher for one canonical PN key value."""
        return cls(
            tuple(
                _Pattern.compile(g, wildcards=True, ignore_case=True) if g else None
                for g in text.split("=")
            )
        )

    def matches(self, stored: object) -> bool:
        for value in _stored_values(stored):
            if isinstance(value, str) and self._matches_groups(_canonical("PN", value)):
                return True
        return False

    def _matches_groups(self, name: str) -> bool:
        groups = name.split("=")
        for i, pattern in enumerate(self.groups):
            group = groups[i] if i < len(groups) else ""
            if pattern is not None and not pattern.fullmatch(group):
                return False
        return True


# --- numbers --------------------------------------------------------------------------------


def _number(text: str, *, integer: bool = False) -> int | float | None:
    """`text` as a number (int only if `integer`), or None if it is not one."""
    text = text.strip(" ")
    try:
        return int(text)
    except ValueError:
        if integer:
            return None
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class _Number:
    """Single value matching of IS, DS and binary numeric VRs by numeric equality."""

    # Ours (C.2.2.2.1 says "match exactly"): IS/DS compare as numbers, not as strings, so
    # DS "1.50" equals 1.5 and IS "007" equals 7, however the index or the SCU wrote them.
    value: int | float

    def matches(self, stored: object) -> bool:
        for value in _stored_values(stored):
            if isinstance(value, bool):
                continue
            number = _number(value) if isinstance(value, str) else value
            if isinstance(number, int | float) and number == self.value:
                return True
        return False


# --- dates and times: single value and range matching ---------------------------------------

_DATE_FIELDS = ((0, 9999), (1, 12), (1, 31))  # day 31 also bounds shorter months from above
_TIME_FIELDS = ((0, 23), (0, 59), (0, 60))  # PS3.5 6.2 TM: a leap second is 60
_DA = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})", re.ASCII)  # PS3.5 6.2: legacy YYYY.MM.DD
_TM = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?", re.ASCII)  # legacy ":"
# PS3.5 6.2 DT: YYYY[MM[DD[HH[MM[SS[.F{1-6}]]]]]][&ZZXX]; the offset is read and dropped.
_DT = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?"
    r"(?:[+-](?:0\d|1[0-4])[0-5]\d)?",
    re.ASCII,
)


def _bounds(groups: Sequence[str | None], fields: Sequence[tuple[int, int]]) -> Bounds | None:
    """First and last instant of a partial value: missing fields are minima / maxima."""
    low: list[int] = []
    high: list[int] = []
    for text, (least, most) in zip(groups, fields, strict=False):
        if text is None:
            low.append(least)
            high.append(most)
            continue
        value = int(text)
        if not least <= value <= most:
            return None
        low.append(value)
        high.append(value)
    if len(groups) > len(fields):  # a fraction of a second, up to 6 digits
        fraction = groups[len(fields)]
        low.append(int(fraction.ljust(6, "0")) if fraction else 0)
        high.append(int(fraction.ljust(6, "9")) if fraction else 999_999)
    return tuple(low), tuple(high)


def _parse_da(text: str) -> Bounds | None:
    found = _DA.fullmatch(text)
    return _bounds(found.groups(), _DATE_FIELDS) if found else None


def _parse_tm(text: str) -> Bounds | None:
    found = _TM.fullmatch(text)
    return _bounds(found.groups(), _TIME_FIELDS) if found else None


def _parse_dt(text: str) -> Bounds | None:
    # Ours: the UTC offset is ignored and values compare as written. PS3.4 C.2.2.2.5 would
    # have offsets taken into account; this is right only when the SCU and the stored
    # values use the same offset.
    found = _DT.fullmatch(text)
    return _bounds(found.groups(), _DATE_FIELDS + _TIME_FIELDS) if found else None


_PARSERS: dict[str, Callable[[str], Bounds | None]] = {
    "DA": _parse_da,
    "TM": _parse_tm,
    "DT": _parse_dt,
}


def _compile_temporal(vr: str, text: str) -> Matcher:
    """Single value or range matching of one DA, TM or DT key value."""
    parse = _PARSERS[vr]
    single = parse(text)
    if single is not None:
        # C.2.2.2.1 single value matching. Ours: at the key's precision, so TM "10" matches
        # 10:00:00-10:59:59.999999 and DT "2024" the whole year. Tried before ranges so
        # that DT "2024-0500" is 2024 at UTC-5, not a range down to year 500.
        return _Temporal(vr, *single)
    # C.2.2.2.5: "D1-D2", "-D2" and "D1-", inclusive. A DT offset may itself contain "-",
    # so the separator is the first "-" that leaves a valid value (or nothing) each side.
    for i, char in enumerate(text):
        if char != "-":
            continue
        low_text, high_text = text[:i], text[i + 1 :]
        low = parse(low_text) if low_text else None
        high = parse(high_text) if high_text else None
        if (low is not None or not low_text) and (high is not None or not high_text):
            return _Temporal(vr, low[0] if low else None, high[1] if high else None)
    return _Never(f"{text!r} is not a {vr} value or range")


@dataclass(frozen=True, slots=True)
class _Temporal:
    """A DA/TM/DT whose first instant lies in [low, high] (C.2.2.2.5); None is unbounded."""

    # Ours: a partial stored value counts as its first instant, so a stored TM "10" is
    # 10:00:00 and falls outside "1030-1100". DA and TM keys are matched independently:
    # combined date-time matching (C.2.2.2.5) is an extended negotiation we do not accept.
    vr: str
    low: Point | None
    high: Point | None

    def matches(self, stored: object) -> bool:
        parse = _PARSERS[self.vr]
        for value in _stored_values(stored):
            bounds = parse(value.strip(" ")) if isinstance(value, str) else None
            if bounds is None:
                continue
            first = bounds[0]
            after_low = self.low is None or self.low <= first
            if after_low and (self.high is None or first <= self.high):
                return True
        return False
