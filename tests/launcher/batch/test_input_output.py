"""Input validation line by line, and the result files' durability rules (torn tails, resume)."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_fleet.launcher.batch.input import (
    BatchRequest,
    InputError,
    PlainOptions,
    count_lines,
    read_input,
    validate_openai_line,
)
from vllm_fleet.launcher.batch.output import (
    IdSet,
    ResultWriter,
    drop_torn_tail,
    result_record,
    scan_results,
)

GOOD = {"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}


def line(**changes: object) -> str:
    return json.dumps({**GOOD, **changes})


def test_a_good_line_becomes_a_request() -> None:
    item = validate_openai_line(7, line())
    assert item == BatchRequest(7, "x", "/v1/completions", {"prompt": "hi"})


def test_each_kind_of_bad_line_names_its_line_number_and_the_fix() -> None:
    cases = {
        "{not json": "not JSON",
        "[1, 2]": "not a JSON object",
        line(custom_id=None): "custom_id is missing",
        line(custom_id=""): "custom_id is missing",
        line(url="/v1/chat/completion"): "not a known route",
        line(method="GET"): "use POST",
        line(body="text"): "body is missing",
        line(body={"prompt": "hi", "stream": True}): "body.stream is true",
    }
    for text, expected in cases.items():
        item = validate_openai_line(12, text)
        assert isinstance(item, InputError), text
        assert item.message.startswith("line 12: "), item.message
        assert expected in item.message, (text, item.message)


def test_plain_text_lines_become_chat_requests_with_line_ids(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("first\n\nsecond\n")
    plain = PlainOptions(model="m", system="be brief", max_tokens=5)
    items = list(read_input(path, plain))
    assert [i.custom_id for i in items if isinstance(i, BatchRequest)] == ["line-1", "line-3"]
    first = items[0]
    assert isinstance(first, BatchRequest)
    assert first.url == "/v1/chat/completions"
    assert first.body == {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
        ],
    }


def test_plain_jsonl_with_field_and_template(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"custom_id": "d1", "text": "abc", "lang": "fr"}\n{"other": 1}\n')
    by_field = list(read_input(path, PlainOptions(model="m", field="text")))
    assert isinstance(by_field[0], BatchRequest) and by_field[0].custom_id == "d1"
    assert isinstance(by_field[1], InputError) and "field 'text'" in by_field[1].message
    template = PlainOptions(model="m", template="Translate to {lang}: {text}")
    templated = list(read_input(path, template))
    assert isinstance(templated[0], BatchRequest)
    assert templated[0].body["messages"][-1]["content"] == "Translate to fr: abc"
    assert isinstance(templated[1], InputError) and "'lang'" in templated[1].message


def test_count_lines_counts_a_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a\nb\nc")
    assert count_lines(path) == 3
    path.write_bytes(b"a\nb\n")
    assert count_lines(path) == 2


def test_a_torn_last_line_is_dropped_and_whole_lines_kept(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    whole = json.dumps(result_record("a", status_code=200, body={})) + "\n"
    path.write_text(whole + '{"id": "batch_req_1", "custom_id": "b", "resp')
    assert drop_torn_tail(path)
    assert path.read_text() == whole
    assert not drop_torn_tail(path)
    path.write_text('{"torn from the start')
    assert drop_torn_tail(path)
    assert path.read_bytes() == b""


def test_scan_results_finds_finished_ids_and_reported_lines(tmp_path: Path) -> None:
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    writer = ResultWriter(out, errors)
    writer.write(result_record("ok-1", status_code=200, body={}))
    writer.write(result_record("bad-1", status_code=400, body={"error": "x"}))
    writer.write(result_record(None, error_code="invalid_request", message="line 4: x", line=4))
    writer.close()
    assert len(out.read_text().splitlines()) == 1  # failures went to the error file
    with errors.open("a") as handle:
        handle.write('{"custom_id": "torn')
    state = scan_results([out, errors])
    assert "ok-1" in state.finished and "bad-1" in state.finished
    assert "torn" not in state.finished
    assert state.reported_lines == {4}
    assert state.torn == 1 and state.lines == 3


def test_writer_syncs_once_the_interval_has_passed(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    writer = ResultWriter(out, sync_interval_s=1.0)
    writer.write(result_record("a", status_code=200, body={}))
    start = writer._last_sync
    assert not writer.due(start + 0.5)
    assert writer.due(start + 1.0)
    writer.maybe_sync(start + 1.0)
    assert out.read_text().count("\n") == 1  # on disk without close()
    assert not writer.due(start + 5.0)  # nothing new to sync
    writer.close()


def test_id_set_keeps_hashes_not_strings() -> None:
    ids = IdSet()
    for n in range(1000):
        ids.add(f"request-{n}")
    assert len(ids) == 1000
    assert "request-999" in ids and "request-1000" not in ids
    assert all(isinstance(h, int) and h < 2**60 for h in ids._hashes)
