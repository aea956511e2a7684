"""Experts: models that give P(unsafe | x) for the rows the policy delegates.

* :mod:`.classifier` -- a transformers sequence classifier (as guard models often are), and the
  builder that fine-tunes one from an encoder (the strong expert of the replication benchmark and
  the embedded demo).
* :mod:`.zero_shot` -- a zero-shot judge: sentence-embedding similarity to label descriptions (the
  weak expert of the replication benchmark).
* :mod:`.judge` -- an LLM judge: prompt template and first-token label logprobs (served by vLLM, in
  a Ray Data pool or behind an OpenAI-compatible endpoint).
"""
