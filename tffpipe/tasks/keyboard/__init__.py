"""The keyboard task: next-word prediction on each user's own text, in TFF's Stack Overflow layout."""
