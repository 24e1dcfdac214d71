#!/usr/bin/env bash
# `tuili bench spec` with the n-gram proposer on chat prompts whose answer repeats a text of the prompt (quoting,
# rewriting, copying: where prompt lookup pays). Extra flags (model, device, k, --json ...) pass through.
python -m tuili.cli bench spec --speculative-method ngram --output-len 128 \
  --prompt "Repeat the following text exactly, word for word: The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night its light swept across the dark water, warning ships away from the rocks below. The keeper climbed the spiral stairs at sunset, trimmed the wick, and polished the great glass lens until it shone." \
  --prompt "Repeat the following text exactly, word for word: Bread has been baked for thousands of years. The first loaves were flat and hard, made from crushed grain and water and cooked on hot stones. Later, bakers learned that dough left to rest would rise, and that the bread made from it was lighter and kept for longer." \
  --prompt "Repeat the following text exactly, word for word: The river begins as a small spring high in the mountains. It runs over stones and under fallen trees, joined by other streams, until it becomes wide and slow in the valley, where farmers use its water for their fields and children swim in it on summer afternoons." \
  --prompt "Repeat the following text exactly, word for word: A good map shows only what the traveller needs. It leaves out the small details of every house and tree, and keeps the roads, the rivers, the towns and the hills, so that a person can find the way from one place to another without getting lost." \
  "$@"
