"""render.py: `check`, `explain` and `jobs list` print exactly these lines, through rich.

The expected texts are what the CLI printed with click.echo before rendering moved here;
`inspect`'s tables are checked in test_report.py.
"""

from __future__ import annotations

import io

import pytest
from click.testing import CliRunner
from rich.console import Console

from gradpipe import render
from gradpipe.cli import cli


def printed(fn, *args, width: int = 40) -> str:
    """What fn(*args, console) prints on a narrow, non-terminal console."""
    out = io.StringIO()
    fn(*args, console=Console(file=out, width=width, highlight=False))
    return out.getvalue()


REPORT = {"checks": [None] * 96, "samples": 4, "parameters": 24,
          "worst": {"sample": 1143, "layer": 2, "param": "w", "j": 5, "k": 6,
                    "backprop": 0.00025124691849798015,
                    "finite_difference": 0.0002512468011417468,
                    "relative_error": 2.3354766191064153e-07, "abs_error": 1.17e-10,
                    "fd_error": 1e-13, "scale": 5e-4}}
CHECK_LINES = ("compared 96 per-sample derivatives (4 samples x 24 parameters)\n"
               "worst error 2.335e-07 of the gradient's norm beyond the finite difference's own "
               "error (difference 2.3e-07, error bound 2.0e-10) at layer 2 {where}, sample 1143: "
               "backprop "
               "0.0002512469185, finite difference 0.0002512468011\n")


@pytest.mark.parametrize(("ok", "tol", "last"), [(True, 1e-6, "ok"),
                                                 (False, 0.0, "FAILED: above --tol 0")])
def test_check_lines(ok: bool, tol: float, last: str) -> None:
    # 40 columns: the long line is not wrapped, and w[5, 6] is not taken for markup.
    expected = CHECK_LINES.format(where="w[5, 6]") + last + "\n"
    assert printed(render.render_check, REPORT, ok, tol) == expected


def test_check_names_a_bias_without_k() -> None:
    report = dict(REPORT, worst=dict(REPORT["worst"], param="b", k=None))
    assert printed(render.render_check, report, True, 1e-6) == \
        CHECK_LINES.format(where="b[5]") + "ok\n"


TERMS = [{"m": 0, "w": 0.1, "delta": 0.25, "product": 0.025},
         {"m": 1, "w": -0.2, "delta": 0.24, "product": -0.048},
         {"m": 2, "w": 0.30000000000000004, "delta": 0.23, "product": 0.06900000000000002},
         {"m": 3, "w": -1.0, "delta": 0.16, "product": -0.16},
         {"m": 4, "w": 1.1, "delta": 0.15, "product": 0.165}]
EXPLAIN = {"sample": 7, "layer": 1, "j": 3, "k": 10, "activation": "sigmoid",
           "loss": "squared", "dC_da_formula": "sum_m w[2][m, 3] * delta[2]_m",
           "dC_da_terms": TERMS, "dC_da": 0.4293481096, "da_dz": 0.2371281316,
           "z_j": 0.461855, "dz_dw": 0.4375, "grad": 0.0445421003298,
           "finite_difference": 0.0445421004525, "relative_error": 1.38e-09}


def test_explain_lines_show_the_first_terms_then_a_count(monkeypatch: pytest.MonkeyPatch) -> None:
    assert render.EXPLAIN_TERMS == 12  # what the CLI has always shown
    monkeypatch.setattr(render, "EXPLAIN_TERMS", 3)
    assert printed(render.render_explain, EXPLAIN) == """\
sample 7, w[1][3, 10], layer 1 activation sigmoid, loss squared
  dC_0/da_j = sum_m w[2][m, 3] * delta[2]_m = 0.4293481096
      m=0: w +0.1 * delta +0.25 = +0.025
      m=1: w -0.2 * delta +0.24 = -0.048
      m=2: w +0.3 * delta +0.23 = +0.069
      ... 2 more terms
  da_j/dz_j = g'(z_j) = 0.2371281316   (z_j = 0.461855)
  dz_j/dw   = a_k^(l-1) = 0.4375
  product   = 0.0445421003298
  finite difference = 0.0445421004525 (relative error 1.38e-09)
"""
    monkeypatch.setattr(render, "EXPLAIN_TERMS", 5)
    assert "more terms" not in printed(render.render_explain, EXPLAIN)


def test_explain_lines_with_a_note_for_a_bias() -> None:
    out = {"sample": 0, "layer": 2, "j": 1, "k": None, "activation": "softmax",
           "loss": "cross_entropy",
           "note": "softmax + cross_entropy: dC_0/dz_j = a_j - y_j is shown as dC_da, "
                   "with da_dz = 1",
           "da_dz": 1.0, "z_j": -1.13181, "dz_dw": 1.0, "grad": 0.0184937671733,
           "finite_difference": 0.0184937671843, "relative_error": 2.98e-10}
    assert printed(render.render_explain, out) == """\
sample 0, b[2][1], layer 2 activation softmax, loss cross_entropy
  softmax + cross_entropy: dC_0/dz_j = a_j - y_j is shown as dC_da, with da_dz = 1
  da_j/dz_j = g'(z_j) = 1   (z_j = -1.13181)
  dz_j/dw   = 1 (bias)
  product   = 0.0184937671733
  finite difference = 0.0184937671843 (relative error 2.98e-10)
"""


JOBS = [
    {"id": "raysubmit_aBcD1234EfGh5678", "status": "SUCCEEDED",
     "start_time": "2026-01-02T10:11:12", "entrypoint":
     "python -m gradpipe train --job ok.toml -- --hidden [64,32] --out /shared/runs/a-long-name"},
    {"id": None, "status": "PENDING", "start_time": None,
     "entrypoint": "python -m gradpipe grad --job bad.toml"},
]


def test_jobs_table_keeps_one_line_per_job_when_piped(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeJobs:
        url = "http://127.0.0.1:8265"

        def __init__(self, *args, **kwargs) -> None:
            pass

        def list(self) -> list[dict]:
            return JOBS

    monkeypatch.setattr("gradpipe.jobs.Jobs", FakeJobs)
    monkeypatch.delenv("COLUMNS", raising=False)
    result = CliRunner().invoke(cli, ["jobs", "list", "--address", "http://127.0.0.1:8265"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["ID", "STATUS", "START", "ENTRYPOINT"]
    first = lines[1].split(None, 4)
    assert first[:4] == ["raysubmit_aBcD1234EfGh5678", "SUCCEEDED", "2026-01-02", "10:11:12"]
    assert first[4].rstrip() == JOBS[0]["entrypoint"]  # whole, brackets and all
    assert lines[2].split() == ["PENDING", *JOBS[1]["entrypoint"].split()]
    # The columns line up: every row's status starts where the header's does.
    assert {line.index(s) for line, s in zip(lines, ["STATUS", "SUCCEEDED", "PENDING"],
                                             strict=True)} == {lines[0].index("STATUS")}


def test_jobs_table_on_a_narrow_terminal_wraps_only_the_entrypoint() -> None:
    lines = printed(render.render_jobs, JOBS, width=80).splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert lines[1].startswith("raysubmit_aBcD1234EfGh5678  SUCCEEDED  2026-01-02 10:11:12  ")
    second = next(i for i, line in enumerate(lines) if "PENDING" in line)
    assert second > 2  # the first entrypoint took several lines, in its own column
    assert not any(line[:60].strip() for line in lines[2:second])  # ID..START: row 1 only
    column = "".join(line[60:] for line in lines[1:second])
    assert column.replace(" ", "") == JOBS[0]["entrypoint"].replace(" ", "")


def test_no_jobs_prints_the_header() -> None:
    assert printed(render.render_jobs, []).split() == ["ID", "STATUS", "START", "ENTRYPOINT"]


def test_a_noise_scale_without_late_estimates_says_why() -> None:
    noise = {"latest": 1.5e5, "latest_step": 70, "window_steps": [270, 299],
             "median_last": None, "window_finite": 0, "suggested_batch": 1797,
             "samples_per_step": 1797, "layers": [], "explanation": "B_simple"}
    text = " ".join(printed(render.render, {"path": "r", "kind": "run", "noise_scale": noise},
                            width=100).split())
    assert "no estimate in the last 10%" in text and "capped at the dataset's rows" in text
