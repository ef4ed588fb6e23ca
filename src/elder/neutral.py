"""Neutral text that methods use to centre hidden states (ELDER's subject keys, the retrieve baseline's
prompt embeddings)."""

# Neutral sentences whose mean token state centres the states: raw hidden states share a large common direction (and
# a few massive activations) that would make every pair of tokens look alike.
CENTERING_TEXT = (
    "The weather was mild for most of the week.",
    "She opened the window and looked at the street below.",
    "Numbers can be added, subtracted, multiplied and divided.",
    "A small boat drifted slowly along the river.",
    "He said that the meeting would start after lunch.",
    "Most people drink water several times a day.",
    "The book on the table has a red cover.",
    "They walked home together when the film ended.",
    "Music was playing quietly in the next room.",
    "The price of bread rose again this year.",
    "Children learn to read at different ages.",
    "What time does the last train leave tonight?",
)
