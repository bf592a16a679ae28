"""DPO data faults: degenerate pairs counted, reported and refused above a threshold; the report counts records;
a file that is not UTF-8 names its line."""
import json

import pytest

from recipes.posttrain import data, fallback
from recipes.posttrain.data import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return fallback.char_tokenizer()


def _pair(i, chosen="good", rejected="bad"):
    return {"prompt": f"q{i} ", "chosen": chosen, "rejected": rejected, "_line": i + 1}


def test_degenerate_pairs_are_counted_and_reported(tokenizer):
    records = [_pair(i) for i in range(40)] + [_pair(40, "same", "same")]
    out = data.Tokeniser(tokenizer, max_length=64).dpo(records, "p.jsonl")
    assert out.degenerate == ["p.jsonl line 41"] and len(out.examples) == 41
    assert out.report() == ("p.jsonl: 41 of 41 dpo records used (0 truncated, 0 skipped as longer than max length, "
                            "1 degenerate pairs with chosen == rejected, which train at loss ln 2 with zero gradient)")


def test_too_many_degenerate_pairs_are_refused_naming_lines_and_flag(tokenizer):
    records = [_pair(i) for i in range(8)] + [_pair(8 + i, "same", "same") for i in range(2)]
    with pytest.raises(DataError, match=r"p\.jsonl: 2 of 10 DPO pairs have chosen == rejected .*e\.g\. p\.jsonl line 9, "
                                        r"p\.jsonl line 10\).*raise --max-degenerate-pairs \(now 0\.05\)"):
        data.Tokeniser(tokenizer, max_length=64).dpo(records, "p.jsonl")
    assert len(data.Tokeniser(tokenizer, max_length=64, max_degenerate=0.2).dpo(records, "p.jsonl").degenerate) == 2


def test_pairs_equal_only_after_truncation_are_degenerate_too(tokenizer):
    # the sides differ only past the length budget: what the model sees is identical
    records = [_pair(0, "a" * 40 + "x", "a" * 40 + "y")]
    out = data.Tokeniser(tokenizer, max_length=24, max_degenerate=1.0).dpo(records, "p.jsonl")
    assert out.degenerate == ["p.jsonl line 1"]


def test_dpo_report_counts_records_not_sides(tokenizer):
    long = "z" * 100
    records = [_pair(0, long, long + "!"), _pair(1), _pair(2, "ok", long)]
    out = data.Tokeniser(tokenizer, max_length=40, max_degenerate=1.0).dpo(records, "p.jsonl")
    assert (out.total, len(out.examples), out.truncated) == (3, 3, 2)  # both sides of record 1 cut: counted once
    assert out.report().startswith("p.jsonl: 3 of 3 dpo records used (2 truncated, 0 skipped")


def test_non_utf8_data_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps({"instruction": "a", "output": "b"}), '{"instruction": "caf\xe9", "output": "x"}']
    path.write_bytes(lines[0].encode() + b"\n" + lines[1].encode("latin-1") + b"\n")
    with pytest.raises(DataError) as info:
        data.load_records(str(path), "sft")
    assert str(info.value) == (f"{path} line 2: not UTF-8 (byte 0xe9 at column 21); re-encode the file as UTF-8, "
                               f"e.g. iconv -f latin1 -t utf-8")
