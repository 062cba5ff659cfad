"""cprec.bench.server's pieces that need no wrk: the results' file name and the request scripts."""
import pathlib

from cprec.bench.server import _lua, results_name


def test_results_name_keeps_the_runs_of_dtype_named_exports_apart():
    assert results_name("runs/c1m-serve/exports/int8") == "c1m-serve-int8"
    assert results_name("runs/other/exports/int8") == "other-int8"
    assert results_name("somewhere/float32") == "somewhere-float32"
    assert results_name("exports/cprec-demo") == "cprec-demo"


def test_request_scripts_hold_one_body_and_path_per_history(tmp_path):
    hist = [[1, 2, "a"], [3, 4, 5]]
    rec = _lua("recommend", hist, tmp_path / "r.lua").read_text()
    assert rec.count("/v1/recommend") == 2 and '{"history": [1, 2, "a"], "n": 20}' in rec
    ses = _lua("session", hist, tmp_path / "s.lua").read_text()
    assert ses.count("/v1/sessions/user-") == 2 and '{"items": ["a"], "n": 20}' in ses


def test_ab_variants_parse_and_bad_ones_are_refused():
    import pytest

    from cprec.bench.server_ab import _variant
    from cprec.errors import CprecError

    assert _variant('none=--length-buckets none') == ("none", ["--length-buckets", "none"])
    assert _variant("auto=") == ("auto", [])
    for bad in ("auto", "=--x"):
        with pytest.raises(CprecError, match="--variant"):
            _variant(bad)
