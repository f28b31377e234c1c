"""Prompt alignment: how much history to write so that prompts end on a KV-cache block."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from model_store.recommend import aligned_history


@given(st.integers(1, 40), st.integers(0, 50), st.integers(1, 5), st.sampled_from([0, 16, 32, 64]))
def test_aligned_history_trims_little_and_only_to_cache_more(head, items, sid_len, block):
    n = aligned_history(head, items, sid_len, block)
    assert 0 <= n <= items
    if block == 0 or head + items * sid_len < block:
        assert n == items  # nothing to gain: keep every item
        return
    assert items - n < max(1, block // sid_len)  # drops fewer items than one block holds
    tail = (head + n * sid_len) % block
    for m in range(n + 1, items + 1):  # every longer choice leaves a longer uncached tail
        assert (head + m * sid_len) % block > tail


def test_the_usual_prompt_keeps_fourteen_of_twenty_items() -> None:
    # <bos> <user> <ctx> + 4 context words + <hist> = 8 tokens, 4 tokens per item
    assert aligned_history(8, 20, 4, 32) == 14  # 8 + 56 = 64 tokens: two whole blocks
    assert aligned_history(8, 20, 4, 0) == 20
