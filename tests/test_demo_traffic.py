"""The demo's realistic traffic (ctd/testing/traffic.py, issue #24 item 7): few unsafe conversations,
distinct texts of realistic length, groups that are the conversations' topics, and a shifted night
whose extra unsafe rows are phrased as everyday questions."""

import json

import numpy as np
from scipy import stats

from ctd.testing import traffic as tr
from ctd.testing.demo import generate_corpus, generate_night


def rows_of(uri: str) -> list[dict]:
    out = []
    for line in open(uri, "rb"):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and r.get("label") in (0, 1) and isinstance(r.get("text", ""), str) and "id" in r:
            if isinstance(r.get("messages", []), list) and ("text" in r or "messages" in r):
                out.append(r)
    return out


def text_of(r: dict) -> str:
    return r["text"] if "text" in r else " ".join(m["content"] for m in r["messages"])


def test_realistic_traffic_has_few_unsafe_rows_distinct_texts_and_topic_groups(tmp_path):
    uris = generate_corpus(str(tmp_path), seed=5, traffic="realistic")
    audit = rows_of(uris["audit"])
    texts = [text_of(r) for r in audit]
    assert len(set(texts)) >= 0.9 * len(texts)
    # unsafe prevalence: text-unsafe at 4%, 10% of those labelled safe, 0.5% of safe ones unsafe
    p = tr.PREVALENCE * (1 - tr.NOISE[1]) + (1 - tr.PREVALENCE) * tr.NOISE[0]
    k = sum(r["label"] for r in audit)
    assert stats.binomtest(k, len(audit), p).pvalue > 0.001, (k, len(audit))
    assert 0.02 < k / len(audit) < 0.08
    words = np.array([len(t.split()) for t in texts])
    assert 25 <= np.median(words) <= 80 and words.max() < 300
    assert 0.3 < np.mean(["messages" in r for r in audit]) < 0.6  # multi-turn chats and single prompts
    assert {r["group"] for r in audit} == set(tr.GROUPS)
    for r in audit:  # every sentence is from the row's topic: no other topic's situation appears in it
        others = [s for t, by in tr.TOPICS.items() if t != r["group"] for y in (0, 1) for s in by[y][0]]
        assert not any(s.split("{")[0][:25] in text_of(r) for s in others if len(s.split("{")[0]) >= 25), r
    train = rows_of(uris["train"])
    assert {r["group"] for r in train} == {"everyday", "medical", "finance"}
    assert 0.25 < np.mean([r["label"] for r in train]) < 0.45  # labelled training sets are enriched


def test_the_shifted_night_adds_unsafe_everyday_questions(tmp_path):
    calm = rows_of(generate_night(str(tmp_path / "a.jsonl"), "2026-12-01", seed=1, traffic="realistic"))
    shifted = rows_of(generate_night(str(tmp_path / "b.jsonl"), "2026-12-02", seed=1, campaign=0.1, traffic="realistic"))
    assert len(calm) == len(shifted)
    campaign = [r for r in shifted if "-c" in r["id"]]
    assert len(campaign) == 120 and np.mean([r["label"] for r in campaign]) > 0.8
    assert np.mean([r["label"] for r in shifted]) > np.mean([r["label"] for r in calm]) + 0.05
    alarmed = sum("!!!" in text_of(r) or "URGENT" in text_of(r) for r in campaign)
    assert alarmed == 0  # told calmly, as everyday questions
