"""What the profiles showed for each figure and what changed because of
them; written into the results next to the numbers they explain."""

NOTES: dict[str, str] = {}
