"""Per-request records stay bounded whatever the request: text is clipped (with prompt logging
on, a 4 MB prompt would otherwise sit in the /debug ring 256 times), token times are capped."""

from serving.records import MAX_TEXT_CHARS, MAX_TOKEN_TIMES, RecentRequests, RequestRecord


def test_a_record_keeps_at_most_4096_characters_of_each_text():
    record = RequestRecord("r1", "/v1/completions")
    record.set_prompt_text("p" * 10_000)
    record.add_completion_text(["a" * 3000])
    record.add_completion_text(["b" * 3000, "c" * 10])
    for _ in range(MAX_TOKEN_TIMES + 100):
        record.note_tokens(1)
    assert record.prompt_text == "p" * MAX_TEXT_CHARS + "... [5904 more characters]"
    assert record.completion_text == "a" * 3000 + "b" * 1096 + "... [1914 more characters]"
    assert sum(map(len, record.completion_parts)) == MAX_TEXT_CHARS
    assert len(record.token_times) == MAX_TOKEN_TIMES and record.completion_tokens == MAX_TOKEN_TIMES + 100


def test_the_recent_ring_holds_its_capacity_with_clipped_text():
    ring = RecentRequests(3, with_text=True)
    for i in range(10):
        record = RequestRecord(f"r{i}", "/v1/completions")
        record.set_prompt_text("x" * 100_000)
        record.finish(200)
        ring.add(record)
    assert [t.request_id for t in ring.items()] == ["r7", "r8", "r9"]
    assert {len(t.prompt) for t in ring.items()} == {MAX_TEXT_CHARS + len("... [95904 more characters]")}
