"""docs/deviations.md stays true to the code and the configs.

The ledger has three machine-read parts:

* the main table (header ``| track | method | setting | paper (value; where stated) | paper profile | toy |
  toy source |``): every registered method of both tracks must appear in its ``method`` column (a backticked
  name; ``*all*`` rows speak for every method of the track);
* the "Defaults" section: one line ``- <track>/<method>: field=value, ...`` per registered method, listing every
  field of its ``Settings`` dataclass with the default as a Python literal (``repr``);
* checked claims in the ``paper profile`` and ``toy`` columns: a backticked Python literal followed by
  ``(default)``, ``(paper.yaml)``, ``(toy_full.yaml)``, ``(toy_cls.yaml)`` or ``(config.yaml)``, in a row whose
  ``setting`` cell is one backticked name. A Settings field is resolved the way the workflow does it
  (``method_settings`` then ``benchmark_settings`` for t2i, ``cls_train`` then ``cls_method_settings`` for cls,
  each profile layered on config/config.yaml); any other name is a dotted config key. ``(default)`` means "the
  column's profile does not set it and the Settings default is this" (paper profile: paper.yaml; toy:
  toy_full.yaml for t2i, toy_cls.yaml for cls); a file marker means "that profile sets it to this".

No model is built; the checks read dataclasses and YAML only. ``python tests/test_deviations.py`` prints the
Defaults section the code implies (to paste after changing a default).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import math
import re
from pathlib import Path

import yaml

from continual_bench.methods.base import build_settings
from continual_bench.methods.registry import get_method, list_methods

REPO = Path(__file__).resolve().parent.parent
LEDGER = REPO / "docs" / "deviations.md"
CONFIG = REPO / "config"
HEADER = ["track", "method", "setting", "paper (value; where stated)", "paper profile", "toy", "toy source"]
TRACKS = ("t2i", "cls")
MARKERS = ("default", "paper.yaml", "config.yaml", "toy_full.yaml", "toy_cls.yaml")
CLAIM = re.compile(r"`([^`]+)`\s*\((" + "|".join(re.escape(m) for m in MARKERS) + r")\b")
COLUMN_PROFILE = {"paper profile": {"t2i": "paper.yaml", "cls": "paper.yaml"},
                  "toy": {"t2i": "toy_full.yaml", "cls": "toy_cls.yaml"}}
DEFAULT_LINE = re.compile(r"^- (\w+)/(\w+): (.*)$")
ITEM = re.compile(r"""\s*(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^,'"]*?)\s*(?:,|$)""")
NO_DEFAULT = object()


# ------------------------------------------------------------------------------------------- reading the ledger
@dataclasses.dataclass
class Row:
    line: int
    cells: list[str]

    def __getitem__(self, column: str) -> str:
        return self.cells[HEADER.index(column)]

    @property
    def track(self) -> str:
        return self.cells[0]

    @property
    def methods(self) -> list[str]:
        """The backticked method names of the ``method`` cell (empty for an ``*all*`` row)."""
        return re.findall(r"`([^`]+)`", self.cells[1])

    def where(self) -> str:
        return f"docs/deviations.md line {self.line} ({self.track} / {self.cells[1]} / {self.cells[2]})"


def split_cells(line: str) -> list[str]:
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def parse_table(text: str) -> tuple[list[Row], list[str]]:
    """The main table's rows (after the header and its separator) and any format problems."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("|") and split_cells(ln) == HEADER), None)
    if start is None:
        return [], [f"docs/deviations.md: no table with the header {' | '.join(HEADER)}"]
    rows, problems = [], []
    for i in range(start + 2, len(lines)):
        ln = lines[i]
        if not ln.lstrip().startswith("|"):
            break
        cells = split_cells(ln)
        if len(cells) != len(HEADER):
            problems.append(f"docs/deviations.md line {i + 1}: {len(cells)} cells, expected {len(HEADER)}: {ln!r}")
            continue
        row = Row(i + 1, cells)
        if row.track not in TRACKS:
            problems.append(f"{row.where()}: track must be one of {TRACKS}, got {row.track!r}")
        if not row.methods and "all" not in row.cells[1]:
            problems.append(f"{row.where()}: the method cell needs a backticked method name or *all*")
        rows.append(row)
    return rows, problems


def parse_items(body: str) -> dict[str, str]:
    """``a=1, b='x,y'`` -> {"a": "1", "b": "'x,y'"} (values unparsed); ValueError on anything else."""
    items, pos = {}, 0
    body = body.strip()
    while pos < len(body):
        m = ITEM.match(body, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read {body[pos:]!r}")
        if m.group(1) in items:
            raise ValueError(f"field {m.group(1)} is listed twice")
        items[m.group(1)] = m.group(2).strip()
        pos = m.end()
    return items


def parse_defaults(text: str) -> tuple[dict[tuple[str, str], dict[str, str]], list[str]]:
    """The "Defaults" section: (track, method) -> {field: literal text}, and format problems."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(r"^##\s+Defaults\b", ln)), None)
    if start is None:
        return {}, ["docs/deviations.md: no '## Defaults' section"]
    out, problems = {}, []
    for i in range(start + 1, len(lines)):
        ln = lines[i]
        if ln.startswith("## "):
            break
        if not ln.startswith("- "):
            continue
        m = DEFAULT_LINE.match(ln)
        if not m:
            problems.append(f"docs/deviations.md line {i + 1}: not of the form '- <track>/<method>: field=value, ...'")
            continue
        key = (m.group(1), m.group(2))
        if key in out:
            problems.append(f"docs/deviations.md line {i + 1}: {key[0]}/{key[1]} has a second Defaults line")
            continue
        try:
            out[key] = parse_items(m.group(3))
        except ValueError as e:
            problems.append(f"docs/deviations.md line {i + 1} ({key[0]}/{key[1]}): {e}")
    return out, problems


# ------------------------------------------------------------------------------------------- the code's side
@functools.lru_cache(maxsize=None)
def registered_settings() -> dict[tuple[str, str], type]:
    return {(m["track"], m["name"]): get_method(m["track"], m["name"]).Settings for m in list_methods()}


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return NO_DEFAULT


def defaults_line(track: str, name: str, settings: type) -> str:
    return f"- {track}/{name}: " + ", ".join(f"{f.name}={field_default(f)!r}" for f in dataclasses.fields(settings))


def same(a, b, strict: bool = False) -> bool:
    """Equal values of the same kind: a bool is not a number; an int literal may stand for a float unless
    ``strict`` (the Defaults lines are ``repr``, so there ``4`` and ``4.0`` differ)."""
    if strict or isinstance(a, (bool, str)) or isinstance(b, (bool, str)):
        if type(a) is not type(b):
            return False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) if (a or b) else a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, strict) for x, y in zip(a, b))
    return a == b


def deep_merge(base: dict, over: dict) -> dict:
    """Snakemake's layering of a --configfile on config/config.yaml: mappings merged key by key."""
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@functools.lru_cache(maxsize=None)
def profiles() -> dict[str, dict]:
    def read(name: str) -> dict:
        return yaml.safe_load((CONFIG / name).read_text()) or {}

    base = read("config.yaml")
    layered = {n: deep_merge(base, read(n)) for n in ("paper.yaml", "toy_full.yaml", "toy_cls.yaml")}
    return {"config.yaml": base, **layered}


def override_sets(profile: dict, track: str, name: str) -> list[dict]:
    """The settings the workflow passes to ``name``: one dict per t2i benchmark (benchmark_settings win over
    method_settings, workflow/rules/common.smk), one for cls (cls_method_settings win over cls_train)."""
    if track == "t2i":
        ms = (profile.get("method_settings") or {}).get(name) or {}
        bs = profile.get("benchmark_settings") or {}
        return [{**ms, **(bs.get(b) or {})} for b in (profile.get("benchmarks") or [None])]
    return [{**(profile.get("cls_train") or {}), **((profile.get("cls_method_settings") or {}).get(name) or {})}]


# ------------------------------------------------------------------------------------------- the checks
def coverage_problems(rows: list[Row], defaults: dict, registered) -> list[str]:
    registered = set(registered)
    in_table = {(r.track, n) for r in rows for n in r.methods}
    problems = [f"{t}/{n} is registered but has no row in the main table of docs/deviations.md"
                for t, n in sorted(registered - in_table)]
    problems += [f"{t}/{n} is registered but has no line in the Defaults section of docs/deviations.md"
                 for t, n in sorted(registered - set(defaults))]
    problems += [f"{r.where()}: method {n!r} is not registered for track {r.track!r}"
                 for r in rows for n in r.methods if (r.track, n) not in registered]
    problems += [f"Defaults line {t}/{n}: no such registered method" for t, n in sorted(set(defaults) - registered)]
    return problems


def defaults_problems(defaults: dict[tuple[str, str], dict[str, str]],
                      settings: dict[tuple[str, str], type]) -> list[str]:
    problems = []
    for (track, name), items in sorted(defaults.items()):
        s = settings.get((track, name))
        if s is None:
            continue  # coverage_problems names it
        fields = {f.name: f for f in dataclasses.fields(s)}
        mine = []
        for fname in items:
            if fname not in fields:
                mine.append(f"{track}/{name}: the ledger lists field {fname!r} (= {items[fname]}), which "
                            f"{s.__name__} no longer has")
        for fname, f in fields.items():
            code = field_default(f)
            if fname not in items:
                mine.append(f"{track}/{name}: field {fname!r} (code default {code!r}) is missing from its "
                            f"Defaults line")
                continue
            try:
                ledger = ast.literal_eval(items[fname])
            except (ValueError, SyntaxError):
                mine.append(f"{track}/{name}.{fname}: ledger value {items[fname]!r} is not a Python literal")
                continue
            if code is NO_DEFAULT or not same(ledger, code, strict=True):
                mine.append(f"{track}/{name}.{fname}: ledger says {items[fname]}, code default is "
                            f"{'(none)' if code is NO_DEFAULT else repr(code)}")
        if mine:
            problems += mine + [f"  expected Defaults line: {defaults_line(track, name, s)}"]
    return problems


def _lookup(profile: dict, dotted: str):
    cur = profile
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return NO_DEFAULT
        cur = cur[part]
    return cur


def _row_methods(row: Row, profile: dict, settings: dict) -> list[tuple[str, str]]:
    if row.methods:
        return [(row.track, n) for n in row.methods if (row.track, n) in settings]
    listed = profile.get("methods" if row.track == "t2i" else "cls_methods") or []
    return [(row.track, n) for n in listed if (row.track, n) in settings]


def claim_problems(rows: list[Row], settings: dict[tuple[str, str], type], profs: dict[str, dict]) -> list[str]:
    problems = []
    for row in rows:
        for column in COLUMN_PROFILE:
            for literal, marker in CLAIM.findall(row[column]):
                problems += _check_claim(row, column, literal, marker, settings, profs)
    return problems


def _check_claim(row, column, literal, marker, settings, profs) -> list[str]:
    where = f"{row.where()}, column '{column}', claim `{literal}` ({marker})"
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError):
        return [f"{where}: `{literal}` is not a Python literal"]
    m = re.fullmatch(r"`([\w.]+)`", row["setting"].strip())
    if not m:
        return [f"{where}: a checked claim needs a setting cell of one backticked name"]
    key = m.group(1)
    pname = COLUMN_PROFILE[column][row.track] if marker == "default" else marker
    prof = profs[pname]
    methods = _row_methods(row, prof, settings)
    has = [k for k in methods if key in {f.name for f in dataclasses.fields(settings[k])}]
    if has and len(has) != len(methods):
        return [f"{where}: {key!r} is a Settings field of {has} but not of {sorted(set(methods) - set(has))}"]
    if not has:  # a config key
        if marker == "default":
            names = [f"{t}/{n}" for t, n in methods]
            return [f"{where}: (default) is for Settings fields; {key!r} is not a field of {names}"]
        actual = _lookup(prof, key)
        if actual is NO_DEFAULT:
            return [f"{where}: {pname} (layered on config.yaml) has no key {key!r}"]
        return [] if same(value, actual) else [f"{where}: ledger says {literal}, {pname} has {key} = {actual!r}"]
    problems = []
    for track, name in methods:
        s = settings[(track, name)]
        variants = override_sets(prof, track, name)
        setters = [v for v in variants if key in v]
        if marker == "default":
            if setters:
                problems.append(f"{where}: {track}/{name}: {pname} sets {key} = {setters[0][key]!r}; the ledger says "
                                f"the Settings default applies")
                continue
            code = field_default({f.name: f for f in dataclasses.fields(s)}[key])
            if not same(value, code):
                problems.append(f"{where}: {track}/{name}.{key}: ledger says {literal}, code default is {code!r}")
            continue
        if len(setters) != len(variants):
            problems.append(f"{where}: {track}/{name}: {pname} does not set {key} (write (default) if the "
                            f"Settings default applies)")
            continue
        for v in variants:
            try:
                actual = getattr(build_settings(s, v, f"{pname}: {track}/{name}"), key)
            except Exception as e:  # an unknown key or a bad type in the config: a finding in itself
                problems.append(f"{where}: {track}/{name}: {pname}'s settings do not build: {e}")
                break
            if not same(value, actual):
                problems.append(f"{where}: {track}/{name}.{key}: ledger says {literal}, {pname} gives {actual!r}")
                break
    return problems


# ------------------------------------------------------------------------------------------- tests on the ledger
def _ledger() -> str:
    return LEDGER.read_text(encoding="utf-8")


def test_ledger_parses():
    rows, p1 = parse_table(_ledger())
    _, p2 = parse_defaults(_ledger())
    assert not p1 + p2, "\n".join(p1 + p2)
    assert rows, "docs/deviations.md: the main table has no rows"


def test_every_registered_method_is_in_the_table_and_the_defaults():
    rows, _ = parse_table(_ledger())
    defaults, _ = parse_defaults(_ledger())
    problems = coverage_problems(rows, defaults, registered_settings())
    assert not problems, "\n".join(problems)


def test_defaults_section_matches_the_settings_dataclasses():
    defaults, _ = parse_defaults(_ledger())
    problems = defaults_problems(defaults, registered_settings())
    assert not problems, "docs/deviations.md disagrees with the code:\n" + "\n".join(problems)


def test_checked_claims_match_the_code_and_the_configs():
    rows, _ = parse_table(_ledger())
    problems = claim_problems(rows, registered_settings(), profiles())
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------- the checker can fail
def _real_defaults():
    defaults, problems = parse_defaults(_ledger())
    assert not problems
    return defaults


def test_checker_reports_a_changed_default():
    real = registered_settings()[("t2i", "c_lora")]
    changed = dataclasses.make_dataclass("CLoRASettings", [("lam", float, dataclasses.field(default=123.0))],
                                         bases=(real,))
    settings = {**registered_settings(), ("t2i", "c_lora"): changed}
    problems = defaults_problems(_real_defaults(), settings)
    named = [p for p in problems if p.startswith("t2i/c_lora.lam:")]
    assert len(named) == 1, problems
    assert "ledger says 10.0" in named[0] and "code default is 123.0" in named[0], named[0]
    assert any("expected Defaults line: - t2i/c_lora:" in p and "lam=123.0" in p for p in problems)
    # a changed type with an equal value is a change too (rank 4 -> 4.0)
    as_float = dataclasses.make_dataclass("S", [("rank", float, dataclasses.field(default=4.0))], bases=(real,))
    problems = defaults_problems(_real_defaults(), {("t2i", "c_lora"): as_float})
    assert any(p.startswith("t2i/c_lora.rank:") and "ledger says 4, code default is 4.0" in p
               for p in problems), problems


def test_checker_reports_removed_and_unlisted_fields():
    defaults = _real_defaults()
    key = ("cls", "coda_p")
    stale = {**defaults, key: {**defaults[key], "old_knob": "3"}}
    problems = defaults_problems(stale, registered_settings())
    assert any("'old_knob'" in p and "no longer has" in p for p in problems), problems
    short = {**defaults, key: {k: v for k, v in defaults[key].items() if k != "pool"}}
    problems = defaults_problems(short, registered_settings())
    assert any("cls/coda_p: field 'pool'" in p and "missing" in p for p in problems), problems


def test_checker_reports_a_missing_method():
    rows, _ = parse_table(_ledger())
    registered = set(registered_settings()) | {("t2i", "brand_new_method")}
    problems = coverage_problems(rows, _real_defaults(), registered)
    assert any("t2i/brand_new_method" in p and "main table" in p for p in problems), problems
    assert any("t2i/brand_new_method" in p and "Defaults" in p for p in problems), problems
    without = [r for r in rows if "dreambooth" not in r.methods]
    assert any("t2i/dreambooth" in p for p in coverage_problems(without, _real_defaults(), registered_settings()))


def test_checker_reports_a_wrong_claim():
    def row(setting, profile_cell, toy_cell, method="`c_lora`", track="t2i"):
        return Row(0, [track, method, setting, "", profile_cell, toy_cell, ""])

    settings, profs = registered_settings(), profiles()
    assert not claim_problems([row("`lam`", "`1e8` (paper.yaml)", "`10.0` (toy_full.yaml)")], settings, profs)
    assert claim_problems([row("`lam`", "`1e7` (paper.yaml)", "")], settings, profs)  # wrong value
    assert claim_problems([row("`lam`", "", "`10.0` (default)")], settings, profs)  # toy_full sets it
    assert claim_problems([row("`lam`", "", "`1e4` (default)", track="cls")], settings, profs) == []
    assert claim_problems([row("`lam`", "`1e4` (paper.yaml)", "", track="cls")], settings, profs)  # paper sets 1e8
    assert claim_problems([row("`evaluation.guidance`", "`5.0` (paper.yaml)", "", method="*all*")], settings, profs)
    assert claim_problems([row("lam and rank", "`1e8` (paper.yaml)", "")], settings, profs)  # unclear setting


if __name__ == "__main__":  # print the Defaults section the code implies
    for (t, n), s in sorted(registered_settings().items()):
        print(defaults_line(t, n, s))
