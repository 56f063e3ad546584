"""The label vocabulary of every mask hnseg reads or writes (HECKTOR 2025 Task 1)."""

BACKGROUND, GTVP, GTVN = 0, 1, 2
LABELS = (BACKGROUND, GTVP, GTVN)  # the values a mask may hold, in output-channel order
LABEL_VALUES = frozenset(LABELS)
LABEL_NAMES = {GTVP: "GTVp", GTVN: "GTVn"}  # the lesion labels, as reports and pictures name them
