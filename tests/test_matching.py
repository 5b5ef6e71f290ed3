"""C-FIND attribute matching (PS3.4 C.2.2.2): one table row per rule, with its negatives."""

from __future__ import annotations

import pytest

from appliance.dicom.matching import Matcher, compile_matcher, match_all

YAMADA = "Yamada^Tarou=山田^太郎=やまだ^たろう"
NEGATIVE_OFFSETS = "202401011200-0500-202401011300-0500"  # the range "-" is the second one

# (vr, query, stored, expected): the key compiles to a matcher (not universal).
CASES = {
    # C.2.2.2.1 single value matching: case-sensitive, except PN.
    "LO exact": ("LO", "Smith", "Smith", True),
    "LO other value": ("LO", "Smith", "Smyth", False),
    "LO case-sensitive": ("LO", "smith", "Smith", False),
    "SH case-sensitive": ("SH", "ACC1", "acc1", False),
    "PN case-insensitive": ("PN", "doe^jane", "Doe^Jane", True),
    "PN other name": ("PN", "Doe^Joan", "Doe^Jane", False),
    "PN caret is part of the value": ("PN", "Doe", "Doe^Jane", False),
    "PN trailing carets insignificant": ("PN", "Doe^Jane", "Doe^Jane^^^", True),
    "PN key without groups: alphabetic": ("PN", "YAMADA^TAROU", YAMADA, True),
    "PN key without groups: not ideographic": ("PN", "山田^太郎", YAMADA, False),
    "PN ideographic group only": ("PN", "=山田^太郎", YAMADA, True),
    "PN every given group must match": ("PN", "Yamada^Tarou=山田^花子", YAMADA, False),
    "PN two groups match": ("PN", "Yamada^Tarou=山田^太郎", YAMADA, True),
    # PS3.5 6.2 padding: trailing spaces never count, leading ones only in LT/ST/UT/UR.
    "LO query trailing space": ("LO", "ABC ", "ABC", True),
    "LO stored trailing spaces": ("LO", "ABC", "ABC  ", True),
    "LO leading space insignificant": ("LO", " ABC", "ABC", True),
    "CS padding": ("CS", "CT ", " CT", True),
    "ST leading space significant": ("ST", " note", "note", False),
    "ST trailing space insignificant": ("ST", "note ", "note", True),
    "UI trailing NUL padding": ("UI", "1.2.3\0", "1.2.3", True),
    # C.2.2.2.4 wild cards: "*" any run (also empty), "?" exactly one character.
    "* at end": ("LO", "Sm*", "Smith", True),
    "* at start": ("LO", "*ith", "Smith", True),
    "* in middle": ("LO", "S*h", "Smith", True),
    "* matches empty run": ("LO", "Sm*ith", "Smith", True),
    "* no match": ("LO", "S*x", "Smith", False),
    "several *": ("LO", "*m*t*", "Smith", True),
    "several * in order": ("LO", "*t*m*", "Smith", False),
    "? at start": ("LO", "?mith", "Smith", True),
    "? in middle": ("LO", "Sm?th", "Smith", True),
    "? at end": ("LO", "Smit?", "Smith", True),
    "? is exactly one char": ("LO", "Sm?th", "Smiith", False),
    "? needs a char": ("LO", "Smith?", "Smith", False),
    "*? together": ("SH", "A*?Z", "AZ", False),
    "*? together match": ("SH", "A*?Z", "ABZ", True),
    "wild cards case-sensitive on LO": ("LO", "sm*", "Smith", False),
    "wild cards ignore case on PN": ("PN", "DOE^J*", "Doe^Jane", True),
    "PN wildcard keeps caret literal": ("PN", "Doe^*", "Doe", False),
    "CS wildcard": ("CS", "C?", "CT", True),
    "AE wildcard": ("AE", "PACS*", "PACS_MAIN", True),
    "regex dot is literal": ("LO", "a.b*", "axbc", False),
    "regex dot matches dot": ("LO", "a.b*", "a.bc", True),
    "regex class is literal": ("LO", "a[bc]", "ab", False),
    "regex class text matches itself": ("LO", "a[bc]", "a[bc]", True),
    "regex specials literal": ("LO", "(x)+?", "(x)+y", True),
    "regex specials no match": ("LO", "(x)+?", "xxy", False),
    "LT wildcard across newline": ("LT", "line1*end", "line1\nline2 end", True),
    "many * without backtracking": ("LO", "*a" * 12 + "*b", "a" * 64, False),
    # No wild cards on DA, TM, UI or numbers: "*"/"?" are literal and match nothing.
    "DA * is literal": ("DA", "2024*", "20240101", False),
    "TM ? is literal": ("TM", "1?", "10", False),
    "UI * is literal": ("UI", "1.2.*", "1.2.3", False),
    "UI ? is literal": ("UI", "1.2.?", "1.2.3", False),
    "IS * is literal": ("IS", "1*", "10", False),
    # C.2.2.2.5 DA range matching, inclusive; legacy YYYY.MM.DD.
    "DA inside range": ("DA", "20240101-20240131", "20240115", True),
    "DA lower bound inclusive": ("DA", "20240101-20240131", "20240101", True),
    "DA upper bound inclusive": ("DA", "20240101-20240131", "20240131", True),
    "DA after range": ("DA", "20240101-20240131", "20240201", False),
    "DA before range": ("DA", "20240101-20240131", "20231231", False),
    "DA open lower": ("DA", "-20240131", "19990101", True),
    "DA open lower excludes later": ("DA", "-20240131", "20240201", False),
    "DA open upper": ("DA", "20240101-", "29991231", True),
    "DA open upper excludes earlier": ("DA", "20240101-", "20231231", False),
    "DA reversed range is empty": ("DA", "20240131-20240101", "20240115", False),
    "DA legacy dotted range": ("DA", "2024.01.01-2024.01.31", "20240115", True),
    "DA legacy dotted stored": ("DA", "20240115", "2024.01.15", True),
    "DA single value": ("DA", "20240115", "20240115", True),
    "DA single value other day": ("DA", "20240115", "20240116", False),
    "DA malformed key": ("DA", "2024011", "2024011", False),
    "DA invalid month": ("DA", "20241301", "20241301", False),
    # TM: missing parts are 0 in a lower bound, maxima in an upper bound and a single value.
    "TM -10 includes 10:59:59": ("TM", "-10", "105959", True),
    "TM -10 includes fraction": ("TM", "-10", "105959.999999", True),
    "TM -10 excludes 11:00": ("TM", "-10", "110000", False),
    "TM 10- includes 10:00": ("TM", "10-", "100000", True),
    "TM 10- excludes 09:59:59": ("TM", "10-", "095959.999999", False),
    "TM single hour covers the hour": ("TM", "10", "103000", True),
    "TM single hour excludes next": ("TM", "10", "110000", False),
    "TM single hour excludes previous": ("TM", "10", "095959", False),
    "TM HHMM upper bound": ("TM", "0800-1000", "100059", True),
    "TM HHMM upper bound excludes": ("TM", "0800-1000", "100100", False),
    "TM stored partial is its start": ("TM", "1030-1100", "10", False),
    "TM legacy colons": ("TM", "10:00-11:00", "10:30:00", True),
    "TM fraction upper bound": ("TM", "-103000.5", "103000.599999", True),
    "TM fraction upper excludes": ("TM", "-103000.5", "103000.6", False),
    "TM invalid hour": ("TM", "25", "25", False),
    # DT: YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX], offsets ignored.
    "DT range by day": ("DT", "20240101-20240102", "20240102235959", True),
    "DT range by day excludes next": ("DT", "20240101-20240102", "20240103", False),
    "DT stored offset ignored": ("DT", "20240101-20240102", "20240101000000.000000+0100", True),
    "DT range by month": ("DT", "202401-202402", "20240229", True),
    "DT range by month excludes": ("DT", "202401-202402", "20240301", False),
    "DT range by year": ("DT", "2024-2025", "20250601", True),
    "DT offsets compare as written": (
        "DT",
        "202401011200+0500-202401011300+0500",
        "202401011230-0800",
        True,
    ),
    "DT key with negative offset": ("DT", "2024-0500", "20240615", True),
    "DT negative offsets in range": ("DT", NEGATIVE_OFFSETS, "202401011230", True),
    "DT negative offsets keep upper bound": ("DT", NEGATIVE_OFFSETS, "202401011400", False),
    "DT single year": ("DT", "2024", "20241231235959", True),
    "DT single year excludes": ("DT", "2024", "20250101", False),
    # C.2.2.2.2 List of UID matching: exact match of any listed UID.
    "UID list first": ("UI", "1.2.3\\1.2.4", "1.2.3", True),
    "UID list second": ("UI", "1.2.3\\1.2.4", "1.2.4", True),
    "UID list other": ("UI", "1.2.3\\1.2.4", "1.2.5", False),
    "UID no prefix match": ("UI", "1.2", "1.2.3", False),
    "UID single": ("UI", "1.2.840.10008.1.1", "1.2.840.10008.1.1", True),
    # Numbers compare numerically (C.2.2.2.1).
    "IS equal": ("IS", "42", 42, True),
    "IS equal stored string": ("IS", " 7 ", "007", True),
    "IS not equal": ("IS", "42", 43, False),
    "IS malformed key": ("IS", "4x", "4x", False),
    "DS 1.50 equals 1.5": ("DS", "1.50", 1.5, True),
    "DS stored string": ("DS", "1.50", "1.5", True),
    "DS not equal": ("DS", "1.50", 1.51, False),
    "US equal": ("US", 512, 512, True),
    "US not equal": ("US", 512, 511, False),
    "US one-element list": ("US", [512], 512, True),
    "FD equal": ("FD", 0.5, 0.5, True),
    "UL from string key": ("UL", "7", 7, True),
    # C.2.2.3: a multi-valued stored attribute matches if any value does.
    "stored list any value": ("CS", "MR", ["CT", "MR"], True),
    "stored list no value": ("CS", "PT", ["CT", "MR"], False),
    "ImageType value": ("CS", "AXIAL", ["ORIGINAL", "PRIMARY", "AXIAL"], True),
    "ImageType wildcard": ("CS", "AX*", ["ORIGINAL", "PRIMARY", "AXIAL"], True),
    "stored numbers": ("US", 3, [1, 2, 3], True),
    "stored dates": ("DA", "20240101-20240131", ["20230101", "20240115"], True),
    # Ours: several values in a non-UI key mean any of them; literal in LT/ST/UT/UR.
    "backslash key is any-of": ("CS", "CT\\PT", ["MR", "PT"], True),
    "backslash key single stored": ("CS", "CT\\PT", "CT", True),
    "backslash key no value": ("CS", "CT\\PT", "MR", False),
    "backslash key LO": ("LO", "A\\B", "B", True),
    "backslash key numbers": ("US", [1, 2], 2, True),
    "backslash key DA ranges": ("DA", "20230101-20230131\\20240101-", "20240115", True),
    "backslash key DA ranges gap": ("DA", "20230101-20230131\\20240101-", "20230615", False),
    "backslash key DA values": ("DA", "20230101\\20240115", "20240115", True),
    "backslash literal in LT": ("LT", "a\\b", "a\\b", True),
    "backslash literal in LT not split": ("LT", "a\\b", "a", False),
    # An absent or empty stored value never matches a non-universal key.
    "absent LO": ("LO", "x", None, False),
    "empty LO": ("LO", "x", "", False),
    "padding-only LO": ("LO", "x", "   ", False),
    "empty list": ("CS", "CT", [], False),
    "absent in list": ("CS", "CT", [None, ""], False),
    "absent PN wildcard": ("PN", "*a*", None, False),
    "absent DA range": ("DA", "-20240101", None, False),
    "absent TM open range": ("TM", "-", None, False),
    "absent US": ("US", 1, None, False),
    "absent UID": ("UI", "1.2.3", None, False),
}


@pytest.mark.parametrize(("vr", "query", "stored", "expected"), CASES.values(), ids=CASES.keys())
def test_matches(vr: str, query: object, stored: object, expected: bool) -> None:
    matcher = compile_matcher(vr, query)
    assert matcher is not None
    assert matcher.matches(stored) is expected


UNIVERSAL = {
    "None": ("LO", None),
    "empty string": ("LO", ""),
    "empty list": ("US", []),
    "padding only": ("LO", "  "),
    "PN carets only": ("PN", "^^"),
    "star": ("PN", "*"),
    "stars": ("LO", "**"),
    "star on DA": ("DA", "*"),
    "star on UI": ("UI", "*"),
    "star on IS": ("IS", "*"),
    "star among values": ("CS", "CT\\*"),
    "empty values only": ("CS", "\\"),
    "SQ": ("SQ", [{"CodeValue": "X"}]),
    "OB": ("OB", "x"),
}


@pytest.mark.parametrize(("vr", "query"), UNIVERSAL.values(), ids=UNIVERSAL.keys())
def test_universal(vr: str, query: object) -> None:
    assert compile_matcher(vr, query) is None


@pytest.mark.parametrize("vr", ["XX", "lo", ""])
def test_unknown_vr(vr: str) -> None:
    with pytest.raises(ValueError, match="unknown VR"):
        compile_matcher(vr, "x")


@pytest.mark.parametrize("query", [b"CT", True, {"a": 1}])
def test_unsupported_query_type(query: object) -> None:
    with pytest.raises(TypeError):
        compile_matcher("CS", query)


def _matchers() -> dict[str, Matcher]:
    keys = {"PatientID": ("LO", "123"), "ModalitiesInStudy": ("CS", "CT"), "StudyDate": ("DA", "")}
    compiled = {k: compile_matcher(vr, q) for k, (vr, q) in keys.items()}
    return {k: m for k, m in compiled.items() if m is not None}


MATCH_ALL = {
    "all keys match": ({"PatientID": "123", "ModalitiesInStudy": ["CT", "MR"]}, True),
    "one key differs": ({"PatientID": "123", "ModalitiesInStudy": ["MR"]}, False),
    "other key differs": ({"PatientID": "124", "ModalitiesInStudy": ["CT"]}, False),
    "missing key is absent": ({"PatientID": "123"}, False),
    "universal key needs no value": ({"PatientID": "123", "ModalitiesInStudy": "CT"}, True),
}


@pytest.mark.parametrize(("record", "expected"), MATCH_ALL.values(), ids=MATCH_ALL.keys())
def test_match_all(record: dict[str, object], expected: bool) -> None:
    matchers = _matchers()
    assert set(matchers) == {"PatientID", "ModalitiesInStudy"}  # StudyDate "" is universal
    assert match_all(matchers, record) is expected


def test_match_all_without_keys_matches_everything() -> None:
    assert match_all({}, {}) is True
