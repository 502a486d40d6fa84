"""A seeded CSV fuzzer: every malformed file loads correctly or fails with a DataError.

Each case writes a file into ``tmp_path`` from a valid base table plus one kind of
damage, and states what must happen: either the banks load with exactly the values
the file holds, or :class:`DataError` is raised with a message naming the file and
the problem (column and 1-based file row where there is one). Any other exception,
or a DataError that does not name the problem, fails the test.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flower_ext.data import CsvSpec, DataError, load_csv_banks

COLUMNS = ["ID", "region", "income", "debt", "y"]
NUMERIC = ["region", "income", "debt"]  # columns the model uses besides the label
NUM_ROWS = 36
VARIANTS = 3  # random placements per kind


@dataclass
class Case:
    """One file to write and what loading it must do."""

    kind: str
    rows: list[list[str]]  # data rows as text cells
    header: list[str] = field(default_factory=lambda: list(COLUMNS))
    spec: dict[str, object] = field(default_factory=dict)
    # Raw text to write instead of header + rows (structural damage).
    text: str | bytes | None = None
    # None: must load. Otherwise every string must appear in the DataError message.
    expect: list[str] | None = None

    def render(self) -> str | bytes:
        if self.text is not None:
            return self.text
        return "\n".join(",".join(r) for r in [self.header, *self.rows]) + "\n"


def base_rows(rng: random.Random) -> list[list[str]]:
    rows = []
    for i in range(NUM_ROWS):
        rows.append(
            [
                str(i),
                str(1 + i % 3),
                f"{rng.uniform(1, 9):.4f}",
                f"{rng.uniform(-2, 2):.3e}",
                str(rng.randint(0, 1)),
            ]
        )
    return rows


def _cell(rng: random.Random, rows, columns=NUMERIC) -> tuple[int, str]:
    """A random data row index and column to damage."""
    return rng.randrange(len(rows)), rng.choice(columns)


def bad_cell(value: str, problem: str, columns=NUMERIC) -> Callable[[random.Random], Case]:
    def make(rng: random.Random) -> Case:
        rows = base_rows(rng)
        i, column = _cell(rng, rows, columns)
        rows[i][COLUMNS.index(column)] = value
        return Case(f"cell {value!r}", rows, expect=[f"column '{column}'", f"row {i + 2}", problem])

    return make


def bad_label(value: str, problem: str) -> Callable[[random.Random], Case]:
    return bad_cell(value, problem, columns=["y"])


def header_case(header: list[str], problem: list[str], **spec) -> Callable[[random.Random], Case]:
    def make(rng: random.Random) -> Case:
        return Case(
            f"header {header}", base_rows(rng), header=list(header), spec=spec, expect=problem
        )

    return make


def spec_case(spec: dict[str, object], problem: list[str]) -> Callable[[random.Random], Case]:
    def make(rng: random.Random) -> Case:
        return Case(f"spec {spec}", base_rows(rng), spec=spec, expect=problem)

    return make


def raw_case(kind: str, build: Callable[[random.Random, str], str | bytes], problem: list[str]):
    def make(rng: random.Random) -> Case:
        rows = base_rows(rng)
        text = "\n".join(",".join(r) for r in [COLUMNS, *rows]) + "\n"
        return Case(kind, rows, text=build(rng, text), expect=problem)

    return make


def row_damage(kind: str, damage: Callable[[list[str]], list[str]], problem: str):
    def make(rng: random.Random) -> Case:
        rows = base_rows(rng)
        i = rng.randrange(len(rows))
        rows[i] = damage(rows[i])
        return Case(kind, rows, expect=[f"row {i + 2}", problem])

    return make


def ok_case(kind: str, edit: Callable[[random.Random, list[list[str]]], str | None] | None = None):
    """A file that must load; ``edit`` may change the cells (in place) or return raw text."""

    def make(rng: random.Random) -> Case:
        rows = base_rows(rng)
        text = edit(rng, rows) if edit is not None else None
        return Case(kind, rows, text=text, expect=None)

    return make


def _blank_lines_then_bad(rng: random.Random) -> Case:
    # Blank lines before the damaged row shift its file row: the message must count them.
    rows = base_rows(rng)
    i = rng.randrange(5, len(rows))
    rows[i][COLUMNS.index("income")] = "inf"
    lines = [",".join(COLUMNS)] + [",".join(r) for r in rows]
    lines.insert(3, "")
    lines.insert(3, "")
    return Case("blank lines then inf", rows, text="\n".join(lines) + "\n", expect=[f"row {i + 4}"])


def _multiline_quote_then_bad(rng: random.Random) -> Case:
    # A dropped free-text column with a value spanning two lines shifts later file rows.
    rows = base_rows(rng)
    i = rng.randrange(3, len(rows))
    rows[i][COLUMNS.index("debt")] = "north"
    header = [*COLUMNS, "note"]
    lines = [",".join(header)]
    for j, r in enumerate(rows):
        lines.append(",".join([*r, '"two\nlines"' if j == 1 else "x"]))
    return Case(
        "multi-line note then text",
        rows,
        text="\n".join(lines) + "\n",
        spec={"drop_columns": ("ID", "note")},
        expect=["column 'debt'", f"row {i + 3}", "'north' is not a number"],
    )


def _set(column: str, value: str, row: int = 0):
    def edit(rng: random.Random, rows: list[list[str]]) -> None:
        rows[row][COLUMNS.index(column)] = value

    return edit


def _crlf(rng: random.Random, rows: list[list[str]]) -> str:
    return "\r\n".join(",".join(r) for r in [COLUMNS, *rows]) + "\r\n"


def _bom(rng: random.Random, rows: list[list[str]]) -> str:
    return "\ufeff" + "\n".join(",".join(r) for r in [COLUMNS, *rows])


def _quoted_and_spaced(rng: random.Random, rows: list[list[str]]) -> str:
    lines = [",".join(COLUMNS)]
    for r in rows:
        lines.append(",".join([r[0], f' "{r[1]}"'.strip(), f" {r[2]} ", f'"{r[3]}"', r[4]]))
    return "\n".join(lines) + "\n"


def _dropped_text_column(rng: random.Random) -> Case:
    rows = base_rows(rng)
    lines = [",".join([*COLUMNS, "branch"])]
    lines += [",".join([*r, rng.choice(["north", "", "the, quoted", "1e400"])]) for r in rows]
    lines = [lines[0]] + [line.replace("the, quoted", '"the, quoted"') for line in lines[1:]]
    return Case(
        "dropped text column", rows, text="\n".join(lines), spec={"drop_columns": ("ID", "branch")}
    )


def _trailing_blank_lines(rng: random.Random, rows: list[list[str]]) -> str:
    return "\n".join(",".join(r) for r in [COLUMNS, *rows]) + "\n\n\n"


KINDS: list[Callable[[random.Random], Case]] = [
    # non-finite and out-of-range numbers
    bad_cell("inf", "infinite"),
    bad_cell("-inf", "infinite"),
    bad_cell("+inf", "infinite"),
    bad_cell("Infinity", "infinite"),
    bad_cell("-Infinity", "infinite"),
    bad_cell("1e39", "out of range"),
    bad_cell("-1e39", "out of range"),
    bad_cell("1e400", "out of range"),
    bad_cell("-1e400", "out of range"),
    bad_cell("3.5e38", "out of range"),
    # missing values
    bad_cell("", "empty value"),
    bad_cell("   ", "empty value"),
    bad_cell("nan", "missing value"),
    bad_cell("NaN", "missing value"),
    bad_cell("-nan", "missing value"),
    bad_cell("NA", "missing value"),
    bad_cell("NULL", "missing value"),
    bad_cell("None", "missing value"),
    bad_cell("?", "missing value"),
    # text in a numeric column
    bad_cell("north", "'north' is not a number"),
    bad_cell("0x1F", "is not a number"),
    bad_cell("True", "is not a number"),
    bad_cell('"1,000"', "'1,000' is not a number"),
    bad_cell("1.2.3", "is not a number"),
    bad_cell("12%", "is not a number"),
    bad_cell("€5", "is not a number"),
    bad_cell("x" * 500, "is not a number"),
    # the label
    bad_label("2", "must be 0 or 1"),
    bad_label("-1", "must be 0 or 1"),
    bad_label("0.5", "must be 0 or 1"),
    bad_label("yes", "is not a number"),
    bad_label("", "empty value"),
    bad_label("inf", "infinite"),
    bad_label("1e39", "out of range"),
    # the header
    header_case(["ID", "region", "income", "y", "y"], ["'y' appears twice", "row 1"]),
    header_case(["ID", "region", "y", "debt", "y"], ["'y' appears twice", "columns 3 and 5"]),
    header_case(["ID", "income", "income", "debt", "y"], ["'income' appears twice"]),
    header_case(["ID", "region", "income", "y ", "y"], ["'y' appears twice"]),
    header_case(["ID", "region", "", "debt", "y"], ["column 3 has an empty name"]),
    header_case(["ID", "region", " income", "debt", "y"], ["spaces around it"]),
    header_case(["ID", "region", "income", "debt", "label"], ["label column 'y' not found"]),
    header_case(["ID", "region", "income", "debt", "Y"], ["did you mean 'Y'"]),
    header_case(["id", "region", "income", "debt", "y"], ["columns to drop ['ID']"]),
    header_case(["ID", "area", "income", "debt", "y"], ["partition column 'region' not found"]),
    # the run config against the file
    spec_case({"drop_columns": ("ID", "y")}, ["label column 'y' is listed in csv-drop-columns"]),
    spec_case({"drop_columns": ("region",)}, ["partition column 'region'", "csv-drop-columns"]),
    spec_case(
        {"drop_columns": ("ID", "region", "income", "debt"), "split": "iid"},
        ["no feature columns left"],
    ),
    spec_case({"partition_column": "y"}, ["partition column is the label"]),
    spec_case({"partition_values": ("north",)}, ["'north' is not a number"]),
    spec_case({"partition_values": ("1", "9")}, ["region=9", "no rows"]),
    spec_case({"partition_values": ("nan",)}, ["not a finite number"]),
    spec_case({"split": "random"}, ["csv-split must be one of"]),
    spec_case({"split": "iid", "num_banks": 100}, ["into 100 banks"]),
    spec_case({"split": "dirichlet", "dirichlet_alpha": 0.0}, ["csv-dirichlet-alpha"]),
    spec_case({"partition_column": ""}, ["needs csv-partition-column"]),
    # structure
    raw_case("empty file", lambda rng, t: "", ["is empty"]),
    raw_case("blank file", lambda rng, t: "\n \n\t\n", ["is empty"]),
    raw_case("header only", lambda rng, t: t.splitlines()[0] + "\n", ["header but no rows"]),
    raw_case("header and blanks", lambda rng, t: t.splitlines()[0] + "\n\n\n", ["no rows"]),
    raw_case("single row", lambda rng, t: "\n".join(t.splitlines()[:2]), ["1 data row(s)"]),
    raw_case("three rows", lambda rng, t: "\n".join(t.splitlines()[:4]), ["3 data row(s)"]),
    raw_case("semicolons", lambda rng, t: t.replace(",", ";"), ["';'-separated", "row 1"]),
    raw_case("tabs", lambda rng, t: t.replace(",", "\t"), ["'\\t'-separated"]),
    raw_case("pipes", lambda rng, t: t.replace(",", "|"), ["'|'-separated"]),
    raw_case("first line blank", lambda rng, t: "\n" + t, ["row 1", "first line is empty"]),
    raw_case(
        "latin-1 byte",
        lambda rng, t: t.replace("ID", "ID\u00e9").encode("latin-1"),
        [
            "row 1",
            "not UTF-8",
        ],
    ),
    raw_case(
        "latin-1 in row 5",
        lambda rng, t: "\n".join(
            line + ("\u00e9" if n == 4 else "") for n, line in enumerate(t.splitlines())
        ).encode("latin-1"),
        ["row 5", "not UTF-8"],
    ),
    raw_case("NUL byte", lambda rng, t: t.replace("\n", "\n\x00", 3), ["NUL"]),
    raw_case("binary", lambda rng, t: bytes(rng.randrange(256) for _ in range(300)), ["CSV file"]),
    raw_case(
        "unterminated quote",
        lambda rng, t: "\n".join('"' + x if n == 6 else x for n, x in enumerate(t.split("\n"))),
        ["row 7", "closing quote"],
    ),
    row_damage("extra field", lambda r: [*r, "7"], "6 field(s) but the header has 5"),
    row_damage("missing field", lambda r: r[:-1], "4 field(s) but the header has 5"),
    row_damage("one field", lambda r: ["1"], "1 field(s)"),
    row_damage("whitespace row", lambda r: ["   "], "1 field(s)"),
    _blank_lines_then_bad,
    _multiline_quote_then_bad,
    # files that must load, with exactly their values
    ok_case("clean"),
    ok_case("crlf line endings", _crlf),
    ok_case("byte-order mark, no final newline", _bom),
    ok_case("quoted and spaced numbers", _quoted_and_spaced),
    ok_case("trailing blank lines", _trailing_blank_lines),
    ok_case("underflow to zero", _set("income", "1e-400", 3)),
    ok_case("largest float32", _set("debt", "3.4e38", 5)),
    ok_case("explicit plus sign", _set("income", "+2.5", 7)),
    ok_case("label as 1.0", _set("y", "1.0", 2)),
    _dropped_text_column,
]


def expected_frame(case: Case, spec: CsvSpec) -> pd.DataFrame:
    """What the file holds, as numbers, without the dropped columns."""
    frame = pd.DataFrame(case.rows, columns=COLUMNS)
    frame = frame.drop(columns=[c for c in spec.drop_columns if c in frame.columns])
    return frame.apply(lambda s: pd.to_numeric(s.str.strip().str.strip('"')))


def build_cases(seed: int) -> list[Case]:
    rng = random.Random(seed)
    return [make(rng) for make in KINDS for _ in range(VARIANTS)]


def test_enough_kinds_and_files():
    cases = build_cases(0)
    assert len(KINDS) >= 50
    assert len([c for c in cases if c.expect is not None]) >= 50


@pytest.mark.parametrize("seed", [0, 1])
def test_every_malformed_csv_loads_right_or_names_the_problem(tmp_path, seed):
    outcomes = {"loaded": 0, "refused": 0}
    for number, case in enumerate(build_cases(seed)):
        path = tmp_path / f"case-{number}.csv"
        content = case.render()
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")
        spec = replace(
            CsvSpec(str(path), "y", ("ID",), "natural", "region"),
            **case.spec,  # type: ignore[arg-type]
        )
        try:
            banks = load_csv_banks(spec)
        except DataError as err:
            message = str(err)
            assert case.expect is not None, f"{case.kind}: a valid file was refused: {message}"
            for part in case.expect:
                assert part in message, f"{case.kind}: {part!r} not in {message!r}"
            if not case.spec:  # a problem of the file itself: the file is named
                assert path.name in message, message
            assert len(message) < 600 and "\n" not in message, message
            outcomes["refused"] += 1
            continue
        except Exception as err:  # the point: nothing else may escape
            pytest.fail(f"{case.kind}: {type(err).__name__} escaped the loader: {err}")
        assert case.expect is None, f"{case.kind}: loaded, but should fail with {case.expect}"
        want = expected_frame(case, spec)
        order = list(want.columns)
        want = want.sort_values(order).reset_index(drop=True)
        loaded = pd.concat(banks.values()).sort_values(order).reset_index(drop=True)
        assert list(loaded.columns) == list(want.columns)
        assert loaded.shape == want.shape == (NUM_ROWS, len(want.columns))
        np.testing.assert_allclose(
            loaded.to_numpy(dtype=np.float64), want.to_numpy(dtype=np.float64), rtol=1e-12
        )
        assert all(len(f) >= 4 for f in banks.values())
        outcomes["loaded"] += 1
    assert outcomes["refused"] >= 50 and outcomes["loaded"] >= 10


def test_duplicated_label_never_reaches_the_features(tmp_path):
    # pandas alone would rename the second 'y' to 'y.1' and train on it.
    path = Path(tmp_path / "dup.csv")
    rows = base_rows(random.Random(3))
    path.write_text(
        "ID,region,income,debt,y,y\n" + "\n".join(",".join([*r, r[4]]) for r in rows) + "\n"
    )
    with pytest.raises(DataError, match=r"'y' appears twice \(columns 5 and 6\)"):
        load_csv_banks(CsvSpec(str(path), "y", ("ID",), "natural", "region"))
