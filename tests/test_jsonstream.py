import io
import json

import pytest

from storage.jsonstream import iter_json_array, iter_json_lines

RECORDS = [{"id": f"r{i}", "text": "中文字符 and ascii " * (i % 4), "n": [i, {"x": "]},{"}]}
           for i in range(50)]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_array_streams_in_any_chunk_size(chunk):
    data = json.dumps(RECORDS, ensure_ascii=False, indent=1).encode()
    items = list(iter_json_array(io.BytesIO(data), chunk=chunk))
    assert [it.value for it in items] == RECORDS
    assert [it.index for it in items] == list(range(50))
    assert all(it.error is None for it in items)
    assert json.loads(items[3].raw) == RECORDS[3]


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_malformed_element_costs_one_reject(chunk):
    good = [json.dumps(r) for r in RECORDS[:4]]
    body = "[" + ",".join(good[:2] + ['{"id": "bad" "x": [1, 2}]}'] + good[2:]) + "]"
    items = list(iter_json_array(io.BytesIO(body.encode()), chunk=chunk))
    assert len(items) == 5
    assert items[2].error.reason == "malformed_json"
    assert "bad" in items[2].raw
    assert [it.value for it in items if it.error is None] == RECORDS[:4]
    assert [it.index for it in items] == [0, 1, 2, 3, 4]


def test_truncated_file_rejects_the_cut_element_only():
    body = json.dumps(RECORDS[:3])
    cut = body[: body.rindex("\"id\"") + 10]
    items = list(iter_json_array(io.BytesIO(cut.encode()), chunk=16))
    assert [it.value for it in items[:2]] == RECORDS[:2]
    assert len(items) == 3 and items[2].error.reason == "malformed_json"


def test_invalid_utf8_is_per_element():
    body = b'[{"id": "a"}, {"id": "caf\xe9"}, {"id": "\xe4\xb8\xad"}]'
    items = list(iter_json_array(io.BytesIO(body), chunk=4))
    assert items[0].value == {"id": "a"}
    assert items[1].error.reason == "invalid_utf8" and "0xe9" in items[1].error.detail
    assert items[2].value == {"id": "中"}


def test_not_an_array_is_one_clear_reject():
    items = list(iter_json_array(io.BytesIO(b'{"id": 1}\n{"id": 2}\n')))
    assert len(items) == 1 and items[0].error.reason == "malformed_json"
    assert "jsonl" in items[0].error.detail


def test_empty_array_bom_and_scalars():
    assert list(iter_json_array(io.BytesIO(b"\xef\xbb\xbf [ ] "))) == []
    items = list(iter_json_array(io.BytesIO(b"[12345, 678]"), chunk=2))
    assert [it.value for it in items] == [12345, 678]


def test_json_lines_reports_each_bad_line():
    data = b'{"a": 1}\n\n{"a": 2,\n{"a": "\xff"}\n  \n{"a": 3}\n'
    items = list(iter_json_lines(io.BytesIO(data)))
    assert [it.index for it in items] == [0, 1, 2, 3]
    assert [it.where for it in items] == ["line 1", "line 3", "line 4", "line 6"]
    assert items[0].value == {"a": 1} and items[3].value == {"a": 3}
    assert items[1].error.reason == "malformed_json"
    assert items[2].error.reason == "invalid_utf8"
